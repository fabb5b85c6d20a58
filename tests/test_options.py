"""bus/options: a{sv} -> model values; every refusal is an InvalidArgument a person can act on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from hypothesis import given, settings
from hypothesis import strategies as st

from vmspawnd.bus.options import (
    ADD_DRIVE_OPTIONS,
    DRIVE_OPTIONS,
    MACHINE_OPTIONS,
    MAX_CPUS,
    MAX_MEMORY,
    MAX_STRING,
    MIN_MEMORY,
    MOUNT_OPTIONS,
    REMOVE_DRIVE_OPTIONS,
    add_drive,
    add_drive_port,
    add_share,
    incoming,
    incoming_timeout,
    machine_spec,
    migrate,
    open_graphics,
    power_off_timeout,
    remove_timeout,
)
from vmspawnd.errors import InvalidArgument
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
    PluggedDrive,
)

V = Variant
IMG = {"image": V("s", "/img")}

# One well-formed sample per signature we try.
SAMPLES: dict[str, Variant] = {
    "s": V("s", "x"),
    "b": V("b", True),
    "t": V("t", 1),
    "u": V("u", 1),
    "i": V("i", 1),
    "x": V("x", 1),
    "d": V("d", 1.0),
    "y": V("y", 1),
    "o": V("o", "/x"),
    "as": V("as", ["x"]),
    "a{sv}": V("a{sv}", {"path": V("s", "/x")}),
    "aa{sv}": V("aa{sv}", [{"path": V("s", "/x")}]),
    "ay": V("ay", b"/x"),
    "v": V("v", V("s", "x")),
}

# A valid value for every CreateMachine key and what it becomes.
VALID: dict[str, tuple[Variant, Any]] = {
    "kernel": (V("s", "/boot/vmlinuz"), lambda s: s.kernel == Path("/boot/vmlinuz")),
    "initrd": (V("s", "/boot/initrd"), lambda s: s.initrd == Path("/boot/initrd")),
    "cmdline": (V("s", "console=ttyS0 quiet"), lambda s: s.cmdline == "console=ttyS0 quiet"),
    "image": (V("s", "/img"), lambda s: s.image == DriveSpec(Path("/img"))),
    "image_format": (V("s", "qcow2"), lambda s: s.image is None),
    "disk_type": (V("s", "nvme"), lambda s: s.image is None),
    "drives": (
        V("aa{sv}", [{"path": V("s", "/d")}]),
        lambda s: s.drives == (DriveSpec(Path("/d")),),
    ),
    "directory": (V("s", "/srv"), lambda s: s.directory == Path("/srv")),
    "mounts": (
        V("aa{sv}", [{"source": V("s", "/m"), "tag": V("s", "t")}]),
        lambda s: s.mounts == (MountSpec(Path("/m"), "t"),),
    ),
    "network": (V("s", "user"), lambda s: s.network == Network(NetworkMode.USER)),
    "vsock": (V("b", True), lambda s: s.vsock is True),
    "memory": (V("t", 2048 * MiB), lambda s: s.memory == 2048 * MiB),
    "cpus": (V("u", 4), lambda s: s.cpus == 4),
    "hotplug_spares": (V("u", 3), lambda s: s.hotplug_spares == 3),
    "accel": (V("s", "tcg"), lambda s: s.accel is Accel.TCG),
    "qemu_extra": (V("as", ["-smp", "2"]), lambda s: s.qemu_extra == ("-smp", "2")),
    "firmware": (V("s", "uefi"), lambda s: s.firmware is Firmware.UEFI),
    "keep": (V("b", True), lambda s: s.keep is True),
    "plugged": (
        V("aa{sv}", [{"path": V("s", "/p"), "id": V("s", "disk3"), "port": V("s", "rp1")}]),
        lambda s: s.plugged == (PluggedDrive("disk3", DriveSpec(Path("/p")), "rp1"),),
    ),
    # Not the spec's: how QEMU starts (incoming() reads it).
    "incoming": (V("b", True), lambda s: s == MachineSpec("m")),
    "guest_agent": (V("b", True), lambda s: s.guest_agent is True),
    "graphics": (V("s", "vnc"), lambda s: s.graphics is Graphics.VNC),
}


def spec(**options: Variant) -> MachineSpec:
    return machine_spec("m", options)


def refused(options: dict[str, Any], *fragments: str) -> str:
    with pytest.raises(InvalidArgument) as e:
        machine_spec("m", options)
    for fragment in fragments:
        assert fragment in str(e.value)
    return str(e.value)


def test_valid_table_covers_every_key() -> None:
    assert set(VALID) == set(MACHINE_OPTIONS)


def test_defaults() -> None:
    assert machine_spec("m", {}) == MachineSpec("m")
    assert spec(**IMG) == MachineSpec("m", image=DriveSpec(Path("/img")))


@pytest.mark.parametrize("key", sorted(MACHINE_OPTIONS))
def test_every_key_accepted_with_its_signature(key: str) -> None:
    variant, check = VALID[key]
    assert variant.signature == MACHINE_OPTIONS[key]
    assert check(spec(**{key: variant}))


@pytest.mark.parametrize(
    ("key", "other"), [(k, sig) for k in sorted(MACHINE_OPTIONS) for sig in SAMPLES if sig != MACHINE_OPTIONS[k]]
)
def test_every_key_refused_with_any_other_signature(key: str, other: str) -> None:
    msg = refused({key: SAMPLES[other]})
    assert msg == f"CreateMachine option {key!r} must have type '{MACHINE_OPTIONS[key]}', got '{other}'"


@pytest.mark.parametrize("raw", ["/img", 1, True, None, ["/x"]])
def test_a_bare_value_instead_of_a_variant_is_refused(raw: object) -> None:
    refused({"image": raw}, "option 'image' must have type 's'", f"got '{type(raw).__name__}'")


@pytest.mark.parametrize("key", ["colour", "Image", "image ", "", "drive", "timeout_usec"])
def test_unknown_keys_refused_listing_known_ones(key: str) -> None:
    msg = refused({key: V("s", "x")})
    assert msg == f"unknown CreateMachine option {key!r}; known options: {', '.join(sorted(MACHINE_OPTIONS))}"


def test_first_bad_key_wins_but_any_bad_key_refuses() -> None:
    refused(IMG | {"colour": V("s", "blue")}, "'colour'")
    refused(IMG | {"memory": V("s", "1G")}, "'memory'")


# -- enums ---------------------------------------------------------------


@pytest.mark.parametrize("value", list(DiskType))
def test_disk_type_applies_to_the_image(value: DiskType) -> None:
    s = spec(**IMG, disk_type=V("s", str(value)))
    assert s.image is not None and s.image.disk_type is value


@pytest.mark.parametrize("value", list(ImageFormat))
def test_image_format_applies_to_the_image(value: ImageFormat) -> None:
    s = spec(**IMG, image_format=V("s", str(value)))
    assert s.image is not None and s.image.format is value


@pytest.mark.parametrize("value", list(Accel))
def test_accel_values(value: Accel) -> None:
    assert spec(accel=V("s", str(value))).accel is value


@pytest.mark.parametrize("value", list(Firmware))
def test_firmware_values(value: Firmware) -> None:
    assert spec(firmware=V("s", str(value))).firmware is value


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("disk_type", "scsi", "virtio-blk, virtio-scsi, virtio-scsi-cdrom, nvme"),
        ("disk_type", "VIRTIO-BLK", "virtio-blk, virtio-scsi, virtio-scsi-cdrom, nvme"),
        ("disk_type", "", "virtio-blk, virtio-scsi, virtio-scsi-cdrom, nvme"),
        ("image_format", "vmdk", "raw, qcow2"),
        ("image_format", "RAW", "raw, qcow2"),
        ("accel", "hvf", "kvm, tcg, auto"),
        ("accel", "kvm:tcg", "kvm, tcg, auto"),
        ("firmware", "efi", "bios, uefi"),
        ("firmware", " bios", "bios, uefi"),
        ("network", "bridge", "none, user, tap"),
        ("network", "", "none, user, tap"),
        ("network", "USER", "none, user, tap"),
        ("graphics", "sdl", "none, vnc, spice"),
        ("graphics", "VNC", "none, vnc, spice"),
    ],
)
def test_bad_enum_values_list_the_choices(key: str, value: str, choices: str) -> None:
    msg = refused(IMG | {key: V("s", value)})
    assert msg == f"unknown {key} {value!r}; use one of: {choices}"


def test_disk_type_is_checked_even_without_an_image() -> None:
    # It is also the drives' default, so it is always validated.
    refused({"disk_type": V("s", "floppy")}, "unknown disk_type 'floppy'")
    refused(IMG | {"image_format": V("s", "vdi")}, "unknown image_format 'vdi'")


@pytest.mark.parametrize(
    ("value", "network"),
    [
        ("none", Network()),
        ("user", Network(NetworkMode.USER)),
        ("tap:tap0", Network(NetworkMode.TAP, "tap0")),
        ("tap:a", Network(NetworkMode.TAP, "a")),
        ("tap:" + "x" * 15, Network(NetworkMode.TAP, "x" * 15)),
        ("tap:vm-1_a.b", Network(NetworkMode.TAP, "vm-1_a.b")),
    ],
)
def test_network_values(value: str, network: Network) -> None:
    assert spec(network=V("s", value)).network == network


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("tap", "use 'tap:NAME' with an interface name of 1-15 characters"),
        ("tap:", "use 'tap:NAME'"),
        ("tap:" + "x" * 16, "use 'tap:NAME'"),
        ("tap:a b", "use 'tap:NAME'"),
        ("tap:a,b", "use 'tap:NAME'"),
        ("tap:a/b", "use 'tap:NAME'"),
        ("tap:a:b", "use 'tap:NAME'"),
        ("tap:tän", "use 'tap:NAME'"),
        ("user:x", "only 'tap' takes ':NAME'"),
        ("none:eth0", "only 'tap' takes ':NAME'"),
        (":x", "unknown network ''"),
    ],
)
def test_bad_network_values(value: str, fragment: str) -> None:
    msg = refused({"network": V("s", value)}, fragment)
    assert msg.startswith(f"network {value!r}") or msg.startswith("unknown network")


@pytest.mark.parametrize("value", ["user:", "none:"])
def test_empty_name_after_a_non_tap_mode_is_refused(value: str) -> None:
    refused({"network": V("s", value)}, "only 'tap' takes ':NAME'")


def test_bad_image_format_without_an_image_is_refused() -> None:
    refused({"kernel": V("s", "/k"), "image_format": V("s", "vdi")}, "unknown image_format 'vdi'")


# -- ranges --------------------------------------------------------------


@pytest.mark.parametrize("memory", [MIN_MEMORY, MIN_MEMORY + 1, 512 * MiB, MAX_MEMORY])
def test_memory_in_range(memory: int) -> None:
    assert spec(memory=V("t", memory)).memory == memory


@pytest.mark.parametrize("memory", [0, 1, MIN_MEMORY - 1, MAX_MEMORY + 1, 2**64 - 1])
def test_memory_out_of_range(memory: int) -> None:
    msg = refused({"memory": V("t", memory)})
    assert msg == f"memory {memory} bytes is out of range; give 32 MiB to 1 TiB"


def test_memory_bounds_are_32_mib_and_1_tib() -> None:
    assert spec(memory=V("t", 32 * MiB)).memory == 32 * MiB
    assert spec(memory=V("t", 2**40)).memory == 2**40
    refused({"memory": V("t", 32 * MiB - 1)})
    refused({"memory": V("t", 2**40 + 1)})


@pytest.mark.parametrize("cpus", [1, 2, MAX_CPUS])
def test_cpus_in_range(cpus: int) -> None:
    assert spec(cpus=V("u", cpus)).cpus == cpus


@pytest.mark.parametrize("cpus", [0, MAX_CPUS + 1, 2**32 - 1])
def test_cpus_out_of_range(cpus: int) -> None:
    assert refused({"cpus": V("u", cpus)}) == f"cpus {cpus} is out of range; q35 takes 1 to 288"


@pytest.mark.parametrize("spares", [0, 1, 120])
def test_hotplug_spares_passed_through(spares: int) -> None:
    assert spec(hotplug_spares=V("u", spares)).hotplug_spares == spares


@pytest.mark.parametrize("key", ["cmdline", "image", "kernel"])
def test_strings_up_to_max_length(key: str) -> None:
    ok = "/" + "a" * (MAX_STRING - 1)
    spec(**{key: V("s", ok)})
    refused({key: V("s", ok + "a")}, f"option {key!r} holds a string longer than {MAX_STRING} bytes")


# -- paths ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["kernel", "initrd", "image", "directory"])
@pytest.mark.parametrize("value", ["img", "./img", "../img", "", "~/img", " /img"])
def test_relative_paths_refused(key: str, value: str) -> None:
    assert refused({key: V("s", value)}) == f"{key} {value!r} must be an absolute path"


def test_relative_drive_and_mount_paths_refused() -> None:
    refused({"drives": V("aa{sv}", [{"path": V("s", "d")}])}, "drives[0] path 'd' must be an absolute path")
    mounts = V("aa{sv}", [{"source": V("s", "m"), "tag": V("s", "t")}])
    refused({"mounts": mounts}, "mount source 'm' must be an absolute path")


# -- drives --------------------------------------------------------------


def drives(*ds: dict[str, Variant], **top: Variant) -> MachineSpec:
    return spec(drives=V("aa{sv}", list(ds)), **top)


def test_drive_all_keys() -> None:
    s = drives(
        {
            "path": V("s", "/d"),
            "format": V("s", "qcow2"),
            "disk_type": V("s", "virtio-scsi-cdrom"),
            "read_only": V("b", True),
            "serial": V("s", "SN-01"),
        }
    )
    assert s.drives == (DriveSpec(Path("/d"), DiskType.VIRTIO_SCSI_CDROM, ImageFormat.QCOW2, True, "SN-01"),)


def test_drive_defaults() -> None:
    assert drives({"path": V("s", "/d")}).drives == (DriveSpec(Path("/d"), DiskType.VIRTIO_BLK, ImageFormat.RAW),)


@pytest.mark.parametrize("top", list(DiskType))
def test_drive_disk_type_defaults_to_the_top_level_disk_type(top: DiskType) -> None:
    s = drives(
        {"path": V("s", "/a")},
        {"path": V("s", "/b"), "disk_type": V("s", "nvme")},
        disk_type=V("s", str(top)),
    )
    assert [d.disk_type for d in s.drives] == [top, DiskType.NVME]


def test_drive_format_does_not_inherit_image_format() -> None:
    s = drives({"path": V("s", "/a")}, image_format=V("s", "qcow2"), **IMG)
    assert s.drives[0].format is ImageFormat.RAW
    assert s.image is not None and s.image.format is ImageFormat.QCOW2


def test_drives_keep_request_order_and_follow_the_image() -> None:
    s = drives(*({"path": V("s", f"/d{i}")} for i in range(5)), **IMG)
    assert [str(d.path) for d in s.boot_drives] == ["/img", "/d0", "/d1", "/d2", "/d3", "/d4"]


def test_drive_missing_path() -> None:
    refused({"drives": V("aa{sv}", [{"path": V("s", "/a")}, {"read_only": V("b", True)}])}, "drives[1] needs a 'path'")


def test_drive_junk_key_refused_listing_drive_keys() -> None:
    msg = refused({"drives": V("aa{sv}", [{"path": V("s", "/a"), "junk": V("s", "x")}])})
    assert msg == f"unknown drives[0] option 'junk'; known options: {', '.join(sorted(DRIVE_OPTIONS))}"


def test_drive_wrong_type_refused() -> None:
    msg = refused({"drives": V("aa{sv}", [{"path": V("s", "/a"), "read_only": V("s", "yes")}])})
    assert msg == "drives[0] option 'read_only' must have type 'b', got 's'"


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("disk_type", "ide", "unknown disk_type 'ide'; use one of: virtio-blk"),
        ("format", "vmdk", "unknown format 'vmdk'; use one of: raw, qcow2"),
        ("serial", "a b", "serial 'a b' may only hold printable ASCII without spaces"),
    ],
)
def test_drive_bad_values(key: str, value: str, fragment: str) -> None:
    refused({"drives": V("aa{sv}", [{"path": V("s", "/a"), key: V("s", value)}])}, fragment)


def test_drive_string_too_long() -> None:
    refused(
        {"drives": V("aa{sv}", [{"path": V("s", "/" + "a" * MAX_STRING)}])},
        "drives[0] option 'path' holds a string longer",
    )


def test_empty_drive_list() -> None:
    assert drives().drives == ()


# -- mounts --------------------------------------------------------------


def mounts(*ms: dict[str, Variant]) -> MachineSpec:
    return spec(mounts=V("aa{sv}", list(ms)))


def test_mounts() -> None:
    s = mounts(
        {"source": V("s", "/a"), "tag": V("s", "a")},
        {"source": V("s", "/b"), "tag": V("s", "b"), "read_only": V("b", True)},
    )
    assert s.mounts == (MountSpec(Path("/a"), "a"), MountSpec(Path("/b"), "b", True))


@pytest.mark.parametrize("m", [{"source": V("s", "/a")}, {"tag": V("s", "a")}, {}])
def test_mount_needs_source_and_tag(m: dict[str, Variant]) -> None:
    refused({"mounts": V("aa{sv}", [m])}, "mounts[0] needs 'source' and 'tag'")


def test_mount_junk_key_refused() -> None:
    msg = refused({"mounts": V("aa{sv}", [{"source": V("s", "/a"), "tag": V("s", "a"), "path": V("s", "/x")}])})
    assert msg == f"unknown mounts[0] option 'path'; known options: {', '.join(sorted(MOUNT_OPTIONS))}"


def test_mount_wrong_type_refused() -> None:
    msg = refused({"mounts": V("aa{sv}", [{"source": V("s", "/a"), "tag": V("b", True)}])})
    assert msg == "mounts[0] option 'tag' must have type 's', got 'b'"


# -- serial --------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "a", "SN-0001", "!~", "a,b=c", "x" * 64])
def test_serial_accepted(value: str) -> None:
    assert drives({"path": V("s", "/a"), "serial": V("s", value)}).drives[0].serial == value


@pytest.mark.parametrize("value", ["a b", " ", "a\tb", "a\n", "\n", "sé", "ü", "\x7f", "\x00", "日本"])
def test_serial_with_spaces_control_or_non_ascii_refused(value: str) -> None:
    msg = refused({"drives": V("aa{sv}", [{"path": V("s", "/a"), "serial": V("s", value)}])})
    assert msg == f"serial {value!r} may only hold printable ASCII without spaces"


@settings(deadline=None)
@given(st.text(max_size=12))
def test_serial_rule(value: str) -> None:
    ok = all(0x21 <= ord(c) <= 0x7E for c in value)
    try:
        got = add_drive("/a", {"serial": V("s", value)})[0].serial
    except InvalidArgument:
        assert not ok
    else:
        assert ok and got == value


# -- AddDrive / RemoveDrive / PowerOff -------------------------------------


def test_add_drive_defaults() -> None:
    assert add_drive("/a", {}) == (DriveSpec(Path("/a")), "")


def test_add_drive_all_options() -> None:
    options = {
        "disk_type": V("s", "nvme"),
        "format": V("s", "qcow2"),
        "read_only": V("b", True),
        "serial": V("s", "S1"),
        "id": V("s", "data"),
        "port": V("s", "sw5p29"),
    }
    assert set(options) == set(ADD_DRIVE_OPTIONS)
    drive = DriveSpec(Path("/a"), DiskType.NVME, ImageFormat.QCOW2, True, "S1")
    assert add_drive("/a", options) == (drive, "data")
    assert add_drive_port(options, drive) == "sw5p29"


def test_add_drive_port_defaults_to_the_lowest_free_spare_and_is_not_for_scsi() -> None:
    assert add_drive_port({}, DriveSpec(Path("/a"))) == ""
    with pytest.raises(InvalidArgument) as e:
        add_drive_port({"port": V("s", "rp3")}, DriveSpec(Path("/a"), DiskType.VIRTIO_SCSI))
    assert str(e.value) == (
        "AddDrive option 'port' is for virtio-blk and nvme drives: a SCSI drive sits on its controller, "
        "which takes the lowest free spare port"
    )


@pytest.mark.parametrize(
    ("path", "options", "message"),
    [
        ("a", {}, "AddDrive path 'a' must be an absolute path"),
        ("", {}, "AddDrive path '' must be an absolute path"),
        (
            "/a",
            {"path": V("s", "/b")},
            "unknown AddDrive option 'path'; known options: disk_type, format, id, port, read_only, serial",
        ),
        ("/a", {"read_only": V("s", "true")}, "AddDrive option 'read_only' must have type 'b', got 's'"),
        (
            "/a",
            {"disk_type": V("s", "sata")},
            "unknown disk_type 'sata'; use one of: virtio-blk, virtio-scsi, virtio-scsi-cdrom, nvme",
        ),
        ("/a", {"format": V("s", "iso")}, "unknown format 'iso'; use one of: raw, qcow2"),
        ("/a", {"serial": V("s", "a b")}, "serial 'a b' may only hold printable ASCII without spaces"),
        ("/a", {"id": V("u", 1)}, "AddDrive option 'id' must have type 's', got 'u'"),
    ],
)
def test_add_drive_refusals(path: str, options: dict[str, Variant], message: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        add_drive(path, options)
    assert str(e.value) == message


def test_remove_timeout_default_and_explicit() -> None:
    assert remove_timeout({}, 10.0) == 10.0
    assert remove_timeout({}, 0.5) == 0.5
    assert remove_timeout({"timeout_usec": V("t", 1)}, 10.0) == 1e-6
    assert remove_timeout({"timeout_usec": V("t", 2_500_000)}, 10.0) == 2.5
    assert remove_timeout({"timeout_usec": V("t", 3600 * 1_000_000)}, 10.0) == 3600.0


@pytest.mark.parametrize("usec", [0, 3600 * 1_000_000 + 1, 2**64 - 1])
def test_remove_timeout_out_of_range(usec: int) -> None:
    with pytest.raises(InvalidArgument) as e:
        remove_timeout({"timeout_usec": V("t", usec)}, 10.0)
    assert str(e.value) == f"timeout_usec {usec} is out of range; give 1 to 3600000000"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": V("t", 1)}, "unknown RemoveDrive option 'timeout'; known options: timeout_usec"),
        ({"timeout_usec": V("u", 1)}, "RemoveDrive option 'timeout_usec' must have type 't', got 'u'"),
    ],
)
def test_remove_timeout_bad_options(options: dict[str, Variant], message: str) -> None:
    assert set(REMOVE_DRIVE_OPTIONS) == {"timeout_usec"}
    with pytest.raises(InvalidArgument) as e:
        remove_timeout(options, 10.0)
    assert str(e.value) == message


@pytest.mark.parametrize(("usec", "seconds"), [(0, 30.0), (1, 1e-6), (5_000_000, 5.0), (3600 * 1_000_000, 3600.0)])
def test_power_off_timeout(usec: int, seconds: float) -> None:
    assert power_off_timeout(usec) == seconds


@pytest.mark.parametrize("usec", [3600 * 1_000_000 + 1, 2**64 - 1])
def test_power_off_timeout_over_an_hour_refused(usec: int) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(f"timeout_usec {usec} is out of range")):
        power_off_timeout(usec)


# -- properties ------------------------------------------------------------

KEYS = [*sorted(set(MACHINE_OPTIONS) | set(DRIVE_OPTIONS) | set(MOUNT_OPTIONS)), "junk", ""]
strings = st.one_of(
    st.sampled_from(
        ["", "/", "/a", "a", "raw", "qcow2", "nvme", "virtio-scsi", "kvm", "uefi", "user", "tap:t0", "tap:", "x" * 5000]
    ),
    st.text(max_size=8),
    st.text(max_size=8).map(lambda s: "/" + s),
)


def leaf_variants() -> st.SearchStrategy[Variant]:
    return st.one_of(
        strings.map(lambda s: V("s", s)),
        st.booleans().map(lambda b: V("b", b)),
        st.integers(0, 2**64 - 1).map(lambda n: V("t", n)),
        st.integers(0, 2**32 - 1).map(lambda n: V("u", n)),
        st.integers(-(2**31), 2**31 - 1).map(lambda n: V("i", n)),
        st.lists(strings, max_size=3).map(lambda xs: V("as", xs)),
    )


option_dicts = st.dictionaries(st.sampled_from(KEYS), leaf_variants(), max_size=4)
variants = st.one_of(
    leaf_variants(),
    st.lists(option_dicts, max_size=3).map(lambda ds: V("aa{sv}", ds)),
    option_dicts.map(lambda d: V("a{sv}", d)),
)


@settings(deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), variants, max_size=6))
def test_any_options_parse_or_raise_invalid_argument(options: dict[str, Variant]) -> None:
    try:
        s = machine_spec("m", options)
    except InvalidArgument as e:
        assert str(e)
        return
    assert isinstance(s, MachineSpec)
    assert set(options) <= set(MACHINE_OPTIONS)
    for p in [s.kernel, s.initrd, s.directory, *(d.path for d in s.boot_drives), *(m.source for m in s.mounts)]:
        assert p is None or p.is_absolute()
    assert MIN_MEMORY <= s.memory <= MAX_MEMORY
    assert 1 <= s.cpus <= MAX_CPUS


def typed(schema: dict[str, str]) -> st.SearchStrategy[dict[str, Variant]]:
    """Option dicts with known keys and the right signatures: the values decide."""
    by_sig: dict[str, st.SearchStrategy[Variant]] = {
        "s": strings.map(lambda v: V("s", v)),
        "b": st.booleans().map(lambda v: V("b", v)),
        "t": st.one_of(st.integers(0, 2**64 - 1), st.integers(MIN_MEMORY - 2, MIN_MEMORY + 2)).map(lambda v: V("t", v)),
        "u": st.integers(0, 300).map(lambda v: V("u", v)),
        "as": st.lists(strings, max_size=3).map(lambda v: V("as", v)),
        "aa{sv}": st.lists(st.one_of(typed_leaf(DRIVE_OPTIONS), typed_leaf(MOUNT_OPTIONS)), max_size=3).map(
            lambda v: V("aa{sv}", v)
        ),
    }
    return st.fixed_dictionaries({}, optional={k: by_sig[sig] for k, sig in schema.items()})


def typed_leaf(schema: dict[str, str]) -> st.SearchStrategy[dict[str, Variant]]:
    by_sig = {"s": strings.map(lambda v: V("s", v)), "b": st.booleans().map(lambda v: V("b", v))}
    return st.fixed_dictionaries({}, optional={k: by_sig[sig] for k, sig in schema.items()})


@settings(deadline=None)
@given(typed(MACHINE_OPTIONS))
def test_well_typed_options_parse_or_raise_invalid_argument(options: dict[str, Variant]) -> None:
    try:
        s = machine_spec("m", options)
    except InvalidArgument as e:
        assert str(e)
        return
    plain = {k: v.value for k, v in options.items()}
    assert s.memory == plain.get("memory", 512 * MiB)
    assert s.cpus == plain.get("cpus", 1)
    assert s.accel == plain.get("accel", "auto")
    assert s.firmware == plain.get("firmware", "bios")
    assert s.graphics == plain.get("graphics", "none")
    assert s.cmdline == plain.get("cmdline", "")
    assert s.qemu_extra == tuple(plain.get("qemu_extra", ()))
    assert len(s.drives) == len(plain.get("drives", ()))
    assert len(s.mounts) == len(plain.get("mounts", ()))
    top = plain.get("disk_type", "virtio-blk")
    for d, raw in zip(s.drives, plain.get("drives", ()), strict=True):
        assert d.disk_type == (raw["disk_type"].value if "disk_type" in raw else top)
        assert str(d.path) == str(Path(raw["path"].value))
    if "image" in plain:
        assert s.image is not None and s.image.disk_type == top
    else:
        assert s.image is None


@settings(deadline=None)
@given(strings, option_dicts)
def test_any_add_drive_parses_or_raises_invalid_argument(path: str, options: dict[str, Variant]) -> None:
    try:
        d, drive_id = add_drive(path, options)
    except InvalidArgument:
        return
    assert d.path.is_absolute()
    assert isinstance(drive_id, str)


@settings(deadline=None)
@given(st.dictionaries(st.sampled_from(["timeout_usec", "junk"]), leaf_variants(), max_size=2))
def test_any_remove_timeout_parses_or_raises_invalid_argument(options: dict[str, Variant]) -> None:
    try:
        t = remove_timeout(options, 10.0)
    except InvalidArgument:
        return
    assert 0 < t <= 3600


def test_add_share_needs_a_tag_and_an_absolute_directory() -> None:
    wanted, read_only, share_id = add_share("/srv/x", {"tag": Variant("s", "t"), "id": Variant("s", "s1")})
    assert (wanted.source, wanted.tag, read_only, share_id) == (Path("/srv/x"), "t", False, "s1")
    assert add_share("/srv/x", {"tag": Variant("s", "t"), "read_only": Variant("b", True)})[1] is True
    with pytest.raises(InvalidArgument, match="needs a 'tag'"):
        add_share("/srv/x", {})
    with pytest.raises(InvalidArgument, match="absolute"):
        add_share("srv", {"tag": Variant("s", "t")})
    with pytest.raises(InvalidArgument, match="unknown AddShare option"):
        add_share("/srv", {"tag": Variant("s", "t"), "cache": Variant("s", "auto")})
    with pytest.raises(InvalidArgument, match="must have type 'b'"):
        add_share("/srv", {"tag": Variant("s", "t"), "read_only": Variant("s", "yes")})


def plugged_entry(**values: Any) -> dict[str, Variant]:
    base = {"path": V("s", "/p"), "id": V("s", "disk3"), "port": V("s", "rp1")}
    return base | {k: V("s", v) if isinstance(v, str) else v for k, v in values.items()}


def test_plugged_scsi_drive_names_its_controller() -> None:
    entry = plugged_entry(disk_type="virtio-scsi", controller="scsi2")
    assert spec(plugged=V("aa{sv}", [entry])).plugged == (
        PluggedDrive("disk3", DriveSpec(Path("/p"), DiskType.VIRTIO_SCSI), "rp1", "scsi2"),
    )


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"path": V("s", "/p"), "id": V("s", "disk3")}, "needs an 'id' and the spare 'port'"),
        (plugged_entry(id="rp0"), "vmspawnd's own"),
        (plugged_entry(id="9lives"), "is invalid"),
        (plugged_entry(disk_type="virtio-scsi"), "names its 'controller'"),
        (plugged_entry(controller="scsi1"), "names its 'controller'"),
        (plugged_entry(disk_type="virtio-scsi", controller="ctl"), "names its 'controller'"),
        (plugged_entry(path="rel"), "must be an absolute path"),
        (plugged_entry(slot="x"), "unknown plugged[0] option 'slot'"),
    ],
)
def test_plugged_refusals(entry: dict[str, Variant], fragment: str) -> None:
    refused({"plugged": V("aa{sv}", [entry])}, fragment)


def test_plugged_ids_are_unique() -> None:
    refused({"plugged": V("aa{sv}", [plugged_entry(), plugged_entry(port="rp2")])}, "'disk3' more than once")


def test_incoming_is_read_beside_the_spec() -> None:
    assert incoming({"incoming": V("b", True)}) is True
    assert incoming({}) is False


def test_migrate_options() -> None:
    assert migrate({}) == (0, 600.0)
    assert migrate({"max_bandwidth": V("t", 1 << 20), "timeout_usec": V("t", 5_000_000)}) == (1 << 20, 5.0)
    assert incoming_timeout({"timeout_usec": V("t", 2_000_000)}) == 2.0
    for bad in ({"timeout_usec": V("t", 0)}, {"speed": V("t", 1)}, {"max_bandwidth": V("u", 1)}):
        with pytest.raises(InvalidArgument):
            migrate(bad)
    with pytest.raises(InvalidArgument, match="unknown Incoming option"):
        incoming_timeout({"max_bandwidth": V("t", 1)})


def test_graphics_default_to_none() -> None:
    assert spec().graphics is Graphics.NONE


def test_open_graphics_takes_no_options_yet() -> None:
    open_graphics({})
    with pytest.raises(InvalidArgument, match="OpenGraphics takes at most 0 options"):
        open_graphics({"protocol": V("s", "vnc")})
