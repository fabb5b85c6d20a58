"""virtiofs under the real unit (systemd as PID 1): each virtiofsd is a transient service of its
own, outside vmspawnd.service's sandbox (RestrictNamespaces=yes, no chroot there), with its own.

The guest mounts a share, reads it, and as root makes a setuid binary and a
device node in it: on the host (the container) the file is the share
owner's and no device node exists.
"""

from __future__ import annotations

import os
import pwd
import re

import pytest
from dbus_fast import DBusError

from tests.integration.harness import Client, guest_options, wait_console

from .conftest import tinyguest, tool
from .support import console, show, wait_until

SHARE = "/srv/share"
DAEMON = pwd.getpwnam("daemon")  # uid 1 on Debian, in the container as on the host


async def test_a_guest_reads_and_writes_a_share_under_the_real_unit(
    container: tool.Container, client: Client, guest: tinyguest.Guest
) -> None:
    share = container.path(SHARE)
    share.mkdir(parents=True, exist_ok=True)
    os.chown(share, DAEMON.pw_uid, DAEMON.pw_gid)
    (share / "run.sh").write_text(
        f": > {'/mnt/data/suid'} && chmod 4755 /mnt/data/suid\nmknod /mnt/data/null c 1 3\ntrue\n"
    )
    options = guest_options(guest, memory=128 << 20, mounts=[{"source": SHARE, "tag": "data"}])
    options["cmdline"] += " tinyguest.mount=data tinyguest.run=data"
    path = await client.create("sharevm", **options)
    log = console(container, await client.prop(path, "ConsoleLog"))
    await wait_console(log, r"VMSPAWN-RUN data rc=\d+", timeout=120)
    # Its own transient service, outside vmspawnd.service's sandbox and cgroup.
    unit = "vmspawnd-virtiofsd-sharevm-fs0.service"
    service = show(container, unit, "ActiveState", "MainPID", "CapabilityBoundingSet", "ProtectSystem")
    assert (service["ActiveState"], service["ProtectSystem"]) == ("active", "strict"), service
    assert service["CapabilityBoundingSet"].split() == ["cap_setgid", "cap_setuid"]
    assert f"/{unit}" in container.run(["cat", f"/proc/{service['MainPID']}/cgroup"]).stdout
    assert "VMSPAWN-MOUNT data files=run.sh" in log.read_text()
    suid = (share / "suid").stat()
    assert (suid.st_uid, suid.st_gid) == (DAEMON.pw_uid, DAEMON.pw_gid)
    assert not (share / "null").exists()
    # A daemon restart leaves it running (it is systemd's, not the daemon's), and the new daemon
    # still ends it with the machine.
    container.run(["systemctl", "restart", "vmspawnd.service"])
    assert await client.prop(path, "State") == "running"
    assert show(container, unit, "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": service["MainPID"]}
    await client.call("TerminateMachine", "s", ["sharevm"])
    wait_until(
        "its virtiofsd's end with QEMU's", lambda: show(container, unit, "LoadState")["LoadState"] == "not-found"
    )


async def test_a_virtiofsd_that_fails_is_named_in_its_own_words_and_its_unit_is_gone(
    container: tool.Container, client: Client, guest: tinyguest.Guest
) -> None:
    """A share of root's is squashed to nobody: a 0700 one cannot be opened by the virtiofsd, whose
    service fails. The error carries virtiofsd's own words and names the kept log, not just QEMU's
    'vhost_backend_init failed: Protocol error'; the failed unit does not linger."""
    private = container.path("/srv/private")
    private.mkdir(parents=True, exist_ok=True)
    private.chmod(0o700)
    with pytest.raises(DBusError) as failed:
        await client.create("nofs", **guest_options(guest, memory=128 << 20, directory="/srv/private"))
    assert failed.value.type == "org.vmspawnd1.Error.QemuFailed"
    assert "virtiofsd for share 'root'" in failed.value.text, failed.value.text
    [log] = re.findall(r"its log: (\S+virtiofsd-rootfs\.log)", failed.value.text)
    # /run is the container's own tmpfs: read through the leader's root.
    assert console(container, log).read_text().strip()
    assert show(container, "vmspawnd-virtiofsd-nofs-rootfs.service", "LoadState")["LoadState"] == "not-found"


async def test_a_hotplugged_share_is_served_by_its_own_transient_service(
    container: tool.Container, client: Client, guest: tinyguest.Guest
) -> None:
    """AddShare under the real unit: its virtiofsd, too, is systemd's (the unit could not run it), the guest
    mounts and reads it; RemoveShare ends the service."""
    hot = container.path("/srv/hot")
    hot.mkdir(parents=True, exist_ok=True)
    os.chown(hot, DAEMON.pw_uid, DAEMON.pw_gid)
    (hot / "hello").write_text("hot share\n")
    options = guest_options(guest, memory=128 << 20, hotplug_spares=2)
    options["cmdline"] += " tinyguest.hotmount=hot"
    path = await client.create("hotvm", **options)
    log = console(container, await client.prop(path, "ConsoleLog"))
    await wait_console(log, "VMSPAWN-GUEST-READY", timeout=60)
    share_id, _ = await client.add_share(path, "/srv/hot", tag="hot")
    await wait_console(log, r"VMSPAWN-SHARE-MOUNT hot hello=hot share\r?\n", timeout=60)
    unit = f"vmspawnd-virtiofsd-hotvm-{share_id}.service"
    assert show(container, unit, "ActiveState")["ActiveState"] == "active"
    start = len(log.read_text(errors="replace"))
    (hot / "unmount").touch()
    await wait_console(log, r"VMSPAWN-SHARE-UMOUNT hot", start=start, timeout=60)
    await client.remove_share(path, share_id)
    wait_until("its virtiofsd's end", lambda: show(container, unit, "LoadState")["LoadState"] == "not-found")
    await client.call("TerminateMachine", "s", ["hotvm"])
