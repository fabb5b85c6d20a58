"""The serial console: OpenConsole, `vmspawnctl console` in a pseudo-terminal, console.log.

Uses test_system.py's private system bus (its daemon, polkitd, other users):
run under `flock /tmp/vmspawnd-polkit.lock`.
"""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Message, MessageType, Variant

from vmspawnd.bus import BUS_NAME, MACHINE_IFACE

from .harness import ROOT, Client, guest_options, wait_console
from .test_system import System, gdbus_machine, polkit, root, system

__all__ = ["polkit", "root", "system"]  # fixtures, used by name

CTL = [sys.executable, "-m", "vmspawnd.ctl"]
READY = "VMSPAWN-GUEST-READY"


async def open_console(client: Client, path: str, read_only: bool = False) -> socket.socket:
    reply = await client.bus.call(
        Message(
            destination=BUS_NAME, path=path, interface=MACHINE_IFACE, member="OpenConsoleEx", signature="a{sv}",
            body=[{"read_only": Variant("b", read_only)}],
        )
    )  # fmt: skip
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise DBusError(reply.error_name or "", reply.body[0] if reply.body else "")
    [fd] = reply.unix_fds
    return socket.socket(fileno=fd)


def read_until(sock: socket.socket, pattern: str, timeout: float = 30) -> str:
    """What the console stream brought until `pattern` matched."""
    deadline = time.monotonic() + timeout
    data = b""
    sock.settimeout(0.2)
    while not re.search(pattern, data.decode(errors="replace")):
        assert time.monotonic() < deadline, f"never saw {pattern!r}; got {data[-1000:]!r}"
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        assert chunk, f"console closed before {pattern!r}; got {data[-1000:]!r}"
        data += chunk
    return data.decode(errors="replace")


class Terminal:
    """vmspawnctl console NAME on a pseudo-terminal, as a person would run it."""

    def __init__(self, system: System, log: Path, *args: str) -> None:
        self.log = log
        self.master, slave = pty.openpty()
        env = os.environ | {"PYTHONPATH": str(ROOT), "DBUS_SYSTEM_BUS_ADDRESS": system.address}
        self.proc = subprocess.Popen(
            [*CTL, "console", *args], stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.seen = b""

    def expect(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen.decode(errors="replace")):
            left = deadline - time.monotonic()
            assert left > 0, (
                f"the terminal never showed {pattern!r}: {self.seen[-1500:]!r}; "
                f"console.log ends {self.log.read_bytes()[-1500:]!r}"
            )
            if select.select([self.master], [], [], min(left, 0.2))[0]:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # EIO: the other side is gone
                    raise AssertionError(f"vmspawnctl ended before {pattern!r}: {self.seen[-1500:]!r}") from None
        return self.seen.decode(errors="replace")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


async def booted_shell(root: Client, guest: Any, name: str) -> tuple[str, Path]:
    path = await root.create(name, **guest_options(guest, cmdline=guest.cmdline + " tinyguest.shell"))
    console = Path(await root.prop(path, "ConsoleLog"))
    await wait_console(console, READY, timeout=150)
    # The shell starts after READY: its first prompt says it reads the console.
    await wait_console(console, r"/ # ", timeout=60)
    return path, console


async def test_console_in_a_terminal_types_into_the_guest_and_leaves_others_follow_or_are_refused(
    polkit: System, root: Client, guest: Any
) -> None:
    path, console = await booted_shell(root, guest, "con")
    term = Terminal(polkit, console, "con")
    try:
        term.expect(r"Connected to the console of con\. Press Ctrl-\] three times within 1 s")
        # A follower sees what the writer's command prints.
        follower = await open_console(root, path, read_only=True)
        assert list(await root.prop(path, "ConsoleClients")) == [2, True]
        term.type(b"\r")
        term.expect(r"/ # ")
        # Raw mode: the line is the guest shell's to edit and echo, not the local terminal's.
        term.type(b"echo co''nsole $((6*7))\r")
        term.expect(r"console 42")
        read_until(follower, r"console 42")

        # One writer at a time: a second read-write console is refused, clearly.
        with pytest.raises(DBusError) as e:
            await open_console(root, path)
        assert e.value.type == "org.vmspawnd1.Error.ConsoleBusy"
        assert "read-only" in e.value.text
        busy = subprocess.run(
            [*CTL, "console", "con"], capture_output=True, text=True, timeout=60,
            env=os.environ | {"PYTHONPATH": str(ROOT), "DBUS_SYSTEM_BUS_ADDRESS": polkit.address},
        )  # fmt: skip
        assert busy.returncode == 5 and "has a writer already" in busy.stderr and "--read-only" in busy.stderr

        # Another user whom polkit does not allow to manage the machine gets no console at all.
        await polkit.start_polkit(rules=False)
        nobody = await gdbus_machine(polkit, "nobody", path, "OpenConsole")
        assert nobody.error == "org.vmspawnd1.Error.AccessDenied", nobody
        # With polkit's yes (manage-machine), nobody may follow it.
        await polkit.start_polkit(rules=True)
        allowed = await gdbus_machine(polkit, "nobody", path, "OpenConsoleEx", "{'read_only': <true>}")
        assert allowed.error == "", allowed

        # Ctrl-] three times within a second leaves; the guest never sees them.
        term.type(b"\x1d\x1d\x1d")
        term.expect(r"Left the console of con\.")
        assert term.proc.wait(20) == 0
        follower.close()
        deadline = time.monotonic() + 10
        while list(await root.prop(path, "ConsoleClients")) != [0, False]:
            assert time.monotonic() < deadline, await root.prop(path, "ConsoleClients")
            await asyncio.sleep(0.05)
        # The writer's slot is free again.
        again = await open_console(root, path)
        again.sendall(b"echo sec''ond\r")
        read_until(again, r"second")
        again.close()
    finally:
        term.close()
    # console.log recorded all of it (QEMU writes it just after the stream).
    await wait_console(console, r"^second\r?$")
    log = console.read_text(errors="replace")
    assert "\nconsole 42\n" in log and "\x1d" not in log


async def test_console_log_records_everything_across_a_daemon_restart_and_the_console_reconnects(
    system: System, root: Client, guest: Any
) -> None:
    path, console = await booted_shell(root, guest, "con-restart")
    sock = await open_console(root, path)
    # A guest that keeps talking while the daemon is away.
    sock.sendall(b"\r(i=0; while :; do i=$((i+1)); echo LINE$i; usleep 200000; done) &\r")
    read_until(sock, r"LINE3\r\n")
    system.daemon.stop()
    # The daemon's end is gone: the client sees EOF.
    sock.settimeout(10)
    while sock.recv(65536):
        pass
    sock.close()
    size = console.stat().st_size
    await wait_console(console, r"LINE\d+", start=size)  # QEMU logs on its own
    system.start_daemon()
    # The bus stayed; the restarted daemon re-attached and connected to the console again.
    assert await root.prop(path, "State") == "running"
    sock = await open_console(root, path)
    sock.sendall(b"kill $!; echo af''ter\r")
    read_until(sock, r"after")
    sock.close()
    numbers = [int(n) for n in re.findall(r"LINE(\d+)", console.read_text(errors="replace"))]
    # Every line, before, during and after the restart, in order and none missing.
    assert numbers == list(range(1, numbers[-1] + 1)), numbers
    assert numbers[-1] > 5


async def test_a_guest_initiated_reboot_keeps_the_machine_running(system: System, root: Client, guest: Any) -> None:
    path, console = await booted_shell(root, guest, "con-reboot")
    offset = len(console.read_text(errors="replace"))
    with await open_console(root, path) as sock:
        sock.sendall(b"\rreboot -f\r")
        await wait_console(console, READY, timeout=150, start=offset)
    assert await root.prop(path, "State") == "running"
