"""Share hotplug latency: D-Bus AddShare/RemoveShare versus the same work done over raw QMP.

One booted machine (tiny guest, accel=tcg, spare root ports) and, on the
same QEMU in the same run, alternating:

- dbus: AddShare(directory, {tag}) over D-Bus, from call to reply (the
        daemon opens the directory as the caller, starts virtiofsd, getfd,
        chardev-add, device_add vhost-user-fs-pci); RemoveShare(id), from
        call to reply (device_del, DEVICE_DELETED, chardev-remove, virtiofsd
        gone);
- raw:  over the benchmark's own QMP monitor, already connected: the
        directory opened the same way and virtiofsd started by the same
        launcher (vmspawnd.share.start), then getfd + chardev-add +
        device_add on a spare port the daemon is not using: the baseline;
        removal: device_del until DEVICE_DELETED (the baseline), then
        chardev-remove and virtiofsd's exit (timed separately, info).

Target: the same as AddDrive's (bench/README.md): dbus add median <=
max(1.5 x raw median, raw median + 5 ms). Removal has no target.

Run: .venv/bin/python bench/hotplug_share.py   (as root; about a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Console, Env, bench_main, document, figures, ms, print_rows, row
from qemu.qmp import EventListener, QMPClient

from tests.integration.harness import Client, guest_options
from tests.integration.qmp_probe import Probe, address
from vmspawnd import cmdline, share
from vmspawnd.process import Process

SERIES = ("dbus", "raw")
SPARES = 4
TAG = "bench"


class Bench:
    def __init__(self, env: Env, client: Client, qmp: QMPClient, machine: str, port: str, settle: float) -> None:
        self.env = env
        self.client = client
        self.qmp = qmp
        self.machine = machine
        self.port = port
        self.settle = settle
        self.deleted = EventListener("DEVICE_DELETED")
        qmp.register_listener(self.deleted)
        # root's share is nobody's in the guest: nobody must be able to enter it.
        self.dir = Path(tempfile.mkdtemp(prefix="share-", dir=env.workdir))
        self.dir.chmod(0o755)
        self.binary = share.need_virtiofsd()

    async def dbus(self, i: int) -> dict[str, int]:
        t0 = time.perf_counter_ns()
        share_id, port = await self.client.add_share(self.machine, str(self.dir), tag=f"{TAG}{i}")
        t1 = time.perf_counter_ns()
        if port == self.port:
            raise RuntimeError(f"the daemon put {share_id} on {port}, the port reserved for the raw path")
        await asyncio.sleep(self.settle)
        t2 = time.perf_counter_ns()
        await self.client.remove_share(self.machine, share_id)  # returns once the device and virtiofsd are gone
        t3 = time.perf_counter_ns()
        return {"add": t1 - t0, "remove": t3 - t2}

    async def raw(self, i: int) -> dict[str, int]:
        dev = f"benchfs{i}"
        chardev = f"{dev}-chr"
        log = self.env.workdir / f"virtiofsd-{dev}.log"
        t0 = time.perf_counter_ns()
        opened = await share.open_share(0, cmdline.Share(dev, self.dir, f"{TAG}raw{i}"))
        try:
            process, conn = await share.start(self.binary, opened, log, None, "bench")
        finally:
            os.close(opened.fd)
        try:
            self.qmp.send_fd_scm(conn)
            await self.qmp.execute("getfd", {"fdname": chardev})
        finally:
            os.close(conn)
        await self.qmp.execute("chardev-add", cmdline.fs_chardev(chardev))
        await self.qmp.execute("device_add", cmdline.fs_device(dev, chardev, opened.share.tag, self.port))
        t1 = time.perf_counter_ns()
        await asyncio.sleep(self.settle)
        self.deleted.clear()
        t2 = time.perf_counter_ns()
        await self.qmp.execute("device_del", {"id": dev})
        async with asyncio.timeout(30):
            while (await self.deleted.get()).get("data", {}).get("device") != dev:
                pass
        t3 = time.perf_counter_ns()
        await self.qmp.execute("chardev-remove", {"id": chardev})
        assert isinstance(process, Process)
        if not await process.wait(5):
            raise RuntimeError(f"virtiofsd of {dev} still runs after its chardev went")
        t4 = time.perf_counter_ns()
        return {"add": t1 - t0, "remove": t3 - t2, "remove_full": t4 - t2}

    async def check_clean(self) -> None:
        free = await self.client.prop(self.machine, "FreeSparePorts")
        shares = await self.client.prop(self.machine, "Shares")
        chardevs = [
            c["label"] for c in await self.qmp.execute("query-chardev") if c["label"].startswith(("bench", "share"))
        ]
        if free != SPARES or shares or chardevs:
            raise RuntimeError(f"leftovers: free={free}/{SPARES} shares={shares} chardevs={chardevs}")


async def run(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    client = await Client.connect()
    qmp = QMPClient("bench")
    monitor = env.workdir / "bench.qmp"
    machine = ""
    try:
        options = guest_options(env.guest, hotplug_spares=SPARES, qemu_extra=Probe.extra(monitor))
        machine = await client.create("bench", **options)
        console = Console(await client.prop(machine, "ConsoleLog"))
        await console.wait("VMSPAWN-GUEST-READY", 0, timeout=120, poll=0.05)
        await qmp.connect(f"\0{address(monitor)}")
        spares = [p for p in await client.prop(machine, "Ports") if p["role"] == "spare"]
        port = spares[-1]["id"]  # the daemon takes the lowest free spare; the raw path the highest
        bench = Bench(env, client, qmp, machine, port, args.settle)
        ops = {"dbus": bench.dbus, "raw": bench.raw}
        samples: dict[str, list[dict[str, int]]] = {s: [] for s in SERIES}
        for i in range(args.warmup + args.reps):
            # Alternate which series goes first.
            for name in SERIES if i % 2 == 0 else SERIES[::-1]:
                await asyncio.sleep(args.settle)
                took = await ops[name](i)
                if i >= args.warmup:
                    samples[name].append(took)
        await bench.check_clean()
    finally:
        await qmp.disconnect()
        if machine:
            await client.terminate_all()
        client.close()

    def series(name: str, what: str) -> list[int]:
        return [s[what] for s in samples[name]]

    add = {s: figures(series(s, "add")) for s in SERIES}
    dbus, raw = add["dbus"]["median_ms"], add["raw"]["median_ms"]
    limit = max(1.5 * raw, raw + 5.0)
    full = figures(series("raw", "remove_full"))["median_ms"]
    rows = [
        row(
            "AddShare (D-Bus) vs raw QMP virtiofsd+getfd+chardev-add+device_add",
            "ms",
            ms(series("dbus", "add")),
            ms(series("raw", "add")),
            "raw QMP on an open monitor, virtiofsd started by the same launcher",
            "<= max(1.5x, +5 ms)",
            dbus <= limit,
            f"limit {limit:.2f} ms; D-Bus costs {dbus - raw:+.2f} ms",
            target_ratio=round(limit / raw, 3),
        ),
        row(
            "RemoveShare (D-Bus) vs raw QMP device_del until DEVICE_DELETED",
            "ms",
            ms(series("dbus", "remove")),
            ms(series("raw", "remove")),
            "raw QMP device_del until DEVICE_DELETED",
            note=f"no target; RemoveShare also removes the chardev and waits for virtiofsd: raw with those {full:.2f} ms",
        ),
    ]
    return document(
        "hotplug_share",
        rows,
        accel="tcg",
        hotplug_spares=SPARES,
        raw_port=port,
        settle_s=args.settle,
        reps=args.reps,
        warmup_reps_not_counted=args.warmup,
        series=add,
        target="dbus median <= max(1.5 x raw median, raw median + 5 ms)",
        target_limit_ms=round(limit, 3),
        verdict="PASS" if dbus <= limit else "MISS",
    )


def report(r: dict[str, Any], out: Path) -> None:
    print(
        f"hotplug_share: {r['reps']} reps per series (+{r['warmup_reps_not_counted']} warm-up not counted), "
        f"{r['settle_s']:g} s idle before each add and remove; QEMU {r['host']['qemu']} accel=tcg, "
        f"raw path on {r['raw_port']}; {r['duration_s']} s in all"
    )
    print_rows(r["rows"])
    print(f"  figures written to {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=10, help="counted repetitions per series (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="leading repetitions not counted (default 1)")
    parser.add_argument("--settle", type=float, default=0.3, help="idle seconds before each timed op (default 0.3)")
    return bench_main("hotplug_share", parser, run, report, default_timeout=300)


if __name__ == "__main__":
    sys.exit(main())
