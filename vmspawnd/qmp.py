"""A thin typed wrapper over qemu.qmp: commands, events, fd passing."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError


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

    async def execute(self, cmd: str, args: dict[str, object] | None = None) -> Any:
        try:
            return await self._client.execute(cmd, args)
        except ExecuteError as e:
            raise QmpError(str(e)) from e
        except (QMPError, OSError, EOFError) as e:
            raise QmpDisconnected(f"{cmd}: {e or type(e).__name__}") from e

    async def pass_fd(self, fd: int, fdset_id: int, opaque: str) -> int:
        """Hand `fd` to QEMU in fdset `fdset_id`; `opaque` is kept with it.

        Returns the fd number QEMU holds.
        """
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as e:
            raise QmpDisconnected(f"add-fd: {e}") from e
        reply = await self.execute("add-fd", {"fdset-id": fdset_id, "opaque": opaque})
        return int(reply["fd"])

    async def next_event(self) -> tuple[str, dict[str, Any]]:
        event = await self._events.get()
        data = event.get("data")
        return str(event["event"]), dict(data) if isinstance(data, dict) else {}

    async def close(self) -> None:
        # A connection that is already broken is as closed as we want it.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
