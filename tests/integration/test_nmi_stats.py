"""InjectNMI and DriveStats on a real QEMU: the tiny guest sees the NMI, its reads
and writes show in the counters (D-Bus and vmspawnctl).

One guest serves the whole module (booted once with a shell on its console:
the tests type the I/O they then look for in the counters).
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError

from .harness import Client, Daemon, blank_image, guest_options, image_options, qemu_pids, wait_console
from .test_console import open_console
from .test_ctl import ctl, expect_error, ok
from .test_hotplug import disk

E = "org.vmspawnd1.Error."
MACHINE_IFACE = "org.vmspawnd1.Machine"
NAME = "nmi-vm"
# What Linux prints for an NMI no handler claims (arch/x86/kernel/nmi.c).
UNKNOWN_NMI = r"NMI received for unknown reason"
PROMPT = r"/ # "
COUNTERS = {"rd_req", "rd_bytes", "wr_req", "wr_bytes", "flush", "errors"}


@dataclass
class Shell:
    client: Client
    path: str
    console: Path
    sock: socket.socket

    def mark(self) -> int:
        return len(self.console.read_text(errors="replace"))

    async def run(self, command: str, done: str) -> None:
        """Type `command; echo <done>` into the guest's shell and wait for <done> on
        the console (quoted as typed, so the echo of the typing does not match)."""
        mark = self.mark()
        self.sock.sendall(f"{command}; echo {done[0]}''{done[1:]}\r".encode())
        await wait_console(self.console, rf"^{done}\r?$", start=mark, timeout=60)

    async def stats(self, drive_id: str) -> dict[str, int]:
        (stats,) = await self.client.call("DriveStats", "s", [drive_id], path=self.path, interface=MACHINE_IFACE)
        return dict(stats)


@pytest.fixture(scope="module")
async def shell(daemon: Daemon, guest: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shell]:
    """The tiny guest booted from a kernel with a blank 4 MiB boot disk (disk0,
    /dev/vda), two spare ports and a shell on its console."""
    tmp = tmp_path_factory.mktemp("nmi")
    client = await Client.connect()
    path = await client.create(
        NAME,
        **guest_options(
            guest, cmdline=guest.cmdline + " tinyguest.shell", image=disk(tmp, "boot.raw", 4 << 20), hotplug_spares=2
        ),
    )
    console = Path(await client.prop(path, "ConsoleLog"))
    await wait_console(console, "VMSPAWN-GUEST-READY", timeout=150)
    await wait_console(console, PROMPT, timeout=60)
    sock = await open_console(client, path)
    yield Shell(client, path, console, sock)
    sock.close()
    await client.terminate_all()
    client.close()
    assert qemu_pids(str(daemon.runtime_dir)) == []


async def test_inject_nmi_is_seen_by_the_guest_through_dbus_and_vmspawnctl(shell: Shell) -> None:
    mark = shell.mark()
    await shell.client.call("InjectNMI", path=shell.path, interface=MACHINE_IFACE)
    await wait_console(shell.console, UNKNOWN_NMI, start=mark)
    mark = shell.mark()
    assert ok("nmi", NAME) == ""
    await wait_console(shell.console, UNKNOWN_NMI, start=mark)
    # The guest went on: its shell still answers.
    await shell.run("true", "AFTER-NMI")


async def test_boot_disk_stats_count_what_the_guest_read_at_boot(shell: Shell) -> None:
    stats = await shell.stats("disk0")
    assert set(stats) == COUNTERS
    # The kernel read the partition table when it found the disk.
    assert stats["rd_req"] > 0 and stats["rd_bytes"] >= 512
    assert stats["errors"] == 0
    # vmspawnctl shows the same counters (the guest does not touch the disk meanwhile).
    doc = json.loads(ok("drive-stats", NAME, "disk0", "--json"))
    assert doc == {"machine": NAME, "id": "disk0"} | stats
    table = ok("drive-stats", NAME, "disk0").splitlines()
    assert table[0].split() == ["READS", "READ-BYTES", "WRITES", "WRITTEN-BYTES", "FLUSHES", "ERRORS"]
    assert table[1].split() == [str(stats[k]) for k in ("rd_req", "rd_bytes", "wr_req", "wr_bytes", "flush", "errors")]


async def test_hotplugged_drive_stats_grow_with_the_guests_reads_writes_and_flushes(
    shell: Shell, tmp_path: Path
) -> None:
    mark = shell.mark()
    drive_id, _ = await shell.client.add_drive(shell.path, disk(tmp_path, "hot.raw", 4 << 20), serial="stats")
    added = await wait_console(shell.console, r"VMSPAWN-BLOCK-ADD (vd[a-z]+) serial=stats", start=mark)
    dev = f"/dev/{added.group(1)}"
    before = await shell.stats(drive_id)
    # 256 KiB from 2 MiB on, which the kernel's partition scan did not read.
    await shell.run(f"dd if={dev} of=/dev/null bs=4096 skip=512 count=64", "READ-DONE")
    read = await shell.stats(drive_id)
    assert read["rd_req"] > before["rd_req"]
    assert read["rd_bytes"] >= before["rd_bytes"] + (256 << 10)
    assert read["wr_req"] == before["wr_req"] and read["errors"] == 0
    # 16 KiB at 3 MiB, then fsync: the guest's flush reaches QEMU.
    await shell.run(f"dd if=/dev/zero of={dev} bs=4096 count=4 seek=768 conv=fsync", "WRITE-DONE")
    written = await shell.stats(drive_id)
    assert written["wr_req"] > read["wr_req"]
    assert written["wr_bytes"] >= read["wr_bytes"] + (16 << 10)
    assert written["flush"] > read["flush"]
    assert written["errors"] == 0
    assert (tmp_path / "hot.raw").read_bytes()[3 << 20 : (3 << 20) + (16 << 10)] == bytes(16 << 10)
    await shell.client.remove_drive(shell.path, drive_id)


async def test_drive_stats_of_an_unknown_drive_is_no_such_drive(shell: Shell) -> None:
    with pytest.raises(DBusError) as e:
        await shell.stats("nope")
    assert e.value.type == E + "NoSuchDrive" and "nope" in e.value.text
    expect_error(ctl("drive-stats", NAME, "nope"), 3, "no drive 'nope'", f"vmspawnctl status {NAME}")


async def test_nmi_and_drive_stats_need_the_right_to_manage_the_machine(shell: Shell) -> None:
    # No polkit on this bus: a caller who is neither root nor the creator is refused.
    expect_error(ctl("nmi", NAME, nobody=True), 4, "", "org.vmspawnd1.manage-machine")
    expect_error(ctl("drive-stats", NAME, "disk0", nobody=True), 4, "", "org.vmspawnd1.manage-machine")


async def test_a_stopped_machine_is_not_running_for_nmi_and_drive_stats(shell: Shell, tmp_path: Path) -> None:
    # Kept, so it stays listed once stopped; SeaBIOS idles on a blank disk.
    path = await shell.client.create("nmi-stopped", **image_options(blank_image(tmp_path, "b.raw"), keep=True))
    await shell.client.call("PowerOff", "t", [1], path=path, interface=MACHINE_IFACE)
    assert await shell.client.prop(path, "State") == "stopped"
    for method, signature, body in (("InjectNMI", "", []), ("DriveStats", "s", ["disk0"])):
        with pytest.raises(DBusError) as e:
            await shell.client.call(method, signature, body, path=path, interface=MACHINE_IFACE)
        assert e.value.type == E + "NotRunning" and "Start()" in e.value.text, method
    expect_error(ctl("nmi", "nmi-stopped"), 1, "stopped", "vmspawnctl start nmi-stopped")
    await shell.client.call("TerminateMachine", "s", ["nmi-stopped"])
