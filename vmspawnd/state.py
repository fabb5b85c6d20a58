"""state.json: what the daemon needs to find a machine again after a restart.

Written atomically (temp file, fsync, rename, fsync of the directory), so a
crash leaves either the old or the new state, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .model import (
    Accel,
    DiskType,
    Drive,
    DriveSpec,
    DriveState,
    Firmware,
    ImageFormat,
    MachineSpec,
    MountSpec,
    Network,
    NetworkMode,
)

VERSION = 1
FILE = "state.json"


@dataclass(frozen=True)
class MachineRecord:
    spec: MachineSpec
    id: str
    owner_uid: int
    pid: int
    start_time: int
    drives: tuple[Drive, ...]
    next_fdset: int
    next_controller: int
    next_drive: int = 0


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _drive_spec(d: dict[str, Any]) -> DriveSpec:
    return DriveSpec(Path(d["path"]), DiskType(d["disk_type"]), ImageFormat(d["format"]), d["read_only"], d["serial"])


def _spec(d: dict[str, Any]) -> MachineSpec:
    return MachineSpec(
        name=d["name"],
        kernel=Path(d["kernel"]) if d["kernel"] else None,
        initrd=Path(d["initrd"]) if d["initrd"] else None,
        cmdline=d["cmdline"],
        image=_drive_spec(d["image"]) if d["image"] else None,
        drives=tuple(_drive_spec(x) for x in d["drives"]),
        directory=Path(d["directory"]) if d["directory"] else None,
        mounts=tuple(MountSpec(Path(m["source"]), m["tag"], m["read_only"]) for m in d["mounts"]),
        network=Network(NetworkMode(d["network"]["mode"]), d["network"]["tap"]),
        vsock=d["vsock"],
        memory=d["memory"],
        cpus=d["cpus"],
        hotplug_spares=d["hotplug_spares"],
        accel=Accel(d["accel"]),
        qemu_extra=tuple(d["qemu_extra"]),
        firmware=Firmware(d["firmware"]),
    )


def dumps(record: MachineRecord) -> str:
    return json.dumps({"version": VERSION} | _plain(asdict(record)), indent=1, sort_keys=True)


def loads(text: str) -> MachineRecord:
    """Parse a state file; ValueError (or KeyError/TypeError) if it is not ours."""
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError(f"state is a JSON {type(d).__name__}, not an object")
    if d.get("version") != VERSION:
        raise ValueError(f"state version {d.get('version')!r}, expected {VERSION}")
    return MachineRecord(
        spec=_spec(d["spec"]),
        id=d["id"],
        owner_uid=d["owner_uid"],
        pid=d["pid"],
        start_time=d["start_time"],
        drives=tuple(
            Drive(
                x["id"],
                x["path"],
                DiskType(x["disk_type"]),
                x["port"],
                DriveState(x["state"]),
                x["fdset"],
                x["controller"],
            )
            for x in d["drives"]
        ),
        next_fdset=d["next_fdset"],
        next_controller=d["next_controller"],
        next_drive=d.get("next_drive", 0),
    )


def write(directory: Path, record: MachineRecord) -> None:
    tmp = directory / f".{FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(dumps(record))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, directory / FILE)
    dirfd = os.open(directory, os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


LOG = "qemu.log"


def clear_all_but_log(directory: Path) -> list[Path]:
    """Remove a dead machine's runtime state, keeping qemu.log for post-mortem.

    Returns what was removed.
    """
    leftovers = [p for p in directory.iterdir() if p.name != LOG]
    for entry in leftovers:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return leftovers


def read(directory: Path) -> MachineRecord:
    return loads((directory / FILE).read_text())
