"""Registration with systemd-machined, so `machinectl list` shows the VMs.

As systemd-vmspawn does on a machined without varlink: one
RegisterMachineWithNetwork call per machine once QEMU runs (QEMU, in this
service's cgroup, is the leader; class "vm"; no root directory; the tap
device as network interface), UnregisterMachine once it is gone.
UnregisterMachine, not TerminateMachine: QEMU is gone already, and
machined's TerminateMachine would stop the unit the machine was registered
in, which is vmspawnd.service itself.

Registration is best effort and never in the way: every call runs as its own
task after the D-Bus reply, calls for one machine name run in order, and
errors (machined absent, a name it does not accept) are logged, not raised.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast import DBusError, Message, MessageType
from dbus_fast.aio import MessageBus

from .machine import Machine
from .model import MachineSpec, NetworkMode

log = logging.getLogger(__name__)

MACHINED = "org.freedesktop.machine1"
MACHINED_PATH = "/org/freedesktop/machine1"
MACHINED_IFACE = "org.freedesktop.machine1.Manager"
SERVICE = "vmspawnd"
CLASS = "vm"
TIMEOUT = 10.0
ABSENT = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")


def network_interfaces(spec: MachineSpec) -> list[int]:
    """Host-side interface indexes: the tap device, when there is one."""
    if spec.network.mode is not NetworkMode.TAP:
        return []
    try:
        return [socket.if_nametoindex(spec.network.tap)]
    except OSError:
        return []


class Machined:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self._registered: set[str] = set()
        # The newest call per machine name: the next one waits for it.
        self._last: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, machine: Machine) -> None:
        name, leader, netifs = machine.name, machine.leader, network_interfaces(machine.spec)
        try:
            machine_id = bytes.fromhex(machine.id)
        except ValueError:
            machine_id = b""
        body = [name, machine_id if len(machine_id) == 16 else b"", SERVICE, CLASS, leader, "", netifs]
        self._queue(name, lambda: self._register(name, body))

    def unregister(self, machine: Machine) -> None:
        name = machine.name
        self._queue(name, lambda: self._unregister(name))

    async def flush(self, timeout: float = TIMEOUT) -> None:
        """Let the calls under way finish (at shutdown: a machine powered off is unregistered)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def _queue(self, name: str, call: Callable[[], Awaitable[None]]) -> None:
        previous = self._last.get(name)

        async def run() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            await call()

        task = asyncio.get_running_loop().create_task(run(), name=f"machined {name}")
        self._last[name] = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(name, t))

    def _done(self, name: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._last.get(name) is task:
            del self._last[name]
        if not task.cancelled() and task.exception() is not None:
            log.error("machined call for %s failed", name, exc_info=task.exception(), extra={"MACHINE": name})

    async def _register(self, name: str, body: list[Any]) -> None:
        error = await self._call("RegisterMachineWithNetwork", "sayssusai", body)
        if error is None:
            self._registered.add(name)
            log.info("machine %s registered with systemd-machined", name, extra={"MACHINE": name})
        elif error.startswith(ABSENT):
            log.debug("machine %s: systemd-machined is not on the bus, not registering", name)
        elif error.startswith("org.freedesktop.machine1.MachineExists"):
            # Re-attached after a restart: the registration is still there.
            self._registered.add(name)
            log.debug("machine %s: registered with systemd-machined already", name)
        else:
            log.warning(
                "machine %s: systemd-machined refused the registration: %s", name, error, extra={"MACHINE": name}
            )

    async def _unregister(self, name: str) -> None:
        if name not in self._registered:
            return
        self._registered.discard(name)
        error = await self._call("UnregisterMachine", "s", [name])
        if error is None:
            log.info("machine %s unregistered from systemd-machined", name, extra={"MACHINE": name})
        elif not error.startswith((*ABSENT, "org.freedesktop.machine1.NoSuchMachine")):
            log.warning("machine %s: systemd-machined unregistration failed: %s", name, error, extra={"MACHINE": name})

    async def _call(self, member: str, signature: str, body: list[Any]) -> str | None:
        """None on success, else the error's name and message."""
        message = Message(
            destination=MACHINED,
            path=MACHINED_PATH,
            interface=MACHINED_IFACE,
            member=member,
            signature=signature,
            body=body,
        )
        try:
            reply = await asyncio.wait_for(self.bus.call(message), TIMEOUT)
        except TimeoutError:
            return f"no answer to {member} within {TIMEOUT:.0f} s"
        except (DBusError, EOFError, OSError) as e:
            return f"{member} failed: {e}"
        if reply is None:
            return f"no reply to {member}"
        if reply.message_type is MessageType.ERROR:
            return f"{reply.error_name}: {reply.body[0] if reply.body else ''}"
        return None
