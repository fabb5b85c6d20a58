"""The QEMU guest agent's protocol (qemu-ga on the virtio-serial port
org.qemu.guest_agent.0), one connection per call.

The agent keeps no session: whatever an earlier client left half written
may sit in its parser, and a late answer to an earlier client may still
come. So every call starts with guest-sync-delimited (qemu-ga's manual): a
0xFF byte resets the agent's parser, the agent puts 0xFF before its answer,
and the answer carries a fresh id; what comes before it is not ours. A guest
without a running agent answers nothing at all, so every wait is bounded.

Pure: the framing (`request`, `sync_request`, `Reader`, `reply_value`);
the I/O edge: `call`. Nothing here logs a command's arguments (a password
is one).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from dataclasses import dataclass, field

from .errors import AgentFailed, AgentUnavailable

DELIMITER = b"\xff"
# The port name qemu-ga opens by default (its -p /dev/virtio-ports/<name>).
PORT_NAME = "org.qemu.guest_agent.0"
# A running agent answers a sync at once; under TCG on a busy host, in well under a second.
SYNC_TIMEOUT = 5.0
# A command may run a program in the guest (chpasswd for a password).
CALL_TIMEOUT = 30.0
# No answer of the commands the daemon sends comes near this.
MAX_REPLY = 1 << 20
HINT = (
    "is qemu-ga running in the guest on the virtio-serial port " + PORT_NAME + " (package qemu-guest-agent)? "
    "A guest still booting may not have started it yet"
)

# Sync ids: unique within the daemon, so a late answer to an earlier call is never taken for this one's.
_ids = itertools.count(int.from_bytes(os.urandom(3), "big"))


def request(command: str, arguments: dict[str, object] | None = None) -> bytes:
    message: dict[str, object] = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def sync_request(sync_id: int) -> bytes:
    """0xFF first: the agent drops whatever half message an earlier client left."""
    return DELIMITER + request("guest-sync-delimited", {"id": sync_id})


# What Reader returns for a line that is not JSON.
GARBLED = object()


@dataclass
class Reader:
    """The agent's output -> its messages, one JSON object a line. A 0xFF
    starts afresh: what came before it on that line was cut off."""

    limit: int = MAX_REPLY
    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[object]:
        self._buf += data
        out: list[object] = []
        while True:
            newline, delimiter = self._buf.find(b"\n"), self._buf.find(DELIMITER)
            if delimiter >= 0 and (newline < 0 or delimiter < newline):
                del self._buf[: delimiter + 1]
                continue
            if newline < 0:
                break
            line = bytes(self._buf[:newline])
            del self._buf[: newline + 1]
            if line.strip():
                out.append(_parse(line))
        if len(self._buf) > self.limit:
            raise AgentFailed(f"the guest agent sent a line of over {self.limit} bytes; it is not a reply")
        return out


def _parse(line: bytes) -> object:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return GARBLED


def is_sync_reply(message: object, sync_id: int) -> bool:
    return isinstance(message, dict) and message.get("return") == sync_id


def reply_value(message: object, command: str) -> object:
    """An answer's "return" value; its "error" as AgentFailed, in the agent's words."""
    if isinstance(message, dict):
        if "return" in message:
            return message["return"]
        error = message.get("error")
        if isinstance(error, dict):
            desc = str(error.get("desc", "")) or "no description"
            raise AgentFailed(f"the guest agent failed {command}: {desc} ({error.get('class', 'no class')})")
    raise AgentFailed(f"the guest agent's answer to {command} is neither a return nor an error")


async def _next(reader: asyncio.StreamReader, messages: Reader, pending: list[object]) -> object:
    while not pending:
        data = await reader.read(65536)
        if not data:
            raise AgentUnavailable("QEMU closed the guest agent's connection (the machine is stopping?)")
        pending += messages.feed(data)
    return pending.pop(0)


async def call(
    path: str,
    command: str,
    arguments: dict[str, object] | None,
    who: str,
    sync_timeout: float = SYNC_TIMEOUT,
    timeout: float = CALL_TIMEOUT,
) -> object:
    """`command` on the agent behind QEMU's chardev socket at `path`; its
    return value. AgentUnavailable when the agent does not answer the sync
    in `sync_timeout` (nothing was asked of the guest then) or the command
    in `timeout`; AgentFailed when it refuses it. `who` names the machine."""
    try:
        async with asyncio.timeout(sync_timeout):
            reader, writer = await asyncio.open_unix_connection(path)
    except (OSError, TimeoutError) as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise AgentUnavailable(f"{who}: cannot connect to QEMU's guest agent socket: {why}") from None
    try:
        messages, pending = Reader(), list[object]()
        sync_id = next(_ids) % 2**31
        try:
            async with asyncio.timeout(sync_timeout):
                writer.write(sync_request(sync_id))
                await writer.drain()
                while not is_sync_reply(await _next(reader, messages, pending), sync_id):
                    pass  # a late answer to an earlier client, or what came before our delimiter
        except TimeoutError:
            raise AgentUnavailable(f"{who}: the guest agent did not answer within {sync_timeout:g} s; {HINT}") from None
        try:
            async with asyncio.timeout(timeout):
                writer.write(request(command, arguments))
                await writer.drain()
                answer = await _next(reader, messages, pending)
        except TimeoutError:
            raise AgentUnavailable(
                f"{who}: the guest agent took {command} but did not answer within {timeout:g} s; "
                "it may still carry it out"
            ) from None
        return reply_value(answer, command)
    except OSError as e:
        raise AgentUnavailable(f"{who}: the guest agent's connection failed: {e.strerror or e}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
