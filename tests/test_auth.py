"""Who is calling and who may: bus/caller.py and auth.py on a private bus.

A private dbus-daemon (session configuration, so any connection may own any
name) carries a test service that reads its caller the way vmspawnd's
methods do, and a stand-in polkit (org.freedesktop.PolicyKit1 served by this
process, recording every CheckAuthorization) for auth.authorize. The real
polkitd, with real users, is in tests/integration/test_system.py.
"""

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import pytest
from dbus_fast import Message, MessageFlag, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr, DBusUInt32
from dbus_fast.service import ServiceInterface, dbus_method

from vmspawnd import auth
from vmspawnd.bus import caller
from vmspawnd.errors import AccessDenied

TEST_NAME = "org.vmspawnd1.Test"
TEST_PATH = "/org/vmspawnd1/test"
Seen = Annotated[list[Any], DBusSignature("ssub")]


@pytest.fixture(scope="module")
def bus_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("bus")
    proc = subprocess.Popen(
        ["dbus-daemon", "--config-file=/usr/share/dbus-1/session.conf",
         f"--address=unix:path={directory}/socket", "--nofork", "--print-address"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    address = proc.stdout.readline().decode().strip()
    assert address, "dbus-daemon did not start"
    yield address
    proc.terminate()
    proc.wait()


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address).connect()


class Who(ServiceInterface):
    """Reports its caller as vmspawnd's methods read it: before and after awaiting."""

    def __init__(self, bus: MessageBus) -> None:
        super().__init__(TEST_NAME)
        self.bus = bus

    @dbus_method()
    async def Who(self, delay_ms: DBusUInt32) -> Seen:
        before = caller.sender()
        await asyncio.sleep(delay_ms / 1000)
        # A bus round trip of our own: replies and other calls arrive meanwhile.
        uid = await caller.uid(self.bus)
        return [before, caller.sender(), uid, caller.allows_interaction()]


@pytest.fixture(scope="module")
async def who_service(bus_address: str) -> AsyncIterator[MessageBus]:
    bus = await connect(bus_address)
    caller.install(bus)
    bus.export(TEST_PATH, Who(bus))
    assert await bus.request_name(TEST_NAME) is RequestNameReply.PRIMARY_OWNER
    yield bus
    bus.disconnect()


async def who(client: MessageBus, delay_ms: int, flags: MessageFlag = MessageFlag.NONE) -> list[Any]:
    reply = await client.call(
        Message(destination=TEST_NAME, path=TEST_PATH, interface=TEST_NAME, member="Who",
                signature="u", body=[delay_ms], flags=flags)
    )  # fmt: skip
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply and reply.body
    return list(reply.body)


async def test_each_call_sees_its_own_caller_across_concurrent_calls_from_two_connections(
    bus_address: str, who_service: MessageBus
) -> None:
    a, b = await connect(bus_address), await connect(bus_address)
    try:
        # Interleaved: early calls sleep longest, so every method is in flight
        # while messages from the other connection are dispatched.
        delays = [60, 5, 45, 0, 30, 15, 50, 10]
        calls = [(conn, who(conn, d)) for i, d in enumerate(delays) for conn in ((a, b) if i % 2 else (b, a))]
        replies = await asyncio.gather(*(c for _, c in calls))
        for (conn, _), (before, after, uid, interactive) in zip(calls, replies, strict=True):
            assert before == after == conn.unique_name
            assert uid == os.getuid()
            assert interactive is False
        assert {r[0] for r in replies} == {a.unique_name, b.unique_name}
    finally:
        a.disconnect()
        b.disconnect()


async def test_allow_interactive_authorization_flag_is_seen(bus_address: str, who_service: MessageBus) -> None:
    client = await connect(bus_address)
    try:
        _, _, _, interactive = await who(client, 0, MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        assert interactive is True
    finally:
        client.disconnect()


def test_no_caller_outside_a_method_call() -> None:
    with pytest.raises(RuntimeError, match="outside a D-Bus method call"):
        caller.sender()


# -- auth.authorize against a stand-in polkit ------------------------------

Subject = Annotated[list[Any], DBusSignature("(sa{sv})")]
Details = Annotated[dict[str, str], DBusSignature("a{ss}")]
Result = Annotated[list[Any], DBusSignature("(bba{ss})")]


class FakeAuthority(ServiceInterface):
    """org.freedesktop.PolicyKit1.Authority that answers from a table and records each question."""

    def __init__(self) -> None:
        super().__init__("org.freedesktop.PolicyKit1.Authority")
        self.calls: list[tuple[str, str, str, int]] = []
        self.answer = (False, False)
        self.delay = 0.0
        self.release = asyncio.Event()

    @dbus_method()
    async def CheckAuthorization(
        self, subject: Subject, action_id: DBusStr, details: Details, flags: DBusUInt32, cancellation_id: DBusStr
    ) -> Result:
        kind, props = subject
        self.calls.append((kind, props["name"].value, action_id, flags))
        if self.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.delay)
        allowed, challenge = self.answer
        return [allowed, challenge, {}]


@pytest.fixture
async def polkit(bus_address: str) -> AsyncIterator[FakeAuthority]:
    bus = await connect(bus_address)
    authority = FakeAuthority()
    bus.export("/org/freedesktop/PolicyKit1/Authority", authority)
    assert await bus.request_name(auth.POLKIT, NameFlag.DO_NOT_QUEUE) is RequestNameReply.PRIMARY_OWNER
    yield authority
    authority.release.set()
    await asyncio.sleep(0.05)
    bus.disconnect()


@pytest.fixture
async def daemon_bus(bus_address: str) -> AsyncIterator[MessageBus]:
    bus = await connect(bus_address)
    yield bus
    bus.disconnect()


@pytest.mark.parametrize(("uid", "owner"), [(0, None), (0, 1000), (1000, 1000)])
async def test_root_and_the_creator_never_ask_polkit(
    daemon_bus: MessageBus, polkit: FakeAuthority, uid: int, owner: int | None
) -> None:
    action = auth.Action.CREATE if owner is None else auth.Action.MANAGE
    await auth.authorize(daemon_bus, ":1.999", uid, action, owner, interactive=False)
    assert polkit.calls == []


@pytest.mark.parametrize("interactive", [False, True])
async def test_polkit_is_asked_about_the_callers_bus_name_with_the_interaction_flag(
    daemon_bus: MessageBus, polkit: FakeAuthority, interactive: bool
) -> None:
    polkit.answer = (True, False)
    await auth.authorize(daemon_bus, ":1.42", 1000, auth.Action.MANAGE, 1001, interactive)
    assert polkit.calls == [("system-bus-name", ":1.42", "org.vmspawnd1.manage-machine", int(interactive))]


async def test_polkit_no_is_access_denied_with_a_hint_when_authentication_would_help(
    daemon_bus: MessageBus, polkit: FakeAuthority
) -> None:
    polkit.answer = (False, True)
    with pytest.raises(AccessDenied, match=r"uid 1000 may not create machines.*interactive authorization"):
        await auth.authorize(daemon_bus, ":1.42", 1000, auth.Action.CREATE, None, interactive=False)
    polkit.answer = (False, False)
    with pytest.raises(AccessDenied) as denied:
        await auth.authorize(daemon_bus, ":1.42", 1000, auth.Action.MANAGE, 0, interactive=True)
    assert "manage this machine" in str(denied.value) and "interactive" not in str(denied.value)
    assert AccessDenied.error_name() == "AccessDenied"


async def test_no_polkit_on_the_bus_is_access_denied_at_once(daemon_bus: MessageBus) -> None:
    start = time.monotonic()
    with pytest.raises(AccessDenied):
        await auth.authorize(daemon_bus, ":1.42", 1000, auth.Action.CREATE, None, interactive=True)
    assert time.monotonic() - start < 2


async def test_a_polkit_that_does_not_answer_is_given_up_on(
    daemon_bus: MessageBus, polkit: FakeAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "TIMEOUT", 0.2)
    polkit.answer, polkit.delay = (True, False), 5.0
    start = time.monotonic()
    verdict = await auth.polkit_check(daemon_bus, ":1.42", auth.Action.CREATE, interactive=False)
    assert not verdict.allowed and "in time" in verdict.unavailable
    assert time.monotonic() - start < 2
