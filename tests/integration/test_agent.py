"""The guest agent (CreateMachine guest_agent=true): SetUserPassword through
qemu-ga in the tiny guest changes root's entry in the guest's /etc/shadow;
no agent port, a paused guest, an agent that answers nothing, a user the
guest does not have: typed errors, none of them naming the password.

The test reads /etc/shadow through the machine's agent socket itself
(guest-file-open/read, between the daemon's calls: the daemon connects
per call).
"""

from __future__ import annotations

import base64
import subprocess
from typing import Any

import pytest
from dbus_fast import DBusError

from vmspawnd import qga
from vmspawnd.bus import MACHINE_IFACE

from .harness import Client, Daemon, guest_options, wait_console

BOOT = 120  # s: the tiny guest boots in seconds, but under TCG on a loaded host
E = "org.vmspawnd1.Error."
# A crypt(3) SHA-512 hash in form (chpasswd -e takes it as it is).
HASH = "$6$vmspawnd$" + "x" * 86
PASSWORD = "s3cret: pass\\word"


async def set_password(client: Client, path: str, user: str, password: str, crypted: bool) -> None:
    await client.call("SetUserPassword", "ssb", [user, password, crypted], path=path, interface=MACHINE_IFACE)


async def guest_file(daemon: Daemon, machine: str, file: str) -> str:
    """`file` of the guest, read through its agent."""
    sock = str(daemon.runtime_dir / "machines" / machine / "agent.sock")
    handle = await qga.call(sock, "guest-file-open", {"path": file, "mode": "r"}, "test")
    try:
        read = await qga.call(sock, "guest-file-read", {"handle": handle, "count": 65536}, "test")
    finally:
        await qga.call(sock, "guest-file-close", {"handle": handle}, "test")
    assert isinstance(read, dict) and read["eof"], read
    return base64.b64decode(read["buf-b64"]).decode()


async def root_hash(daemon: Daemon, machine: str) -> str:
    shadow = await guest_file(daemon, machine, "/etc/shadow")
    return next(line.split(":")[1] for line in shadow.splitlines() if line.startswith("root:"))


def sha512_crypt(password: str, salt: str) -> str:
    """What crypt(3) makes of it: busybox's mkpasswd on the host, the guest's own implementation."""
    out = subprocess.run(
        ["busybox", "mkpasswd", "-m", "sha512", "-S", salt, "-P", "0"], input=password + "\n",
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


async def test_set_user_password_changes_roots_shadow_entry(client: Client, guest: Any, daemon: Daemon) -> None:
    path = await client.create("agent", **guest_options(guest, guest_agent=True, hotplug_spares=0))
    console = await client.prop(path, "ConsoleLog")
    await wait_console(console, r"VMSPAWN-AGENT vport\d+p\d+", timeout=BOOT)
    assert await root_hash(daemon, "agent") == "*"

    # A hash as it is (chpasswd -e in the guest).
    await set_password(client, path, "root", HASH, True)
    assert await root_hash(daemon, "agent") == HASH

    # A password, hashed in the guest: crypt(3) of it with the salt the guest chose.
    await set_password(client, path, "root", PASSWORD, False)
    hashed = await root_hash(daemon, "agent")
    assert hashed.startswith("$6$") and hashed != HASH
    assert sha512_crypt(PASSWORD, hashed.split("$")[2]) == hashed

    # A user the guest does not have: the agent's own words, not the password.
    with pytest.raises(DBusError) as failed:
        await set_password(client, path, "nosuchuser", PASSWORD, False)
    assert failed.value.type == E + "AgentFailed", failed.value
    assert "guest-set-user-password" in failed.value.text and PASSWORD not in failed.value.text
    assert await root_hash(daemon, "agent") == hashed

    # What would be a second "user:password" line for chpasswd is refused before the guest sees it.
    for user, password in (("ro:ot", "x"), ("root", "two\nlines"), ("", "x"), ("root", "")):
        with pytest.raises(DBusError) as refused:
            await set_password(client, path, user, password, False)
        assert refused.value.type == E + "InvalidArgument", (user, refused.value)
    # A paused guest cannot answer: said at once, nothing sent.
    await client.call("Pause", path=path, interface=MACHINE_IFACE)
    with pytest.raises(DBusError) as paused:
        await set_password(client, path, "root", PASSWORD, False)
    assert paused.value.type == E + "AgentUnavailable" and "Resume it first" in paused.value.text
    await client.call("Resume", path=path, interface=MACHINE_IFACE)
    assert await root_hash(daemon, "agent") == hashed

    assert PASSWORD not in daemon.log.read_text(errors="replace")


async def test_no_agent_is_a_typed_error(client: Client, guest: Any) -> None:
    # No agent port at all: refused at once, with what to change.
    no_port = await client.create("noport", **guest_options(guest, hotplug_spares=0))
    with pytest.raises(DBusError) as refused:
        await set_password(client, no_port, "root", PASSWORD, False)
    assert refused.value.type == E + "AgentUnavailable", refused.value
    assert "created without guest_agent" in refused.value.text

    # The port, but nothing in the guest answers on it: bounded, with a hint.
    options = guest_options(guest, guest_agent=True, hotplug_spares=0)
    silent = await client.create("silent", **options | {"cmdline": options["cmdline"] + " tinyguest.noagent"})
    with pytest.raises(DBusError) as unanswered:
        await set_password(client, silent, "root", PASSWORD, False)
    assert unanswered.value.type == E + "AgentUnavailable", unanswered.value
    assert f"did not answer within {qga.SYNC_TIMEOUT:g} s" in unanswered.value.text
    assert "qemu-ga" in unanswered.value.text and PASSWORD not in unanswered.value.text
