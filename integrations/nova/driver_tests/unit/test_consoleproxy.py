"""consoleproxy over the fake client's socketpair streams: what a TCP client
gets, what ends a connection, and that no thread or socket outlives close()."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from driver_tests.fakeclient import RFB_GREETING, SERIAL_GREETING, SPICE_REPLY, FakeClient
from nova.virt.vmspawnd import consoleproxy
from nova.virt.vmspawnd.client import VmspawndError

# A proxy thread that dies of an exception fails the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
PORTS = consoleproxy.parse_range("20100:20199")
HOST = "127.0.0.1"


@pytest.fixture
def fake() -> Iterator[FakeClient]:
    client = FakeClient()
    client.create("vm", {"kernel": "/k", "graphics": "vnc"})
    client.create("spicy", {"kernel": "/k", "graphics": "spice"})
    yield client
    client.close()


@pytest.fixture
def consoles() -> Iterator[consoleproxy.Consoles]:
    before = set(threading.enumerate())
    c = consoleproxy.Consoles()
    yield c
    c.close_all()
    # Every thread of the proxy is gone once close_all returns.
    assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith("console")] == []


def connect(port: int) -> socket.socket:
    """Blocking, with the kernel's own 10 s timeouts: recv(n, MSG_WAITALL) is all of n or the end."""
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.settimeout(None)
    for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", 10, 0))
    return sock


def read(sock: socket.socket, n: int) -> bytes:
    return sock.recv(n, socket.MSG_WAITALL)


def refused(port: int) -> bool:
    try:
        connect(port).close()
    except ConnectionRefusedError:
        return True
    return False


def test_each_connection_gets_a_stream_of_its_own(fake: FakeClient, consoles: consoleproxy.Consoles) -> None:
    port = consoles.port("uuid-1", "vnc", HOST, PORTS, 60, lambda: fake.open_graphics("vm"))
    assert port in PORTS
    first, second = connect(port), connect(port)
    assert read(first, len(RFB_GREETING)) == RFB_GREETING
    assert read(second, len(RFB_GREETING)) == RFB_GREETING
    first.close()
    second.close()


def test_bytes_go_both_ways(fake: FakeClient, consoles: consoleproxy.Consoles) -> None:
    port = consoles.port("uuid-1", "spice", HOST, PORTS, 60, lambda: fake.open_graphics("spicy"))
    with connect(port) as sock:
        sock.sendall(b"REDQ" + bytes(30))
        assert read(sock, len(SPICE_REPLY)) == SPICE_REPLY
    port = consoles.port("uuid-1", "serial", HOST, PORTS, 60, lambda: fake.open_console("vm"))
    with connect(port) as sock:
        assert read(sock, len(SERIAL_GREETING)) == SERIAL_GREETING
        sock.sendall(b"echo hi\r")
        assert read(sock, 8) == b"echo hi\r"


def test_one_port_per_instance_and_kind_reused(fake: FakeClient, consoles: consoleproxy.Consoles) -> None:
    def open_vnc() -> socket.socket:
        return fake.open_graphics("vm")

    vnc = consoles.port("uuid-1", "vnc", HOST, PORTS, 60, open_vnc)
    assert consoles.port("uuid-1", "vnc", HOST, PORTS, 60, open_vnc) == vnc
    serial = consoles.port("uuid-1", "serial", HOST, PORTS, 60, lambda: fake.open_console("vm"))
    other = consoles.port("uuid-2", "vnc", HOST, PORTS, 60, open_vnc)
    assert len({vnc, serial, other}) == 3


def test_closing_an_instance_ends_its_listeners_and_connections(
    fake: FakeClient, consoles: consoleproxy.Consoles
) -> None:
    port = consoles.port("uuid-1", "vnc", HOST, PORTS, 60, lambda: fake.open_graphics("vm"))
    kept = consoles.port("uuid-2", "vnc", HOST, PORTS, 60, lambda: fake.open_graphics("vm"))
    sock = connect(port)
    read(sock, len(RFB_GREETING))
    consoles.close("uuid-1")
    assert sock.recv(1) == b""
    sock.close()
    assert refused(port)
    with connect(kept) as other:
        assert read(other, len(RFB_GREETING)) == RFB_GREETING


def test_either_end_closing_closes_the_other(fake: FakeClient, consoles: consoleproxy.Consoles) -> None:
    ends: list[socket.socket] = []

    def open_pair() -> socket.socket:
        ours, theirs = socket.socketpair()
        ends.append(theirs)
        return ours

    port = consoles.port("uuid-1", "serial", HOST, PORTS, 60, open_pair)
    client = connect(port)
    client.sendall(b"x")
    deadline = time.monotonic() + 10
    while not ends:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    far = ends[0]
    far.settimeout(10)
    assert far.recv(1) == b"x"
    # The daemon's end closes: the TCP client sees the end.
    far.close()
    assert client.recv(1) == b""
    client.close()
    # The TCP client closes: the daemon's end sees it.
    client = connect(port)
    while len(ends) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.close()
    ends[1].settimeout(10)
    assert ends[1].recv(1) == b""
    ends[1].close()


def test_a_refused_stream_closes_the_connection_and_the_port_goes_on(
    fake: FakeClient, consoles: consoleproxy.Consoles
) -> None:
    fake.power_off("vm", 1)  # not kept: gone

    port = consoles.port("uuid-1", "vnc", HOST, PORTS, 60, lambda: fake.open_graphics("vm"))
    with connect(port) as sock:
        assert sock.recv(1) == b""
    with pytest.raises(VmspawndError):
        fake.open_graphics("vm")
    with connect(port) as sock:
        assert sock.recv(1) == b""


def test_a_port_nobody_asks_for_again_stops_accepting(fake: FakeClient, consoles: consoleproxy.Consoles) -> None:
    port = consoles.port("uuid-1", "vnc", HOST, PORTS, 0.2, lambda: fake.open_graphics("vm"))
    deadline = time.monotonic() + 10
    while not refused(port):
        assert time.monotonic() < deadline, "the listener outlived its idle time"
        time.sleep(0.05)
    # Asked for again: a listener anew.
    again = consoles.port("uuid-1", "vnc", HOST, PORTS, 60, lambda: fake.open_graphics("vm"))
    with connect(again) as sock:
        assert read(sock, len(RFB_GREETING)) == RFB_GREETING


def test_a_connection_outlives_the_listeners_idle_time(fake: FakeClient, consoles: consoleproxy.Consoles) -> None:
    port = consoles.port("uuid-1", "serial", HOST, PORTS, 0.3, lambda: fake.open_console("vm"))
    sock = connect(port)
    read(sock, len(SERIAL_GREETING))
    deadline = time.monotonic() + 10
    while not refused(port):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sock.sendall(b"still here")
    assert read(sock, 10) == b"still here"
    sock.close()


def test_a_full_port_range_is_no_free_port(consoles: consoleproxy.Consoles) -> None:
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(consoleproxy.NoFreePort):
            consoles.port("uuid-1", "vnc", HOST, range(port, port + 1), 60, socket.socket)
    finally:
        taken.close()


@pytest.mark.parametrize("text", ["", "5900", "a:b", "6000:5900", "0:10", "1:65536"])
def test_a_bad_port_range_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="first:last"):
        consoleproxy.parse_range(text)


def test_a_port_range_holds_both_ends() -> None:
    assert consoleproxy.parse_range("5900:5902") == range(5900, 5903)
