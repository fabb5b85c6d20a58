"""Transient systemd units on the system bus: start one, follow it, stop it.

Where systemd is PID 1 each machine's QEMU goes into a scope of its own
(cgroup.py), and the helpers that must run outside the daemon's own sandbox
(each share's virtiofsd) or outlive it (QEMU's stderr copied to the journal)
run as transient services. A service is followed by its MainPID (a pidfd,
as for a re-attached QEMU) and by its unit's PropertiesChanged signals, which
carry how it ended; `CollectMode=inactive-or-failed` lets systemd drop the
unit, failed or not, once it has ended (systemd sends a unit's last change
before it frees it), so nothing is left behind even when the daemon is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .process import Process, done_within

log = logging.getLogger(__name__)

SYSTEMD_RUNNING = Path("/run/systemd/system")
SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
TIMEOUT = 10.0
# How long after its process has gone systemd may take to say how it ended.
END_TIMEOUT = 5.0
# siginfo's si_code as systemd reports it in ExecMainCode.
CLD_EXITED = 1


# What every helper service vmspawnd starts has (each adds its capabilities
# and namespaces): it reaches files only through the fds it is handed, so no
# host path need be visible or writable, and it has no network of its own.
SANDBOX: tuple[tuple[str, Variant], ...] = (
    ("NoNewPrivileges", Variant("b", True)),
    ("ProtectSystem", Variant("s", "strict")),
    ("ProtectHome", Variant("s", "yes")),
    ("PrivateTmp", Variant("b", True)),
    ("PrivateDevices", Variant("b", True)),
    ("PrivateNetwork", Variant("b", True)),
    ("RestrictAddressFamilies", Variant("(bas)", [True, ["AF_UNIX"]])),
    ("ProtectKernelTunables", Variant("b", True)),
    ("ProtectKernelModules", Variant("b", True)),
    ("ProtectKernelLogs", Variant("b", True)),
    ("ProtectControlGroups", Variant("b", True)),
    ("LockPersonality", Variant("b", True)),
    ("RestrictRealtime", Variant("b", True)),
    ("MemoryDenyWriteExecute", Variant("b", True)),
    ("SystemCallArchitectures", Variant("as", ["native"])),
)


def running() -> bool:
    """systemd is PID 1 (sd_booted())."""
    return SYSTEMD_RUNNING.is_dir()


def object_path(unit: str) -> str:
    """systemd's object path of a unit (its bus_label_escape)."""
    escaped = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in unit)
    return f"{SYSTEMD_PATH}/unit/{escaped or '_'}"


def exit_code(code: int, status: int) -> int:
    """ExecMainCode/ExecMainStatus as a returncode: the exit status, or minus the signal."""
    return status if code == CLD_EXITED else -status


def service_properties(
    description: str, argv: Sequence[str], stdin: int | None, stdout: int | None, stderr: int | None,
    extra: Sequence[tuple[str, Variant]] = (),
) -> tuple[list[list[Any]], list[int]]:  # fmt: skip
    """StartTransientUnit's a(sv) for a Type=exec service, and the fds it passes.

    systemd 252 has no OpenFile=/ExtraFileDescriptors=: the only fds a
    transient service can be handed are its stdin, stdout and stderr
    (None: systemd's defaults, null input and the journal).
    """
    fds: list[int] = []
    props: list[list[Any]] = [
        ["Description", Variant("s", description)],
        ["Type", Variant("s", "exec")],
        ["ExecStart", Variant("a(sasb)", [[argv[0], list(argv), False]])],
        ["CollectMode", Variant("s", "inactive-or-failed")],
    ]
    for name, fd in (("Input", stdin), ("Output", stdout), ("Error", stderr)):
        if fd is not None:
            props.append([f"Standard{name}FileDescriptor", Variant("h", len(fds))])
            fds.append(fd)
    props += [[name, value] for name, value in extra]
    return props, fds


class Systemd:
    """systemd's manager on the system bus (set `bus` once connected)."""

    def __init__(self) -> None:
        self.bus: MessageBus | None = None
        self._subscribed = False

    def _bus(self) -> MessageBus:
        if self.bus is None:
            raise OSError(errno.ENOTCONN, "not on the system bus yet")
        return self.bus

    async def start(self, unit: str, properties: list[list[Any]], fds: Sequence[int] = ()) -> None:
        """StartTransientUnit, then wait for its job: only then does the unit run
        (a scope holds its pids; a Type=exec service has exec'd)."""
        bus = self._bus()
        finished: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_message(msg: Message) -> None:
            if (
                msg.message_type is MessageType.SIGNAL
                and msg.interface == SYSTEMD_MANAGER
                and msg.member == "JobRemoved"
                and msg.signature == "uoss"
                and msg.body[2] == unit
                and not finished.done()
            ):
                finished.set_result(msg.body[3])

        await self._subscribe(bus)
        bus.add_message_handler(on_message)
        try:
            await self.call("StartTransientUnit", "ssa(sv)a(sa(sv))", [unit, "fail", properties, []], fds)
            async with asyncio.timeout(TIMEOUT):
                result = await finished
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"systemd did not start {unit} in {TIMEOUT:.0f} s") from None
        finally:
            bus.remove_message_handler(on_message)
        if result != "done":
            raise OSError(errno.EIO, f"systemd could not start {unit}: job {result}")

    async def stop(self, unit: str) -> None:
        """StopUnit; a unit gone already is stopped."""
        with contextlib.suppress(FileNotFoundError):
            await self.call("StopUnit", "ss", [unit, "replace"])

    async def start_service(
        self, unit: str, description: str, argv: Sequence[str], stdin: int | None = None, stdout: int | None = None,
        stderr: int | None = None, extra: Sequence[tuple[str, Variant]] = (),
    ) -> Service:  # fmt: skip
        """A transient Type=exec service running `argv`, followed until it ends."""
        props, fds = service_properties(description, argv, stdin, stdout, stderr, extra)
        service = Service(self, unit)
        await service.follow()
        try:
            await self.start(unit, props, fds)
            await service.attach()
        except BaseException:
            await service.forget()
            raise
        return service

    async def call(
        self, member: str, signature: str, body: list[Any], fds: Sequence[int] = (), path: str = SYSTEMD_PATH,
        interface: str = SYSTEMD_MANAGER, destination: str = SYSTEMD,
    ) -> Message:  # fmt: skip
        """A method call to systemd, bounded; a unit or object that is not there is FileNotFoundError."""
        bus = self._bus()
        message = Message(destination=destination, path=path, interface=interface, member=member,
                          signature=signature, body=body, unix_fds=list(fds))  # fmt: skip
        reply = await asyncio.wait_for(bus.call(message), TIMEOUT)
        if reply is None or reply.message_type is MessageType.ERROR:
            name = reply.error_name if reply is not None else ""
            why = reply.body[0] if reply is not None and reply.body else "no reply"
            if name in ("org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.DBus.Error.UnknownObject"):
                raise FileNotFoundError(errno.ENOENT, f"{member}: {why}")
            raise OSError(errno.EIO, f"{member} failed: {name} {why}")
        return reply

    async def match(self, rule: str, add: bool = True) -> None:
        await self.call("AddMatch" if add else "RemoveMatch", "s", [rule], path="/org/freedesktop/DBus",
                        interface="org.freedesktop.DBus", destination="org.freedesktop.DBus")  # fmt: skip

    async def _subscribe(self, bus: MessageBus) -> None:
        """Once: systemd sends JobRemoved (and units' changes) only to subscribed clients."""
        if self._subscribed:
            return
        await self.match(f"type='signal',sender='{SYSTEMD}',interface='{SYSTEMD_MANAGER}',member='JobRemoved'")
        await self.call("Subscribe", "", [])
        self._subscribed = True


@dataclass
class Ended:
    """What systemd says of a service's main process, from its unit's changes."""

    active_state: str = ""
    code: int = 0
    status: int = 0


class Service:
    """A transient service's main process: `exited`, `returncode` and `stop()` as a Process has."""

    def __init__(self, systemd: Systemd, unit: str) -> None:
        self.systemd = systemd
        self.unit = unit
        self.path = object_path(unit)
        self.pid = 0
        self.returncode: int | None = None
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ended = Ended()
        self._final = asyncio.Event()
        self._rule = f"type='signal',sender='{SYSTEMD}',path='{self.path}',interface='{PROPERTIES}'"
        self._process: Process | None = None
        # Resolves `exited` once the process is gone and systemd said how; owned here.
        self._watch: asyncio.Task[None] | None = None

    @property
    def start_time(self) -> int:
        """Its main process's start time (0 if it was gone before it could be followed)."""
        return self._process.start_time if self._process is not None else 0

    async def follow(self) -> None:
        """Before the start: no change of the unit is missed."""
        assert self.systemd.bus is not None
        self.systemd.bus.add_message_handler(self._on_message)
        await self.systemd.match(self._rule)

    async def attach(self) -> None:
        """Once the job is done: its MainPID, by a pidfd (gone already: it ended)."""
        with contextlib.suppress(FileNotFoundError):
            reply = await self.systemd.call(
                "Get", "ss", [SERVICE_IFACE, "MainPID"], path=self.path, interface=PROPERTIES
            )
            self.pid = int(reply.body[0].value)
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                self._process = Process.attach(self.pid)
        self._watch = asyncio.get_running_loop().create_task(self._watch_end(), name=f"{self.unit}: end")

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL or msg.path != self.path or msg.member != "PropertiesChanged":
            return
        changed = msg.body[1]
        if "ActiveState" in changed:
            self._ended.active_state = changed["ActiveState"].value
        if "ExecMainCode" in changed:
            self._ended.code = changed["ExecMainCode"].value
        if "ExecMainStatus" in changed:
            self._ended.status = changed["ExecMainStatus"].value
        if self._ended.active_state in ("inactive", "failed") and self._ended.code:
            self._final.set()

    async def _watch_end(self) -> None:
        try:
            if self._process is not None:
                await self._process.exited
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._final.wait(), END_TIMEOUT)
            if self._final.is_set():
                self.returncode = exit_code(self._ended.code, self._ended.status)
            else:
                log.warning("%s ended, but systemd did not say how within %.0f s", self.unit, END_TIMEOUT)
            await self.forget()
        finally:
            # Cancelled by release(): nothing more is asked of the bus.
            if not self.exited.done():
                self.exited.set_result(None)

    def release(self) -> None:
        """Stop following it without waiting for its end (the daemon exits; it runs on)."""
        if self._watch is not None:
            self._watch.cancel()
        if self.systemd.bus is not None:
            self.systemd.bus.remove_message_handler(self._on_message)
        if self._process is not None:
            self._process.release()

    async def forget(self) -> None:
        """No more following (the unit is gone, or never started)."""
        if self.systemd.bus is not None:
            self.systemd.bus.remove_message_handler(self._on_message)
            with contextlib.suppress(OSError, TimeoutError):
                await self.systemd.match(self._rule, add=False)

    async def wait(self, timeout: float) -> bool:
        return await done_within(self.exited, timeout)

    async def stop(self, timeout: float) -> None:
        """StopUnit (systemd escalates to SIGKILL after TimeoutStopSec=); SIGKILL
        from here if it still runs after `timeout`."""
        with contextlib.suppress(OSError, TimeoutError):
            await self.systemd.stop(self.unit)
        if not await self.wait(timeout) and self._process is not None:
            self._process.signal(signal.SIGKILL)
            await self.wait(timeout)
