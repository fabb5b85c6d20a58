"""QEMU's device type list: parsing, and the snapshot the unit tests use."""

import json

import pytest

from tests.devtypes import SNAPSHOT, TYPES
from vmspawnd import pcitypes

QMP = "\n".join(
    json.dumps(m)
    for m in (
        {"QMP": {}},
        {"return": {}},
        {"return": [{"name": "nvme"}, {"name": "scsi-hd"}, {"name": "pci-bridge"}], "id": "device"},
        {"return": [{"name": "nvme"}, {"name": "pci-bridge"}], "id": "pci"},
        {"return": [{"name": "pci-bridge"}], "id": "bridge"},
    )
)
HELP = 'Storage devices:\nname "virtio-blk-pci", bus PCI, alias "virtio-blk"\nname "nvme", bus PCI, desc "..."\n'


def test_parse_reads_the_three_lists_and_the_aliases() -> None:
    t = pcitypes.parse(QMP, HELP)
    assert t.known == {"nvme", "scsi-hd", "pci-bridge"}
    assert t.pci == {"nvme", "pci-bridge"} and t.bridges == {"pci-bridge"}
    assert t.aliases == (("virtio-blk", "virtio-blk-pci"),)
    assert t.resolve("virtio-blk") == "virtio-blk-pci" and t.resolve("nope") is None


def test_parse_refuses_a_partial_answer() -> None:
    with pytest.raises(ValueError, match="qom-list-types"):
        pcitypes.parse(QMP.rsplit("\n", 1)[0], HELP)


def test_the_snapshot_round_trips_and_knows_the_test64_types() -> None:
    assert pcitypes.from_json(json.loads(SNAPSHOT.read_text())) == TYPES
    assert pcitypes.from_json(pcitypes.to_json(TYPES)) == TYPES
    assert {"nvme", "virtio-scsi-pci", "megasas-gen2", "pci-bridge"} <= TYPES.pci
    assert {"scsi-hd", "nvme-ns", "nvme-subsys", "ide-hd"}.isdisjoint(TYPES.pci)
    assert {"x3130-upstream", "xio3130-downstream", "pcie-root-port"} <= TYPES.bridges
