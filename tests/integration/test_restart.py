"""Never lose a VM: daemon restarts and crashes, QEMU crashes, power-off.

Each test runs its own bus and daemon: they kill the daemon on purpose.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Message, Variant

from .harness import (
    ROOT,
    Client,
    Site,
    blank_image,
    guest_options,
    image_options,
    qemu_pids,
    qemu_uid,
    record_states,
    running,
    shared_dir,
    virtiofsd_pids,
    wait_console,
)
from .qmp_probe import Probe

sys.path.insert(0, str(ROOT / "tools"))

MACHINE = "org.vmspawnd1.Machine"
E = "org.vmspawnd1.Error."


@pytest.fixture
def client(site_client: Client) -> Client:
    """The client of the test's own daemon (conftest's `client` talks to the session's)."""
    return site_client


def disk(directory: Path, name: str) -> str:
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return str(path)


async def snapshot(client: Client) -> dict[str, dict[str, Any]]:
    """Every machine's properties, as a client sees them."""
    out = {}
    for name in await client.names():
        (path,) = await client.call("GetMachine", "s", [name])
        (props,) = await client.call("GetAll", "s", [MACHINE], path=path, interface="org.freedesktop.DBus.Properties")
        out[path] = {k: v.value for k, v in props.items()}
    return out


async def boot(client: Client, guest: Any, site: Site, name: str, **extra: Any) -> str:
    path = await client.create(name, **guest_options(guest, **extra))
    await wait_console(await client.prop(path, "ConsoleLog"), "VMSPAWN-GUEST-READY", timeout=90)
    return path


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_restart_takes_every_machine_back(site: Site, client: Client, guest: Any, sig: signal.Signals) -> None:
    paths = await asyncio.gather(*(boot(client, guest, site, f"vm{i}", hotplug_spares=4) for i in range(3)))
    busy = paths[0]
    await client.add_drive(busy, disk(site.dir, "n.raw"), disk_type="nvme", serial="keepnvme")
    await client.add_drive(busy, disk(site.dir, "s.raw"), disk_type="virtio-scsi", serial="keepscsi")
    await client.add_drive(busy, disk(site.dir, "b.raw"), serial="keepblk")
    before = await snapshot(client)
    pids = qemu_pids(str(site.daemon.runtime_dir))
    assert len(pids) == 3

    site.daemon.stop(sig)
    assert sorted(qemu_pids(str(site.daemon.runtime_dir))) == sorted(pids), "QEMU must outlive the daemon"
    site.daemon.start()
    assert b"STATUS=3 machines running" in site.daemon.notifications[0]
    client.close()
    client = await site.client()
    assert await snapshot(client) == before

    # And it still works: the guest sees a further hotplug and unplug.
    console = Path(await client.prop(busy, "ConsoleLog"))
    mark = len(console.read_text())
    drive_id, _port = await client.add_drive(busy, disk(site.dir, "after.raw"), serial="afterrestart")
    added = await wait_console(console, r"VMSPAWN-BLOCK-ADD (\S+) serial=afterrestart", start=mark)
    await client.remove_drive(busy, drive_id)
    await wait_console(console, rf"VMSPAWN-BLOCK-REMOVE {added.group(1)}", start=mark)
    for drive_id in ("disk0", "disk1", "disk2"):  # the drives from before the restart
        await client.remove_drive(busy, drive_id)
    assert await client.prop(busy, "Drives") == []
    await client.terminate_all()
    client.close()


async def test_a_hotplugged_share_survives_a_restart_with_its_virtiofsd_adopted(
    site: Site, client: Client, guest: Any
) -> None:
    """Shares, ports and the virtiofsd come back from QEMU and state.json; RemoveShare then stops
    the adopted virtiofsd, and a share added after the restart gets a fresh id."""
    with shared_dir("vmspawnd-share-", 0o755) as directory:
        (directory / "hello").write_text("before the restart\n")
        options = guest_options(guest, hotplug_spares=3)
        options["cmdline"] += " tinyguest.hotmount=hot tinyguest.hotmount=later"
        path = await client.create("sharerestart", **options)
        console = Path(await client.prop(path, "ConsoleLog"))
        await wait_console(console, "VMSPAWN-GUEST-READY", timeout=90)
        share_id, _port = await client.add_share(path, str(directory), tag="hot")
        await wait_console(console, "VMSPAWN-SHARE-MOUNT hot hello=before the restart")
        assert site.daemon.proc is not None
        [virtiofsd] = virtiofsd_pids(site.daemon.proc.pid)
        before = await snapshot(client)

        site.daemon.stop(signal.SIGKILL)
        assert running(virtiofsd), "virtiofsd must outlive the daemon"
        site.daemon.start()
        client.close()
        client = await site.client()
        assert await snapshot(client) == before
        assert f"share {share_id}: its virtiofsd" not in site.daemon.log.read_text()

        later_id, _ = await client.add_share(path, str(directory), tag="later")
        assert later_id not in (share_id, "")
        await client.remove_share(path, share_id)
        assert not running(virtiofsd), site.daemon.log.read_text()[-3000:]
        await client.remove_share(path, later_id)
        assert await client.prop(path, "Shares") == []
        assert await client.prop(path, "FreeSparePorts") == 3
        await client.terminate_all()


async def test_a_restart_rebuilds_hotplugged_nics_from_qemu(site: Site, client: Client, guest: Any) -> None:
    path = await boot(client, guest, site, "nics", hotplug_spares=3)
    console = Path(await client.prop(path, "ConsoleLog"))
    mark = len(console.read_text())
    user = {"id": Variant("s", "up"), "mac": Variant("s", "02:00:00:00:00:aa")}
    await client.call("AddNetwork", "a{sv}", [user], path=path, interface=MACHINE)
    await client.add_drive(path, disk(site.dir, "d.raw"), serial="nicdrive")
    added = await wait_console(console, r"VMSPAWN-NET-ADD (\S+) mac=02:00:00:00:00:aa", start=mark)
    before = await snapshot(client)
    assert [n["id"].value for n in before[path]["Networks"]] == ["up"]

    site.daemon.stop(signal.SIGKILL)
    site.daemon.start()
    client.close()
    client = await site.client()
    assert await snapshot(client) == before
    # The NIC from before the restart unplugs as any: the guest sees it go, its port is free.
    free = await client.prop(path, "FreeSparePorts")
    mark = len(console.read_text())
    await client.call("RemoveNetwork", "s", ["up"], path=path, interface=MACHINE)
    await wait_console(console, rf"VMSPAWN-NET-REMOVE {added.group(1)} mac=02:00:00:00:00:aa", start=mark)
    assert await client.prop(path, "Networks") == []
    assert await client.prop(path, "FreeSparePorts") == free + 1
    await client.terminate_all()
    client.close()


async def test_qemu_identities_survive_a_restart_and_are_free_again_once_a_machine_ends(
    site: Site, client: Client
) -> None:
    # A range of 3: machines that survive a restart must keep theirs taken.
    base = 0x7B000000 + os.getpid() % 1000 * 8
    config = site.dir / "vmspawnd.conf"
    config.write_text(f"[identity]\nuid_base = {base}\nuid_count = 3\n")
    site.daemon.stop()
    site.daemon.start("--config", str(config))
    client.close()
    client = await site.client()
    a, b = [await client.create(n, **image_options(blank_image(site.dir, f"{n}.raw"))) for n in ("ida", "idb")]
    leaders = [await client.prop(p, "Leader") for p in (a, b)]
    uids = [qemu_uid(pid) for pid in leaders]
    assert sorted(uids) == [base, base + 1]

    site.daemon.stop(signal.SIGKILL)
    site.daemon.start("--config", str(config))
    client.close()
    client = await site.client()
    assert [qemu_uid(await client.prop(p, "Leader")) for p in (a, b)] == uids
    c = await client.create("idc", **image_options(blank_image(site.dir, "idc.raw")))
    assert qemu_uid(await client.prop(c, "Leader")) == base + 2
    with pytest.raises(DBusError) as e:
        await client.create("idd", **image_options(blank_image(site.dir, "idd.raw")))
    assert e.value.type == E + "NoSpace" and "all 3 QEMU identities" in e.value.text
    # A machine that ends gives its identity back.
    await client.call("TerminateMachine", "s", ["ida"])
    d = await client.create("idd", **image_options(blank_image(site.dir, "idd.raw")))
    assert qemu_uid(await client.prop(d, "Leader")) == uids[0]
    await client.terminate_all()
    client.close()


async def test_a_crash_between_blockdev_add_and_device_add_is_reconciled(
    site: Site, client: Client, guest: Any
) -> None:
    site.daemon.stop()
    site.daemon.start(env={"VMSPAWND_TEST_FAULT": "after-blockdev-add"})
    client.close()
    client = await site.client()
    monitor = site.dir / "probe.qmp"
    path = await client.create("crashy", **guest_options(guest, hotplug_spares=2, qemu_extra=Probe.extra(monitor)))
    probe = Probe(monitor)
    with pytest.raises(DBusError):
        await client.add_drive(path, disk(site.dir, "half.raw"))
    assert site.daemon.proc is not None and site.daemon.proc.wait(10) == -signal.SIGKILL
    site.daemon.proc = None
    assert "disk0-node" in probe.block_nodes()
    assert len(probe.fdsets()) == 1

    site.daemon.start()
    client.close()
    client = await site.client()
    assert "disk0-node" not in probe.block_nodes()
    assert probe.fdsets() == []
    assert await client.prop(path, "FreeSparePorts") == 2
    assert await client.add_drive(path, disk(site.dir, "whole.raw")) == ("disk0", "rp0")
    assert "orphan block node disk0-node" in site.daemon.log.read_text()
    await client.terminate_all()
    client.close()


async def test_a_killed_qemu_is_noticed_and_cleaned_up(site: Site, client: Client, guest: Any) -> None:
    victim = await client.create("victim", **guest_options(guest))
    other = await client.create("other", **guest_options(guest))
    changes: list[tuple[str, Any]] = []
    removed = asyncio.get_running_loop().create_future()

    def watch(msg: Message) -> None:
        if msg.member == "PropertiesChanged" and msg.path == victim and "State" in msg.body[1]:
            changes.append(("State", msg.body[1]["State"].value))
        if msg.member == "MachineRemoved" and msg.body[0] == "victim" and not removed.done():
            removed.set_result(msg.body)

    await client.subscribe("org.freedesktop.DBus.Properties")
    await client.subscribe("org.vmspawnd1.Manager")
    client.bus.add_message_handler(watch)
    pid = await client.prop(victim, "Leader")
    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(10):
        assert await removed == ["victim", victim]
    assert changes == [("State", "failed")]
    directory = site.daemon.runtime_dir / "machines" / "victim"
    assert sorted(p.name for p in directory.iterdir()) == ["console.log", "qemu.log"]
    assert "victim: QEMU exited unexpectedly" in site.daemon.log.read_text()
    assert await client.names() == ["other"]
    assert await client.prop(other, "State") == "running"
    await client.terminate_all()
    client.close()


async def test_power_off_via_acpi(site: Site, client: Client, guest: Any) -> None:
    path = await boot(client, guest, site, "acpi")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.call("PowerOff", "t", [20_000_000], path=path, interface=MACHINE)
    # Well inside the 20 s: the guest powered itself off, nothing was escalated.
    assert loop.time() - started < 20
    assert await client.names() == []
    assert "ignored the ACPI power button" not in site.daemon.log.read_text()
    assert qemu_pids(str(site.daemon.runtime_dir)) == []
    client.close()


async def test_a_reattached_machine_powered_off_is_stopped_and_keeps_its_console(
    site: Site, client: Client, guest: Any
) -> None:
    """Finding 11: a re-attached QEMU is not the daemon's child, so its exit
    status is unknown: a clean power-off was 'QEMU exited unexpectedly (None)',
    State failed, and the console log the user may want was gone."""
    path = await boot(client, guest, site, "again")
    client.close()
    site.daemon.stop()
    site.daemon.start()
    client = await site.client()
    states = await record_states(client, path)
    await client.call("PowerOff", "t", [20_000_000], path=path, interface=MACHINE)
    assert await client.names() == []
    assert states == ["stopped"]
    assert "exited unexpectedly" not in site.daemon.log.read_text()
    directory = site.daemon.runtime_dir / "machines" / "again"
    assert sorted(p.name for p in directory.iterdir()) == ["console.log", "qemu.log"]
    assert "VMSPAWN-GUEST-READY" in (directory / "console.log").read_text(errors="replace")
    client.close()


async def test_power_off_escalates_when_the_guest_ignores_acpi(site: Site, client: Client, guest: Any) -> None:
    """-S: the CPUs never run, so nobody answers the power button."""
    path = await client.create("deaf", **guest_options(guest, qemu_extra=["-S"]))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.call("PowerOff", "t", [1_000_000], path=path, interface=MACHINE)
    assert loop.time() - started < 1 + 5 + 5
    assert await client.names() == []
    assert "deaf ignored the ACPI power button" in site.daemon.log.read_text()
    assert qemu_pids(str(site.daemon.runtime_dir)) == []
    client.close()


async def test_stop_machines_on_exit(site: Site, client: Client, guest: Any) -> None:
    site.daemon.stop()
    site.daemon.start("--stop-machines-on-exit", "--stop-timeout", "2")
    client.close()
    client = await site.client()
    await client.create("ephemeral", **guest_options(guest, qemu_extra=["-S"]))
    client.close()
    assert len(qemu_pids(str(site.daemon.runtime_dir))) == 1
    site.daemon.stop()
    assert qemu_pids(str(site.daemon.runtime_dir)) == []
    assert not re.search(r"state\.json", " ".join(str(p) for p in site.daemon.runtime_dir.rglob("*")))
