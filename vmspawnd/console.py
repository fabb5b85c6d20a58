"""A machine's serial console: QEMU's end, the log, and the clients.

QEMU's serial port is a `socket,server=on` chardev on a listening socket
the daemon made (console.sock, passed as an fd). QEMU itself records every
byte in console.log (the chardev's `logfile=`), so nothing is lost while
the daemon is down or restarting; the daemon connects to the socket, hands
each OpenConsole caller one end of a socketpair, copies QEMU's output to
every client and the one writer's input to QEMU, and keeps console.log
bounded (rotated once past a cap into console.log.1). After a daemon
restart QEMU listens again and the new daemon connects again.

Pure parts (unit-tested): the escape sequence a client watches for
(`EscapeDetector`) and who is attached (`Roster`); `rotate_log` is the only
file I/O, `Console` the only socket I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import acl
from .errors import ConsoleBusy, NotRunning

log = logging.getLogger(__name__)

# Ctrl-] three times within a second leaves (as machinectl login does).
ESCAPE = 0x1D
ESCAPE_PRESSES = 3
ESCAPE_WINDOW = 1.0
ESCAPE_HELP = "Press Ctrl-] three times within 1 s to leave the console."

# Followers per machine: each costs an fd and a buffer in the daemon.
MAX_CLIENTS = 16
# A client that lets this much of QEMU's output pile up unread is cut off:
# the guest must never wait for the slowest follower.
CLIENT_BACKLOG = 1 << 20
# Input queued for QEMU beyond this stops reading from the writer until it drained.
INPUT_BACKLOG = 64 << 10
# console.log is rotated once past this many bytes (console.log.1 keeps the previous part).
LOG_CAP = 1 << 20
# How much output may arrive between two size checks of console.log.
LOG_CHECK_EVERY = 64 << 10


@dataclass
class EscapeDetector:
    """Finds Ctrl-] pressed three times within a second in a client's keystrokes."""

    presses: int = 0
    first: float = 0.0

    def feed(self, data: bytes, now: float) -> tuple[bytes, bool]:
        """(what to send on, whether to leave): the bytes before the press
        that completes the sequence go on, the press itself does not."""
        for i, byte in enumerate(data):
            if byte != ESCAPE:
                self.presses = 0
                continue
            if self.presses == 0 or now - self.first > ESCAPE_WINDOW:
                self.presses, self.first = 1, now
            else:
                self.presses += 1
            if self.presses >= ESCAPE_PRESSES:
                self.presses = 0
                return data[:i], True
        return data, False


@dataclass
class Roster:
    """Who follows a console and who may type: any number of readers (up
    to MAX_CLIENTS), one writer at a time. A second writer is refused: two
    people typing into one shell corrupt each other's commands."""

    machine: str
    clients: dict[int, bool] = field(default_factory=dict)
    next_id: int = 1

    @property
    def writer(self) -> int | None:
        return next((cid for cid, writable in self.clients.items() if writable), None)

    def admit(self, writable: bool) -> int:
        if len(self.clients) >= MAX_CLIENTS:
            raise ConsoleBusy(
                f"the console of {self.machine} has {MAX_CLIENTS} clients already; close one of them first"
            )
        if writable and self.writer is not None:
            raise ConsoleBusy(
                f"the console of {self.machine} has a writer already (one at a time); follow it read-only "
                "(OpenConsoleEx with read_only=true, 'vmspawnctl console --read-only') or wait until it is closed"
            )
        cid = self.next_id
        self.next_id += 1
        self.clients[cid] = writable
        return cid

    def leave(self, cid: int) -> None:
        self.clients.pop(cid, None)

    def may_write(self, cid: int) -> bool:
        return self.clients.get(cid, False)

    @property
    def summary(self) -> tuple[int, bool]:
        """(clients attached, whether one of them writes): the ConsoleClients property."""
        return len(self.clients), self.writer is not None


def rotate_log(path: Path, cap: int) -> bool:
    """If `path` is past `cap` bytes: its content to path.1 (replaced
    whole, same mode and ACL: the machine's owner reads both), then `path` emptied in place. QEMU appends to it
    (O_APPEND), so it goes on writing at the new end; what it writes
    between the copy and the truncate (microseconds) is the only loss."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    with open(fd, "r+b") as f:
        st = os.fstat(fd)
        if st.st_size <= cap:
            return False
        data = f.read()
        tmp_fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.1.", dir=path.parent)
        try:
            with open(tmp_fd, "wb") as out:
                os.fchmod(tmp_fd, st.st_mode & 0o777)
                acl.copy(fd, tmp_fd)
                out.write(data)
            os.rename(tmp, path.with_name(path.name + ".1"))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        f.truncate(0)
    return True


class _QemuSide(asyncio.Protocol):
    def __init__(self, console: Console) -> None:
        self.console = console

    def data_received(self, data: bytes) -> None:
        self.console._from_guest(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.console._guest_lost()

    def pause_writing(self) -> None:
        self.console._input_paused(True)

    def resume_writing(self) -> None:
        self.console._input_paused(False)


class _ClientSide(asyncio.Protocol):
    def __init__(self, console: Console, cid: int) -> None:
        self.console = console
        self.cid = cid

    def data_received(self, data: bytes) -> None:
        self.console._from_client(self.cid, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.console._client_gone(self.cid)


class Console:
    """The daemon's side of one machine's serial console."""

    def __init__(self, machine: str, log_path: Path, on_change: Callable[[], None], cap: int = LOG_CAP) -> None:
        self.machine = machine
        self.log_path = log_path
        self.cap = cap
        self._on_change = on_change
        self.roster = Roster(machine)
        self._qemu: asyncio.Transport | None = None
        self._clients: dict[int, asyncio.Transport] = {}
        self._since_check = 0
        self._why_not = "its console is not connected yet"
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._qemu is not None

    async def connect(self, sock: socket.socket) -> None:
        """Take over a connected socket to QEMU's console chardev."""
        transport, _ = await asyncio.get_running_loop().create_unix_connection(lambda: _QemuSide(self), sock=sock)
        # Bounded: past INPUT_BACKLOG the writer is paused (see _input_paused).
        transport.set_write_buffer_limits(high=INPUT_BACKLOG)
        self._qemu = transport
        self.check_log()

    def unavailable(self, why: str) -> None:
        """The console cannot be connected (say why to OpenConsole callers)."""
        self._why_not = why

    async def open(self, writable: bool) -> socket.socket:
        """A new client: returns its end of a socketpair (the caller hands it over and closes it)."""
        if self._qemu is None:
            raise NotRunning(f"machine {self.machine} has no console to open: {self._why_not}")
        cid = self.roster.admit(writable)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            transport, _ = await asyncio.get_running_loop().create_unix_connection(
                lambda: _ClientSide(self, cid), sock=ours
            )
        except BaseException:
            self.roster.leave(cid)
            ours.close()
            theirs.close()
            raise
        self._clients[cid] = transport
        log.info(
            "machine %s: console client %d attached (%s)", self.machine, cid, "read-write" if writable else "read-only",
            extra={"MACHINE": self.machine},
        )  # fmt: skip
        self._on_change()
        return theirs

    def close(self) -> None:
        """The machine ended or the daemon lets go: every client sees EOF."""
        self._closed = True
        for transport in list(self._clients.values()):
            transport.close()
        if self._qemu is not None:
            self._qemu.close()
            self._qemu = None

    def check_log(self) -> None:
        try:
            if rotate_log(self.log_path, self.cap):
                log.info("machine %s: console.log rotated (past %d bytes)", self.machine, self.cap)
        except OSError as e:
            log.warning("machine %s: cannot rotate console.log: %s", self.machine, e, extra={"MACHINE": self.machine})

    # -- protocol callbacks -------------------------------------------------

    def _from_guest(self, data: bytes) -> None:
        for cid, transport in list(self._clients.items()):
            if transport.get_write_buffer_size() > CLIENT_BACKLOG:
                log.warning(
                    "machine %s: console client %d does not read its output; cut off", self.machine, cid,
                    extra={"MACHINE": self.machine},
                )  # fmt: skip
                transport.abort()
                continue
            transport.write(data)
        self._since_check += len(data)
        if self._since_check >= LOG_CHECK_EVERY:
            self._since_check = 0
            self.check_log()

    def _from_client(self, cid: int, data: bytes) -> None:
        # A read-only client's keystrokes go nowhere.
        if self._qemu is not None and self.roster.may_write(cid):
            self._qemu.write(data)

    def _client_gone(self, cid: int) -> None:
        self._clients.pop(cid, None)
        self.roster.leave(cid)
        log.info("machine %s: console client %d left", self.machine, cid, extra={"MACHINE": self.machine})
        if not self._closed:
            self._on_change()

    def _guest_lost(self) -> None:
        if self._qemu is not None:
            self._qemu = None
            self._why_not = "QEMU closed its console"
            for transport in list(self._clients.values()):
                transport.close()

    def _input_paused(self, paused: bool) -> None:
        writer = self.roster.writer
        transport = self._clients.get(writer) if writer is not None else None
        if transport is not None:
            (transport.pause_reading if paused else transport.resume_reading)()
