"""Live migration between two daemons on this host (two private buses).

The stream is a socketpair the test connects, as nova-compute connects a
TCP socket between two hosts: neither daemon nor QEMU opens a network
connection. The tiny guest prints its uptime twice a second (tinyguest.tick):
ticks that go on at the destination with a larger uptime, and no second
READY, show the guest moved without a reboot.
"""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Variant

from .harness import Client, Site, guest_options, not_just_logs, qemu_pids, wait_console

MACHINE = "org.vmspawnd1.Machine"
E = "org.vmspawnd1.Error."
TICK = r"VMSPAWN-TICK (\d+\.\d+)"
# Slow enough that the cancel lands while the stream is still going.
SLOW = 1 << 20


async def wait_prop(client: Client, path: str, name: str, wanted: set[str], timeout: float = 60) -> str:
    """Poll a property until it is one of `wanted` (MIGRATION statuses come as PropertiesChanged; polling is simpler)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (value := await client.prop(path, name)) not in wanted:
        assert loop.time() < deadline, f"{name} of {path} is {value!r}, never one of {wanted}"
        await asyncio.sleep(0.05)
    return str(value)


async def last_tick(log: str) -> float:
    text = Path(log).read_text(errors="replace")
    return float(re.findall(TICK, text)[-1])


class Pair:
    """One migration's two ends: Migrate at `src`, Incoming at `dst`, over a socketpair."""

    def __init__(self, source: Client, src: str, target: Client, dst: str) -> None:
        self.source, self.src, self.target, self.dst = source, src, target, dst

    async def run(self, migrate: dict[str, Variant], force: bool = False, cancel: bool = False) -> list[Any]:
        a, b = socket.socketpair()
        with a, b:
            out = asyncio.ensure_future(
                self.source.call(
                    "Migrate", "ha{sv}", [0, migrate], path=self.src, interface=MACHINE, unix_fds=[a.fileno()]
                )
            )
            into = asyncio.ensure_future(
                self.target.call("Incoming", "ha{sv}", [0, {}], path=self.dst, interface=MACHINE, unix_fds=[b.fileno()])
            )
            # Data reached the destination's QEMU: both daemons handed on their ends.
            await wait_prop(self.target, self.dst, "Migration", {"active", "completed"})
        # Only QEMU's copies keep the stream open now: a cancel closing one ends it for the other.
        if force:
            await self.source.call("ForceCompleteMigration", path=self.src, interface=MACHINE)
            assert await self.source.prop(self.src, "State") == "paused"
        if cancel:
            await self.source.call("CancelMigration", path=self.src, interface=MACHINE)
        return list(await asyncio.gather(out, into, return_exceptions=True))


async def incoming(client: Client, options: dict[str, Any]) -> str:
    path = await client.create("mover", **options, incoming=True)
    assert await client.prop(path, "State") == "incoming"
    return path


async def test_a_guest_migrates_between_daemons_and_back_a_cancel_leaves_it_at_the_source(
    client: Client, site: Site, site_client: Client, guest: Any, tmp_path: Path
) -> None:
    disk = tmp_path / "shared.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    # 128 MiB: a migration reads every page of guest memory, so all of it becomes resident (and
    # counts against the machine's cgroup limit, which 256 MiB with the boot files' copies exceeds).
    options = guest_options(guest, cmdline=guest.cmdline + " tinyguest.tick", hotplug_spares=2, memory=128 << 20)
    src = await client.create("mover", **options)
    log = await client.prop(src, "ConsoleLog")
    await wait_console(log, TICK, timeout=90)
    with pytest.raises(DBusError) as e:
        await client.call("ForceCompleteMigration", path=src, interface=MACHINE)
    assert e.value.type == E + "NotMigrating"
    # A hotplugged drive on shared storage: the destination boots it on the same port.
    (drive, port) = await client.call(
        "AddDrive", "sa{sv}", [str(disk), {"serial": Variant("s", "migdisk")}], path=src, interface=MACHINE
    )
    await wait_console(log, "VMSPAWN-BLOCK-ADD .* serial=migdisk")
    at_b = options | {"plugged": [{"id": drive, "path": str(disk), "port": port, "serial": "migdisk"}]}

    # A cancel: the guest runs on at the source, the destination is gone with everything it had.
    dst = await incoming(site_client, at_b)
    out, into = await Pair(client, src, site_client, dst).run({"max_bandwidth": Variant("t", SLOW)}, cancel=True)
    assert isinstance(out, DBusError) and out.type == E + "MigrationFailed", out
    assert isinstance(into, DBusError) and into.type == E + "MigrationFailed", into
    assert await client.prop(src, "State") == "running"
    assert await client.prop(src, "Migration") == "cancelled"
    assert await site_client.call("ListMachines") == [[]]
    assert qemu_pids(str(site.daemon.runtime_dir)) == []
    assert not_just_logs(site.daemon.runtime_dir / "machines") == []
    await wait_console(log, TICK, start=len(Path(log).read_text()))

    # Forced to converge: the source pauses its guest, the destination takes it paused, Resume runs it.
    dst = await incoming(site_client, at_b)
    out, into = await Pair(client, src, site_client, dst).run({"max_bandwidth": Variant("t", 8 * SLOW)}, force=True)
    assert out == [] and into == [], (out, into)
    with pytest.raises(DBusError) as e:
        await client.call("GetMachine", "s", ["mover"])
    assert e.value.type == E + "NoSuchMachine"
    assert await site_client.prop(dst, "State") == "paused"
    assert drive in [d["id"] for d in await site_client.prop(dst, "Drives")]
    await site_client.call("Resume", path=dst, interface=MACHINE)
    at_src = await last_tick(log)
    dst_log = await site_client.prop(dst, "ConsoleLog")
    moved = await wait_console(dst_log, TICK)
    assert float(moved[1]) > at_src
    assert "VMSPAWN-GUEST-READY" not in Path(dst_log).read_text()

    # And back, unforced: it converges on its own and runs on where it started.
    back = await client.create("mover", **at_b, incoming=True)
    out, into = await Pair(site_client, dst, client, back).run({})
    assert out == [] and into == [], (out, into)
    assert await client.prop(back, "State") == "running"
    assert await site_client.call("ListMachines") == [[]]
    at_b_tick = await last_tick(dst_log)
    home_log = await client.prop(back, "ConsoleLog")
    home = await wait_console(home_log, TICK)
    assert float(home[1]) > at_b_tick
    assert "VMSPAWN-GUEST-READY" not in Path(home_log).read_text()
    await client.call("RemoveDrive", "s", [drive], path=back, interface=MACHINE)
