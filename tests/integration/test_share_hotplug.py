"""virtiofs share hotplug (issue 15): AddShare/RemoveShare on the spare ports, seen by the tiny guest."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Message, Variant

from .harness import Client, Daemon, busctl, guest_options, running, shared_dir, virtiofsd_pids, wait_console
from .qmp_probe import Probe
from .test_hotplug import wait_for

E = "org.vmspawnd1.Error."
MACHINE_IFACE = "org.vmspawnd1.Machine"
TAG = "hot"


@pytest.fixture
def hostdir() -> Iterator[Path]:
    # virtiofsd of root's share runs as nobody: the directory must be nobody's to read.
    with shared_dir("vmspawnd-share-", 0o755) as path:
        yield path


async def boot(client: Client, guest: Any, name: str, spares: int = 2) -> tuple[str, Path]:
    options = guest_options(guest, hotplug_spares=spares)
    options["cmdline"] += f" tinyguest.hotmount={TAG}"
    path = await client.create(name, **options)
    console = Path(await client.prop(path, "ConsoleLog"))
    await wait_console(console, "VMSPAWN-GUEST-READY", timeout=60)
    return path, console


def console_len(console: Path) -> int:
    return len(console.read_text(errors="replace"))


def busctl_add_share(path: str, directory: Path, tag: str) -> tuple[str, str]:
    out = busctl("call", "org.vmspawnd1", path, MACHINE_IFACE, "AddShare", "sa{sv}",
                 str(directory), "1", "tag", "s", tag).stdout  # fmt: skip
    m = re.fullmatch(r'ss "(\S+)" "(\S+)"\n', out)
    assert m, out
    return m.group(1), m.group(2)


async def test_a_busctl_share_is_mounted_by_the_guest_and_removal_after_unmount_frees_the_port(
    client: Client, guest: Any, hostdir: Path
) -> None:
    path, console = await boot(client, guest, "sharehp")
    before = await client.prop(path, "FreeSparePorts")
    heard: list[tuple[str, Any]] = []

    def on_signal(msg: Message) -> None:
        if msg.path == path and msg.member in ("ShareAdded", "ShareRemoved"):
            heard.append((msg.member, msg.body))
        elif msg.path == path and msg.member == "PropertiesChanged" and "Shares" in msg.body[1]:
            heard.append(("Shares", [s["state"].value for s in msg.body[1]["Shares"].value]))

    await client.subscribe(MACHINE_IFACE)
    await client.subscribe("org.freedesktop.DBus.Properties")
    client.bus.add_message_handler(on_signal)
    written = f"written on the host {os.urandom(4).hex()}"
    (hostdir / "hello").write_text(written + "\n")
    mark = console_len(console)
    share_id, port = busctl_add_share(path, hostdir, TAG)
    assert port == "rp0"
    await wait_console(console, rf"VMSPAWN-SHARE-MOUNT {TAG} hello={written}\r?\n", start=mark)
    [entry] = await client.prop(path, "Shares")
    assert entry == {"id": share_id, "tag": TAG, "directory": str(hostdir), "port": port, "read_only": False,
                     "state": "attached"}  # fmt: skip
    assert await client.prop(path, "FreeSparePorts") == before - 1
    ports = {p["id"]: p["device"] for p in await client.prop(path, "Ports")}
    assert ports[port] == share_id

    mark = console_len(console)
    (hostdir / "unmount").touch()
    await wait_console(console, rf"VMSPAWN-SHARE-UMOUNT {TAG}", start=mark)
    busctl("call", "org.vmspawnd1", path, MACHINE_IFACE, "RemoveShare", "s", share_id)
    assert await client.prop(path, "Shares") == []
    assert await client.prop(path, "FreeSparePorts") == before

    async def heard_count() -> int:
        return len(heard)

    # Signals may trail the replies on the client's own connection.
    await wait_for(heard_count, 5)
    assert heard == [
        ("Shares", ["attached"]), ("ShareAdded", [share_id, port]),
        ("Shares", ["removing"]), ("ShareRemoved", [share_id]), ("Shares", []),
    ]  # fmt: skip


def virtiofsd_children(daemon: Daemon) -> list[int]:
    assert daemon.proc is not None
    return virtiofsd_pids(daemon.proc.pid)


def chardevs(probe: Probe) -> set[str]:
    return {c["label"] for c in probe("query-chardev")}


async def test_a_share_the_guest_cannot_answer_for_times_out_stays_removing_and_goes_with_the_late_event(
    client: Client, guest: Any, hostdir: Path, daemon: Daemon
) -> None:
    """A paused guest cannot let go: UnplugTimeout, the share stays `removing` on its port; once
    the guest runs again it lets go, and the late DEVICE_DELETED frees the port, the chardev and virtiofsd."""
    path, console = await boot(client, guest, "sharelate")
    before = await client.prop(path, "FreeSparePorts")
    mark = console_len(console)
    share_id, _port = await client.add_share(path, str(hostdir), tag=TAG)
    await wait_console(console, rf"VMSPAWN-SHARE-MOUNT {TAG} hello=", start=mark)
    [virtiofsd] = virtiofsd_children(daemon)
    await client.call("Pause", path=path, interface=MACHINE_IFACE)
    with pytest.raises(DBusError) as e:
        await client.remove_share(path, share_id, timeout_usec=1_000_000)
    assert e.value.type == E + "UnplugTimeout", e.value.text
    [entry] = await client.prop(path, "Shares")
    assert entry["state"] == "removing"
    assert await client.prop(path, "FreeSparePorts") == before - 1
    with pytest.raises(DBusError) as e:
        await client.remove_share(path, share_id)
    assert e.value.type == E + "UnplugInProgress"
    await client.call("Resume", path=path, interface=MACHINE_IFACE)
    # The guest handles the unplug request queued while it was paused once it runs again; under
    # TCG on a loaded host (load 11 seen) that took longer than wait_for's default 10 s once.
    await wait_for(lambda: client.prop(path, "Shares"), [], timeout=60)
    assert await client.prop(path, "FreeSparePorts") == before
    assert virtiofsd_children(daemon) == []
    assert not running(virtiofsd)


async def test_linux_lets_go_of_a_mounted_share(client: Client, guest: Any, hostdir: Path, daemon: Daemon) -> None:
    """A guest cannot refuse a PCIe unplug: Linux 6.1 removes a virtio-fs device even while it is
    mounted, so RemoveShare of a mounted share completes (no UnplugTimeout) and frees everything."""
    path, console = await boot(client, guest, "sharemounted")
    before = await client.prop(path, "FreeSparePorts")
    mark = console_len(console)
    share_id, _port = await client.add_share(path, str(hostdir), tag=TAG)
    await wait_console(console, rf"VMSPAWN-SHARE-MOUNT {TAG} hello=", start=mark)
    await client.remove_share(path, share_id)
    assert await client.prop(path, "Shares") == []
    assert await client.prop(path, "FreeSparePorts") == before
    assert virtiofsd_children(daemon) == []


async def test_drives_and_shares_draw_from_one_port_table_and_a_refused_share_leaves_nothing(
    client: Client, guest: Any, hostdir: Path, daemon: Daemon, tmp_path: Path
) -> None:
    monitor = tmp_path / "probe.qmp"
    # -S: QEMU plugs while the vCPUs stand still, and no guest costs CPU time.
    options = guest_options(guest, hotplug_spares=3, qemu_extra=[*Probe.extra(monitor), "-S"])
    path = await client.create("shareports", **options)
    probe = Probe(monitor)
    idle_chardevs = chardevs(probe)
    share_id, share_port = await client.add_share(path, str(hostdir), tag=TAG)
    assert share_port == "rp0"

    # Each bad request is refused with a typed error and leaves no port, virtiofsd or chardev.
    outside = tmp_path / "not-a-dir"
    outside.write_text("x")
    bad: list[tuple[str, dict[str, Any], str]] = [
        (str(outside), {"tag": "x"}, "InvalidArgument"),
        ("/nonexistent", {"tag": "x"}, "InvalidArgument"),
        ("relative", {"tag": "x"}, "InvalidArgument"),
        (str(hostdir), {}, "InvalidArgument"),
        (str(hostdir), {"tag": "has space"}, "InvalidArgument"),
        (str(hostdir), {"tag": TAG}, "InvalidArgument"),
        (str(hostdir), {"tag": "x", "read_only": True}, "InvalidArgument"),
        (str(hostdir), {"tag": "x", "id": share_id}, "InvalidArgument"),
        (str(hostdir), {"tag": "x", "id": "fs0"}, "InvalidArgument"),
        (str(hostdir), {"tag": "x", "id": "0bad"}, "InvalidArgument"),
    ]
    for directory, opts, error in bad:
        with pytest.raises(DBusError) as e:
            await client.add_share(path, directory, **opts)
        assert e.value.type == E + error, (directory, opts, e.value.text)
        assert await client.prop(path, "FreeSparePorts") == 2
        assert len(virtiofsd_children(daemon)) == 1
        assert chardevs(probe) == idle_chardevs | {f"{share_id}-vfs"}
    # root's share is nobody's in the guest: nobody cannot enter a 0700 directory of root's, and
    # virtiofsd says so; QEMU's device_add fails and everything is rolled back.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(DBusError) as e:
        await client.add_share(path, str(private), tag="private")
    assert e.value.type == E + "QemuFailed", e.value.text
    assert "Permission denied" in e.value.text
    assert await client.prop(path, "FreeSparePorts") == 2
    assert len(virtiofsd_children(daemon)) == 1
    assert chardevs(probe) == idle_chardevs | {f"{share_id}-vfs"}
    assert [s["id"] for s in await client.prop(path, "Shares")] == [share_id]
    with pytest.raises(DBusError) as e:
        await client.remove_share(path, "nosuch")
    assert e.value.type == E + "NoSuchShare"

    image = tmp_path / "d.raw"
    image.write_bytes(b"\0" * (1 << 20))
    drive_id, drive_port = await client.add_drive(path, str(image))
    assert drive_port == "rp1"
    nic_id, nic_port = await client.call(
        "AddNetwork", "a{sv}", [{"network": Variant("s", "user")}], path=path, interface=MACHINE_IFACE
    )
    assert nic_port == "rp2"
    ports = {p["id"]: p["device"] for p in await client.prop(path, "Ports")}
    assert (ports["rp0"], ports["rp1"], ports["rp2"]) == (share_id, drive_id, nic_id)
    # One table for every kind: full for a share, a drive and a NIC alike.
    with pytest.raises(DBusError) as e:
        await client.add_share(path, str(hostdir), tag="another")
    assert e.value.type == E + "NoFreePort", e.value.text
    assert f"rp0={share_id}" in e.value.text and f"rp1={drive_id}" in e.value.text and f"rp2={nic_id}" in e.value.text
    with pytest.raises(DBusError) as e:
        await client.add_drive(path, str(image))
    assert e.value.type == E + "NoFreePort", e.value.text
    assert len(virtiofsd_children(daemon)) == 1
    assert chardevs(probe) == idle_chardevs | {f"{share_id}-vfs"}


async def test_a_virtiofsd_that_dies_is_reported_and_remove_share_still_cleans_up(
    client: Client, guest: Any, hostdir: Path, daemon: Daemon, tmp_path: Path
) -> None:
    monitor = tmp_path / "probe.qmp"
    path = await client.create("sharekill", **guest_options(guest, hotplug_spares=1, qemu_extra=Probe.extra(monitor)))
    console = Path(await client.prop(path, "ConsoleLog"))
    await wait_console(console, "VMSPAWN-GUEST-READY", timeout=60)
    probe = Probe(monitor)
    idle = chardevs(probe)
    share_id, _port = await client.add_share(path, str(hostdir), tag=TAG)
    [virtiofsd] = virtiofsd_children(daemon)
    os.kill(virtiofsd, signal.SIGKILL)
    said = f"virtiofsd of share {share_id} (tag '{TAG}') exited (status -9)"
    await wait_for(lambda: asyncio.to_thread(lambda: said in daemon.log.read_text()), True)
    await client.remove_share(path, share_id)
    assert await client.prop(path, "Shares") == []
    assert await client.prop(path, "FreeSparePorts") == 1
    assert chardevs(probe) == idle
