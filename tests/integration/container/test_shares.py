"""virtiofs under the real unit (systemd as PID 1): its SystemCallFilter=, RestrictNamespaces=,
DevicePolicy= and the rest apply, which setpriv cannot show (tests/integration/test_unit_caps.py).

The guest mounts a share, reads it, and as root makes a setuid binary and a
device node in it: on the host (the container) the file is the share
owner's and no device node exists.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Callable

import pytest
from dbus_fast import DBusError

from tests.integration.harness import Client, guest_options, wait_console

from .conftest import bus_address, tinyguest, tool
from .support import console

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
    assert "VMSPAWN-MOUNT data files=run.sh" in log.read_text()
    suid = (share / "suid").stat()
    assert (suid.st_uid, suid.st_gid) == (DAEMON.pw_uid, DAEMON.pw_gid)
    assert not (share / "null").exists()
    await client.call("TerminateMachine", "s", ["sharevm"])


async def test_without_user_namespaces_the_error_is_virtiofsds_own(
    container: tool.Container, dropin: Callable[[str, str], None], guest: tinyguest.Guest
) -> None:
    """The unit's RestrictNamespaces=user is what virtiofsd needs: with `yes` the start fails, and
    the error carries unshare's own words and names the kept log, not just QEMU's
    'vhost_backend_init failed: Protocol error'."""
    container.path(SHARE).mkdir(parents=True, exist_ok=True)
    dropin("no-userns", "RestrictNamespaces=yes")
    client = await Client.connect(bus_address(container))
    try:
        with pytest.raises(DBusError) as failed:
            await client.create("nouserns", **guest_options(guest, memory=128 << 20, directory=SHARE))
    finally:
        client.close()
    assert failed.value.type == "org.vmspawnd1.Error.QemuFailed"
    assert "unshare" in failed.value.text and "Operation not permitted" in failed.value.text, failed.value.text
    [log] = re.findall(r"its log: (\S+virtiofsd-rootfs\.log)", failed.value.text)
    # /run is the container's own tmpfs: read through the leader's root.
    assert "unshare" in console(container, log).read_text()
