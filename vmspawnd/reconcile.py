"""After a daemon restart: what QEMU has, against what state.json recorded.

Pure: the QMP answers come in (Snapshot), the decisions go out (Reconciled);
machine.py asks QEMU and carries them out. QEMU is the truth: a recorded
drive QEMU no longer has is dropped, a drive QEMU has that was not recorded
(a request cut short by a crash after device_add) is adopted, and block
nodes and fdsets no device uses any more (cut short before device_add) are
removed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from . import imagechain, nic
from .blockjob import drive_nodes
from .model import NODE_SUFFIX, SWAP_SUFFIX, DiskType, Drive, ImageFormat, MachineShare, Nic

# QOM types of the devices a Drive is made of.
DRIVER_TYPES = {
    "nvme": DiskType.NVME,
    "virtio-blk-pci": DiskType.VIRTIO_BLK,
    "scsi-hd": DiskType.VIRTIO_SCSI,
    "scsi-cd": DiskType.VIRTIO_SCSI_CDROM,
}
SHARE_TYPE = "vhost-user-fs-pci"
# A hotplugged share's chardev is its device id with this suffix (machine.SHARE_CHARDEV).
CHARDEV_SUFFIX = "-vfs"


@dataclass(frozen=True)
class Snapshot:
    """QEMU's answers, parsed (see the parse_* helpers)."""

    # qdev id -> QOM type, from qom-list of /machine/peripheral.
    peripheral: Mapping[str, str]
    # qdev id -> the last part of its parent_bus ("rp4", "scsi1.0", "pcie.0"),
    # for every device wanted_parents() named.
    parent_bus: Mapping[str, str]
    # query-named-block-nodes.
    nodes: frozenset[str]
    # fdset id -> the opaque strings of its fds (imagechain.opaque: "device-id:layer:path").
    fdsets: Mapping[int, tuple[str, ...]]
    # qdev id -> its mac property, for every NIC on a spare port (wanted_macs()).
    macs: Mapping[str, str] = field(default_factory=dict)
    # Block node -> its image format and whether it is read-only (parse_formats):
    # what an adopted drive was added with, so a kept machine boots it so again.
    formats: Mapping[str, tuple[ImageFormat, bool]] = field(default_factory=dict)


@dataclass(frozen=True)
class Reconciled:
    # Kept (recorded, still in QEMU) and adopted (in QEMU, not recorded)
    # drives, each with every fdset QEMU holds for it (one per qcow2 layer).
    drives: dict[str, Drive]
    # Kept and adopted NICs, likewise.
    nics: dict[str, Nic]
    # Spare port -> the device QEMU has on it (PortTable's `observed`).
    ports: dict[str, str]
    # Block nodes and fdsets of devices QEMU does not have: to remove.
    orphan_nodes: tuple[str, ...]
    orphan_fdsets: tuple[int, ...]
    # The first fdset id QEMU has not seen.
    next_fdset: int
    # What differed from state.json, for the log.
    messages: tuple[str, ...]


# -- parsing QMP answers -------------------------------------------------------


def parse_peripheral(qom_list: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """qom-list /machine/peripheral -> {qdev id: QOM type}."""
    return {str(c["name"]): str(c["type"])[len("child<") : -1] for c in qom_list if str(c["type"]).startswith("child<")}


def parse_nodes(named_block_nodes: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    return frozenset(str(n["node-name"]) for n in named_block_nodes)


def parse_formats(named_block_nodes: Iterable[Mapping[str, Any]]) -> dict[str, tuple[ImageFormat, bool]]:
    """query-named-block-nodes -> {node: (format, read-only)} for the nodes in a format we use."""
    formats = {str(f) for f in ImageFormat}
    return {
        str(n["node-name"]): (ImageFormat(n["drv"]), bool(n.get("ro", False)))
        for n in named_block_nodes
        if n.get("drv") in formats
    }


def parse_fdsets(query_fdsets: Iterable[Mapping[str, Any]]) -> dict[int, tuple[str, ...]]:
    return {int(f["fdset-id"]): tuple(str(fd.get("opaque", "")) for fd in f["fds"]) for f in query_fdsets}


def bus_name(qom_path: str) -> str:
    """A parent_bus QOM path -> its last part: /machine/peripheral/rp4/rp4 -> rp4."""
    return qom_path.rpartition("/")[2]


def wanted_parents(peripheral: Mapping[str, str], port_ids: Collection[str]) -> list[str]:
    """The devices whose parent_bus the snapshot needs: every device but the
    ports themselves (anything may sit on a spare port, also a user's device)."""
    return sorted(dev for dev in peripheral if dev not in port_ids)


def wanted_macs(
    peripheral: Mapping[str, str], parent_bus: Mapping[str, str], spare_ports: Collection[str]
) -> list[str]:
    """The NICs whose mac the snapshot needs: those on spare ports (hotplugged)."""
    return sorted(d for d, t in peripheral.items() if t == nic.DRIVER and parent_bus.get(d, "") in spare_ports)


def fdset_owner(opaques: tuple[str, ...]) -> str:
    """The device an fdset was passed for, "" for one without an opaque."""
    return imagechain.parse_opaque(opaques[0])[0] if opaques else ""


def node_owner(node: str) -> str:
    """The drive a block node was added for (either generation, see SwapDrive), "" for nodes not named by us."""
    for suffix in (NODE_SUFFIX, SWAP_SUFFIX):
        if node.endswith(suffix) and node != suffix:
            return node.removesuffix(suffix)
    return ""


def _live_node(dev: str, snap: Snapshot) -> str | None:
    """The drive's node QEMU has, either generation (the drive's own first)."""
    return next((n for n in drive_nodes(dev) if n in snap.nodes), None)


# -- the decision ---------------------------------------------------------------


def _drive_port(dev: str, snap: Snapshot) -> tuple[str, str]:
    """(port, controller) of a drive device, from its parent_bus."""
    bus = snap.parent_bus.get(dev, "")
    if DRIVER_TYPES.get(snap.peripheral.get(dev, ""), DiskType.VIRTIO_BLK).is_scsi:
        controller = bus.partition(".")[0]
        return snap.parent_bus.get(controller, ""), controller
    return bus, ""


def _nics(snap: Snapshot, recorded: Mapping[str, Nic], messages: list[str]) -> dict[str, Nic]:
    """Recorded NICs QEMU still has (at QEMU's port), then those it has that
    were not recorded (their network is not known to QEMU's answers)."""
    nics: dict[str, Nic] = {}
    for dev, card in recorded.items():
        if dev not in snap.macs:
            messages.append(f"network interface {dev} went away while vmspawnd was down")
            continue
        port = snap.parent_bus[dev]
        if port != card.port:
            messages.append(f"network interface {dev} is on {port} in QEMU, state.json said {card.port}")
        nics[dev] = replace(card, port=port, mac=snap.macs[dev])
    for dev, mac in sorted(snap.macs.items()):
        if dev not in nics:
            nics[dev] = Nic(dev, "unknown", mac, snap.parent_bus[dev])
            messages.append(f"network interface {dev} on {nics[dev].port} was not in state.json; taken from QEMU")
    return nics


def reconcile(
    snap: Snapshot,
    recorded: Mapping[str, Drive],
    spare_ports: Collection[str],
    next_fdset: int = 1,
    recorded_nics: Mapping[str, Nic] | None = None,
) -> Reconciled:
    messages: list[str] = []
    owned: dict[str, list[int]] = {}
    for fdset, opaques in sorted(snap.fdsets.items()):
        owned.setdefault(fdset_owner(opaques), []).append(fdset)

    drives: dict[str, Drive] = {}
    for dev, drive in recorded.items():
        if dev not in snap.peripheral:
            messages.append(f"drive {dev} went away while vmspawnd was down")
            continue
        port, controller = _drive_port(dev, snap)
        if (port, controller) != (drive.port, drive.controller) and port:
            messages.append(f"drive {dev} is on {port} in QEMU, state.json said {drive.port}")
            drive = replace(drive, port=port, controller=controller)
        node = drive.block_node if drive.block_node in snap.nodes else _live_node(dev, snap)
        if node is not None and node != drive.block_node:
            messages.append(f"drive {dev} reads from node {node} in QEMU, state.json said {drive.block_node}")
            drive = replace(drive, node=node)
        drives[dev] = replace(drive, fdsets=tuple(owned.get(dev, ())))
    for dev, qom_type in sorted(snap.peripheral.items()):
        if dev in drives or qom_type not in DRIVER_TYPES or (node := _live_node(dev, snap)) is None:
            continue
        port, controller = _drive_port(dev, snap)
        fdsets = tuple(owned.get(dev, ()))
        # The image is the chain's top layer; the other fdsets hold its backing files.
        layers = [imagechain.parse_opaque(snap.fdsets[i][0]) for i in fdsets]
        path = next((p for _, label, p in layers if label == imagechain.level_label(0)), "?")
        fmt, read_only = snap.formats.get(node, (ImageFormat.RAW, False))
        drives[dev] = Drive(
            dev, path, DRIVER_TYPES[qom_type], port, fdsets=fdsets, controller=controller, format=fmt,
            read_only=read_only, node="" if node.endswith(NODE_SUFFIX) else node,
        )  # fmt: skip
        messages.append(f"drive {dev} on {port} was not in state.json; taken from QEMU")

    nics = _nics(snap, recorded_nics or {}, messages)

    ports: dict[str, str] = {}
    for dev in sorted(snap.peripheral):
        port = snap.parent_bus.get(dev, "")
        if port not in spare_ports:
            continue
        if port in ports:
            messages.append(f"port {port} holds both {ports[port]} and {dev} in QEMU; counting {ports[port]}")
            continue
        ports[port] = dev

    # A device QEMU has keeps its nodes and fdsets, whatever state.json said.
    alive = set(snap.peripheral) | set(drives)
    orphan_nodes = tuple(sorted(n for n in snap.nodes if (owner := node_owner(n)) and owner not in alive))
    orphan_fdsets = tuple(sorted(i for i, opaques in snap.fdsets.items() if fdset_owner(opaques) not in alive))
    messages += [f"removing orphan block node {n} (a request cut short)" for n in orphan_nodes]
    messages += [f"removing orphan fdset {i} (a request cut short)" for i in orphan_fdsets]
    return Reconciled(
        drives=drives,
        nics=nics,
        ports=ports,
        orphan_nodes=orphan_nodes,
        orphan_fdsets=orphan_fdsets,
        next_fdset=max([next_fdset, *(i + 1 for i in snap.fdsets)]),
        messages=tuple(messages),
    )


# -- shares ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReconciledShares:
    # Kept (recorded, still in QEMU) and adopted (in QEMU, not recorded) hotplugged shares.
    shares: dict[str, MachineShare]
    # Chardevs of shares whose device_add never happened: to remove (virtiofsd ends with them).
    orphan_chardevs: tuple[str, ...]
    messages: tuple[str, ...]


def unrecorded_shares(peripheral: Mapping[str, str], recorded: Collection[str], boot: Collection[str]) -> list[str]:
    """vhost-user-fs devices QEMU has that neither the spec nor state.json knows (their tag is asked)."""
    return sorted(d for d, t in peripheral.items() if t == SHARE_TYPE and d not in recorded and d not in boot)


def reconcile_shares(
    snap: Snapshot,
    chardevs: Collection[str],
    recorded: Mapping[str, MachineShare],
    tags: Mapping[str, str],
) -> ReconciledShares:
    """QEMU is the truth, as for drives; `tags` the tag of each unrecorded_shares() device."""
    messages: list[str] = []
    shares: dict[str, MachineShare] = {}
    for dev, recorded_share in recorded.items():
        if snap.peripheral.get(dev) != SHARE_TYPE:
            messages.append(f"share {dev} went away while vmspawnd was down")
            continue
        port = snap.parent_bus.get(dev, "")
        if port and port != recorded_share.port:
            messages.append(f"share {dev} is on {port} in QEMU, state.json said {recorded_share.port}")
            recorded_share = replace(recorded_share, port=port)
        shares[dev] = recorded_share
    for dev, tag in sorted(tags.items()):
        port = snap.parent_bus.get(dev, "")
        # Its directory and virtiofsd are not known: RemoveShare still unplugs it.
        shares[dev] = MachineShare(dev, tag, "", port)
        messages.append(f"share {dev} (tag {tag!r}) on {port} was not in state.json; taken from QEMU")
    orphans = tuple(
        sorted(
            c for c in chardevs if c.endswith(CHARDEV_SUFFIX) and c.removesuffix(CHARDEV_SUFFIX) not in snap.peripheral
        )
    )
    messages += [f"removing orphan chardev {c} (an AddShare cut short)" for c in orphans]
    return ReconciledShares(shares, orphans, tuple(messages))
