"""A live migration's stream between two nova-computes: one TCP connection.

Neither vmspawnd nor QEMU opens a network connection (the daemon takes the
stream as an fd): the destination's nova-compute listens on its migration
address, on an ephemeral port, from pre_live_migration on; the source's
connects in live_migration; each hands its end to its own daemon (Incoming,
Migrate). Every wait is bounded. Nothing here imports Nova.

Nova may run under eventlet, which makes socket and threading cooperative:
the accepting thread is then a green thread, and its accept yields.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class TransportError(Exception):
    """The stream could not be set up, or the incoming side did not end in time."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def connect(host: str, port: int, timeout: float) -> socket.socket:
    """The source's end of the stream, connected to the destination's listener."""
    try:
        stream = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise TransportError(
            f"cannot connect to the destination's migration listener at {host} port {port}: {e}"
        ) from e
    # QEMU gets the fd: no timeout of ours stays on it.
    stream.settimeout(None)
    return stream


class Listener:
    """The destination's listener of one incoming migration.

    It accepts a single connection within `accept_timeout` on a thread of
    its own and hands it to `receive` (which takes it over and returns once
    the migration came in); wait() reports how that went, close() stops
    waiting for a connection. Its owner (the driver, from pre_live_migration
    to post_live_migration_at_destination or the rollback) calls close() and
    wait() before dropping it: the thread never outlives its owner's wait.
    """

    def __init__(self, host: str, accept_timeout: float, receive: Callable[[socket.socket], None]) -> None:
        try:
            self._server = socket.create_server((host, 0), family=_family(host))
        except OSError as e:
            raise TransportError(f"cannot listen for the migration on {host}: {e}") from e
        self._server.settimeout(accept_timeout)
        self.host = host
        self.port: int = self._server.getsockname()[1]
        self._accept_timeout = accept_timeout
        self._receive = receive
        self._error: Exception | None = None
        self._closed = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vmspawnd-migration-in-{self.port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            stream = self._accept()
            stream.settimeout(None)
            self._receive(stream)
        except Exception as e:  # noqa: BLE001 - the owner's: wait() raises it in the owner's thread
            self._error = e
        finally:
            self._done.set()

    def _accept(self) -> socket.socket:
        try:
            stream, _peer = self._server.accept()
        except TimeoutError as e:
            raise TransportError(f"no migration stream came within {self._accept_timeout:g} s") from e
        except OSError as e:
            if self._closed:
                raise TransportError("the migration was called off before its stream came") from e
            raise TransportError(f"the migration listener on {self.host} port {self.port} failed: {e}") from e
        finally:
            self._server.close()
        return stream

    def close(self) -> None:
        """No connection is taken any more; one taken already goes on (its end is the daemon's)."""
        self._closed = True
        # shutdown() wakes an accept() blocked in the thread (close() alone does not).
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)

    def wait(self, timeout: float) -> None:
        """Returns once `receive` returned; raises what went wrong (TransportError past `timeout`)."""
        if not self._done.wait(timeout):
            raise TransportError(f"the incoming migration on port {self.port} did not end within {timeout:g} s")
        self._thread.join()
        if self._error is not None:
            raise self._error
