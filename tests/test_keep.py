"""A kept machine's next boot, pure: hotplugged drives folded into its spec
(keep.fold), planned onto the spare ports they had (topology.place_plugged),
on QEMU's command line as hotplug put them (cmdline.plugged_args), and what
a stopped machine holds of its owner's quota (quota.held)."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.devtypes import TYPES
from vmspawnd import quota, state
from vmspawnd.cmdline import BOOT_FDSETS, Runtime, build_argv, plugged_files
from vmspawnd.config import Config, Quota
from vmspawnd.errors import AlreadyRunning, InvalidArgument, NoFreePort, QuotaExceeded
from vmspawnd.imagechain import single
from vmspawnd.keep import fold, plugged_drive
from vmspawnd.machine import Machine
from vmspawnd.manager import Manager
from vmspawnd.model import (
    DiskType,
    Drive,
    DriveSpec,
    DriveState,
    ImageFormat,
    MachineSpec,
    MachineState,
    MiB,
    Network,
    NetworkMode,
    PluggedDrive,
    PortRole,
)
from vmspawnd.topology import Plan, plan_machine

IMG = DriveSpec(Path("/img/root.raw"))


def spec(spares: int = 6) -> MachineSpec:
    return MachineSpec("k", image=IMG, network=Network(NetworkMode.USER), hotplug_spares=spares, keep=True)


def plan(s: MachineSpec) -> Plan:
    return plan_machine(s, TYPES)


def spare_ids(s: MachineSpec) -> list[str]:
    return [p.id for p in plan(s).spares]


# -- fold ------------------------------------------------------------------------


def test_fold_turns_each_hotplugged_drive_into_a_boot_drive_on_its_port_with_its_options() -> None:
    s = spec()
    spares = spare_ids(s)
    drives = [
        Drive("disk0", "/img/root.raw", DiskType.VIRTIO_BLK, "rp0"),
        Drive("data", "/d.qcow2", DiskType.NVME, spares[2], format=ImageFormat.QCOW2, read_only=True, serial="S1"),
        Drive("disk2", "/s", DiskType.VIRTIO_SCSI, spares[0], controller="scsi1", serial="x"),
        Drive("disk3", "/gone", DiskType.VIRTIO_BLK, spares[1], DriveState.REMOVING, (4,)),
    ]
    folded = fold(s, drives)
    # The boot drive stays the spec's own; a drive being removed is left out.
    assert folded.boot_drives == s.boot_drives
    assert folded.plugged == (
        PluggedDrive("data", DriveSpec(Path("/d.qcow2"), DiskType.NVME, ImageFormat.QCOW2, True, "S1"), spares[2]),
        PluggedDrive("disk2", DriveSpec(Path("/s"), DiskType.VIRTIO_SCSI, serial="x"), spares[0], "scsi1"),
    )
    assert replace(folded, plugged=()) == s
    # Folding the next run's drives again gives the same spec.
    assert fold(folded, [*drives[:1], *(plugged_drive(p) for p in folded.plugged)]) == folded


def test_a_folded_machine_lists_the_drives_and_holds_their_ports_before_it_runs(tmp_path: Path) -> None:
    s = spec()
    spares = spare_ids(s)
    folded = replace(
        s,
        plugged=(
            PluggedDrive("a", DriveSpec(Path("/a")), spares[3]),
            PluggedDrive("b", DriveSpec(Path("/b"), DiskType.VIRTIO_SCSI), spares[1], "scsi4"),
            PluggedDrive("c", DriveSpec(Path("/c"), DiskType.VIRTIO_SCSI_CDROM), spares[1], "scsi4"),
        ),
    )
    m = Machine(folded, plan(folded), "0" * 32, tmp_path / "k", 0)
    assert {d.id: (d.port, d.controller) for d in m.drives.values()} == {
        "disk0": ("rp0", ""), "a": (spares[3], ""), "b": (spares[1], "scsi4"), "c": (spares[1], "scsi4"),
    }  # fmt: skip
    assert m.ports.holder(spares[3]) == "a" and m.ports.holder(spares[1]) == "scsi4"
    assert m.ports.free_count == len(spares) - 2
    # The next AddDrive takes the lowest free spare, never a folded drive's.
    assert m.ports.take("new") == spares[0]


# -- the plan honours the fixed ports ----------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.data())
def test_plugged_drives_land_on_their_ports_and_nothing_else_moves(spares: int, data: st.DataObject) -> None:
    s = spec(spares)
    before = plan(s)
    ids = [p.id for p in before.spares]
    taken = data.draw(st.lists(st.sampled_from(ids), unique=True, max_size=len(ids)))
    plugged = tuple(PluggedDrive(f"hp{i}", DriveSpec(Path(f"/d{i}")), port) for i, port in enumerate(taken))
    after = plan(replace(s, plugged=plugged))
    carried = {p.port: p.id for p in plugged}
    # Same ports, addresses, chassis, roles: only what the spares carry differs.
    assert [replace(p, carries="") for p in after.ports] == [replace(p, carries="") for p in before.ports]
    assert {p.id: p.carries for p in after.ports if p.role is PortRole.SPARE and p.carries} == carried
    assert [p.carries for p in after.ports if p.role is PortRole.BUILTIN] == [
        p.carries for p in before.ports if p.role is PortRole.BUILTIN
    ]
    assert after.consumers == before.consumers


def test_a_port_the_plan_has_no_spare_of_is_refused() -> None:
    s = spec()
    for port in ("rp0", "rp999"):
        with pytest.raises(NoFreePort, match="no longer has"):
            plan(replace(s, plugged=(PluggedDrive("a", DriveSpec(Path("/a")), port),)))


def test_two_devices_on_one_port_or_one_controller_on_two_are_refused() -> None:
    s = spec()
    a, b = spare_ids(s)[:2]
    clashes = [
        (PluggedDrive("x", DriveSpec(Path("/x")), a), PluggedDrive("y", DriveSpec(Path("/y")), a)),
        (
            PluggedDrive("x", DriveSpec(Path("/x"), DiskType.VIRTIO_SCSI), a, "scsi1"),
            PluggedDrive("y", DriveSpec(Path("/y"), DiskType.VIRTIO_SCSI), b, "scsi1"),
        ),
    ]
    for plugged in clashes:
        with pytest.raises(NoFreePort, match="clashes"):
            plan(replace(s, plugged=plugged))


def test_a_plugged_id_that_qemu_extra_uses_is_refused() -> None:
    s = replace(spec(), qemu_extra=("-device", "nvme,id=data,serial=n"))
    with pytest.raises(InvalidArgument, match="'data'"):
        plan(replace(s, plugged=(PluggedDrive("data", DriveSpec(Path("/a")), spare_ids(s)[0]),)))


# -- the command line --------------------------------------------------------------


def pairs(argv: list[str]) -> list[tuple[str, str]]:
    """(option, value) for every option of an argv."""
    return list(itertools.pairwise(argv))


def device(argv: list[str], dev: str) -> dict[str, object]:
    return next(json.loads(v) for k, v in pairs(argv) if k == "-device" and f'"id":"{dev}"' in v)


def test_plugged_drives_boot_on_their_ports_with_fdsets_of_the_hotplug_range() -> None:
    s = replace(spec(), qemu_extra=("-add-fd", "fd=3,set=2"))
    p = plan(s)
    spares = [x.id for x in p.spares]
    s = replace(
        s,
        plugged=(
            PluggedDrive("data", DriveSpec(Path("/d"), DiskType.NVME, serial="S1"), spares[4]),
            PluggedDrive("disk5", DriveSpec(Path("/s"), DiskType.VIRTIO_SCSI), spares[1], "scsi3"),
        ),
    )
    p = plan(s)
    chains = {
        "data": (single("/d", ImageFormat.RAW, False), {"0": 40}),
        "disk5": (single("/s", ImageFormat.RAW, False), {"0": 41}),
    }
    files, next_fdset = plugged_files(chains, 1, p.taken_fdsets)
    # Around qemu_extra's fdset 2; below the command line's own range.
    assert {d: [f.id for f in pf.fdsets.values()] for d, pf in files.items()} == {"data": [1], "disk5": [3]}
    assert next_fdset == 4 < BOOT_FDSETS
    rt = Runtime("0" * 32, 5, Path("/run/k/console.log"), 6, plugged=files)
    argv = build_argv(s, p, rt)
    add_fds = [v for k, v in pairs(argv) if k == "-add-fd"]
    assert "fd=40,set=1,opaque=data:0:/d" in add_fds and "fd=41,set=3,opaque=disk5:0:/s" in add_fds
    assert device(argv, "data") == {
        "id": "data", "drive": "data-node", "driver": "nvme", "bus": spares[4], "addr": "0", "serial": "S1",
    }  # fmt: skip
    assert device(argv, "scsi3") == {"driver": "virtio-scsi-pci", "id": "scsi3", "bus": spares[1], "addr": "0"}
    assert device(argv, "disk5")["bus"] == "scsi3.0"
    nodes = [json.loads(v) for k, v in pairs(argv) if k == "-blockdev"]
    assert {"node-name": "data-node", "driver": "raw", "read-only": False,
            "file": {"driver": "file", "filename": "/dev/fdset/1", "read-only": False}} in nodes  # fmt: skip
    # The spare ports stay hotplug-capable: a folded drive unplugs like any hotplugged one.
    port_args = [v for k, v in pairs(argv) if k == "-device" and f"id={spares[4]}," in v]
    assert port_args and "hotplug=off" not in port_args[0]


# -- quota -----------------------------------------------------------------------


def test_a_stopped_machine_counts_toward_machines_but_not_memory() -> None:
    q = Quota(machines=2, memory_total=1024 * MiB)
    big = quota.Usage(768 * MiB, 1, 2)
    stopped = quota.held(big, running=False)
    assert stopped == quota.Usage(0, 1, 2) and quota.held(big, running=True) == big
    # Its memory is free for another machine...
    quota.check(q, 1000, [stopped], big)
    # ...but it still takes one of the machines.
    with pytest.raises(QuotaExceeded, match="quota machines"):
        quota.check(q, 1000, [stopped, stopped], quota.Usage(64 * MiB, 1, 2))


# -- the manager's bookkeeping (no QEMU: every check comes before a start) ----------


def stopped_machine(tmp_path: Path, name: str, memory: int, owner: int = 1000) -> Machine:
    s = replace(spec(), name=name, memory=memory)
    m = Machine(s, plan(s), "0" * 32, tmp_path / name, owner)
    record: state.MachineRecord = m.stopped_record()
    m.loaded_stopped(record)
    return m


async def test_start_checks_the_owners_quota_with_stopped_machines_counting_as_machines_only(tmp_path: Path) -> None:
    config = Config(quota=Quota(machines=3, memory_total=1024 * MiB))
    manager = Manager(tmp_path, config)
    for name in ("a", "b"):
        manager.machines[name] = stopped_machine(tmp_path, name, 768 * MiB)
    # Two stopped machines of 768 MiB each hold no memory: the owner may create a third...
    assert manager._held(1000) == [quota.Usage(0, 1, 6)] * 2
    # ...but while one runs, starting the other goes over memory_total and changes nothing.
    manager.machines["a"].state = MachineState.RUNNING
    with pytest.raises(QuotaExceeded, match="memory_total"):
        await manager.start("b")
    assert manager.machines["b"].state is MachineState.STOPPED
    assert manager._creating == {}
    # Start of a running one: AlreadyRunning, before anything else.
    with pytest.raises(AlreadyRunning):
        await manager.start("a")


def test_fold_takes_the_file_a_swapped_boot_drive_moved_to() -> None:
    """SwapDrive of a boot drive: the next boot opens the new file, in its format."""
    s = replace(spec(), drives=(DriveSpec(Path("/img/data.raw"), serial="D"),))
    drives = [
        Drive("disk0", "/img/root.raw", DiskType.VIRTIO_BLK, "rp0"),
        Drive("disk1", "/new/data.qcow2", DiskType.VIRTIO_BLK, "rp1", format=ImageFormat.QCOW2, serial="D",
              node="disk1-swap"),
    ]  # fmt: skip
    folded = fold(s, drives)
    assert folded.image == IMG
    assert folded.drives == (DriveSpec(Path("/new/data.qcow2"), format=ImageFormat.QCOW2, serial="D"),)
    # An ejected boot cdrom (no file) keeps the spec's medium.
    cd = replace(s, image=DriveSpec(Path("/img/cd.iso"), DiskType.VIRTIO_SCSI_CDROM, read_only=True))
    assert fold(cd, [Drive("disk0", "", DiskType.VIRTIO_SCSI_CDROM, "rp0")]).image == cd.image


@pytest.mark.parametrize("keep", [True, False])
async def test_a_failed_start_with_tcg_after_kvm_failed_leaves_it_as_a_failed_start(tmp_path: Path, keep: bool) -> None:
    """Manager._fall_back: the machine's QEMU is gone (it is starting); its
    start with TCG failed. Kept, it stays, stopped, its record written; not
    kept, it goes, only its logs stay."""
    manager = Manager(tmp_path)
    removed: list[Machine] = []
    manager.on_removed = removed.append
    s = replace(spec(), name="k", keep=keep)
    m = Machine(s, plan(s), "0" * 32, tmp_path / "machines" / "k", 1000)
    m.dir.mkdir(parents=True)
    (m.dir / state.LOG).write_text("qemu-system-x86_64: no\n")
    (m.dir / "argv").write_text("qemu\n")
    manager.machines["k"] = m
    # Not stopped (cut short while its QEMU was quitting): nothing changes.
    m.state = MachineState.STOPPING
    await manager._fall_back_failed(m, "vmspawnd stopped meanwhile")
    assert manager.machines == {"k": m} and m.state is MachineState.STOPPING and not m.reason
    m.state = MachineState.STARTING
    await manager._fall_back_failed(m, "QEMU exited during start-up")
    assert m.reason == "the last Start() failed: QEMU exited during start-up"
    if keep:
        assert manager.machines == {"k": m} and m.state is MachineState.STOPPED and removed == []
        assert state.read(m.dir).stopped
    else:
        assert manager.machines == {} and m.state is MachineState.FAILED and removed == [m]
        assert sorted(p.name for p in m.dir.iterdir()) == [state.LOG]
