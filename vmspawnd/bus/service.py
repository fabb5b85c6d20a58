"""Puts the manager and its machines on the bus and keeps them in step."""

import asyncio
import logging

from dbus_fast import BusType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus

from .. import auth, systemd
from ..errors import VmspawndError
from ..machine import Machine
from ..machined import Machined
from ..manager import Manager
from . import BUS_NAME, MANAGER_PATH, caller
from .guard import GuardedBus
from .machine import RUN_PROPERTIES, MachineInterface
from .manager import ManagerInterface

log = logging.getLogger(__name__)


class NameTaken(VmspawndError):
    pass


class BusService:
    def __init__(self, manager: Manager, bus: MessageBus) -> None:
        self.manager = manager
        self.bus = bus
        self.iface = ManagerInterface(manager, self.may_create, self.may_manage, self.caller_uid)
        self.objects: dict[str, MachineInterface] = {}
        # systemd-machined registration: owned tasks, never in a reply's way.
        self.machined = Machined(bus)
        manager.on_new = self._machine_new
        manager.on_removed = self._machine_removed
        manager.on_stopped = self._machine_stopped
        manager.on_replaced = self._machine_replaced
        if manager.systemd is not None:
            manager.systemd.bus = bus

    @classmethod
    async def connect(cls, manager: Manager, user: bool) -> "BusService":
        bus = await GuardedBus(bus_type=BusType.SESSION if user else BusType.SYSTEM, negotiate_unix_fd=True).connect()
        caller.install(bus)
        return cls(manager, bus)

    async def start(self) -> None:
        self.bus.export(MANAGER_PATH, self.iface)
        for machine in self.manager.machines.values():
            self._machine_new(machine)
        reply = await self.bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise NameTaken(f"{BUS_NAME} is owned by another process; is vmspawnd running already?")

    async def _authorize(self, action: auth.Action, machine: Machine | None) -> int:
        uid = await caller.uid(self.bus)
        owner, name = (machine.owner_uid, machine.name) if machine else (None, None)
        await auth.authorize(self.bus, caller.sender(), uid, action, owner, caller.allows_interaction(), name)
        return uid

    async def caller_uid(self) -> int:
        return await caller.uid(self.bus)

    async def may_create(self) -> int:
        return await self._authorize(auth.Action.CREATE, None)

    async def may_manage(self, machine: Machine, action: auth.Action = auth.Action.MANAGE) -> int:
        """Whether the caller may do `action` (managing, or more) to `machine`."""
        return await self._authorize(action, machine)

    def _machine_new(self, machine: Machine) -> None:
        iface = MachineInterface(
            machine,
            self.bus,
            self.may_manage,
            self.manager.start,
            lambda uid: self.manager.config.taps_by_uid.get(uid, ()),
        )
        machine.observer = iface
        self.objects[machine.name] = iface
        self.bus.export(iface.path, iface)
        self.iface.MachineNew(machine.name, iface.path)
        self._count_changed()
        # A kept machine reloaded stopped has no QEMU to register; Start registers its next run.
        if not machine.state.at_rest:
            self.machined.register(machine)

    def _machine_stopped(self, machine: Machine) -> None:
        """A kept machine stopped: still listed, no QEMU to register any more."""
        self.machined.unregister(machine)
        self._status()

    def _machine_replaced(self, old: Machine, new: Machine) -> None:
        """A kept machine's next run takes over its object: same path, no
        MachineRemoved/MachineNew, every property changed at once."""
        iface = self.objects.get(new.name)
        if iface is None:
            return
        old.observer = None
        iface.machine = new
        new.observer = iface
        iface.changed(new, set(RUN_PROPERTIES))
        self.machined.register(new)
        self._status()

    def _machine_removed(self, machine: Machine) -> None:
        iface = self.objects.pop(machine.name, None)
        if iface is None:
            return
        machine.observer = None
        self.bus.unexport(iface.path, iface)
        self.iface.MachineRemoved(machine.name, iface.path)
        self._count_changed()
        self.machined.unregister(machine)

    def _count_changed(self) -> None:
        count = len(self.manager.machines)
        self.iface.emit_properties_changed({"Machines": count})
        self._status()

    def _status(self) -> None:
        systemd.notify(f"STATUS={self.manager.status()}")

    async def wait_for_disconnect(self) -> None:
        """Returns (or raises the connection's error) when the bus connection is gone."""
        await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    @staticmethod
    def disconnect_reason(done: "asyncio.Task[None]") -> str:
        error = done.exception()
        return str(error) or type(error).__name__ if error else "the bus closed the connection"

    def close(self) -> None:
        self.bus.disconnect()
