"""Session fixtures: the tiny guest, a private system bus, the daemon."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from .harness import ROOT, Client, Daemon, qemu_pids

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


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[Client]:
    c = await Client.connect()
    yield c
    # The leak check: every test ends with no machine, no QEMU, no runtime dir.
    await c.terminate_all()
    c.close()
    assert qemu_pids(str(daemon.runtime_dir)) == []
    machines = daemon.runtime_dir / "machines"
    leftovers = list(machines.iterdir()) if machines.exists() else []
    # Only the kept qemu.log of a machine that failed may stay behind.
    assert [p for p in leftovers if [f.name for f in p.iterdir()] != ["qemu.log"]] == []
