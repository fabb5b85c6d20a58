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

import enum
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_fast import Variant

from .config import Config
from .units import Systemd

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids")


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

    def __init__(self, config: Config, root: Path = ROOT, systemd: Systemd | None = None) -> None:
        self.config = config
        self.root = root
        # Scopes, where systemd is PID 1.
        self.systemd = systemd
        self._own = own_cgroups(Path("/proc/self/cgroup").read_text())
        v2 = _v2_ready(root, self._own)
        self.kind = choose(systemd is not None, v2, not v2 and _v1_ready(root, self._own))
        if self.kind is Kind.V2 and not (root / "cgroup.controllers").exists():
            self.root = root / "unified"
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
        if self.systemd is not None:
            # Once its job is done the pid is in the scope (machined, told of
            # the machine next, reads its unit from there).
            await self.systemd.start(unit_name(machine), scope_properties(pid, lim))
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
