"""NIC hotplug latency: D-Bus AddNetwork/RemoveNetwork versus netdev_add + device_add over raw QMP.

One booted machine (tiny guest, accel=tcg, spare root ports) and, on the
same QEMU in the same run, alternating:

- dbus: AddNetwork({network: user}) over D-Bus, from call to reply (the
        daemon authorizes, validates, takes a port, netdev_add user,
        device_add virtio-net-pci with its derived MAC); RemoveNetwork(id),
        from call to reply (device_del, DEVICE_DELETED, netdev_del);
- raw:  over the benchmark's own QMP monitor, already connected:
        netdev_add user + device_add virtio-net-pci (the same arguments,
        vmspawnd.nic) on a spare port the daemon is not using: the
        baseline; removal: device_del until DEVICE_DELETED (the baseline),
        then netdev_del (timed separately, info).

Target: the same as AddDrive's (bench/README.md): dbus add median <=
max(1.5 x raw median, raw median + 5 ms). Removal has no target.

Run: .venv/bin/python bench/hotplug_net.py   (as root; about a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import pairs
from common import Env
from dbus_fast import Variant
from qemu.qmp import QMPClient

from tests.integration.harness import Client
from tests.integration.qmp_probe import netdev_ids
from vmspawnd import nic
from vmspawnd.bus import MACHINE_IFACE

SPARES = 4
USER = {"network": Variant("s", "user")}
LABELS = pairs.Labels(
    "hotplug_net",
    "AddNetwork (D-Bus) vs raw QMP netdev_add+device_add",
    "RemoveNetwork (D-Bus) vs raw QMP device_del until DEVICE_DELETED",
    "raw QMP on an open monitor, the same netdev and device arguments",
    "no target; RemoveNetwork also does netdev_del before replying: raw with it {full}",
)


class Bench:
    def __init__(self, client: Client, qmp: QMPClient, machine: str, machine_id: str, port: str) -> None:
        self.client = client
        self.qmp = qmp
        self.machine = machine
        self.machine_id = machine_id
        self.port = port
        self.unplugs = pairs.Unplugs(qmp)

    async def call(self, method: str, signature: str, body: list[Any]) -> list[Any]:
        return await self.client.call(method, signature, body, path=self.machine, interface=MACHINE_IFACE)

    async def dbus(self, i: int, settle: float) -> dict[str, int]:
        t0 = time.perf_counter_ns()
        nic_id, port = await self.call("AddNetwork", "a{sv}", [USER])
        t1 = time.perf_counter_ns()
        if port == self.port:
            raise RuntimeError(f"the daemon put {nic_id} on {port}, the port reserved for the raw path")
        await asyncio.sleep(settle)
        t2 = time.perf_counter_ns()
        await self.call("RemoveNetwork", "s", [nic_id])  # returns once the device and its netdev are gone
        t3 = time.perf_counter_ns()
        return {"add": t1 - t0, "remove": t3 - t2}

    async def raw(self, i: int, settle: float) -> dict[str, int]:
        dev = f"benchnic{i}"
        t0 = time.perf_counter_ns()
        await self.qmp.execute("netdev_add", nic.netdev_user(dev))
        await self.qmp.execute("device_add", nic.device(dev, nic.default_mac(self.machine_id, dev), self.port))
        t1 = time.perf_counter_ns()
        await asyncio.sleep(settle)
        t2 = time.perf_counter_ns()
        await self.unplugs.device_del(dev)
        t3 = time.perf_counter_ns()
        await self.qmp.execute("netdev_del", {"id": dev})
        t4 = time.perf_counter_ns()
        return {"add": t1 - t0, "remove": t3 - t2, "remove_full": t4 - t2}

    async def check_clean(self) -> None:
        free = await self.client.prop(self.machine, "FreeSparePorts")
        nics = await self.client.prop(self.machine, "Networks")
        # On our own connection: the probe monitor takes one client at a time.
        listing = await self.qmp.execute("human-monitor-command", {"command-line": "info network"})
        netdevs = {n for n in netdev_ids(str(listing)) if n.startswith(("bench", "nic"))}
        if free != SPARES or nics or netdevs:
            raise RuntimeError(f"leftovers: free={free}/{SPARES} networks={nics} netdevs={netdevs}")


async def run(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    async with pairs.booted(env, SPARES) as m:
        bench = Bench(m.client, m.qmp, m.path, await m.client.prop(m.path, "Id"), m.port)
        samples = await pairs.alternate({"dbus": bench.dbus, "raw": bench.raw}, args)
        await bench.check_clean()
    return pairs.result(LABELS, samples, SPARES, m.port, args)


def main() -> int:
    return pairs.main("hotplug_net", __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
