"""Pause, Resume, Reboot and PowerOff on real QEMU with the tiny guest under TCG."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Variant

from vmspawnd.bus import MACHINE_IFACE

from .harness import Client, guest_options, qemu_pids, record_states, wait_console
from .qmp_probe import Probe

READY = "VMSPAWN-GUEST-READY"
TICK = re.compile(r"VMSPAWN-TICK (\d+\.\d+)")


async def machine_call(client: Client, path: str, member: str, signature: str = "", *body: Any) -> list[Any]:
    return await client.call(member, signature, list(body), path=path, interface=MACHINE_IFACE)


async def wait_state(client: Client, path: str, state: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (now := await client.prop(path, "State")) != state:
        assert time.monotonic() < deadline, f"State stayed {now!r}, never {state!r}"
        await asyncio.sleep(0.05)


def ticks(text: str) -> list[float]:
    return [float(m.group(1)) for m in TICK.finditer(text)]


async def test_pause_stops_the_guest_clock_resume_continues_it_and_qemus_own_stop_is_seen(
    client: Client, guest: Any, tmp_path: Path
) -> None:
    probe = Probe(tmp_path / "qmp.sock")
    options = guest_options(guest, cmdline=guest.cmdline + " tinyguest.tick", qemu_extra=Probe.extra(probe.path))
    path = await client.create("pause", **options)
    console = Path(await client.prop(path, "ConsoleLog"))
    await wait_console(console, r"VMSPAWN-TICK .*\n.*VMSPAWN-TICK", timeout=150)

    states = await record_states(client, path)
    await machine_call(client, path, "Pause")
    assert await client.prop(path, "State") == "paused"
    assert probe("query-status")["status"] == "paused"
    before = console.read_text()
    # Observed for a while: a running guest ticks twice a second.
    await asyncio.sleep(3)
    assert console.read_text() == before, "the console went on while paused"
    # Pausing a paused machine changes nothing; hotplug goes on (QEMU plugs
    # while the vCPUs stand still, the guest sees it once it runs).
    await machine_call(client, path, "Pause")
    assert await client.prop(path, "State") == "paused"
    spares = await client.prop(path, "FreeSparePorts")
    drive = tmp_path / "d.raw"
    drive.write_bytes(b"\0" * (1 << 20))
    await client.add_drive(path, str(drive))
    assert await client.prop(path, "FreeSparePorts") == spares - 1

    paused_at = time.monotonic()
    await machine_call(client, path, "Resume")
    assert await client.prop(path, "State") == "running"
    await wait_console(console, r"VMSPAWN-TICK", start=len(before))
    resumed_after = time.monotonic() - paused_at
    last_before, first_after = ticks(before)[-1], ticks(console.read_text()[len(before) :])[0]
    # The guest's clock stood still: it advanced by about one tick over
    # the 3+ s pause, not by the pause.
    assert first_after - last_before < 1.5 < 3 + resumed_after, (last_before, first_after)

    # Paused by someone else (a QMP monitor of its own): State follows QEMU's STOP/RESUME events.
    probe("stop")
    await wait_state(client, path, "paused")
    probe("cont")
    await wait_state(client, path, "running")
    # Every change was signalled, once.
    assert states == ["paused", "running", "paused", "running"]


async def test_reboot_restarts_the_guest_and_keeps_the_hotplugged_drive(
    client: Client, guest: Any, tmp_path: Path
) -> None:
    path = await client.create("reboot", **guest_options(guest))
    console = Path(await client.prop(path, "ConsoleLog"))
    await wait_console(console, READY, timeout=150)
    drive = tmp_path / "kept.raw"
    drive.write_bytes(b"\0" * (1 << 20))
    drive_id, port = await client.add_drive(path, str(drive), serial="kept")
    await wait_console(console, r"VMSPAWN-BLOCK-ADD \S+ serial=kept")
    ports = await client.prop(path, "Ports")
    drives = await client.prop(path, "Drives")
    leader = await client.prop(path, "Leader")

    offset = len(console.read_text())
    await machine_call(client, path, "Reboot")
    # The guest boots again: its boot snapshot lists the hotplugged drive as present at boot.
    await wait_console(console, READY, timeout=150, start=offset)
    rebooted = console.read_text()[offset:]
    assert re.search(r"VMSPAWN-BLOCK \S+ serial=kept", rebooted), rebooted[-2000:]
    assert await client.prop(path, "State") == "running"
    assert await client.prop(path, "Leader") == leader
    assert await client.prop(path, "Ports") == ports
    assert await client.prop(path, "Drives") == drives
    # And it still unplugs like any hotplugged drive.
    await client.remove_drive(path, drive_id, timeout_usec=60_000_000)
    assert await client.prop(path, "FreeSparePorts") == sum(1 for p in ports if p["role"] == "spare")
    assert port in {p["id"] for p in ports}


async def test_power_off_before_the_guest_listens_waits_for_it(client: Client, guest: Any) -> None:
    """The first press comes long before the guest's ACPI button driver is
    up; pressed again, the guest shuts itself down: no forced stop."""
    path = await client.create("early-off", **guest_options(guest))
    # Held open: a stopped machine's log may be cleaned up with its directory.
    with open(await client.prop(path, "ConsoleLog"), "rb") as console:
        started = time.monotonic()
        (forced,) = await machine_call(client, path, "PowerOffEx", "t", 150_000_000)
        assert forced is False
        text = console.read().decode(errors="replace")
    # The guest booted and pressed its own power-off (its watcher is armed before READY).
    assert READY in text and "VMSPAWN-POWEROFF" in text, text[-2000:]
    assert time.monotonic() - started < 150
    assert "early-off" not in await client.names()


async def test_power_off_reports_a_forced_stop(client: Client, tmp_path: Path, daemon: Any) -> None:
    # A blank disk: SeaBIOS finds nothing to boot, no OS listens for the button.
    image = tmp_path / "blank.raw"
    image.write_bytes(b"\0" * (1 << 20))
    path = await client.create("forced-off", image=str(image), accel="tcg", memory=64 << 20)
    (forced,) = await machine_call(client, path, "PowerOffEx", "t", 3_000_000)
    assert forced is True
    assert qemu_pids(str(daemon.runtime_dir / "machines" / "forced-off")) == []


async def test_bad_input_to_the_new_methods_is_refused_and_leaves_nothing(
    client: Client, tmp_path: Path, daemon: Any
) -> None:
    image = tmp_path / "blank.raw"
    image.write_bytes(b"\0" * (1 << 20))
    path = await client.create("bad-input", image=str(image), accel="tcg", memory=64 << 20)
    assert daemon.proc is not None
    fds = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
    refused: list[tuple[str, str, list[Any], str]] = [
        ("OpenConsoleEx", "a{sv}", [{"read_only": Variant("s", "yes")}], "InvalidArgument"),
        ("OpenConsoleEx", "a{sv}", [{"writer": Variant("b", True)}], "InvalidArgument"),
        ("PowerOffEx", "t", [2**64 - 1], "InvalidArgument"),
        ("PowerOff", "t", [3600 * 1_000_000 + 1], "InvalidArgument"),
    ]
    for member, signature, body, error in refused:
        with pytest.raises(DBusError) as e:
            await machine_call(client, path, member, signature, *body)
        assert e.value.type == f"org.vmspawnd1.Error.{error}", (member, body, e.value.text)
    # Arguments a method does not take: refused by the bus layer, the machine untouched.
    for member in ("Pause", "Resume", "Reboot", "OpenConsole"):
        with pytest.raises(DBusError) as e:
            await machine_call(client, path, member, "s", "x")
        assert e.value.type.startswith("org.freedesktop.DBus.Error."), e.value.type
    assert await client.prop(path, "State") == "running"
    assert list(await client.prop(path, "ConsoleClients")) == [0, False]
    assert len(os.listdir(f"/proc/{daemon.proc.pid}/fd")) == fds
