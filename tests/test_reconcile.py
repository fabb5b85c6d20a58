"""The pure part of re-attaching: QEMU's view against state.json."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.model import DiskType, Drive, DriveState, ImageFormat, MachineShare, Nic, PortRole
from vmspawnd.porttable import PortTable
from vmspawnd.reconcile import (
    DRIVER_TYPES,
    Snapshot,
    bus_name,
    fdset_owner,
    node_owner,
    parse_fdsets,
    parse_formats,
    parse_nodes,
    parse_peripheral,
    reconcile,
    reconcile_shares,
    unrecorded_shares,
    wanted_macs,
    wanted_parents,
)
from vmspawnd.topology import Port

SPARES = ("rp2", "rp3", "rp4", "rp5")
PORTS = ("rp0", "rp1", *SPARES)


def snap(
    devices: dict[str, tuple[str, str]], nodes: set[str], fdsets: dict[int, tuple[str, ...]] | None = None
) -> Snapshot:
    """devices: id -> (QOM type, parent bus); the ports themselves are added."""
    peripheral = {p: "pcie-root-port" for p in PORTS} | {d: t for d, (t, _) in devices.items()}
    return Snapshot(peripheral, {d: bus for d, (_, bus) in devices.items()}, frozenset(nodes), fdsets or {})


BOOT = {
    "disk0": ("virtio-blk-pci", "rp0"),
    "net0": ("virtio-net-pci", "rp1"),
    "implicit0": ("virtio-rng-pci", "pcie.0"),
}
DISK0 = Drive("disk0", "/img", DiskType.VIRTIO_BLK, "rp0")


def test_parsers() -> None:
    qom: list[dict[str, Any]] = [
        {"name": "rp0", "type": "child<pcie-root-port>"},
        {"name": "type", "type": "string"},
        {"name": "disk1", "type": "child<nvme>"},
    ]
    assert parse_peripheral(qom) == {"rp0": "pcie-root-port", "disk1": "nvme"}
    assert parse_nodes([{"node-name": "disk1-node"}, {"node-name": "#block123"}]) == {"disk1-node", "#block123"}
    fdsets = [
        {"fdset-id": 1, "fds": [{"fd": 30, "opaque": "disk1:/a"}]},
        {"fdset-id": 4, "fds": [{"fd": 31}, {"fd": 32, "opaque": "x"}]},
        {"fdset-id": 5, "fds": []},
    ]
    assert parse_fdsets(fdsets) == {1: ("disk1:/a",), 4: ("", "x"), 5: ()}
    assert bus_name("/machine/peripheral/rp4/rp4") == "rp4"
    assert bus_name("/machine/peripheral/scsi1/scsi1.0") == "scsi1.0"
    assert wanted_parents({"rp0": "pcie-root-port", "disk1": "nvme", "implicit0": "x"}, PORTS) == ["disk1", "implicit0"]
    assert fdset_owner(("disk1:0:/a", "other:x")) == "disk1"
    assert fdset_owner(("disk1:/a",)) == "disk1"
    assert fdset_owner(()) == ""
    assert node_owner("disk1-node") == "disk1"
    assert node_owner("a-node-node") == "a-node"
    assert node_owner("#block123") == ""
    assert node_owner("-node") == ""


def test_nothing_changed() -> None:
    disk1 = Drive("disk1", "/a", DiskType.NVME, "rp2", fdsets=(1,))
    s = snap(BOOT | {"disk1": ("nvme", "rp2")}, {"disk0-node", "disk1-node", "#block1"}, {1: ("disk1:/a",)})
    r = reconcile(s, {"disk0": DISK0, "disk1": disk1}, SPARES, next_fdset=2)
    assert r.drives == {"disk0": DISK0, "disk1": disk1}
    assert r.ports == {"rp2": "disk1"}
    assert (r.orphan_nodes, r.orphan_fdsets, r.messages) == ((), (), ())
    assert r.next_fdset == 2


def test_a_crash_between_blockdev_add_and_device_add_leaves_orphans() -> None:
    # disk1's node and fdset were added, its device never was.
    s = snap(BOOT, {"disk0-node", "disk1-node"}, {3: ("disk1:/a",)})
    r = reconcile(s, {"disk0": DISK0}, SPARES)
    assert r.drives == {"disk0": DISK0}
    assert r.orphan_nodes == ("disk1-node",)
    assert r.orphan_fdsets == (3,)
    assert r.ports == {}
    assert r.next_fdset == 4
    assert r.messages == (
        "removing orphan block node disk1-node (a request cut short)",
        "removing orphan fdset 3 (a request cut short)",
    )


def test_a_crash_after_device_add_adopts_the_drive_with_every_fdset() -> None:
    # A qcow2 chain: one fdset per layer, each named after the drive.
    s = snap(
        BOOT | {"scsi1": ("virtio-scsi-pci", "rp3"), "hp": ("scsi-hd", "scsi1.0")},
        {"disk0-node", "hp-node"},
        {7: ("hp:0:/top.qcow2",), 8: ("hp:1:/base.qcow2",), 9: ("hp:1d:/base.data",)},
    )
    r = reconcile(s, {"disk0": DISK0}, SPARES, next_fdset=7)
    assert r.drives["hp"] == Drive(
        "hp", "/top.qcow2", DiskType.VIRTIO_SCSI, "rp3", fdsets=(7, 8, 9), controller="scsi1"
    )
    assert r.orphan_fdsets == ()
    assert r.ports == {"rp3": "scsi1"}
    assert r.next_fdset == 10
    assert r.messages == ("drive hp on rp3 was not in state.json; taken from QEMU",)


def test_an_adopted_drive_keeps_the_format_and_read_only_its_node_has() -> None:
    """A kept machine boots an adopted drive again: as the qcow2 it is, never as raw."""
    named = [
        {"node-name": "hp-node", "drv": "qcow2", "ro": True},
        {"node-name": "disk0-node", "drv": "raw", "ro": False},
        {"node-name": "#block123", "drv": "file", "ro": True},
    ]
    formats = parse_formats(named)
    assert formats == {"hp-node": (ImageFormat.QCOW2, True), "disk0-node": (ImageFormat.RAW, False)}
    s = snap(BOOT | {"hp": ("virtio-blk-pci", "rp2")}, {"disk0-node", "hp-node"}, {7: ("hp:0:/top.qcow2",)})
    r = reconcile(Snapshot(s.peripheral, s.parent_bus, s.nodes, s.fdsets, formats=formats), {"disk0": DISK0}, SPARES, 7)
    assert (r.drives["hp"].format, r.drives["hp"].read_only) == (ImageFormat.QCOW2, True)


def test_a_drive_unplugged_while_the_daemon_was_down_is_dropped_and_cleaned() -> None:
    gone = Drive("disk2", "/b", DiskType.NVME, "rp2", DriveState.REMOVING, fdsets=(2,))
    s = snap(BOOT, {"disk0-node", "disk2-node"}, {2: ("disk2:/b",)})
    r = reconcile(s, {"disk0": DISK0, "disk2": gone}, SPARES, next_fdset=3)
    assert list(r.drives) == ["disk0"]
    assert (r.orphan_nodes, r.orphan_fdsets) == (("disk2-node",), (2,))
    assert r.messages[0] == "drive disk2 went away while vmspawnd was down"


def test_a_removing_drive_qemu_still_has_keeps_its_port_and_state() -> None:
    removing = Drive("disk2", "/b", DiskType.NVME, "rp2", DriveState.REMOVING, fdsets=(2,))
    s = snap(BOOT | {"disk2": ("nvme", "rp2")}, {"disk0-node", "disk2-node"}, {2: ("disk2:/b",)})
    r = reconcile(s, {"disk0": DISK0, "disk2": removing}, SPARES)
    assert r.drives["disk2"] == removing
    assert r.ports == {"rp2": "disk2"}


def test_qemu_is_the_truth_for_the_port() -> None:
    recorded = Drive("disk1", "/a", DiskType.NVME, "rp2")
    r = reconcile(snap(BOOT | {"disk1": ("nvme", "rp4")}, {"disk1-node"}), {"disk1": recorded}, SPARES)
    assert r.drives["disk1"].port == "rp4"
    assert r.ports == {"rp4": "disk1"}
    assert r.messages == ("drive disk1 is on rp4 in QEMU, state.json said rp2",)


def test_any_device_on_a_spare_port_holds_it_and_keeps_its_fdsets() -> None:
    # Networks and shares hotplugged onto spares, and a user's own device.
    s = snap(
        BOOT | {"net1": ("virtio-net-pci", "rp2"), "fs3": ("vhost-user-fs-pci", "rp5"), "mine": ("e1000e", "rp4")},
        {"disk0-node"},
        {4: ("net1:tap",), 5: ("",)},
    )
    r = reconcile(s, {"disk0": DISK0}, SPARES, next_fdset=6)
    assert r.ports == {"rp2": "net1", "rp4": "mine", "rp5": "fs3"}
    # net1's fdset stays; an fd without an opaque belongs to nobody.
    assert r.orphan_fdsets == (5,)


def test_two_devices_on_one_spare_port() -> None:
    s = snap(BOOT | {"a": ("e1000e", "rp2"), "b": ("e1000e", "rp2")}, set())
    r = reconcile(s, {}, SPARES)
    assert r.ports == {"rp2": "a"}
    assert r.messages == ("port rp2 holds both a and b in QEMU; counting a",)


# -- for every world --------------------------------------------------------------

DEV_IDS = [f"d{i}" for i in range(8)]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Snapshot, dict[str, Drive], int]:
    """QEMU's devices on spare ports (drives, controllers, others), block
    nodes and fdsets for present and absent devices, and a state.json that
    may be stale in either direction."""
    present = draw(st.lists(st.sampled_from(DEV_IDS), unique=True, max_size=6))
    devices: dict[str, tuple[str, str]] = {}
    free = list(SPARES)
    for dev in present:
        kind = draw(st.sampled_from([*DRIVER_TYPES, "virtio-scsi-pci", "virtio-net-pci"]))
        if kind in ("scsi-hd", "scsi-cd"):
            devices.setdefault("scsi9", ("virtio-scsi-pci", free.pop(0) if free else "pcie.0"))
            devices[dev] = (kind, "scsi9.0")
        else:
            devices[dev] = (kind, free.pop(0) if free else draw(st.sampled_from(SPARES)))
    absent = [d for d in DEV_IDS if d not in devices]
    noded = draw(st.lists(st.sampled_from(DEV_IDS), unique=True))
    nodes = {f"{d}-node" for d in noded} | draw(st.sets(st.sampled_from(["#block1", "#block2", "other"])))
    fd_owners = draw(st.lists(st.sampled_from([*DEV_IDS, ""]), max_size=8))
    fdsets = {i + 1: ((f"{o}:{i % 3}:/p{i}",) if o else ()) for i, o in enumerate(fd_owners)}
    recorded_ids = draw(st.lists(st.sampled_from(present + absent), unique=True))
    recorded = {
        d: Drive(d, f"/{d}", DiskType.NVME, draw(st.sampled_from(SPARES)), fdsets=draw(st.tuples(st.integers(1, 9))))
        for d in recorded_ids
    }
    return snap(devices, nodes, fdsets), recorded, draw(st.integers(1, 20))


@given(worlds())
def test_the_rules_hold_for_every_world(world: tuple[Snapshot, dict[str, Drive], int]) -> None:
    s, recorded, next_fdset = world
    r = reconcile(s, recorded, SPARES, next_fdset)
    present = set(s.peripheral)
    # Only what QEMU has is kept; every recorded drive QEMU has is kept.
    assert set(r.drives) <= present
    assert {d for d in recorded if d in present} <= set(r.drives)
    # Adopted: a drive type with its node.
    for dev in set(r.drives) - set(recorded):
        assert s.peripheral[dev] in DRIVER_TYPES and f"{dev}-node" in s.nodes
    # Orphans: exactly the nodes and fdsets of devices QEMU does not have.
    assert set(r.orphan_nodes) == {n for n in s.nodes if (o := node_owner(n)) and o not in present}
    assert set(r.orphan_fdsets) == {i for i, op in s.fdsets.items() if fdset_owner(op) not in present}
    # A drive holds exactly the fdsets QEMU has for it (every layer), none an orphan.
    for dev, drive in r.drives.items():
        assert set(drive.fdsets) == {i for i, op in s.fdsets.items() if fdset_owner(op) == dev}
        assert not set(drive.fdsets) & set(r.orphan_fdsets)
    # The ports are a valid observation for the port table.
    plan = [Port("rp0", PortRole.BUILTIN, carries="disk0"), Port("rp1", PortRole.BUILTIN, carries="net0")]
    plan += [Port(f"rp{i}", PortRole.SPARE) for i in range(2, 6)]
    table = PortTable(plan, "m", observed=r.ports)
    for port, dev in r.ports.items():
        assert s.parent_bus[dev] == port
        assert table.holder(port) == dev
    # A new fdset id collides with none QEMU has.
    assert r.next_fdset >= next_fdset
    assert all(r.next_fdset > i for i in s.fdsets)


# -- shares ------------------------------------------------------------------

SHARE0 = MachineShare("share0", "hot", "/srv/a", "rp2", pid=77, start_time=5)
SHARES_BOOT = BOOT | {"rootfs": ("vhost-user-fs-pci", "rp1")}


def test_a_recorded_share_qemu_still_has_is_kept_on_qemus_port() -> None:
    s = snap(SHARES_BOOT | {"share0": ("vhost-user-fs-pci", "rp3")}, set())
    found = reconcile_shares(s, {"share0-vfs", "rootfs", "console"}, {"share0": SHARE0}, {})
    assert found.shares == {"share0": MachineShare("share0", "hot", "/srv/a", "rp3", pid=77, start_time=5)}
    assert found.orphan_chardevs == ()
    assert found.messages == ("share share0 is on rp3 in QEMU, state.json said rp2",)


def test_a_share_unplugged_while_the_daemon_was_down_is_dropped() -> None:
    found = reconcile_shares(snap(SHARES_BOOT, set()), set(), {"share0": SHARE0}, {})
    assert found.shares == {}
    assert found.messages == ("share share0 went away while vmspawnd was down",)


def test_a_crash_after_device_add_adopts_the_share_with_qemus_tag() -> None:
    s = snap(SHARES_BOOT | {"share4": ("vhost-user-fs-pci", "rp2")}, set())
    assert unrecorded_shares(s.peripheral, {}, {"rootfs"}) == ["share4"]
    found = reconcile_shares(s, {"share4-vfs"}, {}, {"share4": "t"})
    assert found.shares == {"share4": MachineShare("share4", "t", "", "rp2")}
    assert "not in state.json" in found.messages[0]


def test_a_crash_between_chardev_add_and_device_add_leaves_an_orphan_chardev() -> None:
    found = reconcile_shares(snap(SHARES_BOOT, set()), {"share1-vfs", "rootfs", "user-vfsx"}, {}, {})
    assert found.orphan_chardevs == ("share1-vfs",)
    assert found.shares == {}


# -- NICs ------------------------------------------------------------------------


def nic_snap(devices: dict[str, tuple[str, str]], macs: dict[str, str]) -> Snapshot:
    return replace(snap(BOOT | devices, {"disk0-node"}), macs=macs)


def test_wanted_macs_are_those_of_nics_on_spare_ports() -> None:
    s = snap(BOOT | {"nic1": ("virtio-net-pci", "rp2"), "d": ("nvme", "rp3")}, set())
    assert wanted_macs(s.peripheral, s.parent_bus, SPARES) == ["nic1"]


def test_a_recorded_nic_qemu_has_is_kept_with_qemus_port_and_mac() -> None:
    recorded = Nic("nic1", "tap:t0", "02:00:00:00:00:01", "rp3", DriveState.REMOVING)
    r = reconcile(
        nic_snap({"nic1": ("virtio-net-pci", "rp2")}, {"nic1": "02:00:00:00:00:09"}),
        {"disk0": DISK0}, SPARES, recorded_nics={"nic1": recorded},
    )  # fmt: skip
    assert r.nics == {"nic1": Nic("nic1", "tap:t0", "02:00:00:00:00:09", "rp2", DriveState.REMOVING)}
    assert r.ports == {"rp2": "nic1"}
    assert r.messages == ("network interface nic1 is on rp2 in QEMU, state.json said rp3",)


def test_a_recorded_nic_qemu_lost_is_dropped_and_an_unrecorded_one_adopted() -> None:
    gone = Nic("nic1", "user", "02:00:00:00:00:01", "rp2")
    r = reconcile(
        nic_snap({"nic2": ("virtio-net-pci", "rp4")}, {"nic2": "02:00:00:00:00:02"}),
        {"disk0": DISK0}, SPARES, recorded_nics={"nic1": gone},
    )  # fmt: skip
    assert r.nics == {"nic2": Nic("nic2", "unknown", "02:00:00:00:00:02", "rp4")}
    assert r.messages == (
        "network interface nic1 went away while vmspawnd was down",
        "network interface nic2 on rp4 was not in state.json; taken from QEMU",
    )


def test_node_owner_knows_both_generations_of_a_drive_node() -> None:
    assert node_owner("disk1-swap") == "disk1"
    assert node_owner("-swap") == ""
    assert node_owner("disk1-snap") == ""


def test_a_swapped_drive_is_kept_on_the_node_qemu_has() -> None:
    """SwapDrive moved disk1 to disk1-swap: recorded so, or not (the daemon died before writing it)."""
    swapped = Drive("disk1", "/new", DiskType.NVME, "rp2", fdsets=(3,), node="disk1-swap")
    s = snap(BOOT | {"disk1": ("nvme", "rp2")}, {"disk0-node", "disk1-swap"}, {3: ("disk1:0:/new",)})
    r = reconcile(s, {"disk0": DISK0, "disk1": swapped}, SPARES, next_fdset=4)
    assert r.drives["disk1"] == swapped
    assert (r.orphan_nodes, r.messages) == ((), ())
    r = reconcile(s, {"disk0": DISK0, "disk1": replace(swapped, node="")}, SPARES, next_fdset=4)
    assert r.drives["disk1"].block_node == "disk1-swap"
    assert r.messages == ("drive disk1 reads from node disk1-swap in QEMU, state.json said disk1-node",)
    # Adopted on its swapped node, with that node's format.
    formats = {"disk1-swap": (ImageFormat.QCOW2, False)}
    r = reconcile(Snapshot(s.peripheral, s.parent_bus, s.nodes, s.fdsets, formats=formats), {"disk0": DISK0}, SPARES)
    assert r.drives["disk1"] == replace(swapped, format=ImageFormat.QCOW2)
    # Swapped back: the drive's own node again, recorded as "".
    s = snap(BOOT | {"disk1": ("nvme", "rp2")}, {"disk0-node", "disk1-node"}, {3: ("disk1:0:/new",)})
    assert reconcile(s, {"disk0": DISK0}, SPARES).drives["disk1"].node == ""
    # Both nodes: the mirror of a swap cut short still runs; neither is an orphan.
    s = snap(BOOT | {"disk1": ("nvme", "rp2")}, {"disk0-node", "disk1-node", "disk1-swap"})
    r = reconcile(s, {"disk0": DISK0, "disk1": replace(swapped, node="")}, SPARES)
    assert r.drives["disk1"].block_node == "disk1-node" and r.orphan_nodes == ()
