"""Plan + spec -> QEMU argv: pure, no I/O, one option per line."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .imagechain import Layer, Role, opaque, single
from .model import (
    NODE_SUFFIX,
    Accel,
    DiskType,
    DriveSpec,
    Firmware,
    Graphics,
    ImageFormat,
    MachineSpec,
    MiB,
    NetworkMode,
    PortKind,
)
from .qga import PORT_NAME
from .topology import AGENT_ID, Plan, Port, drive_id

QEMU = "qemu-system-x86_64"
OVMF = Path("/usr/share/ovmf/OVMF.fd")

# split-wx: TCG's code buffer is never writable and executable at once, so
# QEMU runs under the unit's MemoryDenyWriteExecute=yes.
TCG = "tcg,split-wx=on"
# Tried in order: "auto" is KVM where it initialises, else TCG.
ACCELS = {Accel.KVM: ("kvm",), Accel.TCG: (TCG,), Accel.AUTO: ("kvm", TCG)}


# vectors=0: no MSI-X, the guest uses INTx. A 1-vCPU Linux guest has about
# 200 interrupt vectors and every PCIe port holds one (its AER service), so
# on a 180-spare plan MSI-X here left none for a hotplugged disk; these
# devices are slow talkers (virtio-balloon-pci has no MSI-X at all).
IMPLICIT_PROPS: dict[str, dict[str, str | int | None]] = {
    "virtio-rng-pci": {"vectors": 0},
    "virtio-serial-pci": {"vectors": 0},
}

# The display's servers listen nowhere: OpenGraphics hands QEMU one end of a
# socketpair per client (add_client). VNC: a display with no listener; SPICE:
# no port, no tls-port (nor unix), and no ticket: whoever holds the fd is let in
# (the daemon checked the caller's rights before).
GRAPHICS_ARGS: dict[Graphics, tuple[str, ...]] = {
    Graphics.NONE: (),
    Graphics.VNC: ("-vnc", "none"),
    Graphics.SPICE: ("-spice", "disable-ticketing=on"),
}

# fdset ids from here on are the command line's (console, boot drives);
# fdsets passed at run time (hotplug) count from 1.
BOOT_FDSETS = 1_000_000
# QEMU's own seccomp filter: no obsolete system calls, no setuid & co, no
# fork/exec (a `migrate exec:` or a guest escape runs no host command), no
# scheduler or affinity changes.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class Fdset:
    id: int
    fd: int
    # What the fd is, shown by query-fdsets: the file's path.
    opaque: str


@dataclass(frozen=True)
class PluggedFiles:
    """A kept machine's hotplugged drive at boot: its chain, each layer in an
    fdset of the hotplug range with the opaque AddDrive gives it, so RemoveDrive
    and a daemon restart treat it as the hotplugged drive it was."""

    top: Layer
    # layer label -> its fdset
    fdsets: dict[str, Fdset]

    def path(self, layer: Layer) -> str:
        return f"/dev/fdset/{self.fdsets[layer.label].id}"


def plugged_files(
    chains: dict[str, tuple[Layer, dict[str, int]]], first: int, taken: frozenset[int]
) -> tuple[dict[str, PluggedFiles], int]:
    """Number the fdsets of each drive's layers (`chains`: device id -> (top
    layer, label -> fd)) from `first`, around qemu_extra's; returns them and
    the next free fdset id."""
    ids = (i for i in itertools.count(first) if i not in taken)
    out = {
        dev: PluggedFiles(top, {la.label: Fdset(next(ids), fds[la.label], opaque(dev, la)) for la in top.walk()})
        for dev, (top, fds) in chains.items()
    }
    return out, next(ids)


@dataclass(frozen=True)
class Runtime:
    """Where this QEMU instance talks to the daemon, and the fds it inherits.

    QEMU runs as an unprivileged uid of its own: it opens nothing by name in
    the daemon's directories or that a caller named.
    """

    machine_id: str
    qmp_fd: int
    console_log: Path
    # console.log, opened by the daemon for writing.
    console_fd: int = -1
    vsock_cid: int = 0
    # Caller-supplied paths -> the fd the daemon opened with the caller's
    # rights (O_RDONLY or O_RDWR as QEMU will ask); each becomes an fdset.
    opened: dict[str, int] = field(default_factory=dict)
    # Kernel and initrd: -kernel opens by name and knows no fdsets, so QEMU
    # reopens /proc/self/fd/N: a file anyone may read, or a sealed memfd.
    kernel_fd: int | None = None
    initrd_fd: int | None = None
    # virtiofs device id -> QEMU's end of its connection to virtiofsd.
    fs_fds: dict[str, int] = field(default_factory=dict)
    # The tap device the daemon opened (and checked the creator may use).
    tap_fd: int | None = None
    # A boot drive's device id -> its image chain, every layer of it in `opened`.
    chains: dict[str, Layer] = field(default_factory=dict)
    # The listening socket of the serial console (console.py).
    console_sock: int = -1
    # A kept machine's drives on spare ports at boot, by device id.
    plugged: dict[str, PluggedFiles] = field(default_factory=dict)
    # A suspended machine's start: QEMU waits for its saved state
    # (migrate-incoming) and its vCPUs for the daemon's cont.
    # A live migration's destination runs the vCPUs once its state is in.
    autostart: bool = False
    incoming: bool = False
    # The listening socket of the guest agent's port (guest_agent machines).
    agent_sock: int = -1

    @property
    def console_fdset(self) -> Fdset:
        return Fdset(BOOT_FDSETS, self.console_fd, str(self.console_log))

    def _opened_fdsets(self) -> list[Fdset]:
        return [Fdset(BOOT_FDSETS + 1 + i, fd, path) for i, (path, fd) in enumerate(self.opened.items())]

    def fdsets(self) -> list[Fdset]:
        """The console's fdset, one per opened path, then the plugged drives' layers."""
        plugged = [f for p in self.plugged.values() for f in p.fdsets.values()]
        return [self.console_fdset, *self._opened_fdsets(), *plugged]

    def path(self, path: Path) -> str:
        """What QEMU is told for a caller's path: the fdset of the fd the daemon opened."""
        for fdset in self._opened_fdsets():
            if fdset.opaque == str(path):
                return f"/dev/fdset/{fdset.id}"
        return str(path)

    def chain(self, device_id: str, drive: DriveSpec) -> Layer:
        return self.chains.get(device_id) or single(str(drive.path), drive.format, read_only(drive))

    def layer_path(self, layer: Layer) -> str:
        return self.path(Path(layer.path))


def escape(value: str) -> str:
    """QEMU's key=value syntax doubles commas inside values."""
    return value.replace(",", ",,")


def opts(*parts: str, **props: str | int | None) -> str:
    """`a,b,key=value,...`; None values are left out."""
    items = list(parts) + [f"{k.replace('_', '-')}={v}" for k, v in props.items() if v is not None]
    return ",".join(items)


def node_name(device_id: str) -> str:
    return device_id + NODE_SUFFIX


def read_only(drive: DriveSpec) -> bool:
    return drive.read_only or drive.disk_type is DiskType.VIRTIO_SCSI_CDROM


def blockdev(device_id: str, top: Layer, filename: Callable[[Layer], str], node: str = "") -> dict[str, object]:
    """The -blockdev / QMP blockdev-add arguments for a drive's image chain,
    its top node named `node` (by default the drive's own, node_name()).

    Every layer is an explicit node whose file is `filename(layer)` (an fd
    of the daemon's): a qcow2 node always gets `backing` (a node, or null
    at the bottom) and its `data-file`, so QEMU opens nothing its header names.
    """
    return {"node-name": node or node_name(device_id)} | _node(top, filename)


def _node(layer: Layer, filename: Callable[[Layer], str]) -> dict[str, object]:
    file: dict[str, object] = {"driver": "file", "filename": filename(layer), "read-only": layer.read_only}
    if layer.role is Role.DATA_FILE:
        return file
    node: dict[str, object] = {"driver": str(layer.format), "read-only": layer.read_only, "file": file}
    if layer.format is ImageFormat.QCOW2:
        node["backing"] = _node(layer.backing, filename) if layer.backing is not None else None
        if layer.data_file is not None:
            node["data-file"] = _node(layer.data_file, filename)
    return node


def drive_device(device_id: str, drive: DriveSpec, bus: str, bootindex: int | None = None) -> dict[str, object]:
    """The -device / QMP device_add arguments for `drive` on `bus`.

    `bus` is a root port id, or the SCSI controller for SCSI disk types.
    """
    props: dict[str, object] = {"id": device_id, "drive": node_name(device_id)}
    if drive.disk_type.is_scsi:
        props["driver"] = "scsi-cd" if drive.disk_type is DiskType.VIRTIO_SCSI_CDROM else "scsi-hd"
        props["bus"] = f"{bus}.0"
    else:
        props["driver"] = "nvme" if drive.disk_type is DiskType.NVME else "virtio-blk-pci"
        # One device per root port, always at addr 0: any other addr is
        # accepted by QEMU but invisible to the guest.
        props["bus"] = bus
        props["addr"] = "0"
    serial = drive.serial or (device_id if drive.disk_type is DiskType.NVME else "")
    if serial:
        props["serial"] = serial
    if bootindex is not None:
        props["bootindex"] = bootindex
    return props


def scsi_controller(controller: str, port: str) -> dict[str, object]:
    return {"driver": "virtio-scsi-pci", "id": controller, "bus": port, "addr": "0"}


def port_device(port: Port) -> str:
    """The -device value of one level of the port tree."""
    if port.kind is PortKind.UPSTREAM:
        return opts("x3130-upstream", id=port.id, bus=port.bus, addr="0")
    return opts(
        "pcie-root-port" if port.kind is PortKind.ROOT_PORT else "xio3130-downstream",
        id=port.id,
        bus=port.bus,
        addr=port.addr,
        multifunction="on" if port.multifunction else None,
        chassis=port.chassis,
        slot=port.chassis,
        # The guest must not eject what it booted with.
        hotplug=None if port.hotplug else "off",
    )


def plugged_args(spec: MachineSpec, plan: Plan, rt: Runtime) -> list[str]:
    """A kept machine's hotplugged drives, on their spare ports (SCSI ones
    behind their controllers, each on its port) as hotplug put them."""
    argv: list[str] = []
    for controller in dict.fromkeys(p.controller for p in spec.plugged if p.controller):
        argv += _device_args(scsi_controller(controller, plan.port_carrying(controller).id))
    for p in spec.plugged:
        files = rt.plugged[p.id]
        node = blockdev(p.id, files.top, files.path)
        argv += ["-blockdev", json.dumps(node, separators=(",", ":"))]
        argv += _device_args(drive_device(p.id, p.drive, p.controller or p.port))
    return argv


def _device_args(props: dict[str, object]) -> list[str]:
    return ["-device", json.dumps(props, separators=(",", ":"))]


@dataclass(frozen=True)
class Share:
    device: str
    source: Path
    tag: str


def shares(spec: MachineSpec) -> list[Share]:
    """The virtiofs shares: the root directory (tag "root"), then the mounts."""
    out = [Share("rootfs", spec.directory, "root")] if spec.directory is not None else []
    return out + [Share(f"fs{i}", m.source, m.tag) for i, m in enumerate(spec.mounts)]


def shared_memory(spec: MachineSpec) -> bool:
    """Guest memory QEMU can share with a vhost-user process (virtiofsd).

    Boot-time shares need it, and so does every machine with spare ports:
    a share may be hotplugged later, and the backend is chosen at boot. The
    cost is the memfd's: shmem pages get no transparent huge pages and no
    KSM merging; a machine created with hotplug_spares=0 and no share keeps
    plain anonymous memory.
    """
    return bool(shares(spec)) or spec.hotplug_spares > 0


def fs_device(device: str, chardev: str, tag: str, port: str) -> dict[str, object]:
    """A vhost-user-fs-pci device (boot-time and hotplugged) on `port`."""
    return {"driver": "vhost-user-fs-pci", "id": device, "chardev": chardev, "tag": tag, "bus": port, "addr": "0"}


def fs_chardev(chardev: str) -> dict[str, object]:
    """chardev-add of a hotplugged share: QEMU's end of the connection to its
    virtiofsd, passed with getfd under the chardev's own name."""
    addr = {"type": "fd", "data": {"str": chardev}}
    return {"id": chardev, "backend": {"type": "socket", "data": {"addr": addr, "server": False}}}


def agent_args(plan: Plan, rt: Runtime) -> list[str]:
    """The guest agent's virtio-serial port on the machine's virtio-serial
    device, its chardev a server socket the daemon connects to per call."""
    if rt.agent_sock < 0:
        raise ValueError("a guest agent port needs the listening socket the daemon made")
    return [
        "-chardev", opts("socket", id=AGENT_ID, fd=rt.agent_sock, server="on", wait="off"),
        "-device", opts(
            "virtserialport", id=AGENT_ID, bus=f"{plan.serial_controller}.0", chardev=AGENT_ID, name=PORT_NAME
        ),
    ]  # fmt: skip


def build_argv(spec: MachineSpec, plan: Plan, rt: Runtime) -> list[str]:
    fs = shares(spec)
    argv = [
        QEMU,
        "-name", opts(f"guest={escape(spec.name)}"),
        "-uuid", str(uuid.UUID(rt.machine_id)),
        "-sandbox", SANDBOX,
        "-machine", opts("q35", memory_backend="mem" if shared_memory(spec) else None),
        *(arg for accel in ACCELS[spec.accel] for arg in ("-accel", accel)),
        "-cpu", "max",
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory // MiB}M",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        *GRAPHICS_ARGS[spec.graphics],
        "-chardev", opts("socket", id="qmp", fd=rt.qmp_fd, server="on", wait="off"),
        "-mon", opts(chardev="qmp", mode="control"),
    ]  # fmt: skip
    for fdset in rt.fdsets():
        argv += ["-add-fd", opts(fd=fdset.fd, set=fdset.id, opaque=escape(fdset.opaque))]
    argv += [
        # A server socket: the daemon connects, and connects again after a
        # restart; QEMU itself logs every byte to console.log, connected or not.
        "-chardev", opts(
            "socket", id="console", fd=rt.console_sock, server="on", wait="off",
            logfile=f"/dev/fdset/{rt.console_fdset.id}", logappend="on",
        ),
        "-serial", "chardev:console",
    ]  # fmt: skip
    if shared_memory(spec):
        argv += ["-object", opts("memory-backend-memfd", id="mem", size=f"{spec.memory // MiB}M", share="on")]
    # Ports first: an auto-addressed device placed earlier could take a
    # slot the packed ports claim.
    for port in plan.ports:
        argv += ["-device", port_device(port)]
    # At the slots the plan gave them: qemu_extra's addr= slots stay free.
    for implicit in plan.implicit:
        props = IMPLICIT_PROPS.get(implicit.driver, {})
        argv += ["-device", opts(implicit.driver, id=implicit.id, bus="pcie.0", addr=implicit.addr, **props)]

    if spec.guest_agent:
        argv += agent_args(plan, rt)

    if plan.scsi_controller:
        argv += _device_args(scsi_controller(plan.scsi_controller, plan.port_carrying(plan.scsi_controller).id))
    for i, drive in enumerate(spec.boot_drives):
        dev = drive_id(i)
        bus = plan.scsi_controller if drive.disk_type.is_scsi else plan.port_carrying(dev).id
        bootindex = 1 if spec.image is not None and i == 0 else None
        argv += ["-blockdev", json.dumps(blockdev(dev, rt.chain(dev, drive), rt.layer_path), separators=(",", ":"))]
        argv += _device_args(drive_device(dev, drive, bus, bootindex))
    argv += plugged_args(spec, plan, rt)

    if spec.network.mode is not NetworkMode.NONE:
        if spec.network.mode is NetworkMode.TAP:
            # An fd, never a name: QEMU opening /dev/net/tun itself could attach any tap.
            if rt.tap_fd is None:
                raise ValueError("a tap network needs the tap fd the daemon opened")
            netdev = opts("tap", id="net0", fd=rt.tap_fd)
        else:
            netdev = opts("user", id="net0")
        argv += ["-netdev", netdev]
        argv += [
            "-device",
            opts("virtio-net-pci", id="net0", netdev="net0", bus=plan.port_carrying("net0").id, addr="0"),
        ]
    for share in fs:
        argv += ["-chardev", opts("socket", id=share.device, fd=rt.fs_fds[share.device])]
        argv += _device_args(fs_device(share.device, share.device, share.tag, plan.port_carrying(share.device).id))
    if spec.vsock:
        vsock_port = plan.port_carrying("vsock0").id
        argv += ["-device", opts("vhost-vsock-pci", id="vsock0", guest_cid=rt.vsock_cid, bus=vsock_port, addr="0")]

    if spec.firmware is Firmware.UEFI:
        argv += ["-bios", str(OVMF)]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel) if rt.kernel_fd is None else f"/proc/self/fd/{rt.kernel_fd}"]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd) if rt.initrd_fd is None else f"/proc/self/fd/{rt.initrd_fd}"]
    if spec.cmdline:
        argv += ["-append", spec.cmdline]
    if rt.incoming:
        argv += ([] if rt.autostart else ["-S"]) + ["-incoming", "defer"]
    return argv + list(spec.qemu_extra)
