"""Who is calling: the one place that knows the message behind a method call.

dbus-fast's @dbus_method hands the method its arguments only. A message
handler runs for every incoming message just before dispatch and records it
in a context variable; the method's task is created right after, inside the
same callback, so it inherits a copy of the context with its own message.
"""

import os
from contextvars import ContextVar

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

_message: ContextVar[Message | None] = ContextVar("vmspawnd_message", default=None)
# Unique bus names are never reused, so a name's uid never changes: one
# round trip to the bus daemon per client connection, not per call.
_uids: dict[str, int] = {}
UID_CACHE_SIZE = 4096


def _remember(msg: Message) -> None:
    if msg.message_type is MessageType.METHOD_CALL:
        _message.set(msg)
        # Only a method with an 'h' argument takes fds (and closes them):
        # any sent along with another call are closed here, at once.
        if msg.unix_fds and "h" not in msg.signature:
            for fd in msg.unix_fds:
                os.close(fd)


def install(bus: MessageBus) -> None:
    bus.add_message_handler(_remember)


def current_message() -> Message:
    msg = _message.get()
    if msg is None:
        raise RuntimeError("caller.current_message() outside a D-Bus method call")
    return msg


def passed_fds() -> list[int]:
    """The fds that came with this call, now the daemon's own."""
    return list(current_message().unix_fds)


def sender() -> str:
    return current_message().sender or ""


def allows_interaction() -> bool:
    return bool(current_message().flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)


async def uid(bus: MessageBus) -> int:
    """The caller's uid, as the bus daemon vouches for it."""
    name = sender()
    if name in _uids:
        return _uids[name]
    reply = await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="GetConnectionUnixUser",
            signature="s",
            body=[name],
        )
    )
    if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
        raise RuntimeError(f"GetConnectionUnixUser failed: {reply.body if reply else 'no reply'}")
    if len(_uids) >= UID_CACHE_SIZE:
        _uids.pop(next(iter(_uids)))
    _uids[name] = int(reply.body[0])
    return _uids[name]
