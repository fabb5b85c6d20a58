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

import pairs
from common import Env
from qemu.qmp import QMPClient

from tests.integration.harness import Client
from vmspawnd import cmdline, share
from vmspawnd.process import Process

SPARES = 4
TAG = "bench"
LABELS = pairs.Labels(
    "hotplug_share",
    "AddShare (D-Bus) vs raw QMP virtiofsd+getfd+chardev-add+device_add",
    "RemoveShare (D-Bus) vs raw QMP device_del until DEVICE_DELETED",
    "raw QMP on an open monitor, virtiofsd started by the same launcher",
    "no target; RemoveShare also removes the chardev and waits for virtiofsd: raw with those {full}",
)


class Bench:
    def __init__(self, env: Env, client: Client, qmp: QMPClient, machine: str, port: str) -> None:
        self.env = env
        self.client = client
        self.qmp = qmp
        self.machine = machine
        self.port = port
        self.unplugs = pairs.Unplugs(qmp)
        # root's share is nobody's in the guest: nobody must be able to enter it.
        self.dir = Path(tempfile.mkdtemp(prefix="share-", dir=env.workdir))
        self.dir.chmod(0o755)
        self.binary = share.need_virtiofsd()

    async def dbus(self, i: int, settle: float) -> dict[str, int]:
        t0 = time.perf_counter_ns()
        share_id, port = await self.client.add_share(self.machine, str(self.dir), tag=f"{TAG}{i}")
        t1 = time.perf_counter_ns()
        if port == self.port:
            raise RuntimeError(f"the daemon put {share_id} on {port}, the port reserved for the raw path")
        await asyncio.sleep(settle)
        t2 = time.perf_counter_ns()
        await self.client.remove_share(self.machine, share_id)  # returns once the device and virtiofsd are gone
        t3 = time.perf_counter_ns()
        return {"add": t1 - t0, "remove": t3 - t2}

    async def raw(self, i: int, settle: float) -> dict[str, int]:
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
        await asyncio.sleep(settle)
        t2 = time.perf_counter_ns()
        await self.unplugs.device_del(dev)
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
    async with pairs.booted(env, SPARES) as m:
        bench = Bench(env, m.client, m.qmp, m.path, m.port)
        samples = await pairs.alternate({"dbus": bench.dbus, "raw": bench.raw}, args)
        await bench.check_clean()
    return pairs.result(LABELS, samples, SPARES, m.port, args)


def main() -> int:
    return pairs.main("hotplug_share", __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
