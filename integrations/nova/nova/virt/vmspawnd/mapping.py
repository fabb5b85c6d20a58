"""Pure rules between Nova's words and vmspawnd's: names, ids, sizes, inventory.

No I/O and nothing of Nova here, so every rule is tested for all inputs.
"""

from __future__ import annotations

import os.path
import re
import uuid
from dataclasses import dataclass
from typing import Any

# vmspawnd's own limit on names (manager.NAME).
MACHINE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# vmspawnd takes drive ids of 32 characters, but QEMU's node name (the id and
# "-node") holds 31: 26 is the longest id a drive can really have.
DRIVE_ID_LENGTH = 26
# virtio-blk's serial holds 20 bytes.
SERIAL_BYTES = 20
MiB = 1024 * 1024

HOTPLUG_RC = "CUSTOM_VMSPAWND_HOTPLUG_PORT"
HOTPLUG_EXTRA_SPEC = "resources:" + HOTPLUG_RC

# Nova's power states by the daemon's State (nova.compute.power_state names).
POWER_STATES = {
    "starting": "RUNNING",
    "running": "RUNNING",
    "paused": "PAUSED",
    "stopping": "RUNNING",
    "stopped": "SHUTDOWN",
    # Saved to disk, no QEMU (Suspend); Start() resumes it: libvirt's managed save.
    "suspended": "SUSPENDED",
    "failed": "CRASHED",
    "unmanaged": "NOSTATE",
}


class NameRefused(ValueError):
    """Nova's instance name cannot be part of a vmspawnd machine name."""


def machine_name(instance_name: str, instance_uuid: str) -> str:
    """'<instance name>.<uuid>': the name Nova lists, and the uuid it looks up by."""
    name = f"{instance_name}.{uuid.UUID(instance_uuid)}"
    if not instance_name or "." in instance_name or not MACHINE_NAME.fullmatch(name):
        raise NameRefused(
            f"instance name {instance_name!r} does not fit a vmspawnd machine name (1 to 27 characters "
            "from A-Z a-z 0-9 _ -): set nova.conf's instance_name_template accordingly"
        )
    return name


@dataclass(frozen=True)
class Owned:
    instance_name: str
    instance_uuid: str


def parse_machine_name(name: str) -> Owned | None:
    """The instance behind a machine name, or None for a machine Nova did not make."""
    instance_name, dot, rest = name.partition(".")
    if not dot or not instance_name:
        return None
    try:
        parsed = uuid.UUID(rest)
    except ValueError:
        return None
    if str(parsed) != rest:
        return None
    return Owned(instance_name, rest)


# A rescue machine's name: "<uuid>.rescue". Its first part is no instance name
# (36 characters, over the 27 an instance name may have), so list_instances
# never counts it, and the uuid says whose it is.
RESCUE_SUFFIX = ".rescue"


def rescue_name(instance_uuid: str) -> str:
    return f"{uuid.UUID(instance_uuid)}{RESCUE_SUFFIX}"


def rescued_instance(name: str) -> str | None:
    """The uuid of the instance a rescue machine serves, or None for any other machine."""
    head, suffix = name[: -len(RESCUE_SUFFIX)], name[-len(RESCUE_SUFFIX) :]
    if suffix != RESCUE_SUFFIX:
        return None
    try:
        parsed = uuid.UUID(head)
    except ValueError:
        return None
    return head if str(parsed) == head else None


def outside(paths: list[str], directory: str) -> list[str]:
    """The paths that are not inside `directory` (what does not move with it)."""
    top = os.path.normpath(directory)
    return [p for p in paths if os.path.commonpath([top, os.path.normpath(p)]) != top]


def drive_id(volume_id: str) -> str:
    """The daemon's drive id for a Cinder volume: stable, so detach finds what attach made."""
    return "v" + "".join(c for c in volume_id if c.isascii() and c.isalnum())[: DRIVE_ID_LENGTH - 1]


# The drive ids drive_id() makes: a volume's, never one the daemon picks (diskN).
VOLUME_DRIVE = re.compile(rf"v[A-Za-z0-9]{{0,{DRIVE_ID_LENGTH - 1}}}")


def is_volume_drive(drive: str) -> bool:
    return bool(VOLUME_DRIVE.fullmatch(drive))


def volume_drive(drives: list[tuple[str, str]], volume_id: str, path: str | None) -> str | None:
    """The drive (of `drives`: id, path) holding a volume: the one attach made
    (drive_id(volume_id)), else the volume drive a swap moved onto the
    volume's `path` (a drive keeps its id, the old volume's). None: not attached."""
    if any(d == drive_id(volume_id) for d, _ in drives):
        return drive_id(volume_id)
    return next((d for d, p in drives if path is not None and p == path and is_volume_drive(d)), None)


def volumes_to_change(present: list[str], wanted: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """(values of `wanted` to plug, drive ids to unplug) so that the machine's
    volume drives are exactly `wanted` (drive id -> what to plug)."""
    volumes = {d for d in present if is_volume_drive(d)}
    return [v for d, v in wanted.items() if d not in volumes], sorted(volumes - wanted.keys())


def serial(volume_id: str) -> str:
    """What the guest sees as the disk's serial (/dev/disk/by-id/virtio-<serial>)."""
    printable = "".join(c for c in volume_id if "\x21" <= c <= "\x7e")
    return printable.encode()[:SERIAL_BYTES].decode()


def power_state_name(state: str) -> str:
    return POWER_STATES.get(state, "NOSTATE")


# The daemon bounds saving a machine, and loading it again, to 30 s plus 30 s
# per GiB of guest memory (DESIGN §2, Suspend).
SAVE_SECONDS = 30.0
SAVE_SECONDS_PER_GIB = 30.0


def save_timeout(memory_mb: int) -> float:
    """How long Suspend, or the Start that resumes, may take the daemon."""
    return SAVE_SECONDS + SAVE_SECONDS_PER_GIB * memory_mb / 1024


def hotplug_spares(requested: int | None, default: int, volumes: int, most: int) -> int:
    """Spare ports for a new machine: what the flavor asked for (else the
    default), and never fewer than the volumes to plug in at boot."""
    wanted = default if requested is None else requested
    return min(max(wanted, volumes), most)


def requested_ports(allocations: dict[str, Any] | None) -> int | None:
    """The hotplug ports placement allocated to the instance, if its flavor asked."""
    total = None
    for allocation in (allocations or {}).values():
        amount = allocation.get("resources", {}).get(HOTPLUG_RC)
        if amount is not None:
            total = (total or 0) + int(amount)
    return total


def inventory(vcpus: int, memory_mb: int, disk_gb: int, hotplug_ports: int, most_ports: int) -> dict[str, Any]:
    """The resource provider inventory of one host."""
    inv: dict[str, Any] = {
        "VCPU": {"total": vcpus, "min_unit": 1, "max_unit": vcpus, "step_size": 1},
        "MEMORY_MB": {"total": memory_mb, "min_unit": 1, "max_unit": memory_mb, "step_size": 1},
        "DISK_GB": {"total": disk_gb, "min_unit": 1, "max_unit": max(disk_gb, 1), "step_size": 1},
    }
    if disk_gb < 1:
        del inv["DISK_GB"]
    if hotplug_ports > 0:
        inv[HOTPLUG_RC] = {
            "total": hotplug_ports,
            "min_unit": 1,
            "max_unit": min(hotplug_ports, most_ports),
            "step_size": 1,
            "reserved": 0,
            "allocation_ratio": 1.0,
        }
    return inv


def volume_for_disk(disk_id: str, volumes: list[tuple[str | None, str]]) -> str | None:
    """The volume Nova names `disk_id` in block_stats: by its device name (the
    compute manager passes it without "/dev/") or by its volume id.
    `volumes`: (device name, volume id) of the instance's volume mappings."""
    for device_name, volume_id in volumes:
        if device_name is not None and device_name.removeprefix("/dev/") == disk_id.removeprefix("/dev/"):
            return volume_id
    return next((volume_id for _, volume_id in volumes if volume_id == disk_id), None)


# DriveStats' counters in the order of libvirt's virDomainBlockStats tuple.
BLOCK_STATS = ("rd_req", "rd_bytes", "wr_req", "wr_bytes", "errors")


def block_stats(counters: dict[str, int]) -> tuple[int, int, int, int, int]:
    """(rd_req, rd_bytes, wr_req, wr_bytes, errs), as libvirt's blockStats gives them."""
    rd_req, rd_bytes, wr_req, wr_bytes, errors = (int(counters[key]) for key in BLOCK_STATS)
    return rd_req, rd_bytes, wr_req, wr_bytes, errors


# -- live migration --------------------------------------------------------


def stream_address(host: str, port: int) -> str:
    """'host:port' ('[v6]:port') of the destination's migration listener."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_stream_address(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""
    if not colon or not host or "[" in host or "]" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not the host:port of a migration listener")
    return host, int(port)


def migration_timeout(memory_mb: int, seconds_per_gib: float) -> float:
    """How long a migration may take before it is cancelled (as libvirt's
    live_migration_completion_timeout: per GiB of guest memory, at least 2)."""
    return seconds_per_gib * max(2, memory_mb / 1024)


def volume_ports(drives: list[dict[str, Any]]) -> dict[str, str]:
    """The spare port of each volume drive of a machine (its `Drives`)."""
    return {d["id"]: d["port"] for d in drives if is_volume_drive(d["id"]) and d.get("port")}


def spare_ports(ports: list[dict[str, Any]], drives: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(port, volume drive on it or "") of each spare port of a machine (its `Ports` and `Drives`)."""
    on = {port: drive for drive, port in volume_ports(drives).items()}
    return [(p["id"], on.get(p["id"], "")) for p in ports if p.get("role") == "spare"]


def plugged(volumes: dict[str, tuple[str, str, str]], ports: dict[str, str]) -> list[dict[str, Any]]:
    """CreateMachine's `plugged` for a migration's destination: each volume
    (drive id -> path here, format, serial) on the port it has at the source.
    The two sides must hold the same volumes, or the guest's devices differ."""
    if missing := sorted(volumes.keys() - ports.keys()):
        raise ValueError(f"volume drives {', '.join(missing)} are not attached at the source")
    if extra := sorted(ports.keys() - volumes.keys()):
        raise ValueError(f"volume drives {', '.join(extra)} of the source have no connection on this host")
    return [
        {"id": drive, "path": path, "format": fmt, "serial": serial, "port": ports[drive]}
        for drive, (path, fmt, serial) in volumes.items()
    ]
