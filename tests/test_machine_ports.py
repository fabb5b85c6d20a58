"""The machine's port and id choices (no QEMU: a scripted monitor)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.service import ServiceInterface

from tests.devtypes import TYPES
from vmspawnd.bus.machine import MachineInterface, PortsValue, port_entry
from vmspawnd.errors import InvalidArgument, QemuFailed
from vmspawnd.machine import Machine
from vmspawnd.model import DriveSpec, MachineSpec, MachineState
from vmspawnd.qmp import QmpError
from vmspawnd.topology import plan_machine

BUSY = "Hot-unplug failed: guest is busy (power indicator blinking)"


class Monitor:
    """Answers from a script: an exception instance is raised, anything else returned."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, dict[str, Any] | None]] = []

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.calls.append((cmd, args))
        answer = self.answers.pop(0) if self.answers else {}
        if isinstance(answer, Exception):
            raise answer
        return answer


def machine(spares: int = 4, extra: tuple[str, ...] = ()) -> Machine:
    spec = MachineSpec("m", kernel=Path("/k"), hotplug_spares=spares, qemu_extra=extra)
    m = Machine(spec, plan_machine(spec, TYPES), "0" * 32, Path("/nonexistent"), 0)
    m.state = MachineState.RUNNING
    return m


def test_spares_behind_switches_fill_in_order_and_unplug_frees_exactly_that_port() -> None:
    m = machine(spares=178)
    taken = [m.ports.take(f"d{i}") for i in range(33)]
    assert taken[:2] == ["sw0p0", "sw0p1"] and taken[29:31] == ["sw0p29", "sw1p0"]
    assert m.ports.release("d7") == "sw0p7"
    assert m.ports.take("again") == "sw0p7"
    assert m.ports.free_count == 178 - 33


def test_the_ports_property_rebuilds_only_the_entries_that_changed() -> None:
    """On a 180-spare machine building all 192 entries for every hotplug's
    PropertiesChanged cost ~3.5 ms of the event loop."""
    m = machine(spares=180)
    ports = PortsValue(m)
    first = ports()
    assert first == [port_entry(p, "") for p in m.plan.ports]
    m.ports.take("d0", "sw5p29")
    second = ports()
    assert second == [port_entry(p, m.ports.holder(p.id)) for p in m.plan.ports]
    rebuilt = [b for a, b in zip(first, second, strict=True) if a is not b]
    assert [e["id"].value for e in rebuilt] == ["sw5p29"] and rebuilt[0]["device"].value == "d0"
    m.ports.release("d0")
    assert ports() == first


def test_a_hotplug_invalidates_ports_instead_of_sending_them() -> None:
    """The 180-spare machine's Ports value is a 45 KB PropertiesChanged that
    went to the bus before every AddDrive/RemoveDrive reply (measured: +20-30
    ms a call on this host); Ports says EmitsChangedSignal=invalidates."""
    m = machine(spares=180)
    iface = MachineInterface(m, None, None, None)  # type: ignore[arg-type]
    sent: list[tuple[dict[str, Any], list[str]]] = []
    iface.emit_properties_changed = lambda changed, invalidated=[]: sent.append((changed, invalidated))  # type: ignore[method-assign]
    iface.changed(m, {"Drives", "Ports", "FreeSparePorts"})
    ((changed, invalidated),) = sent
    assert set(changed) == {"Drives", "FreeSparePorts"} and invalidated == ["Ports"]
    (ports,) = [p for p in ServiceInterface._get_properties(iface) if p.name == "Ports"]
    assert ports.introspection.annotations == {"org.freedesktop.DBus.Property.EmitsChangedSignal": "invalidates"}


async def test_scsi_controller_is_named_around_qemu_extra_and_a_refusal_is_qemu_failed() -> None:
    extra = tuple(a for i in range(4) for a in ("-device", f"virtio-scsi-pci,id=scsi{i}"))
    m = machine(extra=extra)
    m._monitor = Monitor(QmpError("Duplicate device ID"), {})  # type: ignore[assignment]
    with pytest.raises(QemuFailed, match="QEMU refused the SCSI controller scsi4 on rp0: Duplicate"):
        await m._scsi_controller()
    assert m.ports.holders() == {}  # the port is free again
    controller, port, created = await m._scsi_controller()
    assert (controller, port, created) == ("scsi5", "rp0", True)


def test_drive_ids_skip_and_refuse_qemu_extra_ids() -> None:
    m = machine(extra=("-blockdev", "driver=null-co,node-name=disk0", "-device", "e1000,id=data"))
    assert m._new_drive_id() == "disk1"
    with pytest.raises(InvalidArgument, match="'data' is already used"):
        m.validate_drive(DriveSpec(Path("/x")), "data")


def test_fdsets_skip_qemu_extra_ones() -> None:
    m = machine(extra=("-add-fd", "fd=3,set=1", "-add-fd", "fd=4,set=2"))
    assert m.plan.taken_fdsets == frozenset({1, 2})


async def test_device_del_is_asked_again_while_the_guest_is_busy() -> None:
    m = machine()
    m._monitor = Monitor(QmpError(BUSY), QmpError(BUSY), {})  # type: ignore[assignment]
    await m._device_del("disk1", asyncio.get_running_loop().time() + 5)
    assert [c for c, _ in m._monitor.calls] == ["device_del"] * 3  # type: ignore[attr-defined]


async def test_device_del_gives_up_at_the_deadline_and_other_errors_at_once() -> None:
    m = machine()
    m._monitor = Monitor(*[QmpError(BUSY)] * 50)  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(QmpError, match="guest is busy"):
        await m._device_del("disk1", start + 0.35)
    assert loop.time() - start < 1
    m._monitor = Monitor(QmpError("Device 'disk1' not found"))  # type: ignore[assignment]
    with pytest.raises(QmpError, match="not found"):
        await m._device_del("disk1", loop.time() + 5)
    assert len(m._monitor.calls) == 1  # type: ignore[attr-defined]
