"""The device sets of systemd's TEST-64-UDEV-STORAGE, as qemu_extra.

Transcribed from systemd's test/integration-tests/TEST-64-UDEV-STORAGE/meson.build
(the cases vmspawn runs today) and test/TEST-64-UDEV-STORAGE/test.sh (the
older QEMU-only cases megasas2_basic and the 28-controller nvme_basic). The
suite's `--drive=ID:SIZE` becomes a `-blockdev` null-co node named ID (no
file needed, reads return zeros), so each case is exactly the -device
arguments systemd passes plus its drives.

`pcie0` is how many pcie.0 slots the case's own devices take (its PCI
devices without bus=), `controllers` the PCI functions the guest must see
(by vendor:device), `disks` the block devices the tiny guest must list.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024

# vendor:device as the guest's sysfs shows them.
VIRTIO_SCSI = ("1af4:1004", "1af4:1048")
NVME = ("1b36:0010",)
MEGASAS_GEN2 = ("1000:0079",)
PCI_BRIDGE = ("1b36:0001",)
VIRTIO_BLK = ("1af4:1001", "1af4:1042")


@dataclass(frozen=True)
class Case:
    name: str
    devices: tuple[str, ...]
    drives: tuple[tuple[str, int], ...]
    pcie0: int
    # (vendor:device choices, how many functions)
    controllers: tuple[tuple[tuple[str, ...], int], ...]
    # Block devices the tiny guest lists (it has no megaraid driver).
    disks: int
    # False: pcie.0 cannot hold it (the old 28-controller nvme_basic).
    fits: bool = True

    @property
    def qemu_extra(self) -> list[str]:
        out: list[str] = []
        for node, size in self.drives:
            out += ["-blockdev", f"driver=null-co,node-name={node},size={size},read-zeroes=on"]
        for dev in self.devices:
            out += ["-device", dev]
        return out


def _scsi_case(name: str, tag: str, n: int, sizes: tuple[str, ...], vendor: bool = True) -> Case:
    devices = ["virtio-scsi-pci,id=scsi0"]
    drives = []
    for i in range(n):
        node = f"drive{tag}{i}"
        drives.append((node, _size(sizes[min(i, len(sizes) - 1)])))
        product = "vendor=systemd,product=foobar," if vendor else ""
        devices.append(f"scsi-hd,drive={node},{product}serial={_serial(tag, i)}")
    return Case(name, tuple(devices), tuple(drives), 1, ((VIRTIO_SCSI, 1),), n)


def _serial(tag: str, i: int) -> str:
    return {
        "btrfsbasic": f"deadbeefbtrfs{i}",
        "iscsibasic": f"deadbeefiscsi{i}",
        "lvmbasic": f"deadbeeflvm{i}",
        "mdadmbasic": f"deadbeefmdadm{i}",
        "mdadmlvm": f"deadbeefmdadmlvm{i}",
        "simultaneousevents": f"deadbeeftest{i}",
    }[tag]


def _size(text: str) -> int:
    return int(text.removesuffix("M")) * MiB


def _long_sysfs_path() -> Case:
    devices = ["pci-bridge,id=pci_bridge0,chassis_nr=64"]
    devices += [f"pci-bridge,id=pci_bridge{b},bus=pci_bridge{b - 1},chassis_nr={64 + b},addr=1" for b in range(1, 26)]
    devices.append("virtio-blk-pci,drive=drive0,bus=pci_bridge25,addr=1,serial=long-sysfs-path")
    return Case("long_sysfs_path", tuple(devices), (("drive0", 64 * MiB),), 1, ((PCI_BRIDGE, 26), (VIRTIO_BLK, 1)), 1)


def _multipath() -> Case:
    devices = ["virtio-scsi-pci,id=scsi0"]
    drives = []
    for ndisk in range(16):
        wwn = f"0xDEADDEADBEEF{ndisk:04d}"
        for nback in range(4):
            node = f"drive{ndisk}x{nback}"
            drives.append((node, (16 if ndisk == 0 else 1) * MiB))
            devices.append(f"scsi-hd,drive={node},serial=MPIO{ndisk},wwn={wwn}")
    return Case("multipath_basic_failover", tuple(devices), tuple(drives), 1, ((VIRTIO_SCSI, 1),), 64)


def _virtio_scsi_basic() -> Case:
    devices = [f"virtio-scsi-pci,id=scsi{i}" for i in range(4)]
    drives = []
    for i in range(128):
        drives.append((f"drive{i}", MiB))
        devices.append(f"scsi-hd,drive=drive{i},serial=drive{i},bus=scsi{i // 32}.0,channel=0,scsi-id={i % 32},lun=0")
    return Case("virtio_scsi_basic", tuple(devices), tuple(drives), 4, ((VIRTIO_SCSI, 4),), 128)


def _nvme_basic() -> Case:
    serials = [f"deadbeef{i}" for i in range(3)]
    serials += [f"    deadbeef  {i}   " for i in range(3, 6)]
    serials += [f"    dead/beef/{i}   " for i in range(6, 9)]
    serials += [f"dead/../../beef/{i}" for i in range(9, 12)]
    devices = tuple(f"nvme,drive=nvme{i},serial={s},max_ioqpairs=8" for i, s in enumerate(serials))
    drives = tuple((f"nvme{i}", MiB) for i in range(12))
    return Case("nvme_basic", devices, drives, 12, ((NVME, 12),), 12)


def _nvme_subsystem() -> Case:
    devices = (
        "nvme-subsys,id=nvme-subsys-64,nqn=subsys64",
        "nvme,subsys=nvme-subsys-64,serial=deadbeef",
        "nvme,subsys=nvme-subsys-64,serial=deadbeef",
        "nvme-ns,drive=nvme0,nsid=16,shared=on",
        "nvme-ns,drive=nvme1,nsid=17,shared=on",
    )
    # Both namespaces on both controllers; the tiny guest runs nvme_core
    # with multipath=N, so each controller shows both: 4 block devices.
    return Case("nvme_subsystem", devices, (("nvme0", MiB), ("nvme1", MiB)), 2, ((NVME, 2),), 4)


def _identically_named() -> Case:
    devices = ["virtio-scsi-pci,id=scsi0,num_queues=4"]
    drives = []
    for i in range(16):
        drives.append((f"drive{i}", 40 * MiB))
        devices.append(f"scsi-hd,drive=drive{i},serial=drive{i},bus=scsi0.0,channel=0,scsi-id=0,lun={i}")
    return Case("virtio_scsi_identically_named_partitions", tuple(devices), tuple(drives), 1, ((VIRTIO_SCSI, 1),), 16)


def _megasas2_basic() -> Case:
    devices = [f"megasas-gen2,id=scsi{i}" for i in range(4)]
    drives = []
    for i in range(128):
        drives.append((f"drive{i}", MiB))
        devices.append(f"scsi-hd,drive=drive{i},bus=scsi{i // 32}.0,channel=0,scsi-id={i % 32},lun=0")
    return Case("megasas2_basic", tuple(devices), tuple(drives), 4, ((MEGASAS_GEN2, 4),), 0)


def _nvme_basic_28() -> Case:
    devices = tuple(f"nvme,drive=nvme{i},serial=deadbeef{i},num_queues=8" for i in range(28))
    drives = tuple((f"nvme{i}", MiB) for i in range(28))
    return Case("nvme_basic_28 (test.sh)", devices, drives, 28, ((NVME, 28),), 28, fits=False)


CASES: tuple[Case, ...] = (
    _scsi_case("btrfs_basic", "btrfsbasic", 4, ("350M", "128M")),
    _scsi_case("iscsi_lvm", "iscsibasic", 4, ("150M", "70M")),
    _long_sysfs_path(),
    _scsi_case("lvm_basic", "lvmbasic", 4, ("32M",)),
    _scsi_case("mdadm_basic", "mdadmbasic", 5, ("64M",)),
    _scsi_case("mdadm_lvm", "mdadmlvm", 5, ("64M",)),
    _multipath(),
    _scsi_case("simultaneous_events", "simultaneousevents", 10, ("128M",), vendor=False),
    _virtio_scsi_basic(),
    _nvme_basic(),
    _nvme_subsystem(),
    _identically_named(),
    _megasas2_basic(),
    _nvme_basic_28(),
)
BY_NAME = {c.name: c for c in CASES}
