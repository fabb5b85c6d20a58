"""Drive hotplug onto spare root ports, seen by a real guest under TCG."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Variant

from .harness import Client, busctl, guest_options, wait_console
from .qmp_probe import Probe

E = "org.vmspawnd1.Error."
MACHINE_IFACE = "org.vmspawnd1.Machine"


@dataclass
class VM:
    name: str
    path: str
    console: Path
    probe: Probe


async def boot(client: Client, guest: Any, tmp: Path, name: str, spares: int = 4, ready: bool = True) -> VM:
    monitor = tmp / f"{name}.qmp"
    path = await client.create(name, **guest_options(guest, hotplug_spares=spares, qemu_extra=Probe.extra(monitor)))
    console = Path(await client.prop(path, "ConsoleLog"))
    if ready:
        await wait_console(console, "VMSPAWN-GUEST-READY", timeout=60)
    return VM(name, path, console, Probe(monitor))


@pytest.fixture
async def vm(client: Client, guest: Any, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[VM]:
    # A test marked no_guest checks only what the daemon and QEMU decide: it
    # need not wait the guest's ~3 s boot (dozens of such tests in the suite).
    ready = request.node.get_closest_marker("no_guest") is None
    yield await boot(client, guest, tmp_path, "hp", ready=ready)


def disk(tmp: Path, name: str, size: int = 1 << 20) -> str:
    path = tmp / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def busctl_add(vm: VM, file: str, disk_type: str, serial: str) -> tuple[str, str]:
    out = busctl("call", "org.vmspawnd1", vm.path, MACHINE_IFACE, "AddDrive", "sa{sv}",
                 file, "2", "disk_type", "s", disk_type, "serial", "s", serial).stdout  # fmt: skip
    m = re.fullmatch(r'ss "(\S+)" "(\S+)"\n', out)
    assert m, out
    return m.group(1), m.group(2)


def console_len(vm: VM) -> int:
    return len(vm.console.read_text(errors="replace"))


async def spare_owners(client: Client, vm: VM) -> dict[str, str]:
    return {p["id"]: p["device"] for p in await client.prop(vm.path, "Ports") if p["role"] == "spare"}


@pytest.mark.parametrize(
    ("disk_type", "guest_name"),
    [("nvme", r"nvme\d+n1"), ("virtio-blk", r"vd[a-z]"), ("virtio-scsi", r"sd[a-z]")],
)
async def test_busctl_hotplug_is_seen_by_the_guest_and_unplug_frees_the_port(
    client: Client, vm: VM, tmp_path: Path, disk_type: str, guest_name: str
) -> None:
    before = await client.prop(vm.path, "FreeSparePorts")
    mark = console_len(vm)
    serial = f"hot{disk_type.replace('-', '')}"[:20]
    drive_id, port = busctl_add(vm, disk(tmp_path, "a.raw"), disk_type, serial)
    assert port == "rp0"
    added = await wait_console(vm.console, rf"VMSPAWN-BLOCK-ADD ({guest_name}) serial={serial}", start=mark)
    assert await client.prop(vm.path, "FreeSparePorts") == before - 1
    drives = {d["id"]: d for d in await client.prop(vm.path, "Drives")}
    assert drives[drive_id]["port"] == port and drives[drive_id]["state"] == "attached"
    assert vm.probe.block_nodes() >= {f"{drive_id}-node"}

    mark = console_len(vm)
    busctl("call", "org.vmspawnd1", vm.path, MACHINE_IFACE, "RemoveDrive", "s", drive_id)
    await wait_console(vm.console, rf"VMSPAWN-BLOCK-REMOVE {added.group(1)}", start=mark)
    if disk_type == "virtio-scsi":
        # The controller goes with its last drive, once the guest let go of it.
        await wait_for(lambda: client.prop(vm.path, "FreeSparePorts"), before)
    assert await client.prop(vm.path, "FreeSparePorts") == before
    assert drive_id not in {d["id"] for d in await client.prop(vm.path, "Drives")}
    assert f"{drive_id}-node" not in vm.probe.block_nodes()
    assert vm.probe.fdsets() == []


async def wait_for(get: Any, want: Any, timeout: float = 10) -> None:
    """Until the async getter returns `want` (state that follows a guest's action)."""
    async with asyncio.timeout(timeout):
        while await get() != want:
            await asyncio.sleep(0.05)


async def test_scsi_drives_share_one_controller(client: Client, vm: VM, tmp_path: Path) -> None:
    first = await client.add_drive(vm.path, disk(tmp_path, "s1"), disk_type="virtio-scsi")
    second = await client.add_drive(vm.path, disk(tmp_path, "s2"), disk_type="virtio-scsi-cdrom", read_only=True)
    assert first[1] == second[1] == "rp0"
    owners = await spare_owners(client, vm)
    assert owners["rp0"].startswith("scsi") and owners["rp1"] == ""
    await client.remove_drive(vm.path, first[0])
    assert (await spare_owners(client, vm))["rp0"].startswith("scsi")


async def test_full_spares_give_no_free_port_and_removing_one_makes_room(
    client: Client, vm: VM, tmp_path: Path
) -> None:
    ids = [(await client.add_drive(vm.path, disk(tmp_path, f"f{i}"), serial=f"fill{i}"))[0] for i in range(4)]
    assert await client.prop(vm.path, "FreeSparePorts") == 0
    with pytest.raises(DBusError) as e:
        await client.add_drive(vm.path, disk(tmp_path, "one-more"))
    assert e.value.type == E + "NoFreePort"
    assert "all 4 spare ports of hp are taken (rp0=disk0, rp1=disk1, rp2=disk2, rp3=disk3)" in e.value.text
    assert "hotplug_spares" in e.value.text
    await client.remove_drive(vm.path, ids[2])
    # The freed port is handed out again; ids are not (a stale id must not hit
    # a new drive), and the refused request used none up.
    assert await client.add_drive(vm.path, disk(tmp_path, "one-more")) == ("disk4", "rp2")


async def test_add_drive_on_a_named_spare_and_a_taken_one_is_no_free_port(
    client: Client, vm: VM, tmp_path: Path
) -> None:
    drive_id, port = await client.add_drive(vm.path, disk(tmp_path, "last"), port="rp3", serial="named")
    assert port == "rp3"
    assert vm.probe.devices_on("rp3") == [drive_id]
    await wait_console(vm.console, r"VMSPAWN-BLOCK-ADD vd[a-z]+ serial=named")
    # The default is still the lowest free spare.
    assert (await client.add_drive(vm.path, disk(tmp_path, "low")))[1] == "rp0"
    nodes, fdsets = vm.probe.block_nodes(), vm.probe.fdsets()
    with pytest.raises(DBusError) as e:
        await client.add_drive(vm.path, disk(tmp_path, "again"), port="rp3")
    assert e.value.type == E + "NoFreePort"
    assert f"spare port rp3 of hp holds {drive_id}" in e.value.text
    # The refusal handed QEMU nothing.
    assert (vm.probe.block_nodes(), vm.probe.fdsets()) == (nodes, fdsets)
    await client.remove_drive(vm.path, drive_id)
    assert vm.probe.devices_on("rp3") == []
    assert await client.prop(vm.path, "FreeSparePorts") == 3


@pytest.mark.no_guest
async def test_no_free_port_on_a_paused_vm_leaves_no_fdset(client: Client, vm: VM, tmp_path: Path) -> None:
    """Finding 12: the fd went to QEMU before the port was taken, and a paused
    QEMU closes no removed fd: every NoFreePort left an fdset behind."""
    for i in range(4):
        await client.add_drive(vm.path, disk(tmp_path, f"p{i}"))
    attached = vm.probe.fdsets()
    assert len(attached) == 4
    for command, state in (("stop", "paused"), ("cont", "running")):
        vm.probe(command)
        await wait_for(lambda: client.prop(vm.path, "State"), state)
        for i in range(3):
            with pytest.raises(DBusError) as e:
                await client.add_drive(vm.path, disk(tmp_path, f"{command}{i}"))
            assert e.value.type == E + "NoFreePort"
        assert vm.probe.fdsets() == attached


async def test_20_add_remove_cycles_leave_nothing_behind(client: Client, vm: VM, tmp_path: Path) -> None:
    nodes = vm.probe.block_nodes()
    file = disk(tmp_path, "cycle")
    for i in range(20):
        disk_type = ("nvme", "virtio-blk", "virtio-scsi")[i % 3]
        drive_id, port = await client.add_drive(vm.path, file, disk_type=disk_type, serial=f"c{i}")
        await client.remove_drive(vm.path, drive_id)
    await wait_for(lambda: client.prop(vm.path, "FreeSparePorts"), 4)
    assert vm.probe.block_nodes() == nodes
    assert vm.probe.fdsets() == []
    assert await client.prop(vm.path, "Drives") == []
    assert set((await spare_owners(client, vm)).values()) == {""}
    # QEMU agrees: nothing is plugged behind any spare port.
    for port in ("rp0", "rp1", "rp2", "rp3"):
        assert vm.probe.devices_on(port) == []


async def test_8_concurrent_adds_get_8_ports_and_two_machines_hotplug_in_parallel(
    client: Client, guest: Any, tmp_path: Path
) -> None:
    a, b = await asyncio.gather(
        boot(client, guest, tmp_path, "par-a", spares=8), boot(client, guest, tmp_path, "par-b", spares=8)
    )
    files = [disk(tmp_path, f"p{i}") for i in range(16)]
    results = await asyncio.gather(
        *(client.add_drive(a.path, files[i], serial=f"a{i}") for i in range(8)),
        *(client.add_drive(b.path, files[8 + i], serial=f"b{i}") for i in range(8)),
    )
    for vm, got in ((a, results[:8]), (b, results[8:])):
        assert len({port for _, port in got}) == 8
        assert len({drive for drive, _ in got}) == 8
        assert await client.prop(vm.path, "FreeSparePorts") == 0
        for drive_id, port in got:
            assert vm.probe.devices_on(port) == [drive_id]


@pytest.mark.no_guest
async def test_failed_device_add_is_rolled_back(client: Client, vm: VM, tmp_path: Path) -> None:
    """A real failure: the same image twice, writable. blockdev-add succeeds,
    device_add fails on QEMU's image lock; nothing may be left behind.

    virtio-blk: QEMU 7.2's nvme leaks its node on a failed realize ("Node is
    in use" on blockdev-del), which no client can undo."""
    file = disk(tmp_path, "locked")
    await client.add_drive(vm.path, file)
    nodes, ports = vm.probe.block_nodes(), await spare_owners(client, vm)
    with pytest.raises(DBusError) as e:
        await client.add_drive(vm.path, file, serial="second")
    assert e.value.type == E + "InvalidArgument"
    assert 'Failed to get "write" lock' in e.value.text
    assert vm.probe.block_nodes() == nodes
    assert vm.probe.fdsets() == [{"fdset-id": 1, "fds": vm.probe.fdsets()[0]["fds"]}]
    assert await spare_owners(client, vm) == ports
    assert vm.probe.devices_on("rp1") == []


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"disk_type": Variant("s", "floppy")}, "InvalidArgument", "unknown disk_type 'floppy'"),
        ({"format": Variant("s", "vmdk")}, "InvalidArgument", "unknown format 'vmdk'"),
        ({"serial": Variant("s", "x" * 21)}, "InvalidArgument", "virtio-blk allows at most 20"),
        ({"colour": Variant("s", "x")}, "InvalidArgument", "unknown AddDrive option 'colour'"),
        ({"read_only": Variant("s", "yes")}, "InvalidArgument", "must have type 'b'"),
        ({"id": Variant("s", "rp1")}, "InvalidArgument", "reserved for vmspawnd"),
        ({"id": Variant("s", "1bad")}, "InvalidArgument", "drive id '1bad' is invalid"),
        ({"port": Variant("s", "rp9")}, "InvalidArgument", "'rp9' is not a spare port of hp; its spare ports are rp0,"),
        (
            {"port": Variant("s", "rp1"), "disk_type": Variant("s", "virtio-scsi")},
            "InvalidArgument",
            "'port' is for virtio-blk and nvme drives",
        ),
    ],
)
@pytest.mark.no_guest
async def test_bad_add_drive_options_change_nothing(
    client: Client, vm: VM, tmp_path: Path, options: dict[str, Variant], error: str, text: str
) -> None:
    nodes = vm.probe.block_nodes()
    with pytest.raises(DBusError) as e:
        await client.call("AddDrive", "sa{sv}", [disk(tmp_path, "x"), options], path=vm.path, interface=MACHINE_IFACE)
    assert e.value.type == E + error and text in e.value.text, e.value.text
    assert vm.probe.block_nodes() == nodes
    assert await client.prop(vm.path, "FreeSparePorts") == 4


@pytest.mark.no_guest
async def test_bad_paths_and_ids(client: Client, vm: VM, tmp_path: Path) -> None:
    cases = [
        ("/nonexistent.raw", "does not exist"),
        (str(tmp_path), "is a directory; give a file"),
    ]
    for file, text in cases:
        with pytest.raises(DBusError) as e:
            await client.add_drive(vm.path, file)
        assert e.value.type == E + "InvalidArgument" and text in e.value.text, e.value.text
    with pytest.raises(DBusError) as e:
        await client.remove_drive(vm.path, "nope")
    assert e.value.type == E + "NoSuchDrive"
    _drive_id, _ = await client.add_drive(vm.path, disk(tmp_path, "dup"), id="mine")
    with pytest.raises(DBusError) as e:
        await client.add_drive(vm.path, disk(tmp_path, "dup2"), id="mine")
    assert e.value.type == E + "InvalidArgument" and "already used" in e.value.text


@pytest.mark.no_guest
async def test_nobody_may_not_add_drives_to_roots_machine(client: Client, vm: VM, tmp_path: Path) -> None:
    result = busctl("call", "org.vmspawnd1", vm.path, MACHINE_IFACE, "AddDrive", "sa{sv}", "/etc/shadow", "0",
                    check=False, as_user="nobody")  # fmt: skip
    assert result.returncode != 0
    assert "may not manage this machine" in result.stderr, result.stderr
    assert await client.prop(vm.path, "FreeSparePorts") == 4


async def test_unplug_timeout_without_a_guest_os_leaves_the_drive_removing(
    client: Client, guest: Any, tmp_path: Path
) -> None:
    """Without a guest OS there is no DEVICE_DELETED: -S keeps the CPUs stopped."""
    path = await client.create("stopped", **guest_options(guest, qemu_extra=["-S"]))
    drive_id, _port = await client.add_drive(path, disk(tmp_path, "t"))
    with pytest.raises(DBusError) as e:
        await client.remove_drive(path, drive_id, timeout_usec=300_000)
    assert e.value.type == E + "UnplugTimeout"
    assert "removing" in e.value.text
    drives = {d["id"]: d["state"] for d in await client.prop(path, "Drives")}
    assert drives[drive_id] == "removing"
    assert await client.prop(path, "FreeSparePorts") == 9
    with pytest.raises(DBusError) as e:
        await client.remove_drive(path, drive_id)
    assert e.value.type == E + "UnplugInProgress"


async def test_a_late_device_deleted_frees_the_port(client: Client, vm: VM, tmp_path: Path) -> None:
    """The guest needs ~100 ms to let go; a 1 ms timeout expires first."""
    drive_id, _port = await client.add_drive(vm.path, disk(tmp_path, "late"))
    with pytest.raises(DBusError) as e:
        await client.remove_drive(vm.path, drive_id, timeout_usec=1000)
    assert e.value.type == E + "UnplugTimeout"
    await wait_for(lambda: client.prop(vm.path, "FreeSparePorts"), 4)
    assert await client.prop(vm.path, "Drives") == []
    assert f"{drive_id}-node" not in vm.probe.block_nodes()


async def test_not_running_machine(client: Client, guest: Any, tmp_path: Path) -> None:
    path = await client.create("norun", **guest_options(guest))
    machine = await client.call("GetMachine", "s", ["norun"])
    assert machine == [path]
    await client.call("TerminateMachine", "s", ["norun"])
    with pytest.raises(DBusError) as e:
        await client.add_drive(path, disk(tmp_path, "n"))
    # The object is gone with the machine: the bus says so.
    assert "UnknownObject" in e.value.type or "UnknownMethod" in e.value.type or e.value.type == E + "NotRunning"
