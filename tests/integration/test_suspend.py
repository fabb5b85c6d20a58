"""Suspend(): a kept machine's memory and device state saved to a file, its
QEMU gone; Start() goes on from there (no new boot), also after a daemon
restart; a resume that fails leaves it suspended with its file; Terminate
removes it.

Each test runs its own bus and daemon (conftest's site): one restarts it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError

from .harness import Client, Site, blank_image, guest_options, image_options, wait_console
from .test_ctl import ctl, expect_error, ok
from .test_keep import call, machine_qemus
from .test_lifecycle import ticks

READY = "VMSPAWN-GUEST-READY"
E = "org.vmspawnd1.Error."
SAVED = "suspend.vmstate"


async def expect_suspended(client: Client, site: Site, name: str, path: str) -> Path:
    """Suspended: listed, no QEMU, its record and its saved state kept; returns the state file."""
    assert await client.prop(path, "State") == "suspended"
    assert await client.prop(path, "Leader") == 0
    (machines,) = await client.call("ListMachines")
    assert (name, "suspended", path) in [tuple(m) for m in machines]
    assert machine_qemus(site, name) == []
    directory = site.daemon.runtime_dir / "machines" / name
    assert {p.name for p in directory.iterdir()} <= {"state.json", "qemu.log", "console.log", "console.log.1", SAVED}
    saved = directory / SAVED
    assert saved.stat().st_size > 0
    assert saved.stat().st_mode & 0o777 == 0o600
    return saved


async def test_a_suspended_guest_goes_on_where_it_was_with_its_hotplugged_drive_also_after_a_daemon_restart(
    site_client: Client, site: Site, guest: Any, tmp_path: Path
) -> None:
    client = site_client
    # Spares: the guest memory is a shared memfd (share=on), which the save must handle.
    options = guest_options(guest, cmdline=guest.cmdline + " tinyguest.tick", keep=True, hotplug_spares=2)
    path = await client.create("sleeper", **options)
    console = Path(await client.prop(path, "ConsoleLog"))
    await wait_console(console, READY, timeout=150)
    drive = tmp_path / "data.raw"
    drive.write_bytes(b"\0" * (1 << 20))
    drive_id, _ = await client.add_drive(path, str(drive), serial="sleep1", id="data")
    await wait_console(console, r"VMSPAWN-BLOCK-ADD (\S+) serial=sleep1")
    await wait_console(console, r"VMSPAWN-TICK [\d.]+\n(.|\n)*VMSPAWN-TICK [\d.]+\n", start=len(console.read_text()))
    drives, ports, machine_id = [await client.prop(path, p) for p in ("Drives", "Ports", "Id")]

    await call(client, path, "Suspend")
    saved = await expect_suspended(client, site, "sleeper", path)
    before = console.read_text()
    last_tick = ticks(before)[-1]
    with pytest.raises(DBusError) as e:
        await call(client, path, "Suspend")
    assert e.value.type == E + "NotRunning"

    # A daemon restart finds it suspended, as it was.
    client.close()
    site.daemon.stop()
    site.daemon.start()
    client = await site.client()
    try:
        await expect_suspended(client, site, "sleeper", path)
        assert await client.prop(path, "Drives") == drives

        await call(client, path, "Start")
        assert await client.prop(path, "State") == "running"
        assert await client.prop(path, "Id") == machine_id
        assert await client.prop(path, "Leader") in machine_qemus(site, "sleeper")
        assert await client.prop(path, "Ports") == ports
        assert await client.prop(path, "Drives") == drives
        assert not saved.exists()
        # The guest goes on: its clock counts on from where it stood, it did not boot again.
        await wait_console(console, r"VMSPAWN-TICK [\d.]+\n(.|\n)*VMSPAWN-TICK [\d.]+\n", start=len(before))
        after = console.read_text()[len(before) :]
        assert READY not in after and "VMSPAWN-PCI" not in after, after[-2000:]
        assert min(ticks(after)) >= last_tick, (last_tick, after[-500:])
        # The drive is still the guest's, plugged where it was: it unplugs.
        offset = len(console.read_text())
        await client.remove_drive(path, drive_id, timeout_usec=60_000_000)
        await wait_console(console, r"VMSPAWN-BLOCK-REMOVE \S+", start=offset)
        await client.call("TerminateMachine", "s", ["sleeper"])
        assert await client.names() == []
    finally:
        client.close()


async def test_a_resume_that_fails_leaves_it_suspended_with_its_file_and_terminate_removes_it(
    site_client: Client, site: Site, tmp_path: Path
) -> None:
    client = site_client
    image = blank_image(tmp_path, "blank.raw")
    bus = {"DBUS_SYSTEM_BUS_ADDRESS": site.address}
    # Only a kept machine can be suspended.
    plain = await client.create("plain", **image_options(image))
    with pytest.raises(DBusError) as e:
        await call(client, plain, "Suspend")
    assert e.value.type == E + "Unsupported" and "keep" in e.value.text
    # vmspawnctl says so too, as invalid (exit 2), with its hint.
    expect_error(ctl("suspend", "plain", env=bus), 2, "not created with keep", "what has to change")
    assert await client.prop(plain, "State") == "running"
    await client.call("TerminateMachine", "s", ["plain"])

    # A hotplugged NIC would not be there at the next start: refused, nothing changes.
    netted = await client.create("netted", **image_options(image, keep=True))
    nic, _ = await call(client, netted, "AddNetwork", "a{sv}", {})
    # Nor an nvme drive: QEMU 7.2 cannot save its state.
    await client.add_drive(netted, blank_image(tmp_path, "n.raw"), disk_type="nvme", id="n")
    with pytest.raises(DBusError) as e:
        await call(client, netted, "Suspend")
    assert e.value.type == E + "Unsupported", e.value.text
    assert f"NIC {nic}" in e.value.text and "nvme drive n" in e.value.text
    assert await client.prop(netted, "State") == "running"
    assert not (site.daemon.runtime_dir / "machines" / "netted" / SAVED).exists()
    await client.call("TerminateMachine", "s", ["netted"])

    path = await client.create("dozer", **image_options(image, keep=True, hotplug_spares=3))
    directory = site.daemon.runtime_dir / "machines" / "dozer"

    # Its hotplugged drives come back, a SCSI one behind its controller, on their ports.
    await client.add_drive(path, blank_image(tmp_path, "b.raw"), id="b")
    await client.add_drive(path, blank_image(tmp_path, "s.raw"), disk_type="virtio-scsi", id="s")
    drives, ports = await client.prop(path, "Drives"), await client.prop(path, "Ports")
    await call(client, path, "Suspend")
    saved = await expect_suspended(client, site, "dozer", path)

    # A saved state QEMU cannot load: Start fails with QEMU's words, the machine stays suspended with its file.
    good = tmp_path / "good.vmstate"
    shutil.copy(saved, good)
    saved.write_bytes(b"not a migration stream" * 100)
    with pytest.raises(DBusError) as e:
        await call(client, path, "Start")
    assert e.value.type == E + "QemuFailed", e.value.text
    assert re.search(r"saved state", e.value.text), e.value.text
    await expect_suspended(client, site, "dozer", path)
    assert "Start() failed" in await client.prop(path, "StateReason")
    assert await client.prop(path, "Drives") == drives

    shutil.copy(good, saved)
    await call(client, path, "Start")
    assert await client.prop(path, "State") == "running"
    assert await client.prop(path, "Drives") == drives
    assert await client.prop(path, "Ports") == ports
    assert not saved.exists()

    # Suspended again (by vmspawnctl), then terminated: the saved state goes with it.
    assert json.loads(ok("suspend", "dozer", "--json", env=bus)) == {"machine": "dozer", "state": "suspended"}
    await expect_suspended(client, site, "dozer", path)
    await client.call("TerminateMachine", "s", ["dozer"])
    assert await client.names() == []
    assert not directory.exists()
