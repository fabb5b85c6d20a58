"""The live migration's TCP stream (transport.py) over real loopback sockets."""

from __future__ import annotations

import socket
import threading

import pytest

from nova.virt.vmspawnd import transport

WAIT = 30.0  # s: the longest any step here may take on a loaded host


def test_the_listener_hands_the_one_connection_it_accepts_to_receive() -> None:
    got: list[bytes] = []

    def receive(stream: socket.socket) -> None:
        with stream:
            assert stream.gettimeout() is None
            got.append(b"".join(iter(lambda: stream.recv(4096), b"")))

    listener = transport.Listener("127.0.0.1", WAIT, receive)
    with transport.connect(listener.host, listener.port, WAIT) as stream:
        assert stream.gettimeout() is None
        stream.sendall(b"guest state")
    listener.wait(WAIT)
    assert got == [b"guest state"]
    # One connection only: the listener is gone.
    with pytest.raises(transport.TransportError, match="cannot connect"):
        transport.connect(listener.host, listener.port, WAIT)


def test_what_receive_raised_is_raised_by_wait() -> None:
    def receive(stream: socket.socket) -> None:
        stream.close()
        raise RuntimeError("the daemon said no")

    listener = transport.Listener("127.0.0.1", WAIT, receive)
    transport.connect(listener.host, listener.port, WAIT).close()
    with pytest.raises(RuntimeError, match="the daemon said no"):
        listener.wait(WAIT)


def test_no_connection_within_the_accept_timeout_ends_the_wait() -> None:
    listener = transport.Listener("127.0.0.1", 0.2, lambda stream: pytest.fail("nothing connected"))
    with pytest.raises(transport.TransportError, match=r"no migration stream came within 0\.2 s"):
        listener.wait(WAIT)


def test_close_calls_off_a_listener_still_waiting() -> None:
    listener = transport.Listener("127.0.0.1", WAIT, lambda stream: pytest.fail("nothing connected"))
    listener.close()
    with pytest.raises(transport.TransportError, match="called off"):
        listener.wait(WAIT)


def test_wait_is_bounded_while_receive_still_runs() -> None:
    release = threading.Event()
    listener = transport.Listener("127.0.0.1", WAIT, lambda stream: release.wait(WAIT) and None)
    stream = transport.connect(listener.host, listener.port, WAIT)
    try:
        with pytest.raises(transport.TransportError, match=r"did not end within 0\.2 s"):
            listener.wait(0.2)
    finally:
        release.set()
        stream.close()
    listener.wait(WAIT)


def test_an_address_it_cannot_listen_on_is_refused() -> None:
    with pytest.raises(transport.TransportError, match="cannot listen"):
        transport.Listener("192.0.2.1", WAIT, lambda stream: None)


def test_ipv6_loopback_works_too() -> None:
    listener = transport.Listener("::1", WAIT, lambda stream: stream.close())
    transport.connect("::1", listener.port, WAIT).close()
    listener.wait(WAIT)
