"""cdrom media: ReplaceDrive and EjectDrive, seen by a real guest under TCG (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dbus_fast import DBusError, Variant

from .harness import Client, busctl, wait_console
from .test_ctl import ctl, expect_error, ok
from .test_hotplug import VM, boot, console_len, disk, vm  # noqa: F401

E = "org.vmspawnd1.Error."
MACHINE_IFACE = "org.vmspawnd1.Machine"


def medium(tmp: Path, name: str, label: str, size: int) -> str:
    """A raw medium whose first bytes are `label` (the guest reports them)."""
    path = tmp / name
    with open(path, "wb") as f:
        f.write(label.encode())
        f.truncate(size)
    return str(path)


async def cdrom(client: Client, vm: VM, tmp: Path) -> tuple[str, str]:  # noqa: F811
    """A hotplugged cdrom holding medium A, and the guest's name for it."""
    mark = console_len(vm)
    drive_id, _ = await client.add_drive(
        vm.path, medium(tmp, "a.iso", "MEDIUM-A", 2 << 20), disk_type="virtio-scsi-cdrom", read_only=True
    )
    added = await wait_console(vm.console, r"VMSPAWN-BLOCK-ADD (sr\d+)", start=mark)
    return drive_id, added.group(1)


async def drive_of(client: Client, vm: VM, drive_id: str) -> dict[str, object]:  # noqa: F811
    return {d["id"]: d for d in await client.prop(vm.path, "Drives")}[drive_id]


async def test_busctl_replace_and_eject_are_seen_by_the_guest(
    client: Client,
    vm: VM,  # noqa: F811
    tmp_path: Path,
) -> None:
    drive_id, name = await cdrom(client, vm, tmp_path)
    before = vm.probe.fdsets()
    b = medium(tmp_path, "b.iso", "MEDIUM-B", 6 << 20)
    mark = console_len(vm)
    busctl("call", "org.vmspawnd1", vm.path, MACHINE_IFACE, "ReplaceDrive", "ssa{sv}", drive_id, b, "0")
    await wait_console(vm.console, rf"VMSPAWN-MEDIA {name} size={6 << 20} head=MEDIUM-B", start=mark)
    assert (await drive_of(client, vm, drive_id))["path"] == b
    # The old medium's fdset went, the new one is QEMU's; one node, the drive's own.
    after = vm.probe.fdsets()
    assert len(after) == len(before) == 1 and after[0]["fdset-id"] != before[0]["fdset-id"]
    assert f"{drive_id}-node" in vm.probe.block_nodes()

    mark = console_len(vm)
    busctl("call", "org.vmspawnd1", vm.path, MACHINE_IFACE, "EjectDrive", "s", drive_id)
    await wait_console(vm.console, rf"VMSPAWN-MEDIA {name} size=0 head=$", start=mark)
    assert (await drive_of(client, vm, drive_id))["path"] == ""
    assert vm.probe.fdsets() == []
    assert f"{drive_id}-node" not in vm.probe.block_nodes()

    # An empty drive takes a medium again, and unplugs cleanly.
    mark = console_len(vm)
    await client.call("ReplaceDrive", "ssa{sv}", [drive_id, b, {}], path=vm.path, interface=MACHINE_IFACE)
    await wait_console(vm.console, rf"VMSPAWN-MEDIA {name} size={6 << 20} head=MEDIUM-B", start=mark)
    await client.remove_drive(vm.path, drive_id)
    assert vm.probe.fdsets() == []
    assert f"{drive_id}-node" not in vm.probe.block_nodes()


@pytest.mark.parametrize(
    ("target", "path", "options", "error", "words"),
    [
        ("disk", "b.iso", {}, "InvalidArgument", "only a cdrom"),
        ("nope", "b.iso", {}, "NoSuchDrive", "no drive"),
        ("cdrom", "missing.iso", {}, "InvalidArgument", "does not exist"),
        ("cdrom", "b.iso", {"format": Variant("s", "vmdk")}, "InvalidArgument", "unknown format"),
        ("cdrom", "b.iso", {"format": Variant("s", "qcow2")}, "InvalidArgument", "not a qcow2 image"),
        ("cdrom", "b.iso", {"read_only": Variant("b", True)}, "InvalidArgument", "unknown ReplaceDrive option"),
        ("cdrom", "relative.iso", {}, "InvalidArgument", "absolute path"),
    ],
)
async def test_bad_replace_drive_is_refused_and_changes_nothing(
    client: Client,
    vm: VM,  # noqa: F811
    tmp_path: Path,
    target: str,
    path: str,
    options: dict[str, Variant],
    error: str,
    words: str,
) -> None:
    drive_id, _ = await cdrom(client, vm, tmp_path)
    disk_id, _ = await client.add_drive(vm.path, disk(tmp_path, "d.raw"))
    medium(tmp_path, "b.iso", "MEDIUM-B", 1 << 20)
    file = path if path.startswith("relative") else str(tmp_path / path)
    ids = {"cdrom": drive_id, "disk": disk_id, "nope": "nope"}
    drives, fdsets, nodes = await client.prop(vm.path, "Drives"), vm.probe.fdsets(), vm.probe.block_nodes()
    with pytest.raises(DBusError) as e:
        await client.call(
            "ReplaceDrive", "ssa{sv}", [ids[target], file, options], path=vm.path, interface=MACHINE_IFACE
        )
    assert e.value.type == E + error and words in str(e.value)
    assert await client.prop(vm.path, "Drives") == drives
    assert vm.probe.fdsets() == fdsets and vm.probe.block_nodes() == nodes


@pytest.mark.no_guest
async def test_eject_drive_refuses_a_disk_and_an_unknown_id(client: Client, vm: VM, tmp_path: Path) -> None:  # noqa: F811
    disk_id, _ = await client.add_drive(vm.path, disk(tmp_path, "d.raw"))
    for drive_id, error in ((disk_id, "InvalidArgument"), ("nope", "NoSuchDrive")):
        with pytest.raises(DBusError) as e:
            await client.call("EjectDrive", "s", [drive_id], path=vm.path, interface=MACHINE_IFACE)
        assert e.value.type == E + error


async def test_vmspawnctl_replace_drive_and_eject_drive(client: Client, vm: VM, tmp_path: Path) -> None:  # noqa: F811
    drive_id, name = await cdrom(client, vm, tmp_path)
    b = medium(tmp_path, "b.iso", "MEDIUM-C", 3 << 20)
    mark = console_len(vm)
    out = json.loads(ok("replace-drive", vm.name, drive_id, b, "--format", "raw", "--json"))
    assert out == {"machine": vm.name, "id": drive_id, "path": b}
    await wait_console(vm.console, rf"VMSPAWN-MEDIA {name} size={3 << 20} head=MEDIUM-C", start=mark)
    mark = console_len(vm)
    assert json.loads(ok("eject-drive", vm.name, drive_id, "--json"))["path"] == ""
    await wait_console(vm.console, rf"VMSPAWN-MEDIA {name} size=0 head=$", start=mark)
    disk_id, _ = await client.add_drive(vm.path, disk(tmp_path, "d.raw"))
    expect_error(ctl("eject-drive", vm.name, disk_id), 2, "only a cdrom", "")
