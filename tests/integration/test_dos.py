"""Finding 7 and 8: no caller, allowed or not, can stall the daemon or probe root's files.

- An 800,000-entry PlanMachine (19 MB) is dropped unread and refused at
  once, while other callers' calls are answered throughout.
- CreateMachine asks "may you?" before looking at the options.
- A FIFO given as a file is refused at once; eight of them in parallel do
  not hold up anyone's opens.
- `nobody` gets the same answer for a root-only path that exists and one
  that does not.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError

from vmspawnd.bus import MANAGER_IFACE
from vmspawnd.bus.guard import DROP_CHUNK
from vmspawnd.bus.options import MACHINE_OPTIONS

from .harness import Client, Daemon, busctl, guest_options, variants

E = "org.vmspawnd1.Error."
DRIVES = 800_000

# Sends one PlanMachine with DRIVES drives over its own raw connection
# (dbus-fast marshals it first: 1-2 s that must not count), then prints
# the client-side times as JSON.
FLOOD = r"""
import json, socket, sys, time
from dbus_fast import Message, MessageType, Variant
from dbus_fast._private.unmarshaller import Unmarshaller
from dbus_fast.auth import AuthExternal

address, count = sys.argv[1], int(sys.argv[2])
sock = socket.socket(socket.AF_UNIX)
sock.connect(address.split("=", 1)[1])
sock.sendall(b"\0AUTH EXTERNAL " + str(0).encode().hex().encode() + b"\r\n")
assert sock.recv(4096).startswith(b"OK"), "auth"
sock.sendall(b"BEGIN\r\n")
hello = Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="Hello", serial=1)
sock.sendall(hello._marshall(False))
reader = Unmarshaller(sock.makefile("rb"))
def reply(serial):
    while True:
        msg = reader.unmarshall()
        if msg.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR) and msg.reply_serial == serial:
            return msg
reply(1)
drives = [{"path": Variant("s", "/x")} for _ in range(count)]
times = {}
# The bus daemon itself reads and validates the whole message before it
# routes it: the same message sent to the bus daemon measures that part.
for serial, destination, path, interface in (
    (2, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus"),
    (3, "org.vmspawnd1", "/org/vmspawnd1", "org.vmspawnd1.Manager"),
):
    big = Message(destination=destination, path=path, interface=interface, member="PlanMachine",
                  signature="sa{sv}", body=["m", {"drives": Variant("aa{sv}", drives)}], serial=serial)._marshall(False)
    started = time.monotonic()
    sock.sendall(big)
    sent = time.monotonic()
    answer = reply(serial)
    done = time.monotonic()
    times[destination] = {"bytes": len(big), "error": answer.error_name, "text": answer.body[0],
                          "from_first_byte": done - started, "from_last_byte": done - sent,
                          "at": [started, sent, done]}
print(json.dumps(times))
"""

# What dropping a message of N bytes costs at least, right now on this host:
# N bytes from one process to another over a unix socket, read in the
# guard's chunks (the bus daemon writes them, vmspawnd reads and discards).
COPY = r"""
import os, socket, sys, time
size, chunk = int(sys.argv[1]), int(sys.argv[2])
ours, theirs = socket.socketpair()
started = time.monotonic()
if os.fork() == 0:
    ours.close()
    left = size
    while left:
        left -= len(theirs.recv(min(left, chunk)))
    theirs.sendall(b"x")
    os._exit(0)
theirs.close()
ours.sendall(bytes(size))
assert ours.recv(1) == b"x"
print(time.monotonic() - started)
os.wait()
"""


async def copy_time(size: int) -> float:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", COPY, str(size), str(DROP_CHUNK), stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    return float(out)


async def ping_until(
    client: Client, done: asyncio.Event, after: int = 50, linger: float = 4.0
) -> list[tuple[float, float]]:
    """(start, end) of rounds of Version and GetMachine, until `after` rounds
    and `linger` seconds past `done`: on a quiet host 50 rounds take a few ms,
    all of them inside the bus daemon's own stall window, which the test skips."""
    rounds = []
    done_at = None
    while len(rounds) < after or done_at is None or time.monotonic() < done_at + linger:
        if not done.is_set():
            after += 1
        elif done_at is None:
            done_at = time.monotonic()
        started = time.monotonic()
        await asyncio.gather(
            client.call("Get", "ss", [MANAGER_IFACE, "Version"], interface="org.freedesktop.DBus.Properties"),
            asyncio.gather(client.call("GetMachine", "s", ["absent"]), return_exceptions=True),
        )
        rounds.append((started, time.monotonic()))
    return rounds


async def test_an_800000_drive_plan_is_refused_fast_while_others_are_answered(
    client: Client, daemon: Daemon, system_bus: str
) -> None:
    log_start = daemon.log.stat().st_size
    copies = [await copy_time(19_200_000)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOOD, system_bus, str(DRIVES), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    done = asyncio.Event()
    pinger = asyncio.create_task(ping_until(client, done))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        done.set()
        rounds = await pinger
    assert proc.returncode == 0, err.decode()
    copies.append(await copy_time(19_200_000))
    # 100 ms on a quiet host; on a loaded one (2 cores, load 7-10) a plain copy
    # of the same bytes, measured before and after, may take a good part of
    # that: then three times the slower copy. Unmarshalling it takes 30-70 s.
    bound = max(0.1, 3 * max(copies))
    results: dict[str, dict[str, Any]] = json.loads(out)
    bus, ours = results["org.freedesktop.DBus"], results["org.vmspawnd1"]
    logged = daemon.log.read_text(errors="replace")[log_start:]
    m = re.search(r"refused a (\d+)-byte PlanMachine call from \S+; dropped in ([\d.]+) ms", logged)
    assert m is not None, logged[-2000:]
    # The bus daemon reads and validates a whole message before it routes
    # it, and routes nothing meanwhile: every caller on the bus waits that
    # long, whatever vmspawnd does. The same message sent to the bus daemon
    # itself measures it; those windows (with a margin) are not vmspawnd's.
    bus_time = bus["at"][2] - bus["at"][0]
    stalls = [(bus["at"][0], bus["at"][2]), (ours["at"][0], ours["at"][0] + 2 * bus_time + 0.2)]
    share = ours["from_last_byte"] - bus["from_last_byte"]
    mine = [(a, b) for a, b in rounds if not any(a < end + 0.05 and b > start for start, end in stalls)]
    after_stall = [r for r in mine if r[0] >= stalls[1][1]]
    slowest = max(b - a for a, b in mine)
    print(
        f"\n{ours['bytes']} bytes; client side: bus alone {bus['from_last_byte'] * 1000:.0f} ms after the last "
        f"byte, vmspawnd {ours['from_last_byte'] * 1000:.0f} ms (its share {share * 1000:.0f} ms); daemon side: "
        f"dropped in {m[2]} ms; {len(mine)} rounds outside the bus's own stalls, slowest {slowest * 1000:.1f} ms; "
        f"a plain copy {' and '.join(f'{c * 1000:.0f}' for c in copies)} ms, bound {bound * 1000:.0f} ms"
    )
    assert ours["error"] == E + "InvalidArgument", ours
    assert "PlanMachine call of" in ours["text"] and "bytes refused" in ours["text"]
    assert float(m[2]) < bound * 1000, (m[2], copies)
    # Client side: the bus daemon's own validation time varies by a quarter
    # from one 19 MB message to the next on this shared host; beyond that, the bound.
    assert share < bound + 0.25 * bus["from_last_byte"], (results, copies)
    # 200 ms on a quiet host; at load 7-10 on 2 cores any round trip may
    # take that long, so 500 ms here (without the guard: 30-70 s).
    assert len(after_stall) >= 20 and slowest < 0.5, (len(after_stall), slowest)


async def test_every_array_is_capped_before_its_entries_are_looked_at(client: Client, guest: Any) -> None:
    for key, value, cap in (
        ("drives", [{"path": "/nonexistent"}] * 257, 256),
        ("mounts", [{"source": "/nonexistent", "tag": "t"}] * 65, 64),
        ("qemu_extra", ["-nodefaults"] * 1025, 1024),
    ):
        with pytest.raises(DBusError) as e:
            await client.call(
                "PlanMachine", "sa{sv}", ["m", variants(guest_options(guest, **{key: value}), MACHINE_OPTIONS)]
            )
        assert e.value.type == E + "InvalidArgument"
        assert f"option {key!r} holds {len(value)} entries, at most {cap}" in e.value.text


async def test_create_asks_who_before_reading_options(client: Client) -> None:
    """nobody, with no polkit to allow it, is refused before its (bad) options are looked at."""
    r = busctl(
        "call", "org.vmspawnd1", "/org/vmspawnd1", "org.vmspawnd1.Manager", "CreateMachine", "sa{sv}",
        "m", "1", "colour", "s", "blue", check=False, as_user="nobody",
    )  # fmt: skip
    assert r.returncode != 0
    assert "may not create machines" in r.stderr, r.stderr


@pytest.fixture
def fifos(daemon: Daemon) -> list[str]:
    directory = daemon.runtime_dir.parent / f"fifos-{os.getpid()}"
    directory.mkdir(exist_ok=True)
    paths = []
    for i in range(8):
        path = directory / f"kernel{i}"
        if not path.exists():
            os.mkfifo(path)
        paths.append(str(path))
    return paths


async def test_fifo_kernels_are_refused_at_once_and_hold_up_no_open(
    client: Client, daemon: Daemon, guest: Any, fifos: list[str]
) -> None:
    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(
            *(client.create(f"fifo{i}", kernel=path, accel="tcg") for i, path in enumerate(fifos)),
            return_exceptions=True,
        ),
        10,
    )
    for path, r in zip(fifos, results, strict=True):
        assert isinstance(r, DBusError) and r.type == E + "InvalidArgument", r
        assert f"kernel {path!r} is a FIFO; give a regular file or a block device" in r.text
    assert time.monotonic() - started < 5
    # Root's own opens were never held up: a real machine starts.
    path = await asyncio.wait_for(client.create("afterfifo", **guest_options(guest)), 60)
    assert await client.prop(path, "State") == "running"


def test_nobody_cannot_tell_whether_a_root_only_path_exists(daemon: Daemon) -> None:
    there = Path("/root") / f".vmspawnd-probe-{os.getpid()}"
    there.write_bytes(b"\0" * 4096)
    there.chmod(0o600)
    absent = Path("/root") / f".vmspawnd-absent-{os.getpid()}"
    try:
        answers = []
        for path in (there, absent):
            r = busctl(
                "call", "org.vmspawnd1", "/org/vmspawnd1", "org.vmspawnd1.Manager", "PlanMachine", "sa{sv}",
                "m", "1", "kernel", "s", str(path), check=False, as_user="nobody",
            )  # fmt: skip
            answers.append((r.returncode, r.stderr.replace(path.name, "NAME")))
        assert answers[0] == answers[1], answers
        assert answers[0][0] != 0 and "does not exist or uid 65534 may not open it" in answers[0][1]
        # Root sees its own file.
        plan = busctl(
            "call", "org.vmspawnd1", "/org/vmspawnd1", "org.vmspawnd1.Manager", "PlanMachine", "sa{sv}",
            "m", "1", "kernel", "s", str(there), check=False,
        )  # fmt: skip
        assert plan.returncode == 0, plan.stderr
    finally:
        there.unlink()
