"""Throughput: AddDrive/RemoveDrive pairs across booted machines with several requests in flight.

4 machines (tiny guest, accel=tcg, booted until VMSPAWN-GUEST-READY), 8
workers (2 per machine), 100 pairs per round: a worker takes the next pair,
adds a 1 MiB raw disk and removes it again, until the round's pairs are done.

- ours:     AddDrive then RemoveDrive over D-Bus (one dbus-fast connection).
- baseline: the same pairs with raw QMP on the same machines, same workers,
            over a second QMP monitor per machine (qemu_extra `-qmp`):
            open + add-fd + blockdev-add + device_add on a spare port the
            daemon does not use, then device_del until DEVICE_DELETED
            (+ blockdev-del + remove-fd, untimed for the latency but inside
            the round's wall time). fd passing is locked per monitor (QEMU
            keeps one passed fd per connection); nothing else is.

Figures per round: requests per second (2 x pairs / wall time) and the p99
request latency (nearest rank over all 2 x pairs requests). Rounds run in
the order ours, raw, raw, ours, ours, raw (3 each by default), after one
warm-up round per series that is not counted. The issue sets no target for
these: they are reported as info.

Run: .venv/bin/python bench/throughput.py   (as root; about a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from common import Console, Env, bench_main, document, make_disk, ms, percentile, print_rows, row, stats
from dbus_fast import DBusError
from qemu.qmp import EventListener, ExecuteError, QMPClient

from tests.integration.harness import Client, guest_options
from tests.integration.qmp_probe import Probe, address
from vmspawnd.cmdline import BOOT_FDSETS

FDSET_BASE = 20_000


class RawMachine:
    """The benchmark's own QMP monitor on one machine; DEVICE_DELETED routed to whoever waits for it."""

    def __init__(self, name: str, ports: list[str]) -> None:
        self.qmp = QMPClient(name)
        self.ports = ports
        self.fd_lock = asyncio.Lock()
        self.waiters: dict[str, asyncio.Future[None]] = {}
        # Devices that went without our device_del (the guest ejected them).
        self.gone: set[str] = set()
        self.listener = EventListener("DEVICE_DELETED")
        self.qmp.register_listener(self.listener)
        self.task: asyncio.Task[None] | None = None

    async def connect(self, path: Path) -> None:
        # An abstract socket: the confined QEMU may create nothing in our dirs.
        await self.qmp.connect(f"\0{address(path)}")
        self.task = asyncio.get_running_loop().create_task(self._events())

    async def _events(self) -> None:
        while True:
            event = await self.listener.get()
            dev = event.get("data", {}).get("device")
            if not dev:
                continue
            waiter = self.waiters.pop(dev, None)
            if waiter is None:
                self.gone.add(dev)
            elif not waiter.done():
                waiter.set_result(None)

    async def add(self, dev: str, path: str, port: str, fdset: int, serial: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            async with self.fd_lock:
                self.qmp.send_fd_scm(fd)
                await self.qmp.execute("add-fd", {"fdset-id": fdset})
        finally:
            os.close(fd)
        node = f"{dev}-node"
        await self.qmp.execute(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": node,
                "read-only": False,
                "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}", "read-only": False},
            },
        )
        await self.qmp.execute(
            "device_add",
            {"driver": "virtio-blk-pci", "id": dev, "drive": node, "bus": port, "addr": "0", "serial": serial},
        )

    async def remove(self, dev: str, fdset: int) -> int:
        """ns from device_del to DEVICE_DELETED; blockdev-del and remove-fd follow, untimed."""
        waiter = self.waiters[dev] = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter_ns()
        try:
            await self.qmp.execute("device_del", {"id": dev})
        except ExecuteError:
            self.waiters.pop(dev, None)
            raise
        await asyncio.wait_for(waiter, 10)
        took = time.perf_counter_ns() - t0
        await self.qmp.execute("blockdev-del", {"node-name": f"{dev}-node"})
        await self.qmp.execute("remove-fd", {"fdset-id": fdset})
        return took

    async def cleanup(self, dev: str, fdset: int) -> None:
        """After the guest ejected `dev` on its own: its node and fdset go too."""
        self.waiters.pop(dev, None)
        await self.qmp.execute("blockdev-del", {"node-name": f"{dev}-node"})
        await self.qmp.execute("remove-fd", {"fdset-id": fdset})

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.qmp.disconnect()


async def run(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    per_machine = -(-args.inflight // args.machines)
    if args.spares < 2 * per_machine:
        raise SystemExit(f"--spares must be at least {2 * per_machine} (ports for the daemon and the raw path)")
    client = await Client.connect()
    raws: list[RawMachine] = []
    fdsets = itertools.count(FDSET_BASE)
    try:
        names = [f"tp{m}" for m in range(args.machines)]
        monitors = [env.workdir / f"{n}.qmp" for n in names]
        t0 = time.monotonic()
        paths = await asyncio.gather(
            *(
                client.create(
                    n,
                    **guest_options(
                        env.guest,
                        hotplug_spares=args.spares,
                        qemu_extra=Probe.extra(mon),
                    ),
                )
                for n, mon in zip(names, monitors, strict=True)
            )
        )
        consoles = [Console(await client.prop(p, "ConsoleLog")) for p in paths]
        await asyncio.gather(*(c.wait("VMSPAWN-GUEST-READY", 0, timeout=240, poll=0.1) for c in consoles))
        boot_s = time.monotonic() - t0
        print(f"throughput: {args.machines} machines booted in {boot_s:.1f} s", flush=True)
        reserved = []
        for n, p, mon in zip(names, paths, monitors, strict=True):
            spares = [port["id"] for port in await client.prop(p, "Ports") if port["role"] == "spare"]
            raw = RawMachine(n, spares[-per_machine:])  # the daemon takes the lowest free spares
            await raw.connect(mon)
            raws.append(raw)
            reserved.append(set(raw.ports))
        files = [make_disk(env.workdir / f"w{w}.raw") for w in range(args.inflight)]

        async def round_(series: str, pairs: int, tag: str) -> dict[str, Any]:
            todo = iter(range(pairs))
            adds: list[int] = []
            removes: list[int] = []

            lost: list[str] = []

            async def seen(console: Console, pattern: str, mark: int) -> re.Match[str] | None:
                try:
                    match, _ = await console.wait(pattern, mark, timeout=args.guest_timeout, poll=0.005)
                except RuntimeError:
                    return None
                return match

            async def pair_ours(w: int, m: int, serial: str) -> None:
                console = consoles[m]
                mark = console.mark()
                t0 = time.perf_counter_ns()
                # An explicit, never reused id: the daemon re-uses its own diskN ids at once,
                # so after the guest ejected a disk its id may already name another worker's.
                drive_id, port = await client.add_drive(paths[m], files[w], serial=serial, id=serial)
                adds.append(time.perf_counter_ns() - t0)
                if port in reserved[m]:
                    raise RuntimeError(f"the daemon used {port}, reserved for the raw path")
                # The guest sees the disk before it goes, and sees it gone before the
                # next one comes on that port.
                match = await seen(console, rf"VMSPAWN-BLOCK-ADD (vd[a-z]+) serial={serial}\s", mark)
                if match is None:
                    if drive_id in [d["id"] for d in await client.prop(paths[m], "Drives")]:
                        raise RuntimeError(f"the guest of {names[m]} never reported {drive_id} ({serial})")
                    lost.append(f"{names[m]}:{drive_id}:{serial} gone before the guest reported it")
                    return
                mark = console.mark()
                t0 = time.perf_counter_ns()
                try:
                    await client.remove_drive(paths[m], drive_id)
                except DBusError as e:
                    if drive_id in [d["id"] for d in await client.prop(paths[m], "Drives")]:
                        raise
                    lost.append(f"{names[m]}:{drive_id}:{serial} gone before RemoveDrive: {e.text}")
                    return
                removes.append(time.perf_counter_ns() - t0)
                if await seen(console, rf"VMSPAWN-BLOCK-REMOVE {match.group(1)}\s", mark) is None:
                    raise RuntimeError(f"the guest of {names[m]} never reported {match.group(1)} gone")

            async def pair_raw(w: int, m: int, serial: str, dev: str) -> None:
                console, raw, fdset = consoles[m], raws[m], next(fdsets)
                mark = console.mark()
                t0 = time.perf_counter_ns()
                await raw.add(dev, files[w], raw.ports[w // args.machines], fdset, serial)
                adds.append(time.perf_counter_ns() - t0)
                match = await seen(console, rf"VMSPAWN-BLOCK-ADD (vd[a-z]+) serial={serial}\s", mark)
                if match is None:
                    if dev not in raw.gone:
                        raise RuntimeError(f"the guest of {names[m]} never reported {dev} ({serial})")
                    lost.append(f"{names[m]}:{dev}:{serial} gone before the guest reported it")
                    await raw.cleanup(dev, fdset)
                    return
                mark = console.mark()
                try:
                    removes.append(await raw.remove(dev, fdset))
                except ExecuteError as e:
                    if dev not in raw.gone:
                        raise
                    lost.append(f"{names[m]}:{dev}:{serial} gone before device_del: {e}")
                    await raw.cleanup(dev, fdset)
                    return
                if await seen(console, rf"VMSPAWN-BLOCK-REMOVE {match.group(1)}\s", mark) is None:
                    raise RuntimeError(f"the guest of {names[m]} never reported {match.group(1)} gone")

            async def worker(w: int) -> None:
                m = w % args.machines
                for j in todo:
                    if series == "ours":
                        await pair_ours(w, m, f"{tag}w{w}p{j}")
                    else:
                        await pair_raw(w, m, f"{tag}w{w}p{j}", f"{tag}x{j}")

            t0 = time.perf_counter_ns()
            await asyncio.gather(*(worker(w) for w in range(args.inflight)))
            wall = (time.perf_counter_ns() - t0) / 1e9
            latencies = [v / 1e6 for v in adds + removes]
            return {
                "series": series,
                "pairs": pairs,
                "requests": len(latencies),
                "wall_s": round(wall, 3),
                "req_s": round(len(latencies) / wall, 2),
                "p99_ms": round(percentile(latencies, 99), 3),
                "add": ms(adds),
                "remove": ms(removes),
                "lost": lost,
            }

        kinds = ("ours", "raw") if args.series == "both" else (args.series,)
        warmup = [await round_(s, args.inflight, f"w{s[0]}") for s in kinds]
        order = list(itertools.islice(itertools.cycle(kinds + kinds[::-1]), len(kinds) * args.rounds))
        rounds = []
        for k, series in enumerate(order):
            await asyncio.sleep(args.settle)
            r = await round_(series, args.pairs, f"r{k}")
            print(
                f"throughput: round {k + 1}/{len(order)} {series:<4} {r['req_s']:7.1f} req/s  p99 {r['p99_ms']:7.1f} ms"
                f"  ({r['wall_s']:.1f} s; {len(r['lost'])} disks ejected by the guest on its own)",
                flush=True,
            )
            for what in r["lost"]:
                print(f"    {what}", flush=True)
            rounds.append(r)
        for p in paths:
            free = await client.prop(p, "FreeSparePorts")
            drives = await client.prop(p, "Drives")
            if free != args.spares or drives:
                raise RuntimeError(f"leftovers on {p}: free={free}/{args.spares} drives={drives}")
        for raw in raws:
            if fds := [f for f in await raw.qmp.execute("query-fdsets") if f["fdset-id"] < BOOT_FDSETS]:
                raise RuntimeError(f"leftover fdsets on {raw.qmp.name}: {fds}")
    finally:
        for raw in raws:
            await raw.close()
        await client.terminate_all()
        client.close()

    def pick(series: str, key: str) -> dict[str, Any] | None:
        values = [r[key] for r in rounds if r["series"] == series]
        return stats(values) if values else None

    def lost(series: str) -> int:
        return sum(len(r["lost"]) for r in rounds if r["series"] == series)

    label = f"{args.pairs} AddDrive+RemoveDrive pairs, {args.machines} booted machines, {args.inflight} in flight"
    raw_label = f"raw QMP, same pairs, machines and {args.inflight} workers"
    rows = [
        row(
            f"Throughput, {label} (higher is better)",
            "req/s",
            pick("ours", "req_s"),
            pick("raw", "req_s"),
            raw_label,
            note=(
                f"no target in the issue; {args.rounds} rounds per series (median, min-max over rounds); "
                f"disks the guest ejected on its own (pair cut short): ours {lost('ours')}, raw {lost('raw')}"
            ),
        ),
        row(
            f"p99 request latency, {label}",
            "ms",
            pick("ours", "p99_ms"),
            pick("raw", "p99_ms"),
            raw_label + " (remove timed until DEVICE_DELETED)",
            note="no target in the issue; per round: nearest-rank p99 of all add and remove requests",
        ),
    ]
    return document(
        "throughput",
        rows,
        machines=args.machines,
        inflight=args.inflight,
        pairs=args.pairs,
        rounds_per_series=args.rounds,
        hotplug_spares=args.spares,
        boot_s=round(boot_s, 2),
        order=order,
        warmup_rounds_not_counted=warmup,
        round_figures=rounds,
    )


def report(r: dict[str, Any], out: Path) -> None:
    print(
        f"throughput: {r['pairs']} pairs per round, {r['rounds_per_series']} rounds per series "
        f"(+1 warm-up round each, not counted), {r['machines']} machines, {r['inflight']} in flight; "
        f"{r['duration_s']} s in all"
    )
    print_rows(r["rows"])
    print(f"  figures written to {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=100, help="add/remove pairs per round (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds per series (default 3)")
    parser.add_argument("--machines", type=int, default=4, help="booted machines (default 4)")
    parser.add_argument("--inflight", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--spares", type=int, default=4, help="hotplug_spares per machine (default 4)")
    parser.add_argument("--series", choices=("both", "ours", "raw"), default="both", help="(debugging) run one series")
    parser.add_argument(
        "--guest-timeout", type=float, default=15, help="seconds to wait for the guest's console lines (default 15)"
    )
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before each round (default 1)")
    return bench_main("throughput", parser, run, report, default_timeout=420)


if __name__ == "__main__":
    sys.exit(main())
