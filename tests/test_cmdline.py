"""cmdline.build_argv, pinned: port order, device properties, escaping, argv shape."""

from __future__ import annotations

import json
import string
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.devtypes import TYPES
from vmspawnd.cmdline import (
    BOOT_FDSETS,
    OVMF,
    QEMU,
    Runtime,
    Share,
    blockdev,
    build_argv,
    escape,
    shared_memory,
    shares,
)
from vmspawnd.errors import VmspawndError
from vmspawnd.imagechain import Layer, Role, single
from vmspawnd.model import (
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
    PortRole,
)
from vmspawnd.topology import DIRECT_PORTS as MAX_PORTS
from vmspawnd.topology import DISPLAY_DEVICE, IMPLICIT_DEVICES, Plan, plan_machine

IMG = Path("/img/root.raw")
MACHINE_ID = "0123456789abcdef0123456789abcdef"
RT = Runtime(MACHINE_ID, qmp_fd=3, console_log=Path("/run/vmspawnd/machines/m/console.log"), console_fd=4, vsock_cid=7)
# Options that take no value.
FLAGS = {"-nodefaults", "-no-user-config"}
OPTIONS_WITH_VALUE = {
    "-name", "-uuid", "-machine", "-accel", "-cpu", "-smp", "-m", "-display", "-chardev", "-mon", "-serial",
    "-device", "-blockdev", "-netdev", "-bios", "-kernel", "-initrd", "-append", "-object", "-sandbox", "-add-fd",
    "-vnc", "-spice",
}  # fmt: skip


# -- helpers -------------------------------------------------------------


def parse_kv(value: str) -> dict[str, str]:
    """QEMU's key=value syntax (',,' is a literal comma); a bare first part is the driver."""
    parts = value.replace(",,", "\0").split(",")
    props: dict[str, str] = {}
    for i, part in enumerate(parts):
        key, sep, val = part.partition("=")
        if not sep and i == 0:
            props["driver"] = key.replace("\0", ",")
        else:
            assert key not in props, f"duplicate key {key!r} in {value!r}"
            props[key] = val.replace("\0", ",")
    return props


def parse_device(value: str) -> dict[str, Any]:
    if value.startswith("{"):
        parsed = json.loads(value)
        assert isinstance(parsed, dict)
        return parsed
    return dict(parse_kv(value))


def pairs(argv: list[str]) -> list[tuple[str, str]]:
    """(option, value) pairs of argv[1:], flags left out; fails on a dangling option."""
    out = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        assert opt.startswith("-"), f"argv[{i}] = {opt!r} is not an option"
        if opt in FLAGS:
            i += 1
            continue
        assert i + 1 < len(argv), f"{opt} has no value"
        out.append((opt, argv[i + 1]))
        i += 2
    return out


def values(argv: list[str], option: str) -> list[str]:
    return [v for o, v in pairs(argv) if o == option]


def devices(argv: list[str]) -> list[dict[str, Any]]:
    return [parse_device(v) for v in values(argv, "-device")]


def blockdevs(argv: list[str]) -> list[dict[str, Any]]:
    return [json.loads(v) for v in values(argv, "-blockdev")]


def device(argv: list[str], device_id: str) -> dict[str, Any]:
    return device_by_id(devices(argv), device_id)


def device_by_id(devs: list[dict[str, Any]], device_id: str) -> dict[str, Any]:
    [found] = [d for d in devs if d.get("id") == device_id]
    return found


def argv_for(spec: MachineSpec, rt: Runtime = RT) -> list[str]:
    return build_argv(spec, plan_machine(spec, TYPES), rt)


def spec(**kw: Any) -> MachineSpec:
    base: dict[str, Any] = {"name": "m", "image": DriveSpec(IMG)}
    return MachineSpec(**(base | kw))


def seed_spec(**kw: Any) -> MachineSpec:
    base: dict[str, Any] = dict(
        image=DriveSpec(IMG),
        drives=(DriveSpec(Path("/extra")),),
        network=Network(NetworkMode.USER),
        vsock=True,
        hotplug_spares=10,
    )
    return spec(**(base | kw))


# -- order and root ports --------------------------------------------------


def test_argv_starts_with_qemu_and_fixed_options() -> None:
    argv = argv_for(spec())
    assert argv[0] == QEMU
    assert "-nodefaults" in argv and "-no-user-config" in argv
    assert values(argv, "-cpu") == ["max"]
    assert values(argv, "-display") == ["none"]
    assert values(argv, "-uuid") == [str(uuid.UUID(MACHINE_ID))]
    assert values(argv, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    # The console is a file the daemon opened; the fdset says which.
    assert values(argv, "-chardev") == [
        "socket,id=qmp,fd=3,server=on,wait=off",
        f"socket,id=console,fd=-1,server=on,wait=off,logfile=/dev/fdset/{BOOT_FDSETS},logappend=on",
    ]
    assert values(argv, "-add-fd") == [f"fd=4,set={BOOT_FDSETS},opaque=/run/vmspawnd/machines/m/console.log"]
    assert values(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert values(argv, "-serial") == ["chardev:console"]


def test_root_ports_come_before_any_other_device() -> None:
    s = seed_spec(drives=(DriveSpec(Path("/s"), DiskType.VIRTIO_SCSI),), qemu_extra=("-device", "nvme,serial=x"))
    plan = plan_machine(s, TYPES)
    devs = devices(build_argv(s, plan, RT))
    n = len(plan.ports)
    assert [d["driver"] for d in devs[:n]] == ["pcie-root-port"] * n
    assert all(d["driver"] != "pcie-root-port" for d in devs[n:])
    # Nothing that takes a pcie.0 slot precedes the ports in argv either.
    argv = build_argv(s, plan, RT)
    first_port = argv.index("-device")
    assert not {"-netdev", "-blockdev", "-bios", "-kernel"} & set(argv[:first_port])


def test_root_port_exact_strings() -> None:
    argv = argv_for(seed_spec())
    ports = [v for v in values(argv, "-device") if v.startswith("pcie-root-port")]
    assert ports[0] == "pcie-root-port,id=rp0,bus=pcie.0,addr=0x10.0,multifunction=on,chassis=1,slot=1,hotplug=off"
    assert ports[1] == "pcie-root-port,id=rp1,bus=pcie.0,addr=0x10.1,chassis=2,slot=2,hotplug=off"
    # Port 4 is the first spare: hotplug left on.
    assert ports[4] == "pcie-root-port,id=rp4,bus=pcie.0,addr=0x10.4,chassis=5,slot=5"
    assert ports[8] == "pcie-root-port,id=rp8,bus=pcie.0,addr=0x11.0,multifunction=on,chassis=9,slot=9"


@pytest.mark.parametrize("spares", [1, 7, 8, 9, 16, MAX_PORTS - 1])
def test_one_root_port_per_planned_port(spares: int) -> None:
    s = spec(hotplug_spares=spares)
    plan = plan_machine(s, TYPES)
    ports = [d for d in devices(build_argv(s, plan, RT)) if d["driver"] == "pcie-root-port"]
    assert len(ports) == len(plan.ports) == spares + 1
    for i, (dev, port) in enumerate(zip(ports, plan.ports, strict=True)):
        expected = {
            "driver": "pcie-root-port",
            "id": f"rp{i}",
            "bus": "pcie.0",
            "addr": f"0x{0x10 + i // 8:x}.{i % 8}",
            "chassis": str(i + 1),
            "slot": str(i + 1),
        }
        if i % 8 == 0:
            expected["multifunction"] = "on"
        if port.role is PortRole.BUILTIN:
            expected["hotplug"] = "off"
        assert dev == expected


def test_implicit_devices_once_right_after_the_ports() -> None:
    s = seed_spec()
    plan = plan_machine(s, TYPES)
    devs = devices(build_argv(s, plan, RT))
    n = len(plan.ports)
    assert [d["driver"] for d in devs[n : n + len(IMPLICIT_DEVICES)]] == list(IMPLICIT_DEVICES)
    for slot, driver in enumerate(IMPLICIT_DEVICES, start=1):
        assert [d["driver"] for d in devs].count(driver) == 1
        # At the lowest slots, named: a qemu_extra device with addr= keeps its slot.
        dev = next(d for d in devs if d["driver"] == driver)
        assert (dev["bus"], dev["addr"]) == ("pcie.0", f"0x{slot:x}.0")


def test_implicit_devices_take_no_msi_vectors() -> None:
    """A 1-vCPU Linux guest has about 200 interrupt vectors and every PCIe
    port of a big plan holds one: rng and serial on INTx (balloon has no
    MSI-X at all) leave the vectors to hotplugged devices (README "How many
    hotplug ports")."""
    s = seed_spec()
    devs = devices(build_argv(s, plan_machine(s, TYPES), RT))
    vectors = {d["driver"]: d.get("vectors") for d in devs if d["driver"] in IMPLICIT_DEVICES}
    assert vectors == {"virtio-rng-pci": "0", "virtio-balloon-pci": None, "virtio-serial-pci": "0"}


# -- drives ----------------------------------------------------------------


@pytest.mark.parametrize(("disk_type", "driver"), [(DiskType.VIRTIO_BLK, "virtio-blk-pci"), (DiskType.NVME, "nvme")])
def test_pci_boot_drive_on_its_builtin_port(disk_type: DiskType, driver: str) -> None:
    s = spec(image=DriveSpec(IMG, disk_type), drives=(DriveSpec(Path("/d1"), disk_type),))
    plan = plan_machine(s, TYPES)
    argv = build_argv(s, plan, RT)
    image = device(argv, "disk0")
    expected: dict[str, Any] = {
        "driver": driver,
        "id": "disk0",
        "drive": "disk0-node",
        "bus": plan.port_carrying("disk0").id,
        "addr": "0",
        "bootindex": 1,
    }
    if disk_type is DiskType.NVME:
        expected["serial"] = "disk0"
    assert image == expected
    extra = device(argv, "disk1")
    assert extra["bus"] == plan.port_carrying("disk1").id == "rp1"
    assert extra["addr"] == "0"
    assert "bootindex" not in extra
    assert ("serial" in extra) == (disk_type is DiskType.NVME)
    assert not any(d["driver"] == "virtio-scsi-pci" for d in devices(argv))


def test_nvme_serial_defaults_to_the_drive_id_and_an_explicit_serial_wins() -> None:
    s = spec(image=DriveSpec(IMG, DiskType.NVME), drives=(DriveSpec(Path("/d"), DiskType.NVME, serial="SN-1"),))
    argv = argv_for(s)
    assert device(argv, "disk0")["serial"] == "disk0"
    assert device(argv, "disk1")["serial"] == "SN-1"


def test_virtio_blk_serial_only_when_given() -> None:
    s = spec(drives=(DriveSpec(Path("/d"), serial="abc"),))
    argv = argv_for(s)
    assert "serial" not in device(argv, "disk0")
    assert device(argv, "disk1")["serial"] == "abc"


@pytest.mark.parametrize(
    ("disk_type", "driver"), [(DiskType.VIRTIO_SCSI, "scsi-hd"), (DiskType.VIRTIO_SCSI_CDROM, "scsi-cd")]
)
def test_scsi_boot_drives_share_one_controller_on_a_builtin_port(disk_type: DiskType, driver: str) -> None:
    """Issue 11 finding 11: the guest must not eject its root disk's controller."""
    s = spec(image=DriveSpec(IMG, disk_type), drives=(DriveSpec(Path("/d1"), disk_type),) * 3)
    plan = plan_machine(s, TYPES)
    argv = build_argv(s, plan, RT)
    devs = devices(argv)
    controllers = [d for d in devs if d["driver"] == "virtio-scsi-pci"]
    port = plan.port_carrying("scsi0")
    assert port.role is PortRole.BUILTIN
    assert "hotplug=off" in next(a for a in argv if a.startswith(f"pcie-root-port,id={port.id},"))
    assert controllers == [{"driver": "virtio-scsi-pci", "id": "scsi0", "bus": port.id, "addr": "0"}]
    for i in range(4):
        d = device(argv, f"disk{i}")
        assert d["driver"] == driver
        assert d["bus"] == "scsi0.0"
        assert "addr" not in d
        assert d["drive"] == f"disk{i}-node"
    assert device(argv, "disk0")["bootindex"] == 1
    assert "serial" not in device(argv, "disk0")
    # The controller is defined before the drives that hang off it.
    ids = [d.get("id") for d in devs]
    assert ids.index("scsi0") < ids.index("disk0")


def test_mixed_drives_each_on_their_own_bus() -> None:
    s = spec(
        drives=(
            DriveSpec(Path("/a"), DiskType.NVME),
            DriveSpec(Path("/b"), DiskType.VIRTIO_SCSI),
            DriveSpec(Path("/c"), DiskType.VIRTIO_SCSI_CDROM),
            DriveSpec(Path("/d")),
        ),
        hotplug_spares=1,
    )
    argv = argv_for(s)
    buses = {i: device(argv, f"disk{i}")["bus"] for i in range(5)}
    assert buses == {0: "rp0", 1: "rp1", 2: "scsi0.0", 3: "scsi0.0", 4: "rp2"}
    assert device(argv, "scsi0")["bus"] == "rp3"
    assert [d["driver"] for d in devices(argv)].count("virtio-scsi-pci") == 1


def test_no_scsi_controller_without_scsi_drives() -> None:
    assert not any(d["driver"] == "virtio-scsi-pci" for d in devices(argv_for(seed_spec())))


def test_image_gets_bootindex_1_and_nothing_else_does() -> None:
    s = seed_spec(drives=(DriveSpec(Path("/a")), DriveSpec(Path("/b"), DiskType.NVME)))
    boot = {d["id"]: d["bootindex"] for d in devices(argv_for(s)) if "bootindex" in d}
    assert boot == {"disk0": 1}


def test_kernel_boot_drives_get_no_bootindex() -> None:
    s = MachineSpec("m", kernel=Path("/k"), drives=(DriveSpec(Path("/a")),))
    argv = argv_for(s)
    assert "bootindex" not in device(argv, "disk0")
    assert values(argv, "-kernel") == ["/k"]


@pytest.mark.parametrize("fmt", list(ImageFormat))
@pytest.mark.parametrize("disk_type", list(DiskType))
@pytest.mark.parametrize("read_only", [False, True])
def test_blockdev_json(fmt: ImageFormat, disk_type: DiskType, read_only: bool) -> None:
    s = spec(image=DriveSpec(Path("/img/a,b.img"), disk_type, fmt, read_only))
    [bd] = blockdevs(argv_for(s))
    ro = read_only or disk_type is DiskType.VIRTIO_SCSI_CDROM
    assert bd == {
        "driver": str(fmt),
        "node-name": "disk0-node",
        "read-only": ro,
        # JSON syntax: no comma escaping in file names.
        "file": {"driver": "file", "filename": "/img/a,b.img", "read-only": ro},
        # QEMU opens no backing file a qcow2 header names.
        **({"backing": None} if fmt is ImageFormat.QCOW2 else {}),
    }


def test_blockdev_precedes_its_device() -> None:
    argv = argv_for(seed_spec())
    p = pairs(argv)
    for i in range(2):
        bd = next(n for n, (o, v) in enumerate(p) if o == "-blockdev" and json.loads(v)["node-name"] == f"disk{i}-node")
        dev = next(n for n, (o, v) in enumerate(p) if o == "-device" and parse_device(v).get("id") == f"disk{i}")
        assert bd < dev


def test_blockdev_helper_uses_the_given_filename() -> None:
    bd = blockdev("x", single("/p", ImageFormat.RAW, False), lambda layer: "/proc/self/fd/9")
    assert bd["file"] == {"driver": "file", "filename": "/proc/self/fd/9", "read-only": False}


def test_blockdev_nests_every_layer_of_a_chain() -> None:
    base = Layer("2", "/b/base.raw", Role.BACKING, ImageFormat.RAW, True)
    data = Layer("1d", "/b/mid.data", Role.DATA_FILE, ImageFormat.RAW, True)
    mid = Layer("1", "/b/mid.qcow2", Role.BACKING, ImageFormat.QCOW2, True, base, data)
    top = Layer("0", "/t/top.qcow2", Role.IMAGE, ImageFormat.QCOW2, False, mid)
    fds = {"0": 10, "1": 11, "1d": 12, "2": 13}
    bd = blockdev("disk3", top, lambda layer: f"/dev/fdset/{fds[layer.label]}")

    def file(n: int, ro: bool) -> dict[str, object]:
        return {"driver": "file", "filename": f"/dev/fdset/{n}", "read-only": ro}

    assert bd == {
        "node-name": "disk3-node",
        "driver": "qcow2",
        "read-only": False,
        "file": file(10, False),
        "backing": {
            "driver": "qcow2",
            "read-only": True,
            "file": file(11, True),
            "backing": {"driver": "raw", "read-only": True, "file": file(13, True)},
            "data-file": file(12, True),
        },
    }


def test_boot_drives_take_their_chain_from_the_runtime() -> None:
    base = Layer("1", "/b/base.raw", Role.BACKING, ImageFormat.RAW, True)
    top = Layer("0", str(IMG), Role.IMAGE, ImageFormat.QCOW2, False, base)
    opened = {str(IMG): 10, "/b/base.raw": 11}
    rt = Runtime(MACHINE_ID, 3, RT.console_log, 4, opened=opened, chains={"disk0": top})
    [bd] = blockdevs(argv_for(spec(image=DriveSpec(IMG, format=ImageFormat.QCOW2)), rt))
    # Each layer its own fdset.
    assert bd["file"]["filename"] == f"/dev/fdset/{BOOT_FDSETS + 1}"
    assert bd["backing"] == {
        "driver": "raw",
        "read-only": True,
        "file": {"driver": "file", "filename": f"/dev/fdset/{BOOT_FDSETS + 2}", "read-only": True},
    }


def test_opened_paths_are_fdsets_kernel_and_initrd_memfds() -> None:
    s = spec(
        image=DriveSpec(IMG),
        drives=(DriveSpec(Path("/d1")), DriveSpec(Path("/not-opened"))),
        kernel=Path("/boot/vmlinuz"),
        initrd=Path("/boot/initrd"),
    )
    opened = {str(IMG): 10, "/d1": 11}
    rt = Runtime(MACHINE_ID, 3, RT.console_log, 4, opened=opened, kernel_fd=12, initrd_fd=13)
    argv = argv_for(s, rt)
    first = BOOT_FDSETS + 1
    assert [b["file"]["filename"] for b in blockdevs(argv)] == [
        f"/dev/fdset/{first}", f"/dev/fdset/{first + 1}", "/not-opened",
    ]  # fmt: skip
    assert values(argv, "-add-fd") == [
        f"fd=4,set={BOOT_FDSETS},opaque={RT.console_log}",
        f"fd=10,set={first},opaque={IMG}",
        f"fd=11,set={first + 1},opaque=/d1",
    ]
    assert values(argv, "-kernel") == ["/proc/self/fd/12"]
    assert values(argv, "-initrd") == ["/proc/self/fd/13"]
    for path in [*opened, "/boot/vmlinuz", "/boot/initrd"]:
        assert path not in argv
        assert not any(path in v for v in values(argv, "-blockdev"))


def test_runtime_path_keys_are_path_strings() -> None:
    rt = Runtime(MACHINE_ID, 3, RT.console_log, 4, opened={"/a/b": 7})
    assert rt.path(Path("/a/b")) == f"/dev/fdset/{BOOT_FDSETS + 1}"
    assert rt.path(Path("/a//b/")) == f"/dev/fdset/{BOOT_FDSETS + 1}"
    assert rt.path(Path("/a/c")) == "/a/c"
    # The console's own path is not a caller's.
    assert rt.path(RT.console_log) == str(RT.console_log)


# -- machine-wide options ----------------------------------------------------


@pytest.mark.parametrize(
    ("accel", "value"),
    [(Accel.KVM, ["kvm"]), (Accel.TCG, ["tcg,split-wx=on"]), (Accel.AUTO, ["kvm", "tcg,split-wx=on"])],
)
def test_accel(accel: Accel, value: list[str]) -> None:
    argv = argv_for(spec(accel=accel))
    assert values(argv, "-machine") == ["q35,memory-backend=mem"]
    assert values(argv, "-accel") == value


@pytest.mark.parametrize(("memory", "value"), [(32 * MiB, "32M"), (512 * MiB, "512M"), (4096 * MiB, "4096M")])
def test_memory_in_mib(memory: int, value: str) -> None:
    assert values(argv_for(spec(memory=memory)), "-m") == [value]


def test_default_memory_and_cpus() -> None:
    argv = argv_for(spec())
    assert values(argv, "-m") == ["512M"]
    assert values(argv, "-smp") == ["1"]


@pytest.mark.parametrize("cpus", [1, 4, 288])
def test_cpus(cpus: int) -> None:
    assert values(argv_for(spec(cpus=cpus)), "-smp") == [str(cpus)]


def test_no_network_no_netdev() -> None:
    argv = argv_for(spec())
    assert values(argv, "-netdev") == []
    assert not any(d["driver"] == "virtio-net-pci" for d in devices(argv))


def test_user_network() -> None:
    s = spec(network=Network(NetworkMode.USER))
    plan = plan_machine(s, TYPES)
    argv = build_argv(s, plan, RT)
    assert values(argv, "-netdev") == ["user,id=net0"]
    net = device(argv, "net0")
    assert net == {
        "driver": "virtio-net-pci",
        "id": "net0",
        "netdev": "net0",
        "bus": plan.port_carrying("net0").id,
        "addr": "0",
    }
    assert net["bus"] == "rp1"


def test_tap_network_is_an_fd_never_a_name() -> None:
    s = spec(network=Network(NetworkMode.TAP, "tap0"))
    argv = argv_for(s, replace(RT, tap_fd=11))
    [netdev] = values(argv, "-netdev")
    assert netdev == "tap,id=net0,fd=11"
    assert "tap0" not in " ".join(argv)
    assert device(argv, "net0")["driver"] == "virtio-net-pci"


def test_tap_network_without_the_daemons_fd_is_a_bug() -> None:
    with pytest.raises(ValueError, match="tap fd"):
        argv_for(spec(network=Network(NetworkMode.TAP, "tap0")))


def test_vsock() -> None:
    s = spec(vsock=True)
    plan = plan_machine(s, TYPES)
    argv = build_argv(s, plan, RT)
    port = plan.port_carrying("vsock0").id
    assert f"vhost-vsock-pci,id=vsock0,guest-cid=7,bus={port},addr=0" in values(argv, "-device")


def test_no_vsock_by_default() -> None:
    assert not any(d["driver"] == "vhost-vsock-pci" for d in devices(argv_for(spec())))


def test_uefi_uses_ovmf_and_bios_passes_nothing() -> None:
    assert values(argv_for(spec(firmware=Firmware.UEFI)), "-bios") == [str(OVMF)]
    assert values(argv_for(spec(firmware=Firmware.BIOS)), "-bios") == []


def test_kernel_initrd_append() -> None:
    s = MachineSpec("m", kernel=Path("/k,1"), initrd=Path("/i,2"), cmdline="console=ttyS0 root=/dev/vda, x")
    argv = argv_for(s)
    # Plain file-name options, not key=value: no escaping.
    assert values(argv, "-kernel") == ["/k,1"]
    assert values(argv, "-initrd") == ["/i,2"]
    assert values(argv, "-append") == ["console=ttyS0 root=/dev/vda, x"]


def test_no_append_without_cmdline() -> None:
    argv = argv_for(MachineSpec("m", kernel=Path("/k")))
    assert values(argv, "-append") == []
    assert values(argv, "-initrd") == []


def test_qemu_extra_appended_last_verbatim() -> None:
    extra = ("-device", "nvme,serial=x,,y", "-global", "kvm-pit.lost_tick_policy=discard", "-S")
    argv = argv_for(seed_spec(qemu_extra=extra, firmware=Firmware.UEFI, kernel=Path("/k"), cmdline="c"))
    assert tuple(argv[-len(extra) :]) == extra
    assert argv.count("-S") == 1


@pytest.mark.parametrize(("name", "escaped"), [("m", "m"), ("a,b", "a,,b"), ("a,,b", "a,,,,b"), ("a=b", "a=b")])
def test_name_is_escaped(name: str, escaped: str) -> None:
    argv = argv_for(spec(name=name))
    assert values(argv, "-name") == [f"guest={escaped}"]
    assert parse_kv(values(argv, "-name")[0]) == {"guest": name}


def test_console_log_path_is_escaped_in_its_fdsets_opaque() -> None:
    rt = Runtime(MACHINE_ID, 3, Path("/run/a,b/console.log"), 4)
    [console] = values(argv_for(spec(), rt), "-add-fd")
    assert console == f"fd=4,set={BOOT_FDSETS},opaque=/run/a,,b/console.log"
    assert parse_kv(console)["opaque"] == "/run/a,b/console.log"


def test_escape() -> None:
    assert escape("") == ""
    assert escape("a,b,,c") == "a,,b,,,,c"


# -- virtiofs ---------------------------------------------------------------

FS_FDS = {"rootfs": 20, "fs0": 21, "fs1": 22}
FS_RT = Runtime(MACHINE_ID, 3, RT.console_log, fs_fds=FS_FDS)


def fs_spec(**kw: Any) -> MachineSpec:
    mounts = (MountSpec(Path("/srv/a"), "a"), MountSpec(Path("/srv/b"), "b.2"))
    return spec(**({"directory": Path("/srv/root"), "mounts": mounts, "memory": 1024 * MiB} | kw))


def test_shares_root_directory_first_then_mounts() -> None:
    assert shares(fs_spec()) == [
        Share("rootfs", Path("/srv/root"), "root"),
        Share("fs0", Path("/srv/a"), "a"),
        Share("fs1", Path("/srv/b"), "b.2"),
    ]
    assert shares(fs_spec(directory=None)) == [Share("fs0", Path("/srv/a"), "a"), Share("fs1", Path("/srv/b"), "b.2")]
    assert shares(spec()) == []


def test_virtiofs_devices_on_their_builtin_ports() -> None:
    s = fs_spec()
    plan = plan_machine(s, TYPES)
    argv = build_argv(s, plan, FS_RT)
    for share in shares(s):
        port = plan.port_carrying(share.device)
        assert port.role is PortRole.BUILTIN
        assert f"socket,id={share.device},fd={FS_FDS[share.device]}" in values(argv, "-chardev")
        assert device(argv, share.device) == {
            "driver": "vhost-user-fs-pci",
            "id": share.device,
            "chardev": share.device,
            "tag": share.tag,
            "bus": port.id,
            "addr": "0",
        }


def test_virtiofs_needs_shared_guest_memory_of_the_machine_size() -> None:
    argv = argv_for(fs_spec(), FS_RT)
    assert values(argv, "-machine") == ["q35,memory-backend=mem"]
    assert values(argv, "-object") == ["memory-backend-memfd,id=mem,size=1024M,share=on"]
    assert values(argv, "-m") == ["1024M"]


def test_only_a_directory_is_enough_for_shared_memory() -> None:
    argv = argv_for(spec(directory=Path("/srv")), Runtime(MACHINE_ID, 3, RT.console_log, fs_fds={"rootfs": 9}))
    assert values(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]
    assert device(argv, "rootfs")["tag"] == "root"


def test_spare_ports_get_shared_memory_for_a_share_hotplugged_later() -> None:
    argv = argv_for(spec(hotplug_spares=1))
    assert values(argv, "-machine") == ["q35,memory-backend=mem"]
    assert values(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]


def test_no_shares_and_no_spares_no_memory_backend() -> None:
    argv = argv_for(spec(hotplug_spares=0))
    assert values(argv, "-object") == []
    assert "memory-backend" not in values(argv, "-machine")[0]


def test_virtiofs_tag_is_carried_intact() -> None:
    s = spec(mounts=(MountSpec(Path("/srv"), "a,b"),))
    argv = argv_for(s, Runtime(MACHINE_ID, 3, RT.console_log, fs_fds={"fs0": 9}))
    assert device(argv, "fs0")["tag"] == "a,b"


# -- properties --------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=16)
paths = texts.map(lambda s: Path("/" + s))
serials = st.text(st.sampled_from(string.ascii_letters + string.digits + ",=-_."), max_size=8)
drive_specs = st.builds(
    DriveSpec, paths, st.sampled_from(list(DiskType)), st.sampled_from(list(ImageFormat)), st.booleans(), serials
)
networks = st.one_of(
    st.just(Network()),
    st.just(Network(NetworkMode.USER)),
    st.builds(Network, st.just(NetworkMode.TAP), st.text(st.sampled_from("ab0,=."), min_size=1, max_size=15)),
)
extra_chunks = st.sampled_from(
    [
        ("-device", "nvme,serial=ex"),
        ("-device", "virtio-rng-pci,bus=pcie.0"),
        ("-device", '{"driver":"e1000"}'),
        ("-global", "kvm-pit.lost_tick_policy=discard"),
        ("-smbios", "type=1,serial=x,,y"),
    ]
)
specs = st.builds(
    MachineSpec,
    name=texts.filter(bool),
    kernel=st.none() | paths,
    initrd=st.none() | paths,
    cmdline=texts,
    image=st.none() | drive_specs,
    drives=st.lists(drive_specs, max_size=12).map(tuple),
    directory=st.none() | paths,
    mounts=st.lists(
        st.builds(MountSpec, paths, st.text(st.sampled_from("ab,.:"), min_size=1, max_size=5)), max_size=3
    ).map(tuple),
    network=networks,
    vsock=st.booleans(),
    memory=st.integers(32, 8192).map(lambda m: m * MiB),
    cpus=st.integers(1, 288),
    hotplug_spares=st.integers(1, 30),
    accel=st.sampled_from(list(Accel)),
    qemu_extra=st.lists(extra_chunks, max_size=5).map(lambda cs: tuple(a for c in cs for a in c)),
    firmware=st.sampled_from(list(Firmware)),
)


def plan_or_skip(spec: MachineSpec) -> Plan:
    try:
        return plan_machine(spec, TYPES)
    except VmspawndError:
        assume(False)
        raise


@settings(deadline=None)
@given(specs, st.booleans())
def test_any_spec_gives_well_formed_argv(spec: MachineSpec, open_all: bool) -> None:
    plan = plan_or_skip(spec)
    files = [d.path for d in spec.boot_drives]
    opened = {str(p): 100 + i for i, p in enumerate(files)} if open_all else {}
    fs_fds = {share.device: 200 + i for i, share in enumerate(shares(spec))}
    kernel_fd, initrd_fd = (98, 99) if open_all else (None, None)
    rt = Runtime(MACHINE_ID, 3, Path("/run/x,y/console.log"), 4, 5, opened, kernel_fd, initrd_fd, fs_fds, tap_fd=6)
    argv = build_argv(spec, plan, rt)
    extra = spec.qemu_extra
    own = argv[: len(argv) - len(extra)]
    assert tuple(argv[len(own) :]) == extra
    # Every option is followed by its value.
    own_pairs = pairs(own)
    assert {o for o, _ in own_pairs} <= OPTIONS_WITH_VALUE
    all_pairs = pairs(argv)

    devs = [parse_device(v) for o, v in all_pairs if o == "-device"]
    ports = [d for d in devs if d["driver"] == "pcie-root-port"]
    # Root ports first, one per planned port.
    assert devs[: len(ports)] == ports
    assert [p["id"] for p in ports] == [p.id for p in plan.ports]
    port_ids = {p["id"] for p in ports}
    scsi_buses = {f"{d['id']}.0" for d in devs if d["driver"] == "virtio-scsi-pci"}
    assert len(scsi_buses) == (1 if any(d.disk_type.is_scsi for d in spec.boot_drives) else 0)
    for d in devs:
        if "bus" in d:
            assert d["bus"] in port_ids | {"pcie.0"} | scsi_buses, d
    ids = [d["id"] for d in devs if "id" in d]
    assert len(ids) == len(set(ids))
    # Each non-SCSI device on a root port sits alone on it at addr 0.
    on_ports = [d for d in devs if d.get("bus") in port_ids]
    assert len({d["bus"] for d in on_ports}) == len(on_ports)
    assert all(d["addr"] == "0" for d in on_ports)

    # One -blockdev per boot drive, each used by exactly one device.
    bds = [json.loads(v) for o, v in own_pairs if o == "-blockdev"]
    assert len(bds) == len(spec.boot_drives)
    nodes = [b["node-name"] for b in bds]
    assert sorted(nodes) == sorted(d["drive"] for d in devs if "drive" in d)
    for bd, drive in zip(bds, spec.boot_drives, strict=True):
        ro = drive.read_only or drive.disk_type is DiskType.VIRTIO_SCSI_CDROM
        assert bd["read-only"] is bd["file"]["read-only"] is ro
        assert bd["file"]["filename"] == rt.path(drive.path)
        assert bd["file"]["filename"].startswith("/dev/fdset/") is open_all
    assert [d["id"] for d in devs if d.get("bootindex") == 1] == (["disk0"] if spec.image else [])

    # key=value options survive QEMU's comma rule.
    assert parse_kv(dict(own_pairs)["-name"]) == {"guest": spec.name}
    fdsets = [parse_kv(v) for v in values(own, "-add-fd")]
    assert fdsets[0] == {"fd": "4", "set": str(BOOT_FDSETS), "opaque": "/run/x,y/console.log"}
    # One fdset per opened file, each named by exactly the drives of that path.
    assert [(f["fd"], f["opaque"]) for f in fdsets[1:]] == [(str(fd), path) for path, fd in opened.items()]
    assert len({f["set"] for f in fdsets}) == len(fdsets)
    if spec.network.mode is NetworkMode.TAP:
        assert parse_kv(values(own, "-netdev")[0]) == {"driver": "tap", "id": "net0", "fd": "6"}
    chardev_ids = [parse_kv(v)["id"] for v in values(own, "-chardev")]
    assert len(chardev_ids) == len(set(chardev_ids))
    for share in shares(spec):
        assert device_by_id(devs, share.device)["tag"] == share.tag
        assert device_by_id(devs, share.device)["chardev"] == share.device
    assert shared_memory(spec) == bool(values(own, "-object")) == (bool(shares(spec)) or spec.hotplug_spares > 0)
    if spec.kernel is not None:
        assert values(own, "-kernel") == ["/proc/self/fd/98" if open_all else str(spec.kernel)]
    if spec.initrd is not None:
        assert values(own, "-initrd") == ["/proc/self/fd/99" if open_all else str(spec.initrd)]


def test_a_suspended_machines_start_waits_for_its_saved_state_with_its_vcpus_stopped() -> None:
    plain = argv_for(spec())
    resumed = argv_for(spec(), replace(RT, incoming=True))
    # The same machine otherwise: the saved state loads only into the same devices.
    assert resumed[: len(plain)] == plain
    assert resumed[len(plain) :] == ["-S", "-incoming", "defer"]
    assert "-incoming" not in plain


def test_an_incoming_machine_waits_for_its_migration_stream() -> None:
    """The destination of a live migration: same devices, QEMU waits for migrate-incoming."""
    plain = argv_for(spec(hotplug_spares=2))
    waiting = argv_for(spec(hotplug_spares=2), replace(RT, incoming=True, autostart=True))
    assert waiting == [*plain, "-incoming", "defer"]


# -- the guest agent ------------------------------------------------------------


def test_the_guest_agent_port_sits_on_the_implicit_virtio_serial_device() -> None:
    s = spec(guest_agent=True)
    plan = plan_machine(s, TYPES)
    argv = build_argv(s, plan, replace(RT, agent_sock=9))
    [serial] = [i.id for i in plan.implicit if i.driver == "virtio-serial-pci"]
    assert device(argv, "qga0") == {
        "driver": "virtserialport", "id": "qga0", "bus": f"{serial}.0", "chardev": "qga0",
        "name": "org.qemu.guest_agent.0",
    }  # fmt: skip
    assert "socket,id=qga0,fd=9,server=on,wait=off" in values(argv, "-chardev")
    # No new PCI device: the plan is the one without the agent.
    assert plan == plan_machine(spec(), TYPES)


def test_no_guest_agent_no_port() -> None:
    argv = argv_for(spec())
    assert not [d for d in devices(argv) if d.get("id") == "qga0"]
    assert not [c for c in values(argv, "-chardev") if "qga0" in c]


def test_a_guest_agent_port_needs_its_socket() -> None:
    with pytest.raises(ValueError, match="listening socket"):
        argv_for(spec(guest_agent=True))


def test_qemu_extra_may_not_take_the_agents_id_when_there_is_an_agent() -> None:
    extra = ("-chardev", "socket,id=qga0,path=/tmp/x")
    with pytest.raises(VmspawndError, match="qga0"):
        plan_machine(spec(guest_agent=True, qemu_extra=extra), TYPES)
    plan_machine(spec(qemu_extra=extra), TYPES)


# -- graphics -------------------------------------------------------------------


def test_no_graphics_no_display_and_no_display_server() -> None:
    argv = argv_for(spec())
    assert values(argv, "-display") == ["none"]
    assert values(argv, "-vnc") == [] and values(argv, "-spice") == []
    assert DISPLAY_DEVICE not in [d["driver"] for d in devices(argv)]


@pytest.mark.parametrize(
    ("graphics", "option", "value"),
    [(Graphics.VNC, "-vnc", "none"), (Graphics.SPICE, "-spice", "disable-ticketing=on")],
)
def test_graphics_is_a_display_device_and_a_server_that_listens_nowhere(
    graphics: Graphics, option: str, value: str
) -> None:
    s = spec(graphics=graphics)
    plan = plan_machine(s, TYPES)
    argv = build_argv(s, plan, RT)
    # No port, no path: OpenGraphics hands QEMU each client's socket.
    assert values(argv, option) == [value]
    assert not [v for v in values(argv, option) if "port" in v or "addr" in v or "unix" in v]
    # No window of QEMU's own either.
    assert values(argv, "-display") == ["none"]
    [display] = [i for i in plan.implicit if i.driver == DISPLAY_DEVICE]
    assert device(argv, display.id) == {
        "driver": DISPLAY_DEVICE,
        "id": display.id,
        "bus": "pcie.0",
        "addr": display.addr,
    }
