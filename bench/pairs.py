"""Add/remove pairs on one machine against the same work over raw QMP: the
loop, the figures, the report and the command line hotplug_share.py and
hotplug_net.py share (their target is AddDrive's, bench/README.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import Console, Env, bench_main, document, figures, ms, print_rows, row
from qemu.qmp import EventListener, QMPClient

from tests.integration.harness import Client, guest_options
from tests.integration.qmp_probe import Probe, address

SERIES = ("dbus", "raw")
# One pair: (repetition, idle seconds before the remove) -> ns taken by "add", "remove" (and, raw, "remove_full").
Op = Callable[[int, float], Awaitable[dict[str, int]]]


@dataclass(frozen=True)
class Labels:
    name: str
    add: str
    remove: str
    # What the raw add does, and what the daemon's remove does beyond the raw one (with {full}: raw doing it too).
    baseline: str
    remove_note: str


@dataclass(frozen=True)
class Booted:
    client: Client
    # The benchmark's own monitor on the machine's QEMU (and its Probe path).
    qmp: QMPClient
    monitor: Path
    path: str
    # The spare port kept for the raw path: the highest (the daemon takes the lowest free one).
    port: str


class Unplugs:
    """device_del on the benchmark's own monitor until its DEVICE_DELETED (listened for from the start)."""

    def __init__(self, qmp: QMPClient) -> None:
        self.qmp = qmp
        self.deleted = EventListener("DEVICE_DELETED")
        qmp.register_listener(self.deleted)

    async def device_del(self, dev: str) -> None:
        self.deleted.clear()
        await self.qmp.execute("device_del", {"id": dev})
        async with asyncio.timeout(30):
            while (await self.deleted.get()).get("data", {}).get("device") != dev:
                pass


@contextlib.asynccontextmanager
async def booted(env: Env, spares: int) -> AsyncIterator[Booted]:
    """The tiny guest booted with `spares` spare ports and a second monitor; all gone afterwards."""
    client = await Client.connect()
    qmp = QMPClient("bench")
    monitor = env.workdir / "bench.qmp"
    machine = ""
    try:
        options = guest_options(env.guest, hotplug_spares=spares, qemu_extra=Probe.extra(monitor))
        machine = await client.create("bench", **options)
        console = Console(await client.prop(machine, "ConsoleLog"))
        await console.wait("VMSPAWN-GUEST-READY", 0, timeout=120, poll=0.05)
        await qmp.connect(f"\0{address(monitor)}")
        port = [p for p in await client.prop(machine, "Ports") if p["role"] == "spare"][-1]["id"]
        yield Booted(client, qmp, monitor, machine, port)
    finally:
        await qmp.disconnect()
        if machine:
            await client.terminate_all()
        client.close()


async def alternate(ops: dict[str, Op], args: argparse.Namespace) -> dict[str, list[dict[str, int]]]:
    """--warmup + --reps pairs of each series, alternating which goes first, --settle idle before each."""
    samples: dict[str, list[dict[str, int]]] = {s: [] for s in SERIES}
    for i in range(args.warmup + args.reps):
        for name in SERIES if i % 2 == 0 else SERIES[::-1]:
            await asyncio.sleep(args.settle)
            took = await ops[name](i, args.settle)
            if i >= args.warmup:
                samples[name].append(took)
    return samples


def result(
    labels: Labels, samples: dict[str, list[dict[str, int]]], spares: int, port: str, args: argparse.Namespace
) -> dict[str, Any]:
    def series(name: str, what: str) -> list[int]:
        return [s[what] for s in samples[name]]

    add = {s: figures(series(s, "add")) for s in SERIES}
    dbus, raw = add["dbus"]["median_ms"], add["raw"]["median_ms"]
    limit = max(1.5 * raw, raw + 5.0)
    full = figures(series("raw", "remove_full"))["median_ms"]
    rows = [
        row(
            labels.add, "ms", ms(series("dbus", "add")), ms(series("raw", "add")), labels.baseline,
            "<= max(1.5x, +5 ms)", dbus <= limit, f"limit {limit:.2f} ms; D-Bus costs {dbus - raw:+.2f} ms",
            target_ratio=round(limit / raw, 3),
        ),
        row(
            labels.remove, "ms", ms(series("dbus", "remove")), ms(series("raw", "remove")),
            "raw QMP device_del until DEVICE_DELETED", note=labels.remove_note.format(full=f"{full:.2f} ms"),
        ),
    ]  # fmt: skip
    return document(
        labels.name,
        rows,
        accel="tcg",
        hotplug_spares=spares,
        raw_port=port,
        settle_s=args.settle,
        reps=args.reps,
        warmup_reps_not_counted=args.warmup,
        series=add,
        target="dbus median <= max(1.5 x raw median, raw median + 5 ms)",
        target_limit_ms=round(limit, 3),
        verdict="PASS" if dbus <= limit else "MISS",
    )


def main(name: str, doc: str | None, run: Callable[[Env, argparse.Namespace], Awaitable[dict[str, Any]]]) -> int:
    def report(r: dict[str, Any], out: Path) -> None:
        print(
            f"{name}: {r['reps']} reps per series (+{r['warmup_reps_not_counted']} warm-up not counted), "
            f"{r['settle_s']:g} s idle before each add and remove; QEMU {r['host']['qemu']} accel=tcg, "
            f"raw path on {r['raw_port']}; {r['duration_s']} s in all"
        )
        print_rows(r["rows"])
        print(f"  figures written to {out}")

    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--reps", type=int, default=10, help="counted repetitions per series (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="leading repetitions not counted (default 1)")
    parser.add_argument("--settle", type=float, default=0.3, help="idle seconds before each timed op (default 0.3)")
    return bench_main(name, parser, run, report, default_timeout=300)
