"""blockstats: a drive's entry in query-blockstats and its counters, for all inputs."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from vmspawnd import blockstats

# One entry as QEMU 7.2 reports a -blockdev virtio-blk drive (trimmed).
VIRTIO = {
    "device": "",
    "node-name": "disk0-node",
    "qdev": "/machine/peripheral/disk0/virtio-backend",
    "stats": {
        "rd_operations": 3, "rd_bytes": 12288, "wr_operations": 1, "wr_bytes": 4096, "flush_operations": 2,
        "failed_rd_operations": 1, "failed_wr_operations": 2, "failed_flush_operations": 4,
        "invalid_rd_operations": 8, "rd_merged": 16,
    },
    "parent": {"node-name": "#block090", "stats": {"rd_operations": 99}},
}  # fmt: skip
# An ejected cdrom: its BlockBackend, no node.
EMPTY_CD = {"device": "", "qdev": "/machine/peripheral/cd0", "stats": {"rd_operations": 5}}

COUNTER_FIELDS = sorted({f for fields in blockstats.COUNTERS.values() for f in fields})
ids = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,25}", fullmatch=True)


def test_counters_of_a_virtio_drive() -> None:
    assert blockstats.counters(VIRTIO) == {
        "rd_req": 3, "rd_bytes": 12288, "wr_req": 1, "wr_bytes": 4096, "flush": 2, "errors": 7,
    }  # fmt: skip


def test_the_entry_is_found_by_node_then_by_qdev() -> None:
    reply = [EMPTY_CD, VIRTIO]
    assert blockstats.entry_of(reply, "disk0", "disk0-node") is VIRTIO
    assert blockstats.entry_of(reply, "cd0", "cd0-node") is EMPTY_CD
    assert blockstats.entry_of(reply, "disk1", "disk1-node") is None
    # A node name inside another entry (the parent, the file layer) is not the drive's.
    assert blockstats.entry_of(reply, "x", "#block090") is None


@given(st.dictionaries(st.sampled_from(COUNTER_FIELDS), st.integers(0, 2**64 - 1)))
def test_every_counter_is_the_sum_of_its_fields_and_missing_ones_are_zero(stats: dict[str, int]) -> None:
    got = blockstats.counters({"stats": stats})
    assert set(got) == set(blockstats.COUNTERS)
    for name, fields in blockstats.COUNTERS.items():
        assert got[name] == sum(stats.get(f, 0) for f in fields)


@given(st.lists(ids, unique=True, max_size=8), st.data())
def test_each_drive_gets_its_own_entry_whatever_the_order(devices: list[str], data: Any) -> None:
    # Some by node, some (no medium) by qdev, virtio-blk's under virtio-backend.
    entries = []
    for dev in devices:
        shape = data.draw(st.sampled_from(["node", "qdev", "virtio"]))
        entry: dict[str, Any] = {"device": "", "stats": {}}
        if shape == "node":
            entry |= {"node-name": f"{dev}-node", "qdev": f"/machine/peripheral/{dev}"}
        else:
            entry["qdev"] = f"/machine/peripheral/{dev}" + ("/virtio-backend" if shape == "virtio" else "")
        entries.append(entry)
    reply = data.draw(st.permutations(entries))
    for dev, entry in zip(devices, entries, strict=True):
        assert blockstats.entry_of(reply, dev, f"{dev}-node") is entry
    unknown = data.draw(ids.filter(lambda i: i not in devices))
    assert blockstats.entry_of(reply, unknown, f"{unknown}-node") is None
