"""QEMU processes: spawn in their own session, confined, and watch their
exit with a pidfd."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .identity import Identity

# util-linux's setpriv drops the identity, groups and capabilities and sets
# NoNewPrivs, then execs QEMU: all of it before QEMU's first instruction,
# without a preexec_fn in a daemon that runs threads.
SETPRIV = "setpriv"
CAP_SETPCAP = 8


@dataclass(frozen=True)
class Confinement:
    """The identity a process runs as; None keeps the daemon's (one that is
    not root cannot change it)."""

    uid: int | None
    gid: int | None
    # Supplementary groups: `kvm`, for /dev/kvm.
    groups: tuple[int, ...] = ()
    # Emptying the bounding set takes CAP_SETPCAP.
    drop_bounding_set: bool = True


def setpriv_argv(c: Confinement) -> list[str]:
    """The setpriv prefix that runs a command confined by `c`."""
    argv = [SETPRIV]
    if c.uid is not None and c.gid is not None:
        argv += [
            f"--reuid={c.uid}",
            f"--regid={c.gid}",
            f"--groups={','.join(map(str, c.groups))}" if c.groups else "--clear-groups",
        ]
    # A uid change from root clears the permitted and effective sets; these
    # take the inheritable, ambient and bounding sets too, and any way back.
    argv += ["--no-new-privs", "--inh-caps=-all"]
    if c.drop_bounding_set:
        argv += ["--bounding-set=-all"]
    return [*argv, "--"]


def kvm_groups() -> tuple[int, ...]:
    """The `kvm` group, if the host has one: it opens /dev/kvm."""
    try:
        return (grp.getgrnam("kvm").gr_gid,)
    except KeyError:
        return ()


def confinement_for(identity: Identity | None) -> Confinement:
    """A machine's QEMU: its own identity with the kvm group; without one
    (a daemon that is not root), the daemon's, still without privileges."""
    drop = has_capability(CAP_SETPCAP)
    if identity is None:
        return Confinement(None, None, drop_bounding_set=drop)
    return Confinement(identity.uid, identity.gid, kvm_groups(), drop)


def _status(pid: int | str) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def has_capability(cap: int) -> bool:
    return bool(int(_status("self")["CapEff"], 16) >> cap & 1)


def uids_in_use(ids: range) -> set[int]:
    """The uids in `ids` a live process runs with.

    The owner of /proc/PID is the process's effective uid: one stat a
    process, where reading every status file cost a millisecond each, the
    largest part of a CreateMachine. A process of the range is a QEMU (or
    its like) whose uids are all one, and it cannot change them (setpriv:
    no capabilities, NoNewPrivs). Zombies hold nothing: a re-attached QEMU
    that ended is one until whoever inherited it reaps it.
    """
    uids: set[int] = set()
    for entry in os.scandir("/proc"):
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (uid := entry.stat().st_uid) in ids and not _is_zombie(entry.name):
                uids.add(uid)
    return uids


def _is_zombie(pid: str) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


CHILD_UMASK = 0o022


def open_log(log: Path) -> int:
    """A child's log, appended to, private to root."""
    return os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def start_time(pid: int) -> int:
    """The process start time in clock ticks (/proc/PID/stat field 22).

    Together with the pid it names one process: a reused pid has another.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: split after the last ')'.
    return int(stat.rpartition(")")[2].split()[19])


def cmdline(pid: int) -> list[str]:
    """/proc/PID/cmdline as a list; empty when the process is gone or not ours to read."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def option(argv: list[str], name: str) -> str | None:
    """The value after `name` in an argv (QEMU's `-uuid X`), None if absent."""
    return next((value for opt, value in itertools.pairwise(argv) if opt == name), None)


def qemu_processes() -> dict[int, list[str]]:
    """pid -> argv of every QEMU system emulator on the host."""
    found = {}
    for entry in Path("/proc").iterdir():
        argv = cmdline(int(entry.name)) if entry.name.isdigit() else []
        if argv and Path(argv[0]).name.startswith("qemu-system-"):
            found[int(entry.name)] = argv
    return found


async def done_within(future: asyncio.Future[None], timeout: float) -> bool:
    """True once `future` is done, False if `timeout` passed first (it is not cancelled)."""
    try:
        await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:
        return False
    return True


class Process:
    """A QEMU process, ours or re-attached; its exit is an awaitable future."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self.start_time = start_time(pid)
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, self._on_exit)

    @classmethod
    def spawn(
        cls, argv: list[str], output: int, pass_fds: tuple[int, ...], confinement: Confinement | None = None,
        stdin: int = subprocess.DEVNULL, stdout: int | None = None,
    ) -> Process:  # fmt: skip
        """Start `argv` (confined, if given); stderr (and stdout, unless given) go to `output` (its log)."""
        if confinement is not None:
            argv = setpriv_argv(confinement) + argv
        popen = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=output if stdout is None else stdout,
            stderr=output,
            pass_fds=pass_fds,
            # QEMU must outlive a daemon restart or crash.
            start_new_session=True,
            # The unit's UMask=0077 is the daemon's own: files virtiofsd
            # creates for a guest get the usual modes.
            umask=CHILD_UMASK,
        )
        # Popen's own bookkeeping is not needed: the pidfd watches, waitpid reaps.
        popen.returncode = 0
        return cls(popen.pid, os.pidfd_open(popen.pid))

    @classmethod
    def attach(cls, pid: int) -> Process:
        return cls(pid, os.pidfd_open(pid))

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        try:
            _, status = os.waitpid(self.pid, os.WNOHANG)
            self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            # Re-attached after a daemon restart: not our child, its parent reaps it.
            pass
        os.close(self._pidfd)
        self._pidfd = -1
        if not self.exited.done():
            self.exited.set_result(None)

    def release(self) -> None:
        """Stop watching without waiting for the exit (a re-attach given up)."""
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def signal(self, sig: signal.Signals) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    async def wait(self, timeout: float) -> bool:
        """True once the process has exited, False if `timeout` passed first."""
        return await done_within(self.exited, timeout)

    async def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        self.signal(signal.SIGTERM)
        if not await self.wait(timeout):
            self.signal(signal.SIGKILL)
            await self.exited
