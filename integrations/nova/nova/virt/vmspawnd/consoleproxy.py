"""TCP ports in front of vmspawnd's console streams, for Nova's console proxies.

Nova's novncproxy, spicehtml5proxy and serialproxy connect to the host and
port a driver names (ConsoleVNC, ConsoleSpice, ConsoleSerial). vmspawnd's
QEMU listens nowhere: a stream is an fd that OpenGraphics or OpenConsole
hands out. So nova-compute listens itself, one port per instance and kind,
and for each connection it accepts opens a fresh stream and copies bytes
both ways until either side closes.

Bounded: a listener nobody was handed for `idle` seconds (Nova's token
lifetime) stops accepting; a stalled peer is cut off after SEND_TIMEOUT;
close() ends a listener and its connections at once and joins their
threads. Every thread and socket belongs to a Listener. Nothing here imports
Nova; under Nova's eventlet the threads are green, and select, socket and
threading are its cooperative ones.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import threading
import time
from collections.abc import Callable

from nova.virt.vmspawnd.client import VmspawndError

log = logging.getLogger(__name__)

CHUNK = 65536
# A peer that takes nothing for this long is gone (a browser tab closed without a FIN).
SEND_TIMEOUT = 60.0
# close() waits this long for each thread; each one wakes at once (the wake socket, or its sockets shut down).
JOIN_TIMEOUT = 10.0
BACKLOG = 8

OpenStream = Callable[[], socket.socket]


class NoFreePort(Exception):
    """Every port of the configured range is taken on this host."""


def parse_range(text: str) -> range:
    """The ports of a range written "first:last", both ends in (as Nova's [serial_console] port_range)."""
    first, sep, last = text.partition(":")
    try:
        ports = range(int(first), int(last) + 1) if sep else range(0)
    except ValueError:
        ports = range(0)
    if not ports or ports.start < 1 or ports.stop > 65536:
        raise ValueError(f"console port range {text!r} is not 'first:last' with 1 <= first <= last <= 65535")
    return ports


def listen(address: str, ports: range) -> socket.socket:
    """A listening TCP socket on the first free port of `ports`."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for port in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(BACKLOG)
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        return sock
    raise NoFreePort(f"no free port in {ports.start}:{ports.stop - 1} on {address} for a console")


def shut(sock: socket.socket) -> None:
    """Wake whoever blocks on `sock` (its peer sees the end); closing is its owner's."""
    # Not connected (any more): nothing to wake.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Listener:
    """One instance's console of one kind: a port, its accept thread, its connections."""

    def __init__(self, address: str, ports: range, open_stream: OpenStream, idle: float, what: str) -> None:
        self.what = what
        self.sock = listen(address, ports)
        self.port: int = self.sock.getsockname()[1]
        self._open = open_stream
        self._idle = idle
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + idle
        self._accepting = True
        # One byte in it ends the accept loop (its only reader: eventlet allows one per fd).
        self._wake, self._waker = socket.socketpair()
        # Each connection's TCP socket -> its thread and its stream from vmspawnd.
        self._links: dict[socket.socket, tuple[threading.Thread, socket.socket]] = {}
        self._thread = threading.Thread(target=self._accept_loop, name=f"console {what}", daemon=True)
        self._thread.start()

    def renew(self) -> bool:
        """Handed out again: accept for another `idle` s. False once it stopped accepting."""
        with self._lock:
            if self._accepting:
                self._deadline = time.monotonic() + self._idle
            return self._accepting

    @property
    def finished(self) -> bool:
        """Neither accepting nor serving a connection."""
        with self._lock:
            return not self._accepting and not self._links

    def _accept_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    left = self._deadline - time.monotonic()
                    if left <= 0 or not self._accepting:
                        self._accepting = False
                        break
                ready = select.select([self.sock, self._wake], [], [], left)[0]
                if self._wake in ready:
                    break
                if self.sock in ready:
                    conn, peer = self.sock.accept()
                    self._serve(conn, peer)
        except OSError as e:
            log.warning("console %s: cannot accept on port %d any more: %s", self.what, self.port, e)
        finally:
            with self._lock:
                self._accepting = False
            self.sock.close()
            log.info("console %s: port %d closed", self.what, self.port)

    def _serve(self, conn: socket.socket, peer: object) -> None:
        try:
            stream = self._open()
        except (VmspawndError, OSError) as e:
            log.warning("console %s: no stream from vmspawnd for %s: %s", self.what, peer, e)
            conn.close()
            return
        for sock in (conn, stream):
            sock.settimeout(SEND_TIMEOUT)
        link = threading.Thread(
            target=self._splice, args=(conn, stream), name=f"console {self.what} {peer}", daemon=True
        )
        with self._lock:
            serving = self._accepting
            if serving:
                self._links[conn] = (link, stream)
        if not serving:  # close() came meanwhile: it did not see this one
            conn.close()
            stream.close()
            return
        link.start()

    def _splice(self, a: socket.socket, b: socket.socket) -> None:
        """Bytes both ways until either side ends (close() shuts both down);
        both closed then. A console may sit idle for hours: only close() or a
        peer ends it."""
        peers = {a: b, b: a}
        try:
            while True:
                for sock in select.select([a, b], [], [])[0]:
                    data = sock.recv(CHUNK)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError as e:  # a reset, or a peer that took nothing for SEND_TIMEOUT
            log.info("console %s: connection ended: %s", self.what, e)
        finally:
            a.close()
            b.close()
            with self._lock:
                self._links.pop(a, None)

    def close(self) -> None:
        """Stop accepting, end every connection, and wait for the threads."""
        with self._lock:
            self._accepting = False
            links = dict(self._links)
        self._waker.send(b"\0")
        for conn, (_, stream) in links.items():
            shut(conn)
            shut(stream)
        for thread in (self._thread, *(link for link, _ in links.values())):
            thread.join(JOIN_TIMEOUT)
        self._wake.close()
        self._waker.close()


class Consoles:
    """A nova-compute's console listeners by (instance uuid, kind): one accepts
    per key; those that stopped accepting stay until their connections end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[tuple[str, str], list[Listener]] = {}

    def port(self, instance: str, kind: str, address: str, ports: range, idle: float, open_stream: OpenStream) -> int:
        """The port of the instance's `kind` console, accepting for `idle` s more."""
        with self._lock:
            listeners = self._listeners.setdefault((instance, kind), [])
            done = [x for x in listeners if x.finished]
            for listener in listeners:
                if listener.renew():
                    break
            else:
                listener = Listener(address, ports, open_stream, idle, f"{kind} of {instance}")
                listeners.append(listener)
            for x in done:
                listeners.remove(x)
        for x in done:
            x.close()
        return listener.port

    def close(self, instance: str) -> None:
        with self._lock:
            gone = [x for key in list(self._listeners) if key[0] == instance for x in self._listeners.pop(key)]
        for listener in gone:
            listener.close()

    def close_all(self) -> None:
        with self._lock:
            gone = [x for listeners in self._listeners.values() for x in listeners]
            self._listeners.clear()
        for listener in gone:
            listener.close()
