"""Block jobs on a running drive, pure: node names, QMP arguments, QEMU's answers.

SnapshotDrive copies a drive as it is at one instant into a file the caller
passed (blockdev-backup sync=full: what the guest writes once the job runs
is copied out first, so the copy is of the job's start). SwapDrive moves a
drive's contents to a new file under the running guest (blockdev-mirror
sync=full, then job-complete points the device at the new node). machine.py
sends the commands and waits for QEMU's JOB_STATUS_CHANGE events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .model import NODE_SUFFIX, SWAP_SUFFIX, ImageFormat

# The snapshot's target node while it is written: "<id>-snap" (31 characters at most, as the others).
SNAPSHOT_SUFFIX = "-snap"
# How long a job may take unless the caller says (timeout_usec): a large disk copies for minutes.
DEFAULT_TIMEOUT = 1800.0
MAX_TIMEOUT = 24 * 3600.0
# QEMU's JobStatus values a request waits for; GONE is ours: QEMU exited.
READY = "ready"
CONCLUDED = "concluded"
GONE = "gone"


def job_id(device_id: str) -> str:
    """One job per drive at a time (JobInProgress otherwise), so the drive names it."""
    return f"{device_id}-job"


def snapshot_node(device_id: str) -> str:
    return device_id + SNAPSHOT_SUFFIX


def swapped_node(device_id: str, current: str) -> str:
    """The node a SwapDrive moves the drive to: the generation it is not on."""
    own = device_id + NODE_SUFFIX
    return device_id + SWAP_SUFFIX if current == own else own


def drive_nodes(device_id: str) -> tuple[str, str]:
    """Both names a drive's block node may have."""
    return device_id + NODE_SUFFIX, device_id + SWAP_SUFFIX


def _file(filename: str) -> dict[str, object]:
    return {"driver": "file", "filename": filename}


def snapshot_target(device_id: str, filename: str, fmt: ImageFormat, size: int) -> dict[str, object]:
    """blockdev-add of the snapshot's target on `filename` (an fdset). A raw
    target is cut to the drive's `size`: a block device larger than the drive
    takes it too (backup wants both the same length)."""
    args: dict[str, object] = {"node-name": snapshot_node(device_id), "driver": str(fmt), "file": _file(filename)}
    if fmt is ImageFormat.RAW:
        args["size"] = size
    return args


def qcow2_create(device_id: str, filename: str, size: int) -> dict[str, object]:
    """blockdev-create of a qcow2 image of `size` bytes on `filename` (the caller's file, formatted anew)."""
    return {
        "job-id": job_id(device_id),
        "options": {"driver": "qcow2", "file": _file(filename), "size": size},
    }


def _copy(device_id: str, source: str, target: str, max_bandwidth: int) -> dict[str, object]:
    # auto-dismiss off: the concluded job stays listed until its error (if any) is read.
    args: dict[str, object] = {
        "job-id": job_id(device_id), "device": source, "target": target, "sync": "full", "auto-dismiss": False,
    }  # fmt: skip
    if max_bandwidth:
        args["speed"] = max_bandwidth
    return args


def backup(device_id: str, source: str, max_bandwidth: int = 0) -> dict[str, object]:
    """blockdev-backup of the drive's node `source` into its snapshot node."""
    return _copy(device_id, source, snapshot_node(device_id), max_bandwidth)


def mirror(device_id: str, source: str, target: str, max_bandwidth: int = 0) -> dict[str, object]:
    """blockdev-mirror of the drive's node `source` to the new node `target`."""
    return _copy(device_id, source, target, max_bandwidth)


def job_error(query_jobs: Iterable[Mapping[str, Any]], job: str) -> str:
    """QEMU's error of a concluded job ("" if it succeeded, or is not listed)."""
    for entry in query_jobs:
        if entry.get("id") == job:
            return str(entry.get("error") or "")
    return ""


def virtual_size(named_block_nodes: Iterable[Mapping[str, Any]], node: str) -> int | None:
    """The guest-visible size of `node` (query-named-block-nodes), None if QEMU has no such node."""
    for entry in named_block_nodes:
        if entry.get("node-name") == node:
            image = entry.get("image")
            return int(image["virtual-size"]) if isinstance(image, Mapping) else None
    return None


def fdsets_of_file(query_fdsets: Iterable[Mapping[str, Any]], path: str, first: int) -> list[int]:
    """The boot-time fdsets (ids from `first`) holding `path`: a boot drive's file, its opaque the path."""
    return [
        int(f["fdset-id"])
        for f in query_fdsets
        if int(f["fdset-id"]) >= first and any(fd.get("opaque") == path for fd in f.get("fds", ()))
    ]
