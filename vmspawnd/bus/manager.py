"""org.vmspawnd1.Manager at /org/vmspawnd1."""

from collections.abc import Awaitable, Callable
from typing import Annotated

from dbus_fast import PropertyAccess, Variant
from dbus_fast.annotations import DBusObjectPath, DBusSignature, DBusStr, DBusUInt32
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from .. import __version__
from ..machine import Machine
from ..manager import Manager
from ..topology import Plan
from . import MANAGER_IFACE
from . import options as parse
from .errors import replies_errors
from .machine import object_path, port_entry

Options = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
DictList = Annotated[list[dict[str, Variant]], DBusSignature("aa{sv}")]
MachineList = Annotated[list[list[str]], DBusSignature("a(sso)")]
NamePath = Annotated[list[str], DBusSignature("so")]


def plan_value(plan: Plan) -> list[dict[str, Variant]]:
    ports = [port_entry(p, p.carries) for p in plan.ports]
    consumers = [
        {
            "kind": Variant("s", "pcie-slots"),
            "what": Variant("s", c.what),
            "slots": Variant("u", c.slots),
            "budget": Variant("u", plan.budget),
        }
        for c in plan.consumers
    ]
    buses = {
        "kind": Variant("s", "buses"),
        "used": Variant("u", plan.buses),
        "budget": Variant("u", plan.bus_budget),
        "max_spares": Variant("u", max(plan.max_spares, 0)),
    }
    return [*ports, *consumers, buses]


class ManagerInterface(ServiceInterface):
    def __init__(
        self,
        manager: Manager,
        may_create: Callable[[], Awaitable[int]],
        may_manage: Callable[[Machine], Awaitable[int]],
        caller_uid: Callable[[], Awaitable[int]],
    ) -> None:
        super().__init__(MANAGER_IFACE)
        self.manager = manager
        self._may_create = may_create
        self._may_manage = may_manage
        self._caller_uid = caller_uid

    @dbus_method()
    @replies_errors
    async def CreateMachine(self, name: DBusStr, options: Options) -> DBusObjectPath:
        # Who asks first: a caller who may not create learns nothing from the options.
        uid = await self._may_create()
        spec = parse.machine_spec(name, options)
        machine = await self.manager.create(spec, owner_uid=uid, incoming=parse.incoming(options))
        return object_path(machine.name)

    @dbus_method()
    @replies_errors
    async def PlanMachine(self, name: DBusStr, options: Options) -> DictList:
        # Open to all; the boot files are opened with the caller's rights.
        uid = await self._caller_uid()
        return plan_value(await self.manager.plan(parse.machine_spec(name, options), uid))

    @dbus_method()
    def ListMachines(self) -> MachineList:
        return [[m.name, str(m.state), object_path(m.name)] for m in self.manager.machines.values()]

    @dbus_method()
    @replies_errors
    async def GetMachine(self, name: DBusStr) -> DBusObjectPath:
        return object_path(self.manager.get(name).name)

    @dbus_method()
    @replies_errors
    async def TerminateMachine(self, name: DBusStr) -> None:
        machine = self.manager.get(name)
        await self._may_manage(machine)
        await machine.terminate()

    @dbus_signal()
    def MachineNew(self, name: str, path: str) -> NamePath:
        return [name, path]

    @dbus_signal()
    def MachineRemoved(self, name: str, path: str) -> NamePath:
        return [name, path]

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def Machines(self) -> DBusUInt32:
        return len(self.manager.machines)
