"""The port table: which port holds what, for every sequence of hotplug steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.devtypes import TYPES
from vmspawnd.errors import InvalidArgument, NoFreePort
from vmspawnd.model import DiskType, DriveSpec, MachineSpec, PortRole
from vmspawnd.porttable import PortTable
from vmspawnd.topology import plan_machine


@dataclass(frozen=True)
class P:
    """A planned port as the table sees it; ids need not be rpN (switch ports)."""

    id: str
    role: PortRole
    carries: str = ""


def ports(builtin: int, spares: int, scsi: bool = False) -> list[P]:
    out = [P(f"rp{i}", PortRole.BUILTIN, f"b{i}") for i in range(builtin)]
    return out + [P(f"rp{builtin + i}", PortRole.SPARE, "scsi0" if scsi and i == 0 else "") for i in range(spares)]


def test_boot_table_from_a_real_plan() -> None:
    spec = MachineSpec(
        "m", image=DriveSpec(Path("/i")), drives=(DriveSpec(Path("/s"), DiskType.VIRTIO_SCSI),), hotplug_spares=3
    )
    table = PortTable(plan_machine(spec, TYPES).ports, "m")
    # The boot SCSI controller has a builtin port of its own.
    assert table.holders() == {"rp0": "disk0", "rp1": "scsi0"}
    assert table.spares == ("rp2", "rp3", "rp4")
    assert table.free_spares == ("rp2", "rp3", "rp4")
    assert table.free_count == 3
    assert table.port_of("disk0") == "rp0"
    assert table.holder("rp2") == ""
    assert table.devices() == {"disk0", "scsi0"}


def test_take_gives_the_first_free_spare_in_plan_order() -> None:
    # Plan order, not name order: a switch's downstream ports listed after rp9 fill in order.
    plan = [P("rp9", PortRole.SPARE), P("sw0p0", PortRole.SPARE), P("sw0p1", PortRole.SPARE), P("rp2", PortRole.SPARE)]
    table = PortTable(plan, "m")
    assert [table.take(f"d{i}") for i in range(4)] == ["rp9", "sw0p0", "sw0p1", "rp2"]
    assert table.release("d1") == "sw0p0"
    assert table.take("d5") == "sw0p0"
    assert list(table.holders()) == ["rp9", "sw0p0", "sw0p1", "rp2"]


def test_no_free_port_names_every_holder() -> None:
    table = PortTable(ports(1, 2, scsi=True), "vm1")
    table.take("disk3")
    with pytest.raises(NoFreePort) as e:
        table.take("disk4")
    assert str(e.value) == (
        "all 2 spare ports of vm1 are taken (rp1=scsi0, rp2=disk3); "
        "remove a device first (RemoveDrive, RemoveShare, RemoveNetwork), or create the machine with more "
        "hotplug_spares"
    )
    # A refusal changes nothing.
    assert table.holders() == {"rp0": "b0", "rp1": "scsi0", "rp2": "disk3"}


def test_take_a_named_spare_port() -> None:
    """AddDrive's `port` option: the caller picks the spare (the last one of a 180-spare machine, say)."""
    table = PortTable([*ports(1, 0), P("sw0p0", PortRole.SPARE), P("sw0p1", PortRole.SPARE)], "vm1")
    assert table.take("d0", "sw0p1") == "sw0p1"
    # The lowest free one is still the default.
    assert table.take("d1") == "sw0p0"
    assert table.release("d0") == "sw0p1"
    with pytest.raises(NoFreePort) as e:
        table.take("d2", "sw0p0")
    assert str(e.value) == "spare port sw0p0 of vm1 holds d1; pick a free one (FreeSparePorts, Ports) or leave port out"
    for port in ("rp0", "nope"):
        with pytest.raises(InvalidArgument) as inv:
            table.check_spare(port)
        assert f"{port!r} is not a spare port of vm1; its spare ports are sw0p0, sw0p1" in str(inv.value)
    # A refusal changes nothing.
    assert table.holders() == {"rp0": "b0", "sw0p0": "d1"}


def test_release() -> None:
    table = PortTable(ports(1, 2), "m")
    port = table.take("x")
    assert table.release("x") == port
    assert table.release("x") is None
    assert table.release("never") is None
    with pytest.raises(ValueError, match="builtin port rp0"):
        table.release("b0")
    assert table.holders() == {"rp0": "b0"}


def test_one_port_per_device_and_one_device_per_port() -> None:
    table = PortTable(ports(1, 3), "m")
    table.take("x")
    with pytest.raises(ValueError, match="x already holds rp1"):
        table.take("x")
    with pytest.raises(ValueError, match="already holds"):
        table.take("b0")
    with pytest.raises(ValueError, match="empty device id"):
        table.take("")
    with pytest.raises(ValueError, match="duplicate port ids"):
        PortTable([P("rp0", PortRole.SPARE), P("rp0", PortRole.SPARE)])
    assert table.holders() == {"rp0": "b0", "rp1": "x"}


def test_rebuilt_from_what_qemu_shows() -> None:
    plan = ports(2, 3, scsi=True)
    # scsi0 went with its last drive before the restart; rp4 holds a hotplugged drive.
    table = PortTable(plan, "m", observed={"rp0": "b0", "rp4": "disk7"})
    assert table.holders() == {"rp0": "b0", "rp1": "b1", "rp4": "disk7"}
    assert table.free_spares == ("rp2", "rp3")
    assert table.take("disk8") == "rp2"
    with pytest.raises(ValueError, match="builtin port rp0 carries 'b0', not 'x'"):
        PortTable(plan, "m", observed={"rp0": "x"})
    with pytest.raises(ValueError, match="rp9 is not a port of the plan"):
        PortTable(plan, "m", observed={"rp9": "x"})
    with pytest.raises(ValueError, match="one port per device"):
        PortTable(plan, "m", observed={"rp2": "x", "rp3": "x"})


@st.composite
def steps(draw: st.DrawFn) -> tuple[int, int, bool, list[tuple[str, int]]]:
    builtin = draw(st.integers(0, 4))
    spares = draw(st.integers(0, 8))
    scsi = spares > 0 and draw(st.booleans())
    ops = draw(st.lists(st.tuples(st.sampled_from(["take", "release"]), st.integers(0, 11)), max_size=60))
    return builtin, spares, scsi, ops


@given(steps())
def test_any_sequence_matches_the_model(case: tuple[int, int, bool, list[tuple[str, int]]]) -> None:
    """The table behaves like a list of spare slots filled first-free-first."""
    builtin, n_spares, scsi, ops = case
    plan = ports(builtin, n_spares, scsi)
    table = PortTable(plan, "m")
    spares = [p.id for p in plan if p.role is PortRole.SPARE]
    model: list[str] = ["scsi0" if scsi and i == 0 else "" for i in range(n_spares)]
    for op, n in ops:
        dev = f"d{n}"
        if op == "take":
            if dev in model:
                with pytest.raises(ValueError):
                    table.take(dev)
            elif "" not in model:
                with pytest.raises(NoFreePort) as e:
                    table.take(dev)
                for port, held in zip(spares, model, strict=True):
                    assert f"{port}={held}" in str(e.value)
            else:
                i = model.index("")
                model[i] = dev
                assert table.take(dev) == spares[i]
        else:
            i = model.index(dev) if dev in model else None
            assert table.release(dev) == (spares[i] if i is not None else None)
            if i is not None:
                model[i] = ""
        # The invariants, after every step.
        held = {port: dev for port, dev in zip(spares, model, strict=True) if dev}
        builtins = {f"rp{i}": f"b{i}" for i in range(builtin)}
        assert table.holders() == builtins | held
        assert table.free_spares == tuple(port for port, dev in zip(spares, model, strict=True) if not dev)
        assert table.free_count == model.count("")
        assert table.devices() == set(builtins.values()) | set(held.values())
        for port, dev in (builtins | held).items():
            assert table.port_of(dev) == port
            assert table.holder(port) == dev
        # What a restart rebuilds from QEMU's view is the same table.
        rebuilt = PortTable(plan, "m", observed=table.holders())
        assert rebuilt.holders() == table.holders()
        assert rebuilt.free_spares == table.free_spares
