"""Each machine's own cgroup, with memory and task limits.

Where systemd is PID 1 the machine's QEMU goes into a transient scope,
`vmspawnd-<name>.scope` (StartTransientUnit on the system bus); elsewhere
the daemon makes a child cgroup of its own: on cgroup v2 where the memory
and pids controllers are enabled for its children, else on the v1 memory
and pids hierarchies. Where none of these is possible machines run without
their own limits, and the daemon says so once.

The pure part (which kind, which paths, which values) is apart from the
writes, which are small and at the end.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .config import Config

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
SYSTEMD_RUNNING = Path("/run/systemd/system")
V1_CONTROLLERS = ("memory", "pids")
SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
SCOPE_TIMEOUT = 10.0


class Kind(enum.StrEnum):
    SCOPE = "systemd scope"
    V2 = "cgroup v2"
    V1 = "cgroup v1"
    NONE = "none"


@dataclass(frozen=True)
class Limits:
    memory: int
    tasks: int


def limits(memory: int, cpus: int, config: Config) -> Limits:
    """A machine's cgroup limits: its guest memory plus QEMU's own, tasks per vCPU."""
    return Limits(memory + config.memory_overhead, config.tasks_base + config.tasks_per_cpu * cpus)


def unit_name(machine: str) -> str:
    return f"vmspawnd-{machine}.scope"


def scope_properties(pid: int, lim: Limits) -> list[list[Any]]:
    """StartTransientUnit's a(sv) for a machine's scope."""
    return [
        ["PIDs", Variant("au", [pid])],
        ["MemoryMax", Variant("t", lim.memory)],
        ["TasksMax", Variant("t", lim.tasks)],
        ["Delegate", Variant("b", False)],
        ["CollectMode", Variant("s", "inactive-or-failed")],
        ["Description", Variant("s", "vmspawnd virtual machine")],
    ]


def own_cgroups(proc_self_cgroup: str) -> dict[str, str]:
    """/proc/self/cgroup -> controller (or '' for v2) -> path."""
    paths = {}
    for line in proc_self_cgroup.splitlines():
        _id, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def choose(systemd: bool, v2_ready: bool, v1_ready: bool) -> Kind:
    if systemd:
        return Kind.SCOPE
    if v2_ready:
        return Kind.V2
    return Kind.V1 if v1_ready else Kind.NONE


def directories(kind: Kind, root: Path, own: dict[str, str], machine: str) -> list[Path]:
    """The directories of a machine's cgroup: one for v2, one per controller for v1."""
    leaf = f"vmspawnd-{machine}"
    if kind is Kind.V2:
        return [root / own[""].lstrip("/") / leaf]
    if kind is Kind.V1:
        return [root / c / own.get(c, "/").lstrip("/") / leaf for c in V1_CONTROLLERS]
    return []


def limit_files(kind: Kind, lim: Limits) -> dict[str, str]:
    """File name -> value, written in each of the machine's directories that has it."""
    if kind is Kind.V2:
        return {"memory.max": str(lim.memory), "pids.max": str(lim.tasks)}
    return {"memory.limit_in_bytes": str(lim.memory), "pids.max": str(lim.tasks)}


# -- the writes ------------------------------------------------------------


def _v2_ready(root: Path, own: dict[str, str]) -> bool:
    """v2 with memory and pids enabled for the daemon's children (enabling them
    is only possible in a namespace's root cgroup, which may hold processes)."""
    if "" not in own:
        return False
    base = root if (root / "cgroup.controllers").exists() else root / "unified"
    here = base / own[""].lstrip("/")
    try:
        if set(V1_CONTROLLERS) <= set((here / "cgroup.subtree_control").read_text().split()):
            return True
        if own[""] == "/" and set(V1_CONTROLLERS) <= set((here / "cgroup.controllers").read_text().split()):
            (here / "cgroup.subtree_control").write_text("+memory +pids")
            return True
    except OSError:
        pass
    return False


def _v1_ready(root: Path, own: dict[str, str]) -> bool:
    return all(c in own and os.access(root / c / own[c].lstrip("/"), os.W_OK) for c in V1_CONTROLLERS)


class Cgroups:
    """The daemon's machine cgroups; detects once which kind it can make."""

    def __init__(self, config: Config, root: Path = ROOT) -> None:
        self.config = config
        self.root = root
        self._own = own_cgroups(Path("/proc/self/cgroup").read_text())
        v2 = _v2_ready(root, self._own)
        self.kind = choose(SYSTEMD_RUNNING.is_dir(), v2, not v2 and _v1_ready(root, self._own))
        if self.kind is Kind.V2 and not (root / "cgroup.controllers").exists():
            self.root = root / "unified"
        # Set once the daemon is on the bus (scopes only).
        self.bus: MessageBus | None = None
        self._subscribed = False
        if self.kind is Kind.NONE:
            log.warning(
                "machines get no cgroup of their own: systemd is not PID 1, and neither cgroup v2 with the "
                "memory and pids controllers enabled nor writable v1 memory and pids hierarchies are there"
            )
        else:
            log.info("machines get their own cgroup: %s", self.kind)

    def directories(self, machine: str) -> list[Path]:
        return directories(self.kind, self.root, self._own, machine)

    async def place(self, machine: str, pid: int, lim: Limits) -> None:
        """Put QEMU's pid into the machine's new cgroup with its limits."""
        if self.kind is Kind.SCOPE:
            await self._start_scope(machine, pid, lim)
            return
        files = limit_files(self.kind, lim)
        for directory in self.directories(machine):
            directory.mkdir(exist_ok=True)
            for name, value in files.items():
                if (directory / name).exists():
                    (directory / name).write_text(value)
            (directory / "cgroup.procs").write_text(str(pid))

    def holds(self, machine: str, pid: int) -> bool:
        """Re-attach: the machine's cgroup is there and holds its QEMU."""
        if self.kind is Kind.SCOPE:
            # systemd keeps the scope while its process lives.
            return True
        try:
            return all(str(pid) in (d / "cgroup.procs").read_text().split() for d in self.directories(machine))
        except OSError:
            return False

    def remove(self, machine: str) -> None:
        """Once the machine's processes are gone (a scope goes by itself)."""
        for directory in self.directories(machine):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove cgroup %s: %s", directory, os.strerror(e.errno or errno.EIO))

    async def _start_scope(self, machine: str, pid: int, lim: Limits) -> None:
        """StartTransientUnit, then wait for its job: only then is the pid in the
        scope (machined, told of the machine next, reads its unit from there)."""
        bus = self.bus
        if bus is None:
            raise OSError(errno.ENOTCONN, "not on the system bus yet")
        unit = unit_name(machine)
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
            await _call(bus, SYSTEMD, SYSTEMD_PATH, SYSTEMD_MANAGER, "StartTransientUnit", "ssa(sv)a(sa(sv))",
                        [unit, "fail", scope_properties(pid, lim), []])  # fmt: skip
            async with asyncio.timeout(SCOPE_TIMEOUT):
                result = await finished
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"systemd did not start {unit} in {SCOPE_TIMEOUT:.0f} s") from None
        finally:
            bus.remove_message_handler(on_message)
        if result != "done":
            raise OSError(errno.EIO, f"systemd could not start {unit}: job {result}")

    async def _subscribe(self, bus: MessageBus) -> None:
        """Once: systemd sends JobRemoved only to subscribed clients."""
        if self._subscribed:
            return
        rule = f"type='signal',sender='{SYSTEMD}',interface='{SYSTEMD_MANAGER}',member='JobRemoved'"
        await _call(
            bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [rule]
        )
        await _call(bus, SYSTEMD, SYSTEMD_PATH, SYSTEMD_MANAGER, "Subscribe", "", [])
        self._subscribed = True


async def _call(bus: MessageBus, destination: str, path: str, interface: str, member: str, signature: str,
                body: list[Any]) -> Message:  # fmt: skip
    reply = await asyncio.wait_for(
        bus.call(Message(destination=destination, path=path, interface=interface, member=member,
                         signature=signature, body=body)),
        SCOPE_TIMEOUT,
    )  # fmt: skip
    if reply is None or reply.message_type is MessageType.ERROR:
        why = reply.body[0] if reply is not None and reply.body else "no reply"
        raise OSError(errno.EIO, f"{member} failed: {reply.error_name if reply else ''} {why}")
    return reply
