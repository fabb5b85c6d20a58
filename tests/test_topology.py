"""The port plan, pinned: seed figures, addresses, caps, budget."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.errors import InvalidArgument, PcieSlotsExhausted, TooManyPorts
from vmspawnd.model import DiskType, DriveSpec, MachineSpec, MountSpec, Network, NetworkMode, PortRole
from vmspawnd.topology import MAX_PORTS, extra_devices_on_pcie0, plan_machine

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


def test_seed_figures_14_ports_in_2_slots_and_budget_25_of_30() -> None:
    plan = plan_machine(seed_spec(qemu_extra=nvme_extra(20)))
    assert len(plan.ports) == 14
    assert [c.slots for c in plan.consumers] == [2, 3, 20]
    assert (plan.used, plan.budget) == (25, 30)


def test_addresses_pack_eight_per_slot_from_0x10_to_0x1e() -> None:
    plan = plan_machine(MachineSpec("m", image=DriveSpec(IMG), hotplug_spares=MAX_PORTS - 1))
    addrs = [p.addr for p in plan.ports]
    assert addrs[0] == "0x10.0"
    assert addrs[7] == "0x10.7"
    assert addrs[8] == "0x11.0"
    assert addrs[-1] == "0x1e.7"
    assert addrs == [f"0x{s:x}.{f}" for s in range(0x10, 0x1F) for f in range(8)]


def test_multifunction_only_on_function_0_and_chassis_slot_is_i_plus_1() -> None:
    plan = plan_machine(seed_spec())
    for i, port in enumerate(plan.ports):
        assert port.multifunction == (port.function == 0)
        assert port.chassis == i + 1


def test_builtin_ports_come_first_in_a_stable_order() -> None:
    plan = plan_machine(seed_spec())
    builtin = [(p.id, p.carries) for p in plan.ports if p.role is PortRole.BUILTIN]
    assert builtin == [("rp0", "disk0"), ("rp1", "disk1"), ("rp2", "net0"), ("rp3", "vsock0")]
    assert all(p.carries == "" for p in plan.spares)


@pytest.mark.parametrize("disk_type", [DiskType.VIRTIO_SCSI, DiskType.VIRTIO_SCSI_CDROM])
def test_scsi_drives_take_no_builtin_port_and_share_one_controller_on_a_spare(disk_type: DiskType) -> None:
    spec = MachineSpec("m", image=DriveSpec(IMG, disk_type), drives=(DriveSpec(IMG, disk_type),) * 3)
    plan = plan_machine(spec)
    assert [p.role for p in plan.ports].count(PortRole.BUILTIN) == 0
    assert len(plan.ports) == 10
    assert [p.carries for p in plan.ports].count("scsi0") == 1
    assert plan.ports[0].carries == "scsi0"


def test_mixed_drives_count_only_non_scsi() -> None:
    drives = (DriveSpec(IMG, DiskType.NVME), DriveSpec(IMG, DiskType.VIRTIO_SCSI), DriveSpec(IMG))
    plan = plan_machine(MachineSpec("m", image=DriveSpec(IMG), drives=drives, hotplug_spares=1))
    assert [p.carries for p in plan.ports] == ["disk0", "disk1", "disk3", "scsi0"]


def test_scsi_without_spares_is_refused_with_a_hint() -> None:
    with pytest.raises(InvalidArgument, match="hotplug_spares"):
        plan_machine(MachineSpec("m", image=DriveSpec(IMG, DiskType.VIRTIO_SCSI), hotplug_spares=0))


def test_directory_and_mounts_take_ports() -> None:
    spec = MachineSpec("m", image=DriveSpec(IMG), directory=Path("/srv"), mounts=(MountSpec(Path("/a"), "a"),) * 2)
    assert len(plan_machine(spec).ports) == 1 + 1 + 2 + 10


def test_120_ports_accepted_121_refused() -> None:
    assert len(plan_machine(MachineSpec("m", image=DriveSpec(IMG), hotplug_spares=119)).ports) == 120
    with pytest.raises(TooManyPorts) as e:
        plan_machine(MachineSpec("m", image=DriveSpec(IMG), hotplug_spares=120))
    assert str(e.value).startswith("Too many PCIe root ports requested (121, max 120). ")
    assert "hotplug_spares" in str(e.value)


def test_slot_budget_overflow_names_every_consumer() -> None:
    with pytest.raises(PcieSlotsExhausted) as e:
        plan_machine(seed_spec(qemu_extra=nvme_extra(26)))
    msg = str(e.value)
    assert "needs 31" in msg and "has 30" in msg
    assert "2 for 14 PCIe root ports" in msg
    assert "3 for implicit devices" in msg
    assert "26 for qemu_extra -device nvme" in msg


def test_exactly_full_budget_is_accepted() -> None:
    assert plan_machine(seed_spec(qemu_extra=nvme_extra(25))).used == 30


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
    ],
)
def test_extra_devices_on_pcie0(extra: tuple[str, ...], drivers: list[str]) -> None:
    assert extra_devices_on_pcie0(extra) == drivers


@pytest.mark.parametrize("extra", [("-device",), ("-device", "{not json"), ("-device", "{[1]}")])
def test_bad_extra_device_is_invalid_argument(extra: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument, match="qemu_extra"):
        extra_devices_on_pcie0(extra)


specs = st.builds(
    MachineSpec,
    name=st.just("h"),
    image=st.builds(DriveSpec, st.just(IMG), st.sampled_from(list(DiskType))),
    drives=st.lists(st.builds(DriveSpec, st.just(IMG), st.sampled_from(list(DiskType))), max_size=40).map(tuple),
    mounts=st.lists(st.builds(MountSpec, st.just(IMG), st.just("t")), max_size=10).map(tuple),
    directory=st.none() | st.just(IMG),
    network=st.sampled_from([Network(), Network(NetworkMode.USER)]),
    vsock=st.booleans(),
    hotplug_spares=st.integers(1, 130),
)


@given(specs)
def test_any_valid_plan_has_unique_addresses_and_chassis(spec: MachineSpec) -> None:
    try:
        plan = plan_machine(spec)
    except TooManyPorts:
        return
    assert len(plan.ports) <= MAX_PORTS
    assert len({p.addr for p in plan.ports}) == len(plan.ports)
    assert len({p.chassis for p in plan.ports}) == len(plan.ports)
    assert all(0x10 <= p.slot <= 0x1E for p in plan.ports)
    assert len({p.carries for p in plan.ports if p.carries}) == len([p for p in plan.ports if p.carries])
    assert plan.used <= plan.budget
    assert len(plan.spares) == spec.hotplug_spares
