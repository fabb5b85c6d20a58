"""console.py: the escape sequence, who is attached, log rotation, and the fan-out over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.console import (
    CLIENT_BACKLOG,
    ESCAPE,
    ESCAPE_WINDOW,
    MAX_CLIENTS,
    Console,
    EscapeDetector,
    Roster,
    rotate_log,
)
from vmspawnd.errors import ConsoleBusy, NotRunning

E = bytes([ESCAPE])


# -- the escape sequence ------------------------------------------------------


def test_three_presses_in_one_chunk_leave_and_stay_behind() -> None:
    assert EscapeDetector().feed(b"ls\r" + E * 3 + b"rest", 0.0) == (b"ls\r" + E * 2, True)


def test_presses_across_chunks_within_the_window_leave() -> None:
    d = EscapeDetector()
    assert d.feed(E, 10.0) == (E, False)
    assert d.feed(E, 10.4) == (E, False)
    assert d.feed(E, 10.9) == (b"", True)


def test_presses_spread_over_more_than_the_window_do_not_leave() -> None:
    d = EscapeDetector()
    assert d.feed(E, 0.0) == (E, False)
    assert d.feed(E, 0.5) == (E, False)
    # The third comes too late: it starts a new count.
    assert d.feed(E, ESCAPE_WINDOW + 0.01) == (E, False)
    assert d.feed(E * 2, ESCAPE_WINDOW + 0.2) == (E, True)


def test_another_key_between_the_presses_resets_the_count() -> None:
    d = EscapeDetector()
    assert d.feed(E * 2 + b"x" + E * 2, 0.0) == (E * 2 + b"x" + E * 2, False)
    assert d.feed(E, 0.1) == (b"", True)


def test_after_leaving_the_count_starts_again() -> None:
    d = EscapeDetector()
    assert d.feed(E * 3, 0.0)[1]
    assert d.feed(E * 2, 0.1) == (E * 2, False)


@given(st.lists(st.binary(max_size=8), max_size=20))
def test_without_three_presses_in_a_row_everything_goes_on(chunks: list[bytes]) -> None:
    d = EscapeDetector()
    data = b"".join(chunks)
    if E * 3 in data:
        return
    out = b""
    for i, chunk in enumerate(chunks):
        sent, leave = d.feed(chunk, i * 0.01)
        assert not leave
        out += sent
    assert out == data


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_what_goes_on_is_a_prefix_that_never_holds_the_sequence(before: bytes, after: bytes) -> None:
    data = before + E * 3 + after
    sent, leave = EscapeDetector().feed(data, 0.0)
    assert leave
    assert data.startswith(sent) and E * 3 not in sent


# -- who is attached ------------------------------------------------------------


def test_many_readers_one_writer() -> None:
    r = Roster("vm")
    readers = [r.admit(False) for _ in range(3)]
    writer = r.admit(True)
    assert r.writer == writer and r.summary == (4, True)
    assert r.may_write(writer) and not any(r.may_write(c) for c in readers)
    with pytest.raises(ConsoleBusy, match=r"has a writer already.*read_only=true"):
        r.admit(True)
    # Refused: nothing changed.
    assert r.summary == (4, True)
    r.leave(writer)
    assert r.summary == (3, False) and not r.may_write(writer)
    assert r.admit(True) != writer  # ids are never reused


def test_the_number_of_clients_is_bounded() -> None:
    r = Roster("vm")
    for _ in range(MAX_CLIENTS):
        r.admit(False)
    with pytest.raises(ConsoleBusy, match=f"{MAX_CLIENTS} clients"):
        r.admit(False)
    r.leave(1)
    r.admit(False)


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=40))
def test_there_is_never_more_than_one_writer(ops: list[tuple[bool, bool]]) -> None:
    r = Roster("vm")
    for join, writable in ops:
        if join:
            with contextlib.suppress(ConsoleBusy):
                r.admit(writable)
        elif r.clients:
            r.leave(next(iter(r.clients)))
        assert sum(r.clients.values()) <= 1
        assert len(r.clients) <= MAX_CLIENTS
        assert r.summary == (len(r.clients), r.writer is not None)


# -- console.log rotation -----------------------------------------------------------


def test_a_log_under_the_cap_stays(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"x" * 100)
    assert not rotate_log(log, 100)
    assert log.read_bytes() == b"x" * 100 and not (tmp_path / "console.log.1").exists()
    assert not rotate_log(tmp_path / "missing.log", 1)


def test_a_log_past_the_cap_moves_to_dot_1_and_the_writer_appends_on(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"old")
    (tmp_path / "console.log.1").write_bytes(b"older")
    log.chmod(0o640)
    # QEMU's fd: O_APPEND, kept open across the rotation.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"-part")
        assert rotate_log(log, 4)
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert (tmp_path / "console.log.1").read_bytes() == b"old-part"
    assert log.read_bytes() == b"new"
    assert (tmp_path / "console.log.1").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 10)
    (tmp_path / "console.log").symlink_to(target)
    with pytest.raises(OSError):
        rotate_log(tmp_path / "console.log", 1)
    assert target.read_bytes() == b"x" * 10


# -- the fan-out, over real sockets ------------------------------------------------


async def recv(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(data)), 5)
        assert chunk, "closed"
        data += chunk
    return data


async def test_output_reaches_every_client_input_only_from_the_writer(tmp_path: Path) -> None:
    changes: list[tuple[int, bool]] = []
    console = Console("vm", tmp_path / "console.log", lambda: changes.append(console.roster.summary))
    with pytest.raises(NotRunning, match="not connected yet"):
        await console.open(True)
    qemu, ours = socket.socketpair()
    qemu.setblocking(False)
    await console.connect(ours)
    writer = await console.open(True)
    reader = await console.open(False)
    for s in (writer, reader):
        s.setblocking(False)
    assert changes == [(1, True), (2, True)]
    with pytest.raises(ConsoleBusy):
        await console.open(True)

    loop = asyncio.get_running_loop()
    await loop.sock_sendall(qemu, b"login: ")
    assert await recv(writer, 7) == b"login: " and await recv(reader, 7) == b"login: "
    await loop.sock_sendall(reader, b"ignored")
    await loop.sock_sendall(writer, b"root\r")
    assert await recv(qemu, 5) == b"root\r"

    writer.close()
    deadline = loop.time() + 5
    while console.roster.summary != (1, False):
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    # The writer's slot is free again.
    again = await console.open(True)
    # QEMU gone: every client sees EOF, and no new one is admitted.
    qemu.close()
    again.setblocking(False)
    assert await asyncio.wait_for(loop.sock_recv(again, 10), 5) == b""
    assert await asyncio.wait_for(loop.sock_recv(reader, 10), 5) == b""
    with pytest.raises(NotRunning, match="QEMU closed its console"):
        await console.open(False)
    console.close()
    for s in (reader, again):
        s.close()


async def test_a_client_that_does_not_read_is_cut_off_not_waited_for(tmp_path: Path) -> None:
    console = Console("vm", tmp_path / "console.log", lambda: None)
    qemu, ours = socket.socketpair()
    qemu.setblocking(False)
    await console.connect(ours)
    stuck = await console.open(False)
    follower = await console.open(False)
    follower.setblocking(False)
    loop = asyncio.get_running_loop()
    chunk = b"x" * 65536
    sent = 0
    while sent <= 2 * CLIENT_BACKLOG + (1 << 20):
        await loop.sock_sendall(qemu, chunk)
        sent += len(chunk)
        # The follower keeps up; `stuck` never reads.
        await recv(follower, len(chunk))
    deadline = loop.time() + 5
    while console.roster.summary != (1, False):
        assert loop.time() < deadline, console.roster.summary
        await asyncio.sleep(0.01)
    console.close()
    stuck.close()
    follower.close()
    qemu.close()


async def test_output_past_the_cap_rotates_the_log(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    console = Console("vm", log, lambda: None, cap=1000)
    qemu, ours = socket.socketpair()
    await console.connect(ours)
    # QEMU writes the log itself; here the test plays QEMU.
    with open(log, "ab") as f:
        f.write(b"y" * 70_000)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(qemu, b"y" * 70_000)
    deadline = loop.time() + 5
    while not (tmp_path / "console.log.1").exists():
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    assert log.stat().st_size == 0
    console.close()
    qemu.close()
