"""vmspawnd.qga: the guest agent's framing (pure, for all inputs) and its I/O
edge against a scripted agent on a real Unix socket; and what
SetUserPassword lets through to the agent (machine.check_password_request)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd import qga
from vmspawnd.errors import AgentFailed, AgentUnavailable, InvalidArgument
from vmspawnd.machine import check_password_request

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
messages = st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=4)


def wire(message: object) -> bytes:
    """As qemu-ga writes an answer: one JSON object, then a newline."""
    return json.dumps(message).encode() + b"\n"


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# -- framing --------------------------------------------------------------------


def test_requests_are_one_json_object_a_line_and_the_sync_starts_with_the_delimiter() -> None:
    assert qga.request("guest-ping") == b'{"execute":"guest-ping"}\n'
    assert qga.sync_request(7) == b'\xff{"execute":"guest-sync-delimited","arguments":{"id":7}}\n'


@given(st.lists(messages, max_size=5), st.lists(st.integers(0, 10_000), max_size=6))
def test_messages_come_out_whole_however_the_stream_is_cut(sent: list[object], cuts: list[int]) -> None:
    reader = qga.Reader()
    data = b"".join(wire(m) for m in sent)
    got = [m for chunk in chunks(data, cuts) for m in reader.feed(chunk)]
    assert got == sent


@given(st.binary(max_size=200).filter(lambda b: b"\n" not in b), messages, st.lists(st.integers(0, 500), max_size=4))
def test_a_delimiter_drops_what_came_before_it_on_its_line(junk: bytes, message: object, cuts: list[int]) -> None:
    reader = qga.Reader()
    data = junk + qga.DELIMITER + wire(message)
    assert [m for chunk in chunks(data, cuts) for m in reader.feed(chunk)] == [message]


def test_a_line_that_is_not_json_is_garbled_not_an_exception() -> None:
    assert qga.Reader().feed(b"{nope\n" + wire({"return": 1})) == [qga.GARBLED, {"return": 1}]


def test_an_endless_line_is_refused() -> None:
    reader = qga.Reader(limit=100)
    with pytest.raises(AgentFailed, match="over 100 bytes"):
        reader.feed(b"x" * 101)


def test_replies() -> None:
    assert qga.reply_value({"return": {}}, "guest-ping") == {}
    assert qga.is_sync_reply({"return": 5}, 5) and not qga.is_sync_reply({"return": 6}, 5)
    error = {"error": {"class": "GenericError", "desc": "child process has failed to set user password"}}
    with pytest.raises(AgentFailed, match=r"failed guest-set-user-password: child process.*GenericError"):
        qga.reply_value(error, "guest-set-user-password")
    for odd in (qga.GARBLED, [], {"neither": 1}, {"error": "text"}):
        with pytest.raises(AgentFailed, match="neither a return nor an error"):
            qga.reply_value(odd, "guest-ping")


# -- the I/O edge against a scripted agent ------------------------------------------

Agent = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[[Agent], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(agent: Agent) -> str:
        path = str(tmp_path / f"agent{len(servers)}.sock")
        servers.append(await asyncio.start_unix_server(agent, path))
        return path

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> dict[str, object]:
    line = (await reader.readline()).lstrip(qga.DELIMITER)
    request = json.loads(line)
    assert isinstance(request, dict)
    return request


async def test_a_call_syncs_first_and_skips_late_answers_to_earlier_clients(
    serve: Callable[[Agent], Awaitable[str]],
) -> None:
    seen: list[dict[str, object]] = []

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sync = await read_request(reader)
        seen.append(sync)
        sync_id = sync["arguments"]["id"]  # type: ignore[index]
        # A late answer, a half line of an earlier one, then the sync's answer.
        writer.write(wire({"return": {"stale": True}}) + b'{"retu' + qga.DELIMITER + wire({"return": sync_id}))
        seen.append(await read_request(reader))
        writer.write(wire({"return": {"ok": 1}}))
        await writer.drain()

    path = await serve(agent)
    assert await qga.call(path, "guest-ping", {"x": 1}, "machine m") == {"ok": 1}
    assert seen[0]["execute"] == "guest-sync-delimited"
    assert seen[1] == {"execute": "guest-ping", "arguments": {"x": 1}}


async def test_an_agent_that_answers_nothing_is_unavailable_with_a_hint(
    serve: Callable[[Agent], Awaitable[str]],
) -> None:
    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads, never answers

    path = await serve(agent)
    with pytest.raises(AgentUnavailable, match=r"machine m: the guest agent did not answer within 0.2 s; is qemu-ga"):
        await qga.call(path, "guest-set-user-password", {"password": "c2VjcmV0"}, "machine m", sync_timeout=0.2)


async def test_a_command_left_unanswered_may_still_be_carried_out(serve: Callable[[Agent], Awaitable[str]]) -> None:
    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sync = await read_request(reader)
        writer.write(qga.DELIMITER + wire({"return": sync["arguments"]["id"]}))  # type: ignore[index]
        await reader.read()

    path = await serve(agent)
    with pytest.raises(AgentUnavailable, match=r"did not answer within 0\.2 s; it may still carry it out") as e:
        await qga.call(path, "guest-set-user-password", {"password": "c2VjcmV0"}, "machine m", timeout=0.2)
    assert "c2VjcmV0" not in str(e.value)


async def test_the_agents_refusal_is_agent_failed(serve: Callable[[Agent], Awaitable[str]]) -> None:
    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sync = await read_request(reader)
        writer.write(qga.DELIMITER + wire({"return": sync["arguments"]["id"]}))  # type: ignore[index]
        await read_request(reader)
        writer.write(wire({"error": {"class": "GenericError", "desc": "no such user"}}))

    path = await serve(agent)
    with pytest.raises(AgentFailed, match="no such user"):
        await qga.call(path, "guest-set-user-password", {}, "machine m")


async def test_a_closed_connection_or_no_socket_is_unavailable(
    serve: Callable[[Agent], Awaitable[str]], tmp_path: Path
) -> None:
    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    path = await serve(agent)
    # QEMU gone: an end of file, or a reset if our sync was still unread.
    with pytest.raises(AgentUnavailable, match=r"closed the guest agent's connection|connection failed"):
        await qga.call(path, "guest-ping", None, "machine m")
    with pytest.raises(AgentUnavailable, match="cannot connect to QEMU's guest agent socket"):
        await qga.call(str(tmp_path / "none.sock"), "guest-ping", None, "machine m")


# -- what SetUserPassword passes on ------------------------------------------------


@given(
    st.text(min_size=1, max_size=64).filter(
        lambda u: not any(c in u for c in ":/") and u.isprintable() and " " not in u and u.strip() == u
    )
)
def test_printable_names_without_colon_slash_or_space_pass(user: str) -> None:
    check_password_request(user, "pw")


@given(st.text(max_size=20), st.sampled_from([":", "/", " ", "\n", "\t", "\0", "\x7f"]), st.text(max_size=20))
def test_a_name_that_would_split_chpasswds_line_is_refused(a: str, bad: str, b: str) -> None:
    with pytest.raises(InvalidArgument, match="user name"):
        check_password_request(a + bad + b, "pw")


@given(st.text(max_size=20), st.sampled_from(["\n", "\r", "\0", "\x1b", "\x7f"]), st.text(max_size=20))
def test_a_password_with_a_control_character_is_refused_without_being_quoted(a: str, bad: str, b: str) -> None:
    password = a + bad + b
    with pytest.raises(InvalidArgument) as e:
        check_password_request("root", password)
    assert password not in str(e.value) or not password.strip()


def test_empty_and_overlong() -> None:
    for user, password in (("", "pw"), ("u" * 257, "pw"), ("root", ""), ("root", "p" * 4097)):
        with pytest.raises(InvalidArgument):
            check_password_request(user, password)
    check_password_request("u" * 256, "p" * 4096)
