"""state.json: what the daemon needs to find a machine again after a restart.

Written atomically (temp file, fsync, rename, fsync of the directory), so a
crash leaves either the old or the new state, never half of one.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import NoSpace
from .model import (
    Accel,
    DiskType,
    Drive,
    DriveSpec,
    DriveState,
    Firmware,
    Graphics,
    ImageFormat,
    MachineShare,
    MachineSpec,
    MountSpec,
    Network,
    NetworkMode,
    Nic,
    PluggedDrive,
)

# 2: kept machines (spec.keep, spec.plugged, each drive's format, read_only
# and serial, a record's `stopped`); version 1 is still read.
VERSION = 2
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
    # The uid/gid QEMU runs as; 0 for a QEMU started without one of its own.
    qemu_uid: int = 0
    qemu_gid: int = 0
    # Hotplugged virtiofs shares (boot-time ones are the spec's).
    shares: tuple[MachineShare, ...] = ()
    # A kept machine that is not running: no pid, its drives in spec.plugged.
    stopped: bool = False
    nics: tuple[Nic, ...] = ()
    # A kept machine whose QEMU saved its state to SAVED (Suspend): Start()
    # resumes it from there. Optional: records without it are not suspended.
    suspended: bool = False


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class StateError(ValueError):
    """state.json is not a record this daemon can use; the message names the field."""


_MISSING: Any = object()


def _get(d: Any, key: str, kind: type, where: str, default: Any = _MISSING) -> Any:
    """d[key] checked to be a `kind` (bool is never taken for an int)."""
    name = f"{where}.{key}" if where and key else where or key
    if not isinstance(d, dict):
        raise StateError(f"{where or 'state'}: expected an object, got {type(d).__name__}")
    if key not in d:
        if default is _MISSING:
            raise StateError(f"{name}: missing")
        return default
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StateError(f"{name}: expected {kind.__name__}, got {type(value).__name__} {value!r:.40}")
    return value


E = TypeVar("E", bound=enum.Enum)


def _enum(d: Any, key: str, kind: type[E], where: str, default: Any = _MISSING) -> E:
    value = _get(d, key, str, where, default)
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(str(e.value) for e in kind)
        raise StateError(f"{where}.{key}: {value!r:.40} is not one of {allowed}") from None


def _optional(d: Any, key: str, kind: type, where: str) -> Any:
    """d[key], which may be null."""
    return None if _get(d, key, object, where) is None else _get(d, key, kind, where)


def _path(d: Any, key: str, where: str) -> Path | None:
    # An empty path was never written; "" reads as none, as before.
    return Path(p) if (p := _optional(d, key, str, where)) else None


def _items(d: Any, key: str, where: str) -> list[tuple[str, Any]]:
    """(where, item) for every entry of the list d[key]."""
    return [(f"{where}.{key}[{i}]" if where else f"{key}[{i}]", x) for i, x in enumerate(_get(d, key, list, where))]


def _strings(d: Any, key: str, where: str) -> tuple[str, ...]:
    return tuple(_get({"": x}, "", str, w) for w, x in _items(d, key, where))


def _drive_spec(d: Any, where: str) -> DriveSpec:
    return DriveSpec(
        path=Path(_get(d, "path", str, where)),
        disk_type=_enum(d, "disk_type", DiskType, where),
        format=_enum(d, "format", ImageFormat, where),
        read_only=_get(d, "read_only", bool, where),
        serial=_get(d, "serial", str, where),
    )


def _plugged(d: Any, where: str) -> PluggedDrive:
    return PluggedDrive(
        id=_get(d, "id", str, where),
        drive=_drive_spec(_get(d, "drive", dict, where), f"{where}.drive"),
        port=_get(d, "port", str, where),
        controller=_get(d, "controller", str, where),
    )


def _spec(d: Any, where: str = "spec", version: int = VERSION) -> MachineSpec:
    net_where = f"{where}.network"
    network = _get(d, "network", dict, where)
    image = _optional(d, "image", dict, where)
    return MachineSpec(
        name=_get(d, "name", str, where),
        kernel=_path(d, "kernel", where),
        initrd=_path(d, "initrd", where),
        cmdline=_get(d, "cmdline", str, where),
        image=_drive_spec(image, f"{where}.image") if image is not None else None,
        drives=tuple(_drive_spec(x, w) for w, x in _items(d, "drives", where)),
        directory=_path(d, "directory", where),
        mounts=tuple(
            MountSpec(Path(_get(m, "source", str, w)), _get(m, "tag", str, w), _get(m, "read_only", bool, w))
            for w, m in _items(d, "mounts", where)
        ),
        network=Network(_enum(network, "mode", NetworkMode, net_where), _get(network, "tap", str, net_where)),
        vsock=_get(d, "vsock", bool, where),
        memory=_get(d, "memory", int, where),
        cpus=_get(d, "cpus", int, where),
        hotplug_spares=_get(d, "hotplug_spares", int, where),
        accel=_enum(d, "accel", Accel, where),
        qemu_extra=_strings(d, "qemu_extra", where),
        firmware=_enum(d, "firmware", Firmware, where),
        keep=_get(d, "keep", bool, where) if version >= 2 else False,
        plugged=tuple(_plugged(x, w) for w, x in _items(d, "plugged", where)) if version >= 2 else (),
        # Optional: records written before the guest agent have none.
        guest_agent=_get(d, "guest_agent", bool, where, default=False),
        # Optional too: records written before graphics have none.
        graphics=_enum(d, "graphics", Graphics, where, default="none"),
    )


def _fdsets(d: Any, where: str) -> tuple[int, ...]:
    """One per layer; records before image chains kept the image's alone, as "fdset"."""
    if isinstance(d, dict) and "fdsets" in d:
        return tuple(_get({"": x}, "", int, w) for w, x in _items(d, "fdsets", where))
    fdset = _optional(d, "fdset", int, where)
    return () if fdset is None else (fdset,)


def _drive(d: Any, where: str, version: int) -> Drive:
    return Drive(
        id=_get(d, "id", str, where),
        path=_get(d, "path", str, where),
        disk_type=_enum(d, "disk_type", DiskType, where),
        port=_get(d, "port", str, where),
        state=_enum(d, "state", DriveState, where),
        fdsets=_fdsets(d, where),
        controller=_get(d, "controller", str, where),
        format=_enum(d, "format", ImageFormat, where) if version >= 2 else ImageFormat.RAW,
        read_only=_get(d, "read_only", bool, where) if version >= 2 else False,
        serial=_get(d, "serial", str, where) if version >= 2 else "",
        # Written since SwapDrive; "" (the drive's own node) before.
        node=_get(d, "node", str, where, default=""),
    )


def _share(d: Any, where: str) -> MachineShare:
    return MachineShare(
        id=_get(d, "id", str, where),
        tag=_get(d, "tag", str, where),
        directory=_get(d, "directory", str, where),
        port=_get(d, "port", str, where),
        read_only=_get(d, "read_only", bool, where),
        state=_enum(d, "state", DriveState, where),
        pid=_get(d, "pid", int, where),
        start_time=_get(d, "start_time", int, where),
    )


def _nic(d: Any, where: str) -> Nic:
    return Nic(
        id=_get(d, "id", str, where),
        network=_get(d, "network", str, where),
        mac=_get(d, "mac", str, where),
        port=_get(d, "port", str, where),
        state=_enum(d, "state", DriveState, where),
    )


def _record(d: dict[str, Any], version: int) -> MachineRecord:
    # One line per field: a new field is one more line here (read from the
    # version that brought it, a default before).
    return MachineRecord(
        spec=_spec(_get(d, "spec", dict, ""), version=version),
        id=_get(d, "id", str, ""),
        owner_uid=_get(d, "owner_uid", int, ""),
        pid=_get(d, "pid", int, ""),
        start_time=_get(d, "start_time", int, ""),
        drives=tuple(_drive(x, w, version) for w, x in _items(d, "drives", "")),
        next_fdset=_get(d, "next_fdset", int, ""),
        next_controller=_get(d, "next_controller", int, ""),
        next_drive=_get(d, "next_drive", int, "", 0),
        qemu_uid=_get(d, "qemu_uid", int, "", 0),
        qemu_gid=_get(d, "qemu_gid", int, "", 0),
        shares=tuple(_share(x, w) for w, x in _items(d, "shares", "")) if "shares" in d else (),
        stopped=_get(d, "stopped", bool, "") if version >= 2 else False,
        nics=tuple(_nic(x, w) for w, x in _items(d, "nics", "")) if "nics" in d else (),
        suspended=_get(d, "suspended", bool, "", False),
    )


# version -> reader; an older version keeps its reader when the format moves on.
READERS = {1: lambda d: _record(d, 1), 2: lambda d: _record(d, 2)}


def dumps(record: MachineRecord) -> str:
    return json.dumps({"version": VERSION} | _plain(asdict(record)), indent=1, sort_keys=True)


def loads(text: str) -> MachineRecord:
    """Parse and check a state file; StateError naming the field if it is not ours."""
    try:
        d = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise StateError(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise StateError(f"state is a JSON {type(d).__name__}, not an object")
    version = d.get("version")
    reader = READERS.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
    if reader is None:
        raise StateError(f"version: {version!r:.40} is not one this vmspawnd reads ({', '.join(map(str, READERS))})")
    try:
        return reader(d)
    except RecursionError:
        raise StateError("nested too deeply") from None


@contextlib.contextmanager
def space_of(directory: Path) -> Iterator[None]:
    """A full disk (or quota) under `directory` becomes NoSpace naming it."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left for {directory} ({e.strerror}); free some space there") from e
        raise


# machines/ and each machine's dir: root's, not listable by others; the
# owner reaches only a file that is theirs (console.log) by its path.
DIR_MODE = 0o711


def make_dir(path: Path, exist_ok: bool = False) -> None:
    path.mkdir(mode=DIR_MODE, exist_ok=exist_ok)
    # mkdir's mode passes through the umask, and an existing dir keeps its own.
    path.chmod(DIR_MODE)


def write_private(path: Path, text: str) -> None:
    """Write `path` afresh, readable by root only whatever mode it had."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with open(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(text)


def write(directory: Path, record: MachineRecord) -> None:
    """Atomic: a unique temp file (two writers never share one), fsync, rename, fsync of the directory."""
    with space_of(directory):
        fd, tmp = tempfile.mkstemp(prefix=f".{FILE}.", suffix=".tmp", dir=directory)
        try:
            with open(fd, "w") as f:
                f.write(dumps(record))
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, directory / FILE)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dirfd = os.open(directory, os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


LOG = "qemu.log"
CONSOLE = "console.log"
# A suspended machine's memory and device state, as QEMU's migration wrote it.
SAVED = "suspend.vmstate"


def virtiofsd_log(device: str) -> str:
    return f"virtiofsd-{device}.log"


def is_log(name: str) -> bool:
    """What a stopped or failed machine's directory keeps, until a machine of
    its name is created again: qemu.log, the console log (console.py rotates
    it once), the virtiofsd logs."""
    return name in (LOG, CONSOLE, f"{CONSOLE}.1") or (name.startswith(virtiofsd_log("")[:-4]) and name.endswith(".log"))


def clear_all_but_log(directory: Path, keep_saved: bool = False) -> list[Path]:
    """Remove a dead machine's runtime state, keeping its logs (is_log) and,
    with `keep_saved`, a suspended machine's saved state (SAVED).

    Returns what was removed.
    """
    try:
        leftovers = [p for p in directory.iterdir() if not is_log(p.name) and not (keep_saved and p.name == SAVED)]
    except FileNotFoundError:
        return []
    for entry in leftovers:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return leftovers


def read(directory: Path) -> MachineRecord:
    """FileNotFoundError if there is none, StateError if it is not a record we can use."""
    data = (directory / FILE).read_bytes()
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise StateError(f"not UTF-8: {e}") from None
    return loads(text)
