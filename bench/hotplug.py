"""Hotplug latency: D-Bus AddDrive versus the same QMP commands sent directly.

One machine (tiny guest, accel=tcg, spare root ports) and, on the same QEMU
in the same run, alternating:

- dbus:     AddDrive(path, {}) over D-Bus, from call to reply
            (the daemon opens the file, add-fd, blockdev-add, device_add);
- raw-fd:   over the benchmark's own QMP monitor, already connected:
            open + add-fd + blockdev-add (raw over file on /dev/fdset/N)
            + device_add virtio-blk-pci on a spare port the daemon is not
            using; the same QMP work the daemon does, so this is the baseline;
- raw-file: the same with blockdev-add opening the path itself (no fd
            passing); informational only, not the baseline.

After each timed add the guest must report the disk on its console, then the
disk is removed (not timed) and the guest must report it gone. Each timed
add starts after --settle seconds of idling (default 0.3), the same for every
series: on a small host the guest's own reaction to the previous hotplug
otherwise competes for the CPUs and mostly adds noise.

Target: dbus median <= max(1.5 x raw-fd median, raw-fd median + 5 ms).

Run: .venv/bin/python bench/hotplug.py   (as root; about a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common import RESULTS, Env, environment, figures
from qemu.qmp import EventListener, QMPClient

from tests.integration.harness import Client, guest_options, wait_console

ADDED = r"VMSPAWN-BLOCK-ADD (vd[a-z]+) "
SERIES = ("dbus", "raw-fd", "raw-file")
LABELS = {
    "dbus": "D-Bus AddDrive",
    "raw-fd": "raw QMP, add-fd (baseline)",
    "raw-file": "raw QMP, file driver (info)",
}
# The raw path's fdset ids: far above the daemon's (it counts from 1).
FDSET_BASE = 10_000


def make_disk(path: Path, size: int = 1 << 20) -> str:
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    return str(path)


class Bench:
    def __init__(self, env: Env, client: Client, qmp: QMPClient, machine: str, console: Path, port: str) -> None:
        self.env = env
        self.client = client
        self.qmp = qmp
        self.machine = machine
        self.console = console
        self.port = port
        self.deleted = EventListener("DEVICE_DELETED")
        qmp.register_listener(self.deleted)
        self.files = {name: make_disk(env.workdir / f"{name}.raw") for name in SERIES}

    def mark(self) -> int:
        return len(self.console.read_text(errors="replace"))

    async def seen_added(self, mark: int) -> str:
        return (await wait_console(self.console, ADDED, timeout=30, start=mark)).group(1)

    async def seen_removed(self, name: str, mark: int) -> None:
        await wait_console(self.console, rf"VMSPAWN-BLOCK-REMOVE {name}\s", timeout=30, start=mark)

    async def dbus(self, i: int) -> int:
        mark = self.mark()
        t0 = time.perf_counter_ns()
        drive_id, port = await self.client.add_drive(self.machine, self.files["dbus"])
        elapsed = time.perf_counter_ns() - t0
        if port == self.port:
            raise RuntimeError(f"the daemon put {drive_id} on {port}, the port reserved for the raw path")
        name = await self.seen_added(mark)
        mark = self.mark()
        await self.client.remove_drive(self.machine, drive_id)  # returns on DEVICE_DELETED, node and fdset gone
        await self.seen_removed(name, mark)
        return elapsed

    async def raw_fd(self, i: int) -> int:
        return await self.raw(i, pass_fd=True)

    async def raw_file(self, i: int) -> int:
        return await self.raw(i, pass_fd=False)

    async def raw(self, i: int, pass_fd: bool) -> int:
        dev = f"bench{i}{'fd' if pass_fd else 'file'}"
        node = f"{dev}-node"
        fdset = FDSET_BASE + i
        path = self.files["raw-fd" if pass_fd else "raw-file"]
        mark = self.mark()
        t0 = time.perf_counter_ns()
        if pass_fd:
            # What the daemon does for a root caller: open, hand over, close.
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
            try:
                self.qmp.send_fd_scm(fd)
                await self.qmp.execute("add-fd", {"fdset-id": fdset})
            finally:
                os.close(fd)
            path = f"/dev/fdset/{fdset}"
        await self.qmp.execute(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": node,
                "read-only": False,
                "file": {"driver": "file", "filename": path, "read-only": False},
            },
        )
        await self.qmp.execute(
            "device_add", {"driver": "virtio-blk-pci", "id": dev, "drive": node, "bus": self.port, "addr": "0"}
        )
        elapsed = time.perf_counter_ns() - t0
        name = await self.seen_added(mark)
        mark = self.mark()
        self.deleted.clear()
        await self.qmp.execute("device_del", {"id": dev})
        async with asyncio.timeout(10):
            while (await self.deleted.get()).get("data", {}).get("device") != dev:
                pass
        await self.qmp.execute("blockdev-del", {"node-name": node})
        if pass_fd:
            await self.qmp.execute("remove-fd", {"fdset-id": fdset})
        await self.seen_removed(name, mark)
        return elapsed

    async def check_clean(self, spares: int) -> None:
        """Nothing left behind by either path (else the figures are suspect)."""
        free = await self.client.prop(self.machine, "FreeSparePorts")
        drives = await self.client.prop(self.machine, "Drives")
        nodes = [n["node-name"] for n in await self.qmp.execute("query-named-block-nodes")]
        fdsets = await self.qmp.execute("query-fdsets")
        ours = [n for n in nodes if n.startswith(("bench", "disk"))]
        if free != spares or drives or ours or fdsets:
            raise RuntimeError(f"leftovers: free={free}/{spares} drives={drives} nodes={ours} fdsets={fdsets}")


async def run(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    client = await Client.connect()
    qmp = QMPClient("bench")
    monitor = env.workdir / "bench.qmp"
    machine = ""
    try:
        options = guest_options(
            env.guest, hotplug_spares=args.spares, qemu_extra=["-qmp", f"unix:{monitor},server=on,wait=off"]
        )
        t0 = time.monotonic()
        machine = await client.create("bench", **options)
        console = Path(await client.prop(machine, "ConsoleLog"))
        await wait_console(console, "VMSPAWN-GUEST-READY", timeout=90)
        boot_s = time.monotonic() - t0
        await qmp.connect(str(monitor))
        version = (await qmp.execute("query-version"))["qemu"]
        spares = [p for p in await client.prop(machine, "Ports") if p["role"] == "spare"]
        port = spares[-1]  # the daemon takes the lowest free spare; the raw path the highest
        if port["device"]:
            raise RuntimeError(f"spare {port['id']} is in use by {port['device']}")
        bench = Bench(env, client, qmp, machine, console, port["id"])
        ops: dict[str, Callable[[int], Awaitable[int]]] = {
            "dbus": bench.dbus,
            "raw-fd": bench.raw_fd,
            "raw-file": bench.raw_file,
        }
        samples: dict[str, list[int]] = {s: [] for s in SERIES}
        warmup: dict[str, list[int]] = {s: [] for s in SERIES}
        order_log = []
        for i in range(args.warmup + args.reps):
            # Rotate the order so each series runs first, second and third equally often.
            k = i % len(SERIES)
            order = SERIES[k:] + SERIES[:k]
            order_log.append(list(order))
            for series in order:
                await asyncio.sleep(args.settle)
                took = await ops[series](i)
                (warmup if i < args.warmup else samples)[series].append(took)
        await bench.check_clean(len(spares))
    finally:
        await qmp.disconnect()
        if machine:
            await client.terminate_all()
        client.close()

    result = {s: figures(samples[s]) for s in SERIES}
    dbus, raw = result["dbus"]["median_ms"], result["raw-fd"]["median_ms"]
    limit = max(1.5 * raw, raw + 5.0)
    return {
        "benchmark": "hotplug",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": ".venv/bin/python bench/hotplug.py",
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "qemu": f"{version['major']}.{version['minor']}.{version['micro']}",
        "accel": "tcg",
        "hotplug_spares": args.spares,
        "raw_port": port["id"],
        "disk": "raw file, 1 MiB, virtio-blk",
        "boot_s": round(boot_s, 2),
        "settle_s": args.settle,
        "reps": args.reps,
        "warmup_reps_not_counted": args.warmup,
        "order": "rotated per repetition: " + ", ".join("/".join(o) for o in order_log[:3]),
        "series": result,
        "warmup_ms": {s: [round(v / 1e6, 3) for v in warmup[s]] for s in SERIES},
        "baseline": "raw-fd",
        "ratio_dbus_over_raw": round(dbus / raw, 3),
        "extra_ms_dbus_over_raw": round(dbus - raw, 3),
        "ratio_dbus_over_raw_file": round(dbus / result["raw-file"]["median_ms"], 3),
        "target": "dbus median <= max(1.5 x raw-fd median, raw-fd median + 5 ms)",
        "target_limit_ms": round(limit, 3),
        "verdict": "PASS" if dbus <= limit else "MISS",
    }


def report(r: dict[str, Any], out: Path) -> None:
    print(
        f"hotplug: {r['reps']} reps per series (+{r['warmup_reps_not_counted']} warm-up not counted), "
        f"order rotated, {r['settle_s']:g} s idle before each; one machine, QEMU {r['qemu']} accel=tcg, {r['host']['cpus']} host CPUs, "
        f"guest boot {r['boot_s']} s; raw path on {r['raw_port']}"
    )
    for s in SERIES:
        f = r["series"][s]
        print(
            f"  {LABELS[s]:<30} median {f['median_ms']:8.2f} ms   min {f['min_ms']:8.2f} ms   max {f['max_ms']:8.2f} ms"
        )
    print(
        f"  ratio D-Bus/raw-fd (medians): {r['ratio_dbus_over_raw']:.2f}  "
        f"(D-Bus costs {r['extra_ms_dbus_over_raw']:+.2f} ms; D-Bus/raw-file {r['ratio_dbus_over_raw_file']:.2f})"
    )
    print(
        f"  target: D-Bus median {r['series']['dbus']['median_ms']:.2f} ms <= "
        f"max(1.5 x raw, raw + 5 ms) = {r['target_limit_ms']:.2f} ms -> {r['verdict']}"
    )
    print(f"  figures written to {out}")


async def main_async(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with asyncio.timeout(args.timeout):
        return await run(env, args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=15, help="counted repetitions per series (default 15)")
    parser.add_argument("--warmup", type=int, default=1, help="leading repetitions not counted (default 1)")
    parser.add_argument("--spares", type=int, default=12, help="hotplug_spares of the machine (default 12)")
    parser.add_argument("--settle", type=float, default=0.3, help="idle seconds before each timed add (default 0.3)")
    parser.add_argument("--timeout", type=float, default=240, help="give up after this many seconds")
    parser.add_argument("--json", type=Path, default=RESULTS / "hotplug.json", help="where the figures go")
    args = parser.parse_args()
    if args.reps < 1 or args.warmup < 0 or args.spares < 2:
        parser.error("need --reps >= 1, --warmup >= 0 and --spares >= 2")
    # SIGTERM stops the run like Ctrl-C: everything started is torn down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with environment() as env:
            try:
                result = asyncio.run(main_async(env, args))
            finally:
                # Closing the event loop reset SIGTERM to its default.
                signal.signal(signal.SIGTERM, signal.default_int_handler)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("hotplug: interrupted; machine, daemon and bus are stopped", file=sys.stderr)
        return 130
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
