"""A thin typed wrapper over qemu.qmp: commands, events, fd passing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from .errors import QemuUnresponsive

# Every command is bounded: a stopped or wedged QEMU must never hold a
# request (or the daemon) for longer than this.
TIMEOUT = 10.0


class QmpError(Exception):
    """QEMU refused a command; the message is QEMU's own description."""


class QmpDisconnected(Exception):
    """The monitor connection is gone, usually because QEMU exited."""


class Monitor:
    def __init__(self, name: str) -> None:
        self._client = QMPClient(name)
        # Registered for the whole connection so no event is missed between
        # a command and whoever waits for its event.
        self._events = EventListener()
        self._client.register_listener(self._events)

    async def connect(self, sock: socket.socket) -> None:
        """Greeting and qmp_capabilities: QEMU is up once this returns."""
        try:
            await self._client.connect(sock)
        except (QMPError, OSError, EOFError) as e:
            raise QmpDisconnected(str(e) or type(e).__name__) from e

    async def execute(self, cmd: str, args: dict[str, object] | None = None, timeout: float = TIMEOUT) -> Any:
        """QEMU's reply; QemuUnresponsive past `timeout`.

        A command that timed out may still be carried out when QEMU wakes up:
        it was written to the socket already. The caller undoes it then.
        """
        try:
            async with asyncio.timeout(timeout):
                return await self._client.execute(cmd, args)
        except TimeoutError:
            raise QemuUnresponsive(f"QEMU did not answer {cmd} within {timeout:g} s; is it stopped or hung?") from None
        except ExecuteError as e:
            raise QmpError(str(e)) from e
        except (QMPError, OSError, EOFError) as e:
            raise QmpDisconnected(f"{cmd}: {e or type(e).__name__}") from e

    def _send_fd(self, fd: int, cmd: str) -> None:
        """SCM_RIGHTS ahead of `cmd`, which takes the fd."""
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as e:
            raise QmpDisconnected(f"{cmd}: {e}") from e

    async def pass_fd(self, fd: int, fdset_id: int, opaque: str, timeout: float = TIMEOUT) -> int:
        """Hand `fd` to QEMU in fdset `fdset_id`; `opaque` is kept with it.

        Returns the fd number QEMU holds.
        """
        self._send_fd(fd, "add-fd")
        reply = await self.execute("add-fd", {"fdset-id": fdset_id, "opaque": opaque}, timeout)
        return int(reply["fd"])

    async def get_fd(self, fd: int, name: str, timeout: float = TIMEOUT) -> None:
        """Hand `fd` to QEMU under `name` (getfd), for a command that takes
        an fd by name (chardev-add, netdev_add's tap) to take."""
        self._send_fd(fd, "getfd")
        await self.execute("getfd", {"fdname": name}, timeout)

    async def next_event(self) -> tuple[str, dict[str, Any]]:
        event = await self._events.get()
        data = event.get("data")
        return str(event["event"]), dict(data) if isinstance(data, dict) else {}

    async def close(self, timeout: float = TIMEOUT) -> None:
        # A connection that is already broken is as closed as we want it;
        # one to a stopped QEMU is abandoned past `timeout`.
        with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
            async with asyncio.timeout(timeout):
                await self._client.disconnect()
