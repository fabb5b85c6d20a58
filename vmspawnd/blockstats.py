"""One drive's I/O counters out of QMP's query-blockstats reply (pure).

QEMU counts on the device's BlockBackend: the counters survive a medium
change, and they start at zero when the device is plugged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# What DriveStats reports, each from these query-blockstats counters (summed).
COUNTERS: dict[str, tuple[str, ...]] = {
    "rd_req": ("rd_operations",),
    "rd_bytes": ("rd_bytes",),
    "wr_req": ("wr_operations",),
    "wr_bytes": ("wr_bytes",),
    "flush": ("flush_operations",),
    # Requests the image failed (EIO, ENOSPC, ...), not the guest's invalid ones.
    "errors": ("failed_rd_operations", "failed_wr_operations", "failed_flush_operations"),
}


def entry_of(reply: Sequence[Mapping[str, Any]], device_id: str, node_name: str) -> Mapping[str, Any] | None:
    """The reply's entry for the device `device_id`: by its root node, or,
    while it has no medium (an ejected cdrom has no node), by its qdev path
    (virtio-blk's backend sits one level below the PCI device)."""
    qdevs = {f"/machine/peripheral/{device_id}", f"/machine/peripheral/{device_id}/virtio-backend"}
    for entry in reply:
        if entry.get("node-name") == node_name:
            return entry
    for entry in reply:
        if entry.get("qdev") in qdevs:
            return entry
    return None


def counters(entry: Mapping[str, Any]) -> dict[str, int]:
    """The entry's counters by DriveStats' names (one QEMU does not report counts as 0)."""
    stats = entry.get("stats", {})
    return {name: sum(int(stats.get(field, 0)) for field in fields) for name, fields in COUNTERS.items()}
