"""Kept machines (CreateMachine keep=true): stopped, not gone; Start() boots
them again with their hotplugged drives at boot on the ports they had; a
daemon restart keeps them; TerminateMachine removes them for good.

Each test runs its own bus and daemon (conftest's site): one restarts it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError

from vmspawnd.bus import MACHINE_IFACE

from .harness import Client, Site, blank_image, guest_options, image_options, qemu_pids, record_states, wait_console
from .test_lifecycle import wait_state

READY = "VMSPAWN-GUEST-READY"
E = "org.vmspawnd1.Error."


async def call(client: Client, path: str, member: str, signature: str = "", *body: Any) -> list[Any]:
    return await client.call(member, signature, list(body), path=path, interface=MACHINE_IFACE)


def machine_qemus(site: Site, name: str) -> list[int]:
    """The QEMUs of machine `name` of this site (its console log is in their argv)."""
    return qemu_pids(f"{site.daemon.runtime_dir}/machines/{name}/console.log")


def guest_bus_of(snapshot: str, port: str, ports: list[dict[str, Any]]) -> str:
    """The PCI address the guest gives the device behind root port `port`:
    SeaBIOS numbers the root ports' buses in slot.function order from 1."""
    roots = sorted((p for p in ports if p["kind"] == "root-port"), key=lambda p: p["addr"])
    bus = 1 + [p["id"] for p in roots].index(port)
    return f"0000:{bus:02x}:00.0"


async def expect_stopped(client: Client, site: Site, name: str, path: str) -> None:
    """Stopped, still on the bus and listed, no QEMU, its record kept."""
    assert await client.prop(path, "State") == "stopped"
    assert await client.prop(path, "Leader") == 0
    assert await client.prop(path, "Keep") is True
    (machines,) = await client.call("ListMachines")
    assert (name, "stopped", path) in [tuple(m) for m in machines]
    assert machine_qemus(site, name) == []
    directory = site.daemon.runtime_dir / "machines" / name
    assert (directory / "state.json").exists()
    # Nothing of the run is left but its logs and the record.
    assert {p.name for p in directory.iterdir()} <= {"state.json", "qemu.log", "console.log", "console.log.1"}


async def test_a_kept_machine_boots_again_with_its_hotplugged_drive_on_its_port_also_after_a_daemon_restart(
    site_client: Client, site: Site, guest: Any, tmp_path: Path
) -> None:
    client = site_client
    path = await client.create("kept", **guest_options(guest, keep=True))
    console = Path(await client.prop(path, "ConsoleLog"))
    await wait_console(console, READY, timeout=150)
    machine_id = await client.prop(path, "Id")
    drive = tmp_path / "kept.raw"
    drive.write_bytes(b"\0" * (1 << 20))
    drive_id, port = await client.add_drive(path, str(drive), serial="kept1", id="data")
    await wait_console(console, r"VMSPAWN-BLOCK-ADD \S+ serial=kept1")
    ports = await client.prop(path, "Ports")
    drives = await client.prop(path, "Drives")
    assert (drive_id, port) in {(d["id"], d["port"]) for d in drives}

    states = await record_states(client, path)
    await call(client, path, "PowerOff", "t", 120_000_000)
    await expect_stopped(client, site, "kept", path)
    assert states[-1] == "stopped"
    assert await client.prop(path, "Drives") == drives
    assert await client.prop(path, "Ports") == ports

    async def start_and_check() -> None:
        offset = len(console.read_text())
        await call(client, path, "Start")
        assert await client.prop(path, "State") in ("running", "paused")
        assert await client.prop(path, "Id") == machine_id
        assert await client.prop(path, "Leader") in machine_qemus(site, "kept")
        # Same ports, the drive on the one it had, still a hotplugged (removable) one.
        assert await client.prop(path, "Ports") == ports
        assert await client.prop(path, "Drives") == drives
        await wait_console(console, READY, timeout=150, start=offset)
        boot = console.read_text()[offset:]
        # The guest finds it at boot (not hotplugged), behind the same root port.
        assert re.search(r"^VMSPAWN-BLOCK \S+ serial=kept1$", boot, re.MULTILINE), boot[-2000:]
        assert f"VMSPAWN-PCI {guest_bus_of(boot, port, ports)} 1af4:1042" in boot, boot[-3000:]
        with pytest.raises(DBusError) as e:
            await call(client, path, "Start")
        assert e.value.type == E + "AlreadyRunning"

    await start_and_check()
    await call(client, path, "PowerOff", "t", 120_000_000)
    await expect_stopped(client, site, "kept", path)

    # A daemon restart finds it stopped, as it was.
    client.close()
    site.daemon.stop()
    site.daemon.start()
    assert b"STATUS=0 machines running, 1 stopped" in site.daemon.notifications[0]
    client = await site.client()
    await expect_stopped(client, site, "kept", path)
    assert await client.prop(path, "Id") == machine_id
    assert await client.prop(path, "Drives") == drives
    await start_and_check()
    # At boot or not, it is still a hotplugged drive: it unplugs, its port is free again.
    free = await client.prop(path, "FreeSparePorts")
    offset = len(console.read_text())
    await client.remove_drive(path, drive_id, timeout_usec=60_000_000)
    await wait_console(console, r"VMSPAWN-BLOCK-REMOVE \S+", start=offset)
    assert await client.prop(path, "FreeSparePorts") == free + 1
    assert drive_id not in {d["id"] for d in await client.prop(path, "Drives")}

    # TerminateMachine: gone for good, nothing left.
    removed: list[str] = []
    await client.subscribe("org.vmspawnd1.Manager")
    client.bus.add_message_handler(lambda m: removed.append(m.body[0]) if m.member == "MachineRemoved" else None)
    await client.call("TerminateMachine", "s", ["kept"])
    assert await client.names() == []
    assert removed == ["kept"]
    assert machine_qemus(site, "kept") == []
    # Its logs stay, as any terminated machine's; no record: the next daemon start does not find it.
    directory = site.daemon.runtime_dir / "machines" / "kept"
    assert not (directory / "state.json").exists()
    client.close()


async def test_a_kept_machine_whose_qemu_dies_is_stopped_and_starts_and_terminate_of_a_stopped_one_removes_its_dir(
    site_client: Client, site: Site, tmp_path: Path
) -> None:
    client = site_client
    image = blank_image(tmp_path, "blank.raw")
    path = await client.create("crash", **image_options(image, keep=True))
    os.kill(await client.prop(path, "Leader"), signal.SIGKILL)
    await wait_state(client, path, "stopped")
    assert "unexpectedly" in await client.prop(path, "StateReason")
    await expect_stopped(client, site, "crash", path)

    await call(client, path, "Start")
    assert await client.prop(path, "State") == "running"
    assert await client.prop(path, "StateReason") == ""
    await call(client, path, "PowerOff", "t", 1_000_000)
    await expect_stopped(client, site, "crash", path)

    await client.call("TerminateMachine", "s", ["crash"])
    assert await client.names() == []
    assert not (site.daemon.runtime_dir / "machines" / "crash").exists()
    with pytest.raises(DBusError) as e:
        await client.prop(path, "State")
    assert e.value.type == "org.freedesktop.DBus.Error.UnknownObject"


async def test_a_failed_start_leaves_the_machine_stopped_with_its_drives_and_terminate_of_a_running_one_ends_it(
    site_client: Client, site: Site, tmp_path: Path
) -> None:
    client = site_client
    image = blank_image(tmp_path, "blank.raw")
    path = await client.create("again", **image_options(image, keep=True))
    extra = Path(blank_image(tmp_path, "extra.raw"))
    await client.add_drive(path, str(extra))
    drives = await client.prop(path, "Drives")
    await call(client, path, "PowerOff", "t", 1_000_000)
    await expect_stopped(client, site, "again", path)

    # Its creator's file is gone: Start says so, the machine stays as it was.
    extra.rename(tmp_path / "moved.raw")
    with pytest.raises(DBusError) as e:
        await call(client, path, "Start")
    assert str(extra) in e.value.text
    await expect_stopped(client, site, "again", path)
    assert "Start() failed" in await client.prop(path, "StateReason")
    assert await client.prop(path, "Drives") == drives

    (tmp_path / "moved.raw").rename(extra)
    await call(client, path, "Start")
    assert await client.prop(path, "Drives") == drives
    # Terminate() on the running machine: it does not stay.
    await call(client, path, "Terminate")
    assert await client.names() == []
    assert machine_qemus(site, "again") == []
    assert not (site.daemon.runtime_dir / "machines" / "again" / "state.json").exists()


async def test_a_kept_machine_whose_qemu_died_while_the_daemon_was_down_is_stopped_with_its_drives(
    site_client: Client, site: Site, tmp_path: Path
) -> None:
    client = site_client
    image = blank_image(tmp_path, "blank.raw")
    path = await client.create("down", **image_options(image, keep=True))
    extra = blank_image(tmp_path, "extra.raw")
    drive_id, port = await client.add_drive(path, extra, serial="x1")
    drives = await client.prop(path, "Drives")
    leader = await client.prop(path, "Leader")
    client.close()
    site.daemon.stop()
    # QEMU outlives the daemon; it dies while nobody watches.
    os.kill(leader, signal.SIGKILL)
    while machine_qemus(site, "down"):
        await asyncio.sleep(0.05)
    site.daemon.start()
    client = await site.client()
    try:
        await expect_stopped(client, site, "down", path)
        assert await client.prop(path, "Drives") == drives
        await call(client, path, "Start")
        assert (drive_id, port) in {(d["id"], d["port"]) for d in await client.prop(path, "Drives")}
        await client.call("TerminateMachine", "s", ["down"])
        assert await client.names() == []
        # A running machine terminated keeps its logs, as any other; its record goes.
        assert not (site.daemon.runtime_dir / "machines" / "down" / "state.json").exists()
    finally:
        client.close()


async def test_scsi_nvme_and_qcow2_drives_come_back_on_their_controller_and_ports(
    site_client: Client, site: Site, tmp_path: Path
) -> None:
    client = site_client
    image = blank_image(tmp_path, "blank.raw")
    path = await client.create("kinds", **image_options(image, keep=True, hotplug_spares=3))
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(top), "1M"], check=True, timeout=60)
    await client.add_drive(path, str(top), format="qcow2", disk_type="nvme", serial="q1", id="q")
    for name in ("s1", "s2"):
        await client.add_drive(path, blank_image(tmp_path, f"{name}.raw"), disk_type="virtio-scsi", id=name)
    await client.add_drive(path, blank_image(tmp_path, "ro.raw"), read_only=True, id="ro")
    drives, ports = await client.prop(path, "Drives"), await client.prop(path, "Ports")
    await call(client, path, "PowerOff", "t", 1_000_000)
    await expect_stopped(client, site, "kinds", path)
    record = json.loads((site.daemon.runtime_dir / "machines" / "kinds" / "state.json").read_text())
    plugged = {p["id"]: p for p in record["spec"]["plugged"]}
    assert plugged["q"]["drive"] | {"path": ""} == {
        "path": "", "disk_type": "nvme", "format": "qcow2", "read_only": False, "serial": "q1"
    }  # fmt: skip
    assert plugged["ro"]["drive"]["read_only"] is True
    assert plugged["s1"]["controller"] == plugged["s2"]["controller"] != ""
    assert plugged["s1"]["port"] == plugged["s2"]["port"]
    await call(client, path, "Start")
    # QEMU took them all on its command line: same drives, the SCSI ones behind one controller on its port.
    assert await client.prop(path, "Drives") == drives
    assert await client.prop(path, "Ports") == ports
    assert await client.prop(path, "FreeSparePorts") == 0
    await client.call("TerminateMachine", "s", ["kinds"])
