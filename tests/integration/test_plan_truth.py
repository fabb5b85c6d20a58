"""Issue 13: the pcie.0 plan tells the truth, and goes past 120 hotplug ports.

Every figure is checked against QEMU's own answer (query-pci on a second
monitor) and the tiny guest's view of its PCI functions and disks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError

from tests import test64
from tests.devtypes import TYPES
from vmspawnd import pcitypes
from vmspawnd.bus.options import MACHINE_OPTIONS

from .harness import Client, guest_options, qemu_pids, variants, wait_console
from .qmp_probe import Probe

E = "org.vmspawnd1.Error."


def pcie0_slots(probe: Probe) -> set[int]:
    """The device numbers QEMU really assigned on pcie.0, host bridge and LPC aside."""
    (bus0,) = [b for b in probe("query-pci") if b["bus"] == 0]
    return {d["slot"] for d in bus0["devices"]} - {0x00, 0x1F}


def guest_pci(console: str) -> list[str]:
    return re.findall(r"^VMSPAWN-PCI \S+ (\S+) class=", console, re.M)


def guest_disks(console: str) -> list[str]:
    ready = console.index("VMSPAWN-GUEST-READY")
    return re.findall(r"^VMSPAWN-BLOCK (\S+) serial=", console[:ready], re.M)


async def boot(
    client: Client, guest: Any, tmp: Path, name: str, timeout: float = 120, **opts: Any
) -> tuple[str, Path, Probe]:
    monitor = tmp / f"{name}.qmp"
    extra = [*opts.pop("qemu_extra", []), *Probe.extra(monitor)]
    path = await client.create(name, **guest_options(guest, qemu_extra=extra, **opts))
    console = Path(await client.prop(path, "ConsoleLog"))
    await wait_console(console, "VMSPAWN-GUEST-READY", timeout=timeout)
    return path, console, Probe(monitor)


@pytest.mark.parametrize("case", [c for c in test64.CASES if c.fits], ids=lambda c: c.name)
async def test_test64_device_sets_boot_and_the_budget_is_what_qemu_assigns(
    client: Client, guest: Any, tmp_path: Path, case: test64.Case
) -> None:
    path, console, probe = await boot(client, guest, tmp_path, "t64", qemu_extra=case.qemu_extra)
    used, budget = await client.prop(path, "PcieSlots")
    assert (used, budget) == (len(pcie0_slots(probe)), 30)
    text = console.read_text(errors="replace")
    seen = guest_pci(text)
    for ids, count in case.controllers:
        assert sum(seen.count(i) for i in ids) == count, (ids, seen)
    assert len(guest_disks(text)) == case.disks


async def test_28_nvme_are_refused_before_qemu_starts(client: Client, guest: Any, daemon: Any) -> None:
    case = test64.BY_NAME["nvme_basic_28 (test.sh)"]
    with pytest.raises(DBusError) as e:
        await client.create("t64", **guest_options(guest, qemu_extra=case.qemu_extra))
    assert e.value.type == E + "PcieSlotsExhausted"
    assert "28 for qemu_extra -device nvme without bus=" in str(e.value)
    assert qemu_pids(str(daemon.runtime_dir)) == []


async def test_scsi_add_drive_next_to_qemu_extra_controllers_scsi0_to_scsi3(
    client: Client, guest: Any, tmp_path: Path
) -> None:
    extra = [a for i in range(4) for a in ("-device", f"virtio-scsi-pci,id=scsi{i}")]
    path, console, probe = await boot(client, guest, tmp_path, "scsi4", qemu_extra=extra)
    ports = []
    for i in range(3):
        file = tmp_path / f"s{i}.raw"
        file.write_bytes(b"\0" * (1 << 20))
        _drive_id, port = await client.add_drive(path, str(file), disk_type="virtio-scsi", serial=f"hot{i}")
        ports.append(port)
        await wait_console(console, rf"VMSPAWN-BLOCK-ADD sd[a-z]+ serial=hot{i}")
    # One controller of ours, on a spare port, named around the user's.
    assert set(ports) == {ports[0]}
    assert probe.devices_on(ports[0]) == ["scsi4"]


async def test_scsi_boot_disk_next_to_a_users_scsi0_boots_on_a_builtin_port(
    client: Client, guest: Any, tmp_path: Path
) -> None:
    image = tmp_path / "boot.raw"
    image.write_bytes(b"\0" * (1 << 20))
    path, console, probe = await boot(
        client, guest, tmp_path, "scsiboot", image=str(image), disk_type="virtio-scsi",
        qemu_extra=["-device", "virtio-scsi-pci,id=scsi0"],
    )  # fmt: skip
    (port,) = [p for p in await client.prop(path, "Ports") if p["device"] == "scsi1"]
    assert port["role"] == "builtin"
    # Issue 11 finding 11: the guest cannot eject its root disk's controller.
    assert probe("qom-get", path=f"/machine/peripheral/{port['id']}", property="hotplug") is False
    assert len(guest_disks(console.read_text(errors="replace"))) == 1


async def test_180_spares_boot_and_the_very_last_one_hotplugs(
    client: Client, guest: Any, tmp_path: Path, daemon: Any
) -> None:
    """The daemon's 180-spare machine (its maximum) boots and both ends of its spares work.

    Both disks go through the daemon: AddDrive on the lowest free spare
    (sw0p0), AddDrive with `port` on the very last one (sw5p29), each
    RemoveDrive'd. With MSI-X on the implicit devices the 1-vCPU guest had
    no interrupt vector left for the last disk (virtio_blk probe -28).
    """
    path, console, _probe = await boot(client, guest, tmp_path, "wide", timeout=300, hotplug_spares=180)
    ports = await client.prop(path, "Ports")
    spares = [p for p in ports if p["role"] == "spare"]
    assert len(spares) == 180 == await client.prop(path, "FreeSparePorts")
    assert {p["kind"] for p in ports} == {"root-port", "switch-upstream", "downstream-port"}
    ups = [p for p in ports if p["kind"] == "switch-upstream"]
    assert len(ups) == 6
    assert all(p["parent"] in {q["id"] for q in ports if q["kind"] == "root-port"} for p in ups)
    assert {p["parent"] for p in spares} == {p["id"] for p in ups}
    assert spares[-1]["id"] == "sw5p29"

    for spare, serial in ((None, "FIRSTSPARE"), ("sw5p29", "LASTSPARE")):
        file = tmp_path / f"{serial}.raw"
        file.write_bytes(b"\0" * (1 << 20))
        mark = len(console.read_text(errors="replace"))
        options = {"serial": serial} | ({"port": spare} if spare else {})
        drive_id, port = await client.add_drive(path, str(file), **options)
        assert port == (spare or "sw0p0")
        added = await wait_console(console, rf"VMSPAWN-BLOCK-ADD (vd[a-z]+) serial={serial}", start=mark, timeout=400)
        await client.remove_drive(path, drive_id, timeout_usec=300_000_000)
        await wait_console(console, rf"VMSPAWN-BLOCK-REMOVE {added.group(1)}$", start=mark, timeout=300)
        assert await client.prop(path, "FreeSparePorts") == 180
        assert await client.prop(path, "Drives") == []


async def test_one_past_the_maximum_is_refused_before_qemu_starts(client: Client, guest: Any, daemon: Any) -> None:
    opts = variants(guest_options(guest, hotplug_spares=0), MACHINE_OPTIONS)
    plan = await client.call("PlanMachine", "sa{sv}", ["wide", opts])
    (buses,) = [e for e in plan[0] if e["kind"].value == "buses"]
    top = buses["max_spares"].value
    assert top == 180
    with pytest.raises(DBusError) as e:
        await client.create("wide", **guest_options(guest, hotplug_spares=top + 1))
    assert e.value.type == E + "TooManyPorts"
    assert f"max {top} on this machine" in str(e.value)
    assert qemu_pids(str(daemon.runtime_dir)) == []


async def test_add_then_remove_at_once_20_times_in_a_row(client: Client, guest: Any, tmp_path: Path) -> None:
    path, _console, _ = await boot(client, guest, tmp_path, "flip", hotplug_spares=2)
    file = tmp_path / "f.raw"
    file.write_bytes(b"\0" * (1 << 20))
    for _ in range(20):
        drive_id, _port = await client.add_drive(path, str(file))
        await client.remove_drive(path, drive_id, timeout_usec=30_000_000)
    assert await client.prop(path, "FreeSparePorts") == 2
    assert await client.prop(path, "Drives") == []


async def test_the_unit_tests_snapshot_is_what_this_qemu_says() -> None:
    assert await pcitypes.query("qemu-system-x86_64") == TYPES
    # Asked once per binary: the second answer is the cached one.
    assert await pcitypes.device_types("qemu-system-x86_64") is await pcitypes.device_types("qemu-system-x86_64")
