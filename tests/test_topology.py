"""The port plan, pinned: seed figures, addresses, caps, budget, switches, ids."""

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import test64
from tests.devtypes import TYPES
from vmspawnd.errors import InvalidArgument, PcieSlotsExhausted, TooManyPorts
from vmspawnd.model import (
    DiskType,
    DriveSpec,
    Graphics,
    MachineSpec,
    MountSpec,
    Network,
    NetworkMode,
    PortKind,
    PortRole,
)
from vmspawnd.topology import (
    BUS_LIMIT,
    DIRECT_PORTS,
    DISPLAY_DEVICE,
    PCIE0,
    SWITCH_PORTS,
    Plan,
    extra_devices_on_pcie0,
    plan_machine,
)

IMG = Path("/img")


def nvme_extra(n: int) -> tuple[str, ...]:
    args: list[str] = []
    for i in range(n):
        args += ["-device", f"nvme,serial=n{i},drive=d{i}"]
    return tuple(args)


def seed_spec(**kw: object) -> MachineSpec:
    """The vmspawn seed: root image, network, vsock, one more drive, 10 spares."""
    base: dict[str, object] = dict(
        name="seed",
        image=DriveSpec(IMG),
        drives=(DriveSpec(Path("/extra")),),
        network=Network(NetworkMode.USER),
        vsock=True,
        hotplug_spares=10,
    )
    return MachineSpec(**(base | kw))  # type: ignore[arg-type]


def plan(spec: MachineSpec) -> Plan:
    return plan_machine(spec, TYPES)


def kernel_spec(spares: int = 10, extra: tuple[str, ...] | list[str] = ()) -> MachineSpec:
    return MachineSpec("k", kernel=IMG, hotplug_spares=spares, qemu_extra=tuple(extra))


def root_ports(p: Plan) -> list[str]:
    return [x.addr for x in p.ports if x.kind is PortKind.ROOT_PORT]


# -- the seed layout -----------------------------------------------------------


def test_seed_figures_14_ports_in_2_slots_and_budget_25_of_30() -> None:
    p = plan(seed_spec(qemu_extra=nvme_extra(20)))
    assert len(p.ports) == 14
    assert [c.slots for c in p.consumers] == [2, 3, 20]
    assert (p.used, p.budget) == (25, 30)


def test_addresses_pack_eight_per_slot_from_0x10_to_0x1e() -> None:
    p = plan(MachineSpec("m", image=DriveSpec(IMG), hotplug_spares=DIRECT_PORTS - 1))
    addrs = [x.addr for x in p.ports]
    assert addrs == [f"0x{s:x}.{f}" for s in range(0x10, 0x1F) for f in range(8)]
    assert all(x.kind is PortKind.ROOT_PORT and x.bus == PCIE0 for x in p.ports)


def test_multifunction_only_on_function_0_and_chassis_slot_is_i_plus_1() -> None:
    p = plan(seed_spec())
    for i, port in enumerate(p.ports):
        assert port.multifunction == (port.function == 0)
        assert port.chassis == i + 1


def test_builtin_ports_come_first_in_a_stable_order() -> None:
    p = plan(seed_spec())
    builtin = [(x.id, x.carries) for x in p.ports if x.role is PortRole.BUILTIN]
    assert builtin == [("rp0", "disk0"), ("rp1", "disk1"), ("rp2", "net0"), ("rp3", "vsock0")]
    assert all(x.carries == "" for x in p.spares)


def test_implicit_devices_take_the_lowest_slots() -> None:
    p = plan(seed_spec())
    assert [(d.id, d.driver, d.addr) for d in p.implicit] == [
        ("implicit0", "virtio-rng-pci", "0x1.0"),
        ("implicit1", "virtio-balloon-pci", "0x2.0"),
        ("implicit2", "virtio-serial-pci", "0x3.0"),
    ]


# -- issue 11 finding 11: the SCSI boot controller is builtin ------------------------


@pytest.mark.parametrize("disk_type", [DiskType.VIRTIO_SCSI, DiskType.VIRTIO_SCSI_CDROM])
def test_scsi_boot_drives_share_one_controller_on_a_builtin_port(disk_type: DiskType) -> None:
    spec = MachineSpec("m", image=DriveSpec(IMG, disk_type), drives=(DriveSpec(IMG, disk_type),) * 3)
    p = plan(spec)
    assert [x.carries for x in p.ports].count("scsi0") == 1
    controller_port = p.port_carrying("scsi0")
    assert controller_port.role is PortRole.BUILTIN and not controller_port.hotplug
    # All 10 spares stay free for hotplug.
    assert len(p.spares) == 10 and len(p.ports) == 11


def test_mixed_drives_count_only_non_scsi() -> None:
    drives = (DriveSpec(IMG, DiskType.NVME), DriveSpec(IMG, DiskType.VIRTIO_SCSI), DriveSpec(IMG))
    p = plan(MachineSpec("m", image=DriveSpec(IMG), drives=drives, hotplug_spares=1))
    assert [x.carries for x in p.ports] == ["disk0", "disk1", "disk3", "scsi0", ""]


def test_scsi_boot_drive_needs_no_spare() -> None:
    p = plan(MachineSpec("m", image=DriveSpec(IMG, DiskType.VIRTIO_SCSI), hotplug_spares=0))
    assert [(x.role, x.carries) for x in p.ports] == [(PortRole.BUILTIN, "scsi0")]


def test_directory_and_mounts_take_ports() -> None:
    spec = MachineSpec("m", image=DriveSpec(IMG), directory=Path("/srv"), mounts=(MountSpec(Path("/a"), "a"),) * 2)
    assert len(plan(spec).ports) == 1 + 1 + 2 + 10


# -- finding 1: only PCI devices on pcie.0 take a slot -----------------------------


@pytest.mark.parametrize("case", [c for c in test64.CASES if c.fits], ids=lambda c: c.name)
def test_test64_budget_counts_only_pci_devices_on_pcie0(case: test64.Case) -> None:
    p = plan(kernel_spec(extra=case.qemu_extra))
    ports_slots = 2  # 10 spares: 8 + 2 root ports
    assert p.used == ports_slots + 3 + case.pcie0
    assert all("scsi-hd" not in c.what and "nvme-ns" not in c.what for c in p.consumers)


def test_multipath_64_scsi_hd_fit_in_6_slots() -> None:
    p = plan(kernel_spec(extra=test64.BY_NAME["multipath_basic_failover"].qemu_extra))
    assert p.used == 6
    assert [c.what for c in p.consumers] == [
        "10 PCIe root ports, 8 per slot",
        "implicit devices (virtio-rng-pci, virtio-balloon-pci, virtio-serial-pci)",
        "qemu_extra -device virtio-scsi-pci without bus=",
    ]


def test_28_nvme_are_refused_naming_every_consumer() -> None:
    with pytest.raises(PcieSlotsExhausted) as e:
        plan(kernel_spec(extra=test64.BY_NAME["nvme_basic_28 (test.sh)"].qemu_extra))
    msg = str(e.value)
    assert "has 30 free device slots but this machine needs 32" in msg
    assert "1 for 10 PCIe ports (at the fewest)" in msg
    assert "3 for implicit devices" in msg
    assert "28 for qemu_extra -device nvme without bus=" in msg


def test_slot_budget_overflow_names_every_consumer() -> None:
    with pytest.raises(PcieSlotsExhausted) as e:
        plan(seed_spec(qemu_extra=nvme_extra(27)))
    msg = str(e.value)
    assert "needs 31" in msg and "has 30" in msg
    assert "1 for 14 PCIe ports (at the fewest)" in msg
    assert "3 for implicit devices" in msg
    assert "27 for qemu_extra -device nvme" in msg


def test_exactly_full_budget_is_accepted() -> None:
    assert plan(seed_spec(qemu_extra=nvme_extra(25))).used == 30


def test_one_slot_left_still_holds_14_ports_through_a_switch() -> None:
    p = plan(seed_spec(qemu_extra=nvme_extra(26)))
    assert p.used == 30
    assert len(p.spares) == 10
    assert [x.kind for x in p.ports].count(PortKind.UPSTREAM) == 1


@pytest.mark.parametrize(
    ("extra", "drivers"),
    [
        (("-device", "nvme,serial=a"), ["nvme"]),
        (("-device", "nvme,bus=rp3,serial=a"), []),
        (("-device", "nvme,bus=pcie.0"), ["nvme"]),
        (("--device=e1000,mac=52:54:00:00:00:01",), ["e1000"]),
        (("-device", '{"driver":"nvme","bus":"rp1"}', "-device", '{"driver":"virtio-rng-pci"}'), ["virtio-rng-pci"]),
        (("-device", "nvme,serial=a,,bus=x"), ["nvme"]),
        (("-m", "1G", "-smp", "2"), []),
        (("-device", "scsi-hd,drive=x", "-device", "nvme-ns,drive=y", "-device", "ide-hd,drive=z"), []),
        (("-device", "nvme-subsys,id=s", "-device", "usb-storage,drive=u"), []),
        (("-device", "virtio-blk,drive=a"), ["virtio-blk-pci"]),
        (("-device", "driver=nvme,serial=a"), ["nvme"]),
        (("-nic", "user,model=virtio-net-pci", "-nic", "none"), ["-nic user"]),
        (("-drive", "if=virtio,file=/x", "-drive", "if=none,id=d,file=/y"), ["-drive if=virtio"]),
    ],
)
def test_extra_devices_on_pcie0(extra: tuple[str, ...], drivers: list[str]) -> None:
    assert extra_devices_on_pcie0(extra, TYPES) == drivers


@pytest.mark.parametrize("extra", [("-device",), ("-device", "{not json"), ("-device", "{[1]}")])
def test_bad_extra_device_is_invalid_argument(extra: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument, match="qemu_extra"):
        extra_devices_on_pcie0(extra, TYPES)


def test_unknown_device_type_is_refused_not_guessed() -> None:
    with pytest.raises(InvalidArgument, match="QEMU has no device type 'nvme-typo'"):
        plan(kernel_spec(extra=["-device", "nvme-typo,serial=a"]))


# -- the user's addr= -----------------------------------------------------------


def test_user_addr_slots_are_kept_and_ports_pack_around_them() -> None:
    extra = [
        "-device",
        "e1000,addr=0x10.0,multifunction=on",
        "-device",
        "e1000,addr=0x10.1",
        "-device",
        "e1000,addr=0x2",
    ]
    p = plan(kernel_spec(spares=10, extra=extra))
    assert [d.addr for d in p.implicit] == ["0x1.0", "0x3.0", "0x4.0"]
    assert root_ports(p)[0] == "0x11.0" and root_ports(p)[-1] == "0x12.1"
    assert "qemu_extra devices with addr= on pcie.0 (slots 0x2, 0x10)" in [c.what for c in p.consumers]
    assert p.used == 2 + 3 + 2


def test_ports_use_slots_below_0x10_when_the_upper_ones_are_taken() -> None:
    extra: list[str] = []
    for slot in range(0x10, 0x1F):
        extra += ["-device", f"e1000,addr=0x{slot:x}"]
    p = plan(kernel_spec(spares=20, extra=extra))
    assert root_ports(p)[:9] == [*(f"0xf.{f}" for f in range(8)), "0xe.0"]
    assert p.used == 15 + 3 + 3


def test_two_devices_at_one_addr_are_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"both ask for pcie\.0 addr 0x5\.0"):
        plan(kernel_spec(extra=["-device", "e1000,addr=5", "-device", "nvme,addr=0x5.0,serial=a"]))


def test_an_auto_device_that_would_take_a_later_addr_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"would take pcie\.0 slot 0x4"):
        plan(kernel_spec(extra=["-device", "e1000", "-device", "nvme,addr=0x4,serial=a"]))
    # After it, QEMU skips the slot: fine.
    plan(kernel_spec(extra=["-device", "nvme,addr=0x4,serial=a", "-device", "e1000"]))


# -- finding 2: ids that cannot collide ----------------------------------------------


def test_ids_are_chosen_around_qemu_extra() -> None:
    extra = [
        *test64.BY_NAME["virtio_scsi_basic"].qemu_extra,
        "-device",
        "e1000,id=rp0",
        "-object",
        "iothread,id=implicit1",
    ]
    spec = MachineSpec("m", image=DriveSpec(IMG, DiskType.VIRTIO_SCSI), hotplug_spares=3, qemu_extra=tuple(extra))
    p = plan(spec)
    assert p.scsi_controller == "scsi4"
    assert [x.id for x in p.ports] == ["rp1", "rp2", "rp3", "rp4"]
    assert [d.id for d in p.implicit] == ["implicit0", "implicit2", "implicit3"]
    assert {"scsi0", "scsi3", "drive127", "rp0"} <= p.taken


@pytest.mark.parametrize("clash", ["disk0", "disk0-node", "net0", "vsock0", "qmp", "console"])
def test_an_id_the_daemon_cannot_rename_is_refused_by_name(clash: str) -> None:
    with pytest.raises(InvalidArgument, match=f"qemu_extra uses id '{clash}'"):
        plan(
            seed_spec(
                qemu_extra=("-device", f"e1000,id={clash}")
                if "node" not in clash
                else ("-blockdev", f"driver=null-co,node-name={clash}")
            )
        )


def test_fdsets_of_qemu_extra_are_known() -> None:
    assert plan(kernel_spec(extra=["-add-fd", "fd=3,set=1"])).taken_fdsets == frozenset({1})


# -- finding 3: past 120 ports, switches --------------------------------------------


def levels(p: Plan) -> Counter[PortKind]:
    return Counter(x.kind for x in p.ports)


def test_past_120_ports_every_spare_goes_behind_a_switch() -> None:
    p = plan(MachineSpec("m", image=DriveSpec(IMG), hotplug_spares=120))
    assert len(p.spares) == 120
    # The builtin port stays a root port; 120 spares fill 4 switches evenly.
    assert levels(p) == {PortKind.ROOT_PORT: 1 + 4, PortKind.UPSTREAM: 4, PortKind.DOWNSTREAM: 120}
    assert [x.buses for x in p.ports if x.role is PortRole.SWITCH and x.kind is PortKind.ROOT_PORT] == [32] * 4


def test_180_spares_plan_shows_every_level() -> None:
    p = plan(kernel_spec(spares=180))
    assert len(p.spares) == 180
    ups = [x for x in p.ports if x.kind is PortKind.UPSTREAM]
    # 6 switches, evenly filled: 30 ports each (192 buses).
    assert len(ups) == 6
    for up in ups:
        rp = next(x for x in p.ports if x.id == up.parent)
        # Hotplug-capable: ACPI hotplug reaches the downstream ports through it.
        assert rp.kind is PortKind.ROOT_PORT and rp.role is PortRole.SWITCH and rp.hotplug
        downs = [x for x in p.ports if x.parent == up.id]
        assert [d.addr for d in downs] == [f"0x{k:x}.0" for k in range(len(downs))]
        assert len(downs) == 30
        assert all(d.role is PortRole.SPARE and d.hotplug for d in downs)
        assert rp.buses == len(downs) + 2 and up.buses == len(downs) + 1
    assert p.buses == 180 + 6 * 2 == BUS_LIMIT == 192
    # Hotplug fills each switch's ports in order, then the next switch.
    assert [x.id for x in p.spares[:3]] == ["sw0p0", "sw0p1", "sw0p2"]
    assert [x.id for x in p.spares[29:31]] == ["sw0p29", "sw1p0"]
    assert p.spares[-1].id == "sw5p29"
    assert p.max_spares == 180


def test_181_spares_would_need_193_buses() -> None:
    with pytest.raises(TooManyPorts) as e:
        plan(kernel_spec(spares=181))
    assert "(181, max 180 on this machine: 192 PCI buses" in str(e.value)


def test_the_maximum_is_the_bus_budget_and_one_more_is_refused() -> None:
    p = plan(kernel_spec(spares=0))
    top = p.max_spares
    assert plan(kernel_spec(spares=top)).buses <= BUS_LIMIT
    with pytest.raises(TooManyPorts) as e:
        plan(kernel_spec(spares=top + 1))
    assert f"({top + 1}, max {top} on this machine" in str(e.value)
    assert f"at most {top} here" in str(e.value)


def test_a_users_bridges_take_from_the_bus_budget() -> None:
    base = plan(kernel_spec(spares=0)).max_spares
    long_path = plan(kernel_spec(spares=0, extra=test64.BY_NAME["long_sysfs_path"].qemu_extra))
    assert long_path.bus_budget == BUS_LIMIT - 26
    assert long_path.max_spares < base


def test_chassis_numbers_skip_the_users() -> None:
    p = plan(kernel_spec(spares=3, extra=["-device", "pcie-root-port,id=x,chassis=2"]))
    assert [x.chassis for x in p.ports] == [1, 3, 4]


# -- for every input --------------------------------------------------------------


specs = st.builds(
    MachineSpec,
    name=st.just("h"),
    image=st.builds(DriveSpec, st.just(IMG), st.sampled_from(list(DiskType))),
    drives=st.lists(st.builds(DriveSpec, st.just(IMG), st.sampled_from(list(DiskType))), max_size=40).map(tuple),
    mounts=st.lists(st.builds(MountSpec, st.just(IMG), st.just("t")), max_size=10).map(tuple),
    directory=st.none() | st.just(IMG),
    network=st.sampled_from([Network(), Network(NetworkMode.USER)]),
    vsock=st.booleans(),
    hotplug_spares=st.integers(0, 260),
    qemu_extra=st.lists(st.sampled_from(sorted(TYPES.known)), max_size=32).map(
        lambda ts: tuple(a for t in ts for a in ("-device", t))
    ),
)


@given(specs)
@settings(max_examples=300, deadline=None)
def test_any_valid_plan_is_a_well_formed_tree(spec: MachineSpec) -> None:
    pci_extra = sum(1 for a in spec.qemu_extra[1::2] if a in TYPES.pci)
    try:
        p = plan(spec)
    except (TooManyPorts, PcieSlotsExhausted):
        return
    by_id = {x.id: x for x in p.ports}
    assert len(by_id) == len(p.ports)
    assert len({(x.bus, x.addr) for x in p.ports}) == len(p.ports)
    hot = [x for x in p.ports if x.kind is not PortKind.UPSTREAM]
    assert len({x.chassis for x in hot}) == len(hot) and all(0 < x.chassis < 256 for x in hot)
    assert len(p.spares) == spec.hotplug_spares <= p.max_spares
    assert p.buses == len(p.ports) <= p.bus_budget
    for x in p.ports:
        if x.kind is PortKind.ROOT_PORT:
            assert x.bus == PCIE0 and 0x01 <= x.slot <= 0x1E
        elif x.kind is PortKind.UPSTREAM:
            assert by_id[x.bus].role is PortRole.SWITCH
        else:
            assert by_id[x.bus].kind is PortKind.UPSTREAM and x.slot < SWITCH_PORTS
    assert all(x.kind is PortKind.ROOT_PORT for x in p.ports if x.role is PortRole.BUILTIN)
    root_slots = {x.slot for x in p.ports if x.bus == PCIE0}
    assert root_slots.isdisjoint(d.slot for d in p.implicit)
    # The budget is exactly: port slots + implicit + each PCI type of qemu_extra.
    assert p.used == len(root_slots) + 3 + pci_extra <= p.budget
    assert len({x.carries for x in p.ports if x.carries}) == len([x for x in p.ports if x.carries])


# -- graphics ------------------------------------------------------------------


@pytest.mark.parametrize("graphics", [Graphics.VNC, Graphics.SPICE])
def test_a_display_device_is_one_more_implicit_device_and_counts_in_the_budget(graphics: Graphics) -> None:
    without = plan(seed_spec(qemu_extra=nvme_extra(20)))
    p = plan(seed_spec(qemu_extra=nvme_extra(20), graphics=graphics))
    assert [i.driver for i in p.implicit] == [*(i.driver for i in without.implicit), DISPLAY_DEVICE]
    # At the lowest slot after the others, never one a root port takes.
    assert [i.slot for i in p.implicit] == [1, 2, 3, 4]
    assert p.used == without.used + 1
    implicit = f"implicit devices (virtio-rng-pci, virtio-balloon-pci, virtio-serial-pci, {DISPLAY_DEVICE})"
    assert p.consumers[1].what == implicit
    assert p.consumers[1].slots == 4
    assert p.ports == without.ports


def test_no_graphics_no_display_device() -> None:
    assert DISPLAY_DEVICE not in [i.driver for i in plan(seed_spec()).implicit]


def test_the_display_device_can_be_the_one_device_too_many() -> None:
    # 1 port slot (behind a switch) + 3 implicit + 26 nvme fill pcie.0; the display is one more.
    assert plan(seed_spec(qemu_extra=nvme_extra(26))).used == 30
    with pytest.raises(PcieSlotsExhausted) as e:
        plan(seed_spec(qemu_extra=nvme_extra(26), graphics=Graphics.VNC))
    implicit = f"4 for implicit devices (virtio-rng-pci, virtio-balloon-pci, virtio-serial-pci, {DISPLAY_DEVICE})"
    assert "needs 31" in str(e.value) and implicit in str(e.value)


def test_the_display_device_keeps_clear_of_a_qemu_extra_addr() -> None:
    p = plan(MachineSpec("k", kernel=IMG, qemu_extra=("-device", "nvme,serial=x,addr=0x4"), graphics=Graphics.VNC))
    assert [i.slot for i in p.implicit] == [1, 2, 3, 5]
