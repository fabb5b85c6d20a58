"""The pure part of SnapshotDrive and SwapDrive: node names, QMP arguments, QEMU's answers."""

from __future__ import annotations

from vmspawnd import blockjob
from vmspawnd.machine import DRIVE_ID
from vmspawnd.model import DiskType, Drive, ImageFormat


def test_a_swap_alternates_between_the_two_node_names_each_within_qemus_31_characters() -> None:
    longest = "d" * 26
    assert DRIVE_ID.fullmatch(longest)
    for dev in ("disk1", longest):
        own, other = blockjob.drive_nodes(dev)
        assert blockjob.swapped_node(dev, own) == other
        assert blockjob.swapped_node(dev, other) == own
        assert max(len(own), len(other), len(blockjob.snapshot_node(dev))) <= 31
        assert len({own, other, blockjob.snapshot_node(dev)}) == 3
    assert Drive("disk1", "/a", DiskType.NVME, "rp0").block_node == "disk1-node"
    assert Drive("disk1", "/a", DiskType.NVME, "rp0", node="disk1-swap").block_node == "disk1-swap"


def test_snapshot_targets_and_jobs() -> None:
    raw = blockjob.snapshot_target("disk1", "/dev/fdset/4", ImageFormat.RAW, 1 << 20)
    assert raw == {
        "node-name": "disk1-snap", "driver": "raw", "size": 1 << 20,
        "file": {"driver": "file", "filename": "/dev/fdset/4"},
    }  # fmt: skip
    qcow2 = blockjob.snapshot_target("disk1", "/dev/fdset/4", ImageFormat.QCOW2, 1 << 20)
    assert "size" not in qcow2 and qcow2["driver"] == "qcow2"
    assert blockjob.qcow2_create("disk1", "/dev/fdset/4", 1 << 20) == {
        "job-id": "disk1-job",
        "options": {"driver": "qcow2", "file": {"driver": "file", "filename": "/dev/fdset/4"}, "size": 1 << 20},
    }
    assert blockjob.backup("disk1", "disk1-node") == {
        "job-id": "disk1-job", "device": "disk1-node", "target": "disk1-snap", "sync": "full", "auto-dismiss": False,
    }  # fmt: skip
    assert blockjob.mirror("disk1", "disk1-node", "disk1-swap", 1000)["speed"] == 1000
    assert "speed" not in blockjob.mirror("disk1", "disk1-node", "disk1-swap")


def test_qemus_answers() -> None:
    jobs = [{"id": "other", "error": "x"}, {"id": "disk1-job", "status": "concluded", "error": "No space left"}]
    assert blockjob.job_error(jobs, "disk1-job") == "No space left"
    assert blockjob.job_error([{"id": "disk1-job", "status": "concluded"}], "disk1-job") == ""
    assert blockjob.job_error([], "disk1-job") == ""
    nodes = [{"node-name": "disk1-node", "image": {"virtual-size": 4096}}, {"node-name": "#block1"}]
    assert blockjob.virtual_size(nodes, "disk1-node") == 4096
    assert blockjob.virtual_size(nodes, "#block1") is None
    assert blockjob.virtual_size(nodes, "disk2-node") is None
    fdsets = [
        {"fdset-id": 1, "fds": [{"fd": 30, "opaque": "disk1:0:/a"}]},
        {"fdset-id": 1_000_001, "fds": [{"fd": 31, "opaque": "/img/root.raw"}]},
        {"fdset-id": 1_000_002, "fds": [{"fd": 32, "opaque": "/img/other.raw"}]},
    ]
    assert blockjob.fdsets_of_file(fdsets, "/img/root.raw", 1_000_001) == [1_000_001]
    assert blockjob.fdsets_of_file(fdsets, "/a", 1_000_001) == []
