"""Refuse oversized method calls before dbus-fast unmarshals them.

dbus-fast decodes a whole message body before any handler runs: an
800,000-entry aa{sv} (19 MB, within the bus daemon's 32 MiB limit) takes it
seconds of the event loop, and no per-service message limit can be set on
the bus. So the daemon reads its socket through this wrapper: it parses
each message's fixed header and header fields itself, passes messages
through untouched, and drops a method call whose body is over
MAX_CALL_BODY without ever handing it to dbus-fast; the caller gets an
InvalidArgument error reply. Reading and discarding 19 MB costs
milliseconds; decoding 1 MiB of the worst shape (empty dicts) about 50 ms.
"""

from __future__ import annotations

import array
import asyncio
import errno
import io
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from dbus_fast import Message
from dbus_fast._private.unmarshaller import Unmarshaller
from dbus_fast.aio import MessageBus

from ..errors import InvalidArgument
from . import ERROR_PREFIX

log = logging.getLogger(__name__)

# The largest method call body the daemon reads. A CreateMachine at every
# array cap with long paths stays well below it.
MAX_CALL_BODY = 1024 * 1024
FIXED = 16
METHOD_CALL = 1
DROP_CHUNK = 1024 * 1024

Refuse = Callable[[Message, int], None]


def message_length(fixed: bytes) -> tuple[int, int]:
    """(bytes up to the body, body length) from a message's first 16 bytes."""
    order = "<" if fixed[0:1] == b"l" else ">"
    body_len, _serial, fields_len = struct.unpack_from(order + "III", fixed, 4)
    head = FIXED + fields_len + (-fields_len & 7)
    return head, body_len


def header_only(head: bytes) -> Message:
    """The message's header fields (sender, serial, member), parsed by
    dbus-fast from a copy whose body length is set to 0."""
    order = "<" if head[0:1] == b"l" else ">"
    patched = head[:4] + struct.pack(order + "I", 0) + head[8:]
    msg = Unmarshaller(io.BytesIO(patched)).unmarshall()  # type: ignore[arg-type]
    assert msg is not None
    return msg


class GuardedSocket:
    """The bus socket as dbus-fast's reader sees it, less oversized calls.

    Reads never cross a message boundary of the real socket, so fds stay
    with the message they came with; an unfinished drop resumes at the next
    readable event.
    """

    def __init__(self, sock: socket.socket, refuse: Refuse, limit: int = MAX_CALL_BODY) -> None:
        self._sock = sock
        self._refuse = refuse
        self._limit = limit
        self._held = b""  # a header read ahead, not yet handed on
        self._held_fds: list[int] = []
        self._left = 0  # bytes of the current message still to pass on
        self._drop = 0  # bytes of a refused message still to discard
        self._refused: tuple[Message, int, float] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def _recv(self, size: int) -> tuple[bytes, list[int]]:
        data, ancdata, _flags, _addr = self._sock.recvmsg(size, socket.CMSG_SPACE(16 * 4))
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        if not data:
            raise EOFError
        return data, fds

    def _discard(self) -> None:
        while self._drop:
            data, fds = self._recv(min(self._drop, DROP_CHUNK))
            for fd in fds:
                os.close(fd)
            self._drop -= len(data)
        if self._refused is not None:
            msg, body_len, started = self._refused
            self._refused = None
            log.warning(
                "refused a %d-byte %s call from %s; dropped in %.1f ms",
                body_len, msg.member, msg.sender, (time.monotonic() - started) * 1000,
            )  # fmt: skip

    def _read_head(self) -> None:
        """Hold the next message's header, then pass it on or drop the message."""
        while len(self._held) < (need := message_length(self._held)[0] if len(self._held) >= FIXED else FIXED):
            data, fds = self._recv(need - len(self._held))
            self._held += data
            self._held_fds += fds
        head_len, body_len = message_length(self._held)
        if self._held[1] != METHOD_CALL or body_len <= self._limit:
            self._left = head_len + body_len
            return
        msg = header_only(self._held)
        for fd in self._held_fds:
            os.close(fd)
        self._held, self._held_fds = b"", []
        self._drop = body_len
        self._refused = (msg, body_len, time.monotonic())
        self._refuse(msg, body_len)
        self._discard()

    def recvmsg(self, size: int, ancsize: int = 0) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any]:
        self._discard()
        if not self._left:
            self._read_head()
            if not self._left:
                # A refused call is gone; the reader comes back when more arrives.
                raise BlockingIOError(errno.EAGAIN, "nothing to read")
        if self._held:
            data, fds = self._held[:size], self._held_fds
            self._held, self._held_fds = self._held[size:], []
        else:
            data, fds = self._recv(min(size, self._left))
        self._left -= len(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        return data, anc, 0, None


def refusal(msg: Message, body_len: int) -> Message:
    return Message.new_error(
        msg,
        ERROR_PREFIX + InvalidArgument.__name__,
        f"{msg.member} call of {body_len} bytes refused: the daemon reads calls of at most {MAX_CALL_BODY} "
        "bytes; send fewer or shorter entries",
    )


class GuardedBus(MessageBus):
    """A MessageBus whose reader sees the socket through GuardedSocket."""

    async def _authenticate(self) -> None:
        await super()._authenticate()
        # dbus-fast builds its reader on self._sock right after this; its
        # writer already holds the real socket.
        self._sock = GuardedSocket(self._sock, self._refuse)  # type: ignore[arg-type,assignment]

    def _refuse(self, msg: Message, body_len: int) -> None:
        self.send(refusal(msg, body_len)).add_done_callback(_sent)


def _sent(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and (e := future.exception()) is not None:
        log.info("could not send a refusal: %s", e)
