"""A booted container with systemd as PID 1 and this checkout of vmspawnd installed in it.

tools/container.py does the work (the cached Debian root, the overlay, nspawn,
the tear-down); these fixtures hand its pieces to the tests. One container per
test run: it boots in about a second, the first build of its root takes about
a minute (mmdebstrap) and is cached in ~/.cache/vmspawnd-container.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import ROOT, Client

sys.path.insert(0, str(ROOT / "tools"))
import container as tool
import tinyguest

GUEST_DIR = "/srv/tinyguest"
DROPINS = "/run/systemd/system/vmspawnd.service.d"


@pytest.fixture(scope="session")
def container() -> Iterator[tool.Container]:
    if reason := tool.unavailable():
        pytest.skip(f"no systemd-nspawn container here: {reason}")
    box = tool.Container(tool.build_rootfs()).start()
    try:
        yield box
    finally:
        box.stop()
    # Nothing left on the host: no mount, no cgroup, no run directory, no process.
    assert str(box.root) not in Path("/proc/self/mountinfo").read_text()
    assert [c for c in box.cgroups if c.exists()] == []
    assert not box.rundir.exists()
    assert box.proc is not None and box.proc.poll() is not None


@pytest.fixture(scope="session")
def guest(container: tool.Container) -> tinyguest.Guest:
    """The tiny guest (built on the host), copied into the container where any uid may read it."""
    built = tinyguest.build(tinyguest.default_cache_dir())
    return tinyguest.Guest(
        kernel=Path(container.copy_in(built.kernel, f"{GUEST_DIR}/kernel")),
        initrd=Path(container.copy_in(built.initrd, f"{GUEST_DIR}/initrd")),
        cmdline=built.cmdline,
    )


@pytest.fixture
async def client(container: tool.Container) -> AsyncIterator[Client]:
    """A client on the container's system bus (from the host, as root), the daemon started."""
    container.run(["systemctl", "start", "vmspawnd.service"])
    c = await Client.connect(container.bus_address)
    yield c
    await c.terminate_all()
    c.close()


@pytest.fixture
def dropin(container: tool.Container) -> Iterator[Callable[[str, str], None]]:
    """Runtime drop-ins for vmspawnd.service, removed (and the daemon restarted plain) after the test."""
    written: list[Path] = []

    def write(name: str, text: str) -> None:
        # /run is the container's own tmpfs: write through the leader's root.
        path = Path(f"/proc/{container.leader}/root{DROPINS}/{name}.conf")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"[Service]\n{text}\n")
        written.append(path)
        container.run(["systemctl", "daemon-reload"])
        container.run(["systemctl", "restart", "vmspawnd.service"])

    yield write
    for path in written:
        path.unlink()
    container.run(["systemctl", "daemon-reload"])
    container.run(["systemctl", "restart", "vmspawnd.service"])
