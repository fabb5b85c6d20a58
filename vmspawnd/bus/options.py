"""a{sv} option dicts -> validated model values.

Unknown keys and wrong variant types are refused here, so the core only
ever sees well-typed values.
"""

import enum
import re
from pathlib import Path
from typing import Any, TypeVar

from dbus_fast import Variant

from .. import nic
from ..blockjob import DEFAULT_TIMEOUT, MAX_TIMEOUT
from ..cmdline import Share
from ..errors import InvalidArgument
from ..machine import DRIVE_ID, RESERVED_ID
from ..model import (
    Accel,
    DiskType,
    DriveSpec,
    Firmware,
    Graphics,
    ImageFormat,
    MachineSpec,
    MiB,
    MountSpec,
    Network,
    NetworkMode,
    PluggedDrive,
)

MACHINE_OPTIONS = {
    "kernel": "s",
    "initrd": "s",
    "cmdline": "s",
    "image": "s",
    "image_format": "s",
    "disk_type": "s",
    "drives": "aa{sv}",
    "directory": "s",
    "mounts": "aa{sv}",
    "network": "s",
    "vsock": "b",
    "memory": "t",
    "cpus": "u",
    "hotplug_spares": "u",
    "accel": "s",
    "qemu_extra": "as",
    "firmware": "s",
    "keep": "b",
    "plugged": "aa{sv}",
    "incoming": "b",
    "guest_agent": "b",
    "graphics": "s",
}
DRIVE_OPTIONS = {"path": "s", "format": "s", "disk_type": "s", "read_only": "b", "serial": "s"}
# A drive on a spare port at boot (a migrating machine's hotplugged drive, where it sits at the source).
PLUGGED_OPTIONS = DRIVE_OPTIONS | {"id": "s", "port": "s", "controller": "s"}
MIGRATE_OPTIONS = {"max_bandwidth": "t", "timeout_usec": "t"}
INCOMING_OPTIONS = {"timeout_usec": "t"}
# How long a migration may take unless the caller says otherwise.
MIGRATION_TIMEOUT = 600.0
CONTROLLER = re.compile(r"scsi\d+")
MOUNT_OPTIONS = {"source": "s", "tag": "s", "read_only": "b"}
ADD_DRIVE_OPTIONS = {"disk_type": "s", "format": "s", "read_only": "b", "serial": "s", "id": "s", "port": "s"}
REMOVE_DRIVE_OPTIONS = {"timeout_usec": "t"}
ADD_SHARE_OPTIONS = {"tag": "s", "read_only": "b", "id": "s"}
OPEN_CONSOLE_OPTIONS = {"read_only": "b"}
# None yet: the a{sv} leaves room (a protocol of several, a client's name).
OPEN_GRAPHICS_OPTIONS: dict[str, str] = {}
REPLACE_DRIVE_OPTIONS = {"format": "s"}
# SnapshotDrive's target format and SwapDrive's new file's; the job's bound and its speed in bytes/s.
BLOCK_JOB_OPTIONS = {"format": "s", "timeout_usec": "t", "max_bandwidth": "t"}
ADD_NETWORK_FD_OPTIONS = {"mac": "s", "id": "s"}
ADD_NETWORK_OPTIONS = ADD_NETWORK_FD_OPTIONS | {"network": "s"}

MIN_MEMORY = 32 * MiB
MAX_MEMORY = 1024 * 1024 * MiB
MAX_CPUS = 288
MAX_STRING = 4096
# Array caps, checked before any entry is looked at. Drives and mounts each
# need a port (at most 120 packed, ~200 behind switches); SCSI drives share one.
MAX_ENTRIES = {"drives": 256, "mounts": 64, "qemu_extra": 1024, "plugged": 256}
IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
SERIAL = re.compile(r"[\x21-\x7e]*")

E = TypeVar("E", bound=enum.StrEnum)


def unpack(options: dict[str, Variant], schema: dict[str, str], where: str) -> dict[str, Any]:
    """Check keys and variant signatures; return plain values."""
    if len(options) > len(schema):
        raise InvalidArgument(f"{where} takes at most {len(schema)} options, got {len(options)}")
    values = {}
    for key, variant in options.items():
        if key not in schema:
            raise InvalidArgument(f"unknown {where} option {key!r}; known options: {', '.join(sorted(schema))}")
        if not isinstance(variant, Variant) or variant.signature != schema[key]:
            got = variant.signature if isinstance(variant, Variant) else type(variant).__name__
            raise InvalidArgument(f"{where} option {key!r} must have type '{schema[key]}', got '{got}'")
        value = variant.value
        if key in MAX_ENTRIES and len(value) > MAX_ENTRIES[key]:
            raise InvalidArgument(f"{where} option {key!r} holds {len(value)} entries, at most {MAX_ENTRIES[key]}")
        strings = value if schema[key] == "as" else [value] if isinstance(value, str) else []
        if any(len(s.encode()) > MAX_STRING for s in strings):
            raise InvalidArgument(f"{where} option {key!r} holds a string longer than {MAX_STRING} bytes")
        values[key] = value
    return values


def choice(kind: type[E], value: str, key: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgument(f"unknown {key} {value!r}; use one of: {', '.join(kind)}") from None


def path(value: str, key: str) -> Path:
    if not value.startswith("/"):
        raise InvalidArgument(f"{key} {value!r} must be an absolute path")
    return Path(value)


def serial(value: str) -> str:
    if not SERIAL.fullmatch(value):
        raise InvalidArgument(f"serial {value!r} may only hold printable ASCII without spaces")
    return value


def drive(values: dict[str, Any], default_type: DiskType, where: str) -> DriveSpec:
    if "path" not in values:
        raise InvalidArgument(f"{where} needs a 'path'")
    return DriveSpec(
        path=path(values["path"], f"{where} path"),
        disk_type=choice(DiskType, values.get("disk_type", default_type), "disk_type"),
        format=choice(ImageFormat, values.get("format", "raw"), "format"),
        read_only=values.get("read_only", False),
        serial=serial(values.get("serial", "")),
    )


def network(value: str) -> Network:
    kind, colon, tap = value.partition(":")
    mode = choice(NetworkMode, kind, "network")
    if mode is NetworkMode.TAP and not IFNAME.fullmatch(tap):
        raise InvalidArgument(f"network {value!r}: use 'tap:NAME' with an interface name of 1-15 characters")
    if mode is not NetworkMode.TAP and colon:
        raise InvalidArgument(f"network {value!r}: only 'tap' takes ':NAME'; use 'none', 'user' or 'tap:NAME'")
    return Network(mode, tap)


def plugged_drive(values: dict[str, Any], where: str) -> PluggedDrive:
    """One `plugged` entry: a drive, its id, its spare port and (SCSI) its controller."""
    if "id" not in values or "port" not in values:
        raise InvalidArgument(f"{where} needs an 'id' and the spare 'port' it sits on")
    spec = drive(values, DiskType.VIRTIO_BLK, where)
    dev, controller = values["id"], values.get("controller", "")
    if not DRIVE_ID.fullmatch(dev) or RESERVED_ID.fullmatch(dev):
        raise InvalidArgument(f"{where} id {dev!r} is invalid or one of vmspawnd's own; give the drive's id")
    if spec.disk_type.is_scsi != bool(controller) or (controller and not CONTROLLER.fullmatch(controller)):
        raise InvalidArgument(f"{where}: a SCSI drive names its 'controller' (scsiN), any other drive none")
    return PluggedDrive(dev, spec, values["port"], controller)


def plugged(entries: list[dict[str, Variant]]) -> tuple[PluggedDrive, ...]:
    drives = tuple(
        plugged_drive(unpack(e, PLUGGED_OPTIONS, f"plugged[{i}]"), f"plugged[{i}]") for i, e in enumerate(entries)
    )
    ids = [p.id for p in drives]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise InvalidArgument(f"plugged names drive id {', '.join(map(repr, dup))} more than once")
    return drives


def incoming(options: dict[str, Variant]) -> bool:
    """CreateMachine's `incoming`: QEMU waits for a migration stream (the spec is checked by machine_spec)."""
    value = options.get("incoming")
    return bool(value.value) if isinstance(value, Variant) and value.signature == "b" else False


def migration_timeout(v: dict[str, Any]) -> float:
    timeout_usec = v.get("timeout_usec", int(MIGRATION_TIMEOUT * 1_000_000))
    if not 0 < timeout_usec <= 24 * 3600 * 1_000_000:
        raise InvalidArgument(f"timeout_usec {timeout_usec} is out of range; give 1 to 86400000000 (a day)")
    return float(timeout_usec) / 1_000_000


def migrate(options: dict[str, Variant]) -> tuple[int, float]:
    """Migrate's (max_bandwidth in bytes/s, 0 for QEMU's own; timeout in s)."""
    v = unpack(options, MIGRATE_OPTIONS, "Migrate")
    return v.get("max_bandwidth", 0), migration_timeout(v)


def incoming_timeout(options: dict[str, Variant]) -> float:
    return migration_timeout(unpack(options, INCOMING_OPTIONS, "Incoming"))


def machine_spec(name: str, options: dict[str, Variant]) -> MachineSpec:
    v = unpack(options, MACHINE_OPTIONS, "CreateMachine")
    disk_type = choice(DiskType, v.get("disk_type", "virtio-blk"), "disk_type")
    image_format = choice(ImageFormat, v.get("image_format", "raw"), "image_format")
    image = DriveSpec(path(v["image"], "image"), disk_type, image_format) if "image" in v else None
    drives = tuple(
        drive(unpack(d, DRIVE_OPTIONS, f"drives[{i}]"), disk_type, f"drives[{i}]")
        for i, d in enumerate(v.get("drives", []))
    )
    mounts = []
    for i, m in enumerate(v.get("mounts", [])):
        mv = unpack(m, MOUNT_OPTIONS, f"mounts[{i}]")
        if "source" not in mv or "tag" not in mv:
            raise InvalidArgument(f"mounts[{i}] needs 'source' and 'tag'")
        mounts.append(MountSpec(path(mv["source"], "mount source"), mv["tag"], mv.get("read_only", False)))
    memory = v.get("memory", 512 * MiB)
    if not MIN_MEMORY <= memory <= MAX_MEMORY:
        raise InvalidArgument(f"memory {memory} bytes is out of range; give {MIN_MEMORY // MiB} MiB to 1 TiB")
    cpus = v.get("cpus", 1)
    if not 1 <= cpus <= MAX_CPUS:
        raise InvalidArgument(f"cpus {cpus} is out of range; q35 takes 1 to {MAX_CPUS}")
    return MachineSpec(
        name=name,
        kernel=path(v["kernel"], "kernel") if "kernel" in v else None,
        initrd=path(v["initrd"], "initrd") if "initrd" in v else None,
        cmdline=v.get("cmdline", ""),
        image=image,
        drives=drives,
        directory=path(v["directory"], "directory") if "directory" in v else None,
        mounts=tuple(mounts),
        network=network(v.get("network", "none")),
        vsock=v.get("vsock", False),
        memory=memory,
        cpus=cpus,
        hotplug_spares=v.get("hotplug_spares", 10),
        accel=choice(Accel, v.get("accel", "auto"), "accel"),
        qemu_extra=tuple(v.get("qemu_extra", [])),
        firmware=choice(Firmware, v.get("firmware", "bios"), "firmware"),
        keep=v.get("keep", False),
        plugged=plugged(v.get("plugged", [])),
        guest_agent=v.get("guest_agent", False),
        graphics=choice(Graphics, v.get("graphics", "none"), "graphics"),
    )


def add_drive(path_value: str, options: dict[str, Variant]) -> tuple[DriveSpec, str]:
    """(the drive, the requested id or "") for AddDrive / AddDriveFd."""
    v = unpack(options, ADD_DRIVE_OPTIONS, "AddDrive")
    return drive({"path": path_value} | v, DiskType.VIRTIO_BLK, "AddDrive"), v.get("id", "")


def add_drive_port(options: dict[str, Variant], drive: DriveSpec) -> str:
    """AddDrive's spare port: "" for the lowest free one."""
    port: str = unpack(options, ADD_DRIVE_OPTIONS, "AddDrive").get("port", "")
    if port and drive.disk_type.is_scsi:
        raise InvalidArgument(
            "AddDrive option 'port' is for virtio-blk and nvme drives: a SCSI drive sits on its controller, "
            "which takes the lowest free spare port"
        )
    return port


def add_share(directory: str, options: dict[str, Variant]) -> tuple[Share, bool, str]:
    """(the share, read_only, the requested id or "") for AddShare; its device id comes later."""
    v = unpack(options, ADD_SHARE_OPTIONS, "AddShare")
    if "tag" not in v:
        raise InvalidArgument("AddShare needs a 'tag', the name the guest mounts the share by")
    return Share("", path(directory, "directory"), v["tag"]), v.get("read_only", False), v.get("id", "")


def replace_drive(path_value: str, options: dict[str, Variant]) -> DriveSpec:
    """The new medium of a ReplaceDrive: a cdrom's, so read-only."""
    v = unpack(options, REPLACE_DRIVE_OPTIONS, "ReplaceDrive")
    return drive({"path": path_value, "read_only": True} | v, DiskType.VIRTIO_SCSI_CDROM, "ReplaceDrive")


def block_job(options: dict[str, Variant], method: str) -> tuple[ImageFormat, float, int]:
    """(format, timeout in s, max_bandwidth in bytes/s or 0 for no limit) of SnapshotDrive / SwapDrive(Fd)."""
    v = unpack(options, BLOCK_JOB_OPTIONS, method)
    timeout_usec = v.get("timeout_usec", int(DEFAULT_TIMEOUT * 1_000_000))
    if not 0 < timeout_usec <= MAX_TIMEOUT * 1_000_000:
        raise InvalidArgument(
            f"timeout_usec {timeout_usec} is out of range; give 1 to {int(MAX_TIMEOUT * 1_000_000)} (a day)"
        )
    max_bandwidth = v.get("max_bandwidth", 0)
    if max_bandwidth >= 2**63:
        raise InvalidArgument(f"max_bandwidth {max_bandwidth} is out of range; give at most {2**63 - 1} bytes/s")
    fmt = choice(ImageFormat, v.get("format", "raw"), "format")
    return fmt, float(timeout_usec) / 1_000_000, max_bandwidth


def swap_target(path_value: str, options: dict[str, Variant], method: str) -> tuple[DriveSpec, float, int]:
    """SwapDrive's new file (as the drive it becomes: its format), the job's timeout and max_bandwidth."""
    fmt, timeout, max_bandwidth = block_job(options, method)
    return DriveSpec(path(path_value, "path"), format=fmt), timeout, max_bandwidth


def nic_options(options: dict[str, Variant], schema: dict[str, str], where: str) -> tuple[str, str, dict[str, Any]]:
    """(the requested id or "", the mac or "", every value) of AddNetwork / AddNetworkFd."""
    v = unpack(options, schema, where)
    return v.get("id", ""), nic.parse_mac(v["mac"]) if "mac" in v else "", v


def add_network(options: dict[str, Variant]) -> tuple[Network, str, str]:
    """(what it connects to: user or a tap, the requested id or "", the mac or "") for AddNetwork."""
    nic_id, mac, v = nic_options(options, ADD_NETWORK_OPTIONS, "AddNetwork")
    net = network(v.get("network", "user"))
    if net.mode is NetworkMode.NONE:
        raise InvalidArgument("AddNetwork network 'none' adds nothing; use 'user' or 'tap:NAME'")
    return net, nic_id, mac


def add_network_fd(options: dict[str, Variant]) -> tuple[str, str]:
    """(the requested id or "", the mac or "") for AddNetworkFd."""
    nic_id, mac, _ = nic_options(options, ADD_NETWORK_FD_OPTIONS, "AddNetworkFd")
    return nic_id, mac


def remove_timeout(options: dict[str, Variant], default: float, method: str = "RemoveDrive") -> float:
    v = unpack(options, REMOVE_DRIVE_OPTIONS, method)
    timeout_usec = v.get("timeout_usec", int(default * 1_000_000))
    if not 0 < timeout_usec <= 3600 * 1_000_000:
        raise InvalidArgument(f"timeout_usec {timeout_usec} is out of range; give 1 to 3600000000")
    return float(timeout_usec) / 1_000_000


def power_off_timeout(timeout_usec: int) -> float:
    """0 means the default of 30 s, as in systemd's PowerOff-style calls."""
    if timeout_usec > 3600 * 1_000_000:
        raise InvalidArgument(f"timeout_usec {timeout_usec} is out of range; give at most 3600000000 (1 hour)")
    return float(timeout_usec) / 1_000_000 if timeout_usec else 30.0


def console_writable(options: dict[str, Variant]) -> bool:
    """OpenConsoleEx options -> whether the client may type."""
    return not unpack(options, OPEN_CONSOLE_OPTIONS, "OpenConsoleEx").get("read_only", False)


def open_graphics(options: dict[str, Variant]) -> None:
    """OpenGraphics options: none known yet, so any key is refused."""
    unpack(options, OPEN_GRAPHICS_OPTIONS, "OpenGraphics")
