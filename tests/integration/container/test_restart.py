"""Running machines survive the daemon: `systemctl restart`, a SIGKILL, a hang the watchdog ends.

One pair of machines for the whole module, as a long-lived host would have
them: `rvm1`, and `rvm2` with a hotplugged drive. After each disruption both
are re-attached (same leader, running), the drive is still there, and the new
daemon really drives the guest: a drive it plugs shows up in the guest and
goes again.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness import Client, wait_console

from .conftest import tinyguest, tool
from .support import UNIT, boot, console, drive_file, journal, restarted, show, wait_until

probes = itertools.count(1)


@dataclass(frozen=True)
class Pair:
    client: Client
    paths: tuple[str, str]
    leaders: tuple[int, int]
    drive: tuple[str, str]
    console: Path


@pytest.fixture(scope="module")
async def pair(container: tool.Container, guest: tinyguest.Guest) -> AsyncIterator[Pair]:
    container.run(["systemctl", "start", UNIT])
    client = await Client.connect(container.bus_address)
    one = await boot(container, client, guest, "rvm1")
    two = await boot(container, client, guest, "rvm2")
    drive = await client.add_drive(two, drive_file(container, "hot.raw"), serial="hot")
    log = console(container, await client.prop(two, "ConsoleLog"))
    await wait_console(log, r"VMSPAWN-BLOCK-ADD \S+ serial=hot$")
    leaders = (await client.prop(one, "Leader"), await client.prop(two, "Leader"))
    yield Pair(client, (one, two), leaders, drive, log)
    await client.terminate_all()
    client.close()


async def kept(container: tool.Container, pair: Pair) -> None:
    """Both machines re-attached and whole; the new daemon drives the guest."""
    client = pair.client
    # The client's connection is to the bus, which stays: the new daemon answers on it.
    assert sorted(await client.names()) == ["rvm1", "rvm2"]
    for path, leader in zip(pair.paths, pair.leaders, strict=True):
        assert await client.prop(path, "State") == "running"
        assert await client.prop(path, "Leader") == leader
    drives = await client.prop(pair.paths[1], "Drives")
    assert pair.drive in [(d["id"], d["port"]) for d in drives]
    assert show(container, UNIT, "StatusText")["StatusText"] == "2 machines running"
    serial = f"probe{next(probes)}"
    probe, _ = await client.add_drive(pair.paths[1], drive_file(container, f"{serial}.raw"), serial=serial)
    await wait_console(pair.console, rf"VMSPAWN-BLOCK-ADD (\S+) serial={serial}$")
    start = len(pair.console.read_text(errors="replace"))
    await client.remove_drive(pair.paths[1], probe)
    await wait_console(pair.console, r"VMSPAWN-BLOCK-REMOVE", start=start)
    assert "exited unexpectedly" not in journal(container, "MACHINE=rvm1") + journal(container, "MACHINE=rvm2")


async def test_restart_keeps_running_machines(container: tool.Container, pair: Pair) -> None:
    before = show(container, UNIT, "MainPID")
    container.run(["systemctl", "restart", UNIT])
    assert restarted(container, before)()
    await kept(container, pair)


async def test_killed_daemon_is_restarted_and_keeps_machines(container: tool.Container, pair: Pair) -> None:
    before = show(container, UNIT, "MainPID", "NRestarts")
    container.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", UNIT])
    wait_until("Restart=on-failure after SIGKILL", restarted(container, before))
    assert int(show(container, UNIT, "NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1
    await kept(container, pair)


async def test_watchdog_restarts_a_daemon_that_stops_answering(
    container: tool.Container, pair: Pair, dropin: Callable[[str, str], None]
) -> None:
    dropin("watchdog", "WatchdogSec=3s\nTimeoutAbortSec=5s")
    before = show(container, UNIT, "MainPID", "NRestarts")
    container.run(["kill", "-STOP", before["MainPID"]])
    wait_until("the watchdog's restart", restarted(container, before), timeout=40)
    assert "Watchdog timeout" in journal(container, "-u", UNIT)
    await kept(container, pair)
