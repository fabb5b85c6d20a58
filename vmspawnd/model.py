"""Frozen value types shared by the planner, the command line and the runtime."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class DiskType(enum.StrEnum):
    VIRTIO_BLK = "virtio-blk"
    VIRTIO_SCSI = "virtio-scsi"
    VIRTIO_SCSI_CDROM = "virtio-scsi-cdrom"
    NVME = "nvme"

    @property
    def is_scsi(self) -> bool:
        return self in (DiskType.VIRTIO_SCSI, DiskType.VIRTIO_SCSI_CDROM)


class ImageFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class Accel(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"
    AUTO = "auto"


class Firmware(enum.StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class Graphics(enum.StrEnum):
    """A display device, and how a client sees it (OpenGraphics): never a
    port or path QEMU listens on."""

    NONE = "none"
    VNC = "vnc"
    SPICE = "spice"


class NetworkMode(enum.StrEnum):
    NONE = "none"
    USER = "user"
    TAP = "tap"


class MachineState(enum.StrEnum):
    STARTING = "starting"
    # Created with `incoming`: QEMU waits for a migration stream (Incoming).
    INCOMING = "incoming"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    # A kept machine whose memory and device state QEMU saved to a file
    # (Suspend); Start() goes on from there.
    SUSPENDED = "suspended"
    FAILED = "failed"
    # Its QEMU may be alive but the daemon cannot manage it (see StateReason);
    # its directory is kept and it is retried.
    UNMANAGED = "unmanaged"

    @property
    def is_live(self) -> bool:
        """QEMU is up and takes commands (its vCPUs may be paused)."""
        return self in (MachineState.RUNNING, MachineState.PAUSED)

    @property
    def at_rest(self) -> bool:
        """A kept machine with no QEMU that Start() boots or resumes."""
        return self in (MachineState.STOPPED, MachineState.SUSPENDED)


class PortRole(enum.StrEnum):
    BUILTIN = "builtin"
    SPARE = "spare"
    # A root port or switch upstream port that carries a switch, not a device.
    SWITCH = "switch"


class PortKind(enum.StrEnum):
    ROOT_PORT = "root-port"
    UPSTREAM = "switch-upstream"
    DOWNSTREAM = "downstream-port"


# A drive's block node is "<id>-node"; after a SwapDrive "<id>-swap", then
# "<id>-node" again (QEMU cannot rename a node; both fit its 31 characters).
NODE_SUFFIX = "-node"
SWAP_SUFFIX = "-swap"


class DriveState(enum.StrEnum):
    ATTACHED = "attached"
    REMOVING = "removing"


@dataclass(frozen=True)
class DriveSpec:
    path: Path
    disk_type: DiskType = DiskType.VIRTIO_BLK
    format: ImageFormat = ImageFormat.RAW
    read_only: bool = False
    serial: str = ""


@dataclass(frozen=True)
class Drive:
    """A drive attached to a running machine (and what it was asked with, so
    a kept machine boots with it again: format, read_only, serial)."""

    id: str
    path: str
    disk_type: DiskType
    # The root port the drive sits on; a SCSI drive names its controller's port.
    port: str
    state: DriveState = DriveState.ATTACHED
    # The fdsets QEMU holds the drive's layers in (hotplugged drives), one per layer.
    fdsets: tuple[int, ...] = ()
    # Set for SCSI drives: the controller they hang off.
    controller: str = ""
    format: ImageFormat = ImageFormat.RAW
    read_only: bool = False
    serial: str = ""
    # The block node the device reads from: "" for the drive's own ("<id>-node");
    # SwapDrive moves it to the other generation ("<id>-swap"), and back.
    node: str = ""

    def drive_spec(self) -> DriveSpec:
        return DriveSpec(Path(self.path), self.disk_type, self.format, self.read_only, self.serial)

    @property
    def block_node(self) -> str:
        return self.node or self.id + NODE_SUFFIX


@dataclass(frozen=True)
class PluggedDrive:
    """A drive a kept machine boots with on a spare port: one it had
    hotplugged, on the port (and SCSI controller) it had, with its id."""

    id: str
    drive: DriveSpec
    # The spare port it sits on; a SCSI drive names its controller's port.
    port: str
    # Set for SCSI drives: the controller (itself on `port`) they hang off.
    controller: str = ""


@dataclass(frozen=True)
class MachineShare:
    """A virtiofs share of a running machine (boot-time or hotplugged)."""

    id: str
    tag: str
    directory: str
    port: str
    read_only: bool = False
    state: DriveState = DriveState.ATTACHED
    # The hotplugged share's virtiofsd (pid, start time): a restarted daemon adopts it.
    pid: int = 0
    start_time: int = 0


@dataclass(frozen=True)
class Nic:
    """A network interface of a running machine (virtio-net-pci + its netdev, same id)."""

    id: str
    # What it is connected to: "user", "tap:NAME", or "fd:NAME" (a tap the caller opened).
    network: str
    mac: str
    port: str
    state: DriveState = DriveState.ATTACHED


@dataclass(frozen=True)
class MountSpec:
    source: Path
    tag: str
    read_only: bool = False


@dataclass(frozen=True)
class Network:
    mode: NetworkMode = NetworkMode.NONE
    tap: str = ""


MiB = 1024 * 1024


@dataclass(frozen=True)
class DeviceTypes:
    """QEMU's own list of device types (vmspawnd.pcitypes asks it)."""

    known: frozenset[str]
    # Types implementing pci-device: each takes a PCI slot where it sits.
    pci: frozenset[str]
    # PCI-PCI bridges: each takes a bus number of its own.
    bridges: frozenset[str]
    # (alias, type), e.g. ("virtio-blk", "virtio-blk-pci").
    aliases: tuple[tuple[str, str], ...] = ()

    def resolve(self, driver: str) -> str | None:
        """The type `driver` names (through its alias), None if QEMU has none."""
        if driver in self.known:
            return driver
        return next((t for a, t in self.aliases if a == driver), None)


@dataclass(frozen=True)
class MachineSpec:
    """Everything CreateMachine was asked for, validated for types and ranges."""

    name: str
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    image: DriveSpec | None = None
    drives: tuple[DriveSpec, ...] = ()
    directory: Path | None = None
    mounts: tuple[MountSpec, ...] = ()
    network: Network = field(default_factory=Network)
    vsock: bool = False
    memory: int = 512 * MiB
    cpus: int = 1
    hotplug_spares: int = 10
    accel: Accel = Accel.AUTO
    qemu_extra: tuple[str, ...] = ()
    firmware: Firmware = Firmware.BIOS
    # Stays defined when it stops; Start() boots it again (Terminate ends it for good).
    keep: bool = False
    # A kept machine's hotplugged drives, at boot on the spare ports they had.
    plugged: tuple[PluggedDrive, ...] = ()
    # A virtio-serial port for the QEMU guest agent (qemu-ga) in the guest.
    guest_agent: bool = False
    graphics: Graphics = Graphics.NONE

    @property
    def boot_drives(self) -> tuple[DriveSpec, ...]:
        """The image first (it boots), then the extra drives, in request order."""
        return ((self.image,) if self.image else ()) + self.drives
