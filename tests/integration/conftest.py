"""Session fixtures: the tiny guest, a private system bus, the daemon."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from .harness import ROOT, Client, Daemon, Site, lost_errors, not_just_logs, qemu_pids

sys.path.insert(0, str(ROOT / "tools"))
import testbus
import tinyguest


@pytest.fixture(scope="session")
def guest() -> tinyguest.Guest:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vmspawnd-guest"
    return tinyguest.build(cache)


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    # Short and world-traversable: `nobody` clients reach the bus socket here.
    path = Path(tempfile.mkdtemp(prefix="vmspawnd-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def system_bus(workdir: Path) -> Iterator[str]:
    proc, address = testbus.start(workdir / "bus")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    yield address
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="session")
def daemon(system_bus: str, workdir: Path) -> Iterator[Daemon]:
    d = Daemon(workdir / "run", workdir / "daemon.log")
    d.start()
    yield d
    if d.proc is not None:
        d.stop()
    # The session's leak check on the daemon itself: no error went unhandled.
    assert lost_errors(d.log) == [], f"unhandled errors in {d.log}"


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[Client]:
    c = await Client.connect()
    yield c
    # The leak check: every test ends with no machine, no QEMU, no runtime dir.
    await c.terminate_all()
    c.close()
    assert qemu_pids(str(daemon.runtime_dir)) == []
    # Only the logs a stopped or failed machine keeps may stay behind.
    assert not_just_logs(daemon.runtime_dir / "machines") == []


@pytest.fixture
def site(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    """A bus and daemon of the test's own, and afterwards what it left checked."""
    base = workdir / ("site-" + re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[:40])
    proc, address = testbus.start(base / "bus")
    daemon = Daemon(base / "run", base / "daemon.log", env={"DBUS_SYSTEM_BUS_ADDRESS": address})
    daemon.start()
    yield Site(address, daemon, base)
    if daemon.proc is not None:
        daemon.stop()
    assert lost_errors(daemon.log) == [], f"unhandled errors in {daemon.log}"
    # Whatever a test left running dies with it.
    for pid in qemu_pids(str(daemon.runtime_dir)):
        os.kill(pid, signal.SIGKILL)
    proc.terminate()
    proc.wait()


@pytest.fixture
async def site_client(site: Site) -> AsyncIterator[Client]:
    c = await site.client()
    yield c
    c.close()
