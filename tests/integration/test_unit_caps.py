"""virtiofs under the shipped unit's capability bounding set and NoNewPrivileges.

Issue 11 (10): with units/vmspawnd.service's capabilities virtiofsd could not
set up its chroot sandbox; QEMU only said `vhost_backend_init failed:
Protocol error` and the failed start deleted virtiofsd's log. PID 1 is not
systemd here: the unit's CapabilityBoundingSet= and NoNewPrivileges= are
applied with setpriv, parsed from the unit file (test_install.setpriv_args).
"""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError

from vmspawnd import share
from vmspawnd.cmdline import Share

from .harness import ROOT, Client, guest_options, wait_console

# world_dir is a fixture (the parameters below reuse its name: F811).
from .test_install import UNIT, setpriv_args, start_confined, stop_confined, unit_settings, world_dir  # noqa: F401

sys.path.insert(0, str(ROOT / "tools"))
import testbus

OPENED = share.OpenShare(Share("fs0", Path("/srv/a"), "a"), fd=5, uid=1000, gid=1000)


@pytest.fixture
def bus(world_dir: Path) -> Iterator[str]:  # noqa: F811
    proc, address = testbus.start(world_dir / "bus")
    yield address
    proc.terminate()
    proc.wait()


@pytest.fixture
async def confined(world_dir: Path, bus: str) -> AsyncIterator[Client]:  # noqa: F811
    proc, client = await start_confined(world_dir, bus, setpriv_args(ROOT / "units" / UNIT))
    try:
        yield client
    finally:
        await stop_confined(proc, client, world_dir)


async def test_a_guest_boots_hotplugs_and_reads_a_share_within_the_units_capabilities(
    confined: Client,
    world_dir: Path,  # noqa: F811
    guest: Any,
) -> None:
    share = world_dir / "share"
    share.mkdir()
    (share / "marker").write_text("m")
    drive = world_dir / "hot.raw"
    drive.write_bytes(b"\0" * (1 << 20))
    options = guest_options(guest, mounts=[{"source": str(share), "tag": "data"}], hotplug_spares=2)
    options["cmdline"] += " tinyguest.mount=data"
    path = await confined.create("capsfs", **options)
    console = await confined.prop(path, "ConsoleLog")
    await wait_console(console, "VMSPAWN-GUEST-READY", timeout=120)
    assert "VMSPAWN-MOUNT data files=marker" in Path(console).read_text()
    drive_id, _ = await confined.add_drive(path, str(drive), serial="hotcaps")
    await wait_console(console, r"VMSPAWN-BLOCK-ADD \w+ serial=hotcaps", timeout=60)
    assert drive_id == "disk0"
    await confined.call("TerminateMachine", "s", ["capsfs"])


async def test_a_virtiofsd_that_cannot_start_is_named_with_its_own_error(world_dir: Path, bus: str, guest: Any) -> None:  # noqa: F811
    """Without CAP_SETUID the daemon cannot hand virtiofsd to the share's owner: the error says
    so in virtiofsd's (here setpriv's) own words and names the log, which is kept."""
    setpriv = [a.replace(",+setuid", "").replace(",+setgid", "") for a in setpriv_args(ROOT / "units" / UNIT)]
    proc, client = await start_confined(world_dir, bus, setpriv)
    try:
        share = world_dir / "share2"
        share.mkdir()
        with pytest.raises(DBusError) as failed:
            await client.create("nofs", **guest_options(guest, directory=str(share)))
        assert failed.value.type == "org.vmspawnd1.Error.QemuFailed"
        message = failed.value.text
        logs = re.findall(r"(/\S+virtiofsd-rootfs\.log)", message)
        assert logs, message
        assert Path(logs[0]).read_text().strip() and "Operation not permitted" in message, message
    finally:
        await stop_confined(proc, client, world_dir)


def test_the_unit_allows_no_namespace_and_no_chroot() -> None:
    """virtiofsd's user namespace and chroot sandbox are not the unit's: where systemd is PID 1
    each virtiofsd is a transient service of its own (tests/integration/container/test_shares.py)."""
    settings = unit_settings(ROOT / "units" / UNIT)
    assert settings["RestrictNamespaces"] == ["yes"]
    assert settings["SystemCallFilter"] == ["@system-service seccomp", "~@resources"]
    argv = share.virtiofsd_argv(share.Virtiofsd("/usr/lib/qemu/virtiofsd", False), OPENED)
    assert argv[argv.index("unshare") : argv.index("unshare") + 3] == ["unshare", "--user", "--map-root-user"]
    assert "sandbox=chroot" in argv
