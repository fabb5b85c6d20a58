"""SnapshotDrive and SwapDrive of a running machine: real QEMU, the tiny guest writing its disk."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Variant

from .harness import Client, Site, blank_image, guest_options, image_options, wait_console
from .qmp_probe import Probe
from .test_console import open_console
from .test_ctl import ctl, expect_error, ok
from .test_hotplug import disk
from .test_image_chain import nobody_polkit  # noqa: F401
from .test_system import System, gdbus_machine, machine_options, new_image, owned_file, polkit, root, system  # noqa: F401

E = "org.vmspawnd1.Error."
MACHINE_IFACE = "org.vmspawnd1.Machine"
SIZE = 4 << 20
# Where the guest writes its markers (4 KiB blocks): before and after a swap.
BEFORE, AFTER = 16, 64


@dataclass
class Guest:
    """A booted guest with a shell on its console and one hotplugged disk."""

    client: Client
    path: str
    console: Path
    probe: Probe
    sock: socket.socket
    drive: str
    file: str
    dev: str

    async def run(self, command: str, done: str) -> None:
        """`command` typed into the guest's shell; returns once it printed `done` (written split: the echo is not it)."""
        mark = len(self.console.read_text(errors="replace"))
        self.sock.sendall(f"{command}; echo {done[:2]}''{done[2:]}-$?\r".encode())
        await wait_console(self.console, rf"^{done}-0\r?$", start=mark)

    async def write(self, text: str, block: int) -> None:
        """`text` onto the guest's disk at 4 KiB block `block`, down to the device (fsync)."""
        await self.run(
            f"printf {text} | dd of=/dev/{self.dev} bs=4096 seek={block} conv=notrunc,fsync 2>/dev/null", "WROTE"
        )

    async def call(self, method: str, signature: str, body: list[Any], fds: tuple[int, ...] = ()) -> list[Any]:
        return await self.client.call(method, signature, body, path=self.path, interface=MACHINE_IFACE, unix_fds=fds)

    async def snapshot(self, target: Path, **options: Variant) -> None:
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            await self.call("SnapshotDrive", "sha{sv}", [self.drive, 0, options], (fd,))
        finally:
            os.close(fd)

    async def swap(self, target: str, **options: Variant) -> None:
        await self.call("SwapDrive", "ssa{sv}", [self.drive, target, options])

    def leftovers(self) -> tuple[Any, ...]:
        """What QEMU holds of jobs, nodes and fdsets."""
        return self.probe("query-jobs"), self.probe("query-block-jobs"), self.probe.block_nodes(), self.probe.fdsets()


def at(path: str | Path, block: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(block * 4096)
        return f.read(length)


def held_by(pid: int, path: str) -> bool:
    """Whether process `pid` has `path` open."""
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fds / fd) == path for fd in os.listdir(fds))


async def booted(client: Client, guest: Any, tmp: Path, name: str) -> Guest:
    monitor = tmp / f"{name}.qmp"
    path = await client.create(
        name,
        **guest_options(
            guest, cmdline=guest.cmdline + " tinyguest.shell", hotplug_spares=4, qemu_extra=Probe.extra(monitor)
        ),
    )
    console = Path(await client.prop(path, "ConsoleLog"))
    await wait_console(console, "VMSPAWN-GUEST-READY", timeout=150)
    await wait_console(console, r"/ # ", timeout=60)
    sock = await open_console(client, path)
    file = disk(tmp, f"{name}.raw", SIZE)
    mark = len(console.read_text(errors="replace"))
    drive, _ = await client.add_drive(path, file, serial="jobs")
    dev = (await wait_console(console, r"VMSPAWN-BLOCK-ADD (vd[a-z]+) serial=jobs", start=mark)).group(1)
    return Guest(client, path, console, Probe(monitor), sock, drive, file, dev)


@pytest.fixture
async def vm(client: Client, guest: Any, tmp_path: Path) -> AsyncIterator[Guest]:
    g = await booted(client, guest, tmp_path, "jobs")
    yield g
    g.sock.close()


async def test_a_snapshot_holds_what_the_guest_wrote_and_the_guest_runs_on(vm: Guest, tmp_path: Path) -> None:
    await vm.write("SNAP-MARKER-1", BEFORE)
    before = vm.leftovers()
    raw = tmp_path / "snap.raw"
    await vm.snapshot(raw)
    assert raw.stat().st_size == SIZE
    assert at(raw, BEFORE, 13) == b"SNAP-MARKER-1"
    # The guest ran on, the drive is as it was, and nothing of the job is left in QEMU.
    await vm.run("true", "ALIVE")
    assert await vm.client.prop(vm.path, "State") == "running"
    assert vm.leftovers() == before
    assert at(vm.file, BEFORE, 13) == b"SNAP-MARKER-1"

    # qcow2: the caller's file is formatted anew (whatever it held) and holds the same bytes.
    qcow2 = tmp_path / "snap.qcow2"
    qcow2.write_bytes(b"junk" * 1000)
    await vm.write("SNAP-MARKER-2", BEFORE)
    await vm.snapshot(qcow2, format=Variant("s", "qcow2"))
    assert qcow2.read_bytes()[:4] == b"QFI\xfb"
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, flat], check=True, capture_output=True)
    assert flat.stat().st_size == SIZE and at(flat, BEFORE, 13) == b"SNAP-MARKER-2"
    assert vm.leftovers() == before

    # A paused machine is copied too, and stays paused.
    await vm.call("Pause", "", [])
    await vm.snapshot(tmp_path / "paused.raw")
    assert at(tmp_path / "paused.raw", BEFORE, 13) == b"SNAP-MARKER-2"
    assert await vm.client.prop(vm.path, "State") == "paused"
    await vm.call("Resume", "", [])


async def test_a_swap_moves_the_disk_under_the_guest_which_writes_to_the_new_file(vm: Guest, tmp_path: Path) -> None:
    await vm.write("OLD-CONTENT", BEFORE)
    new = disk(tmp_path, "new.raw", SIZE)
    leader = await vm.client.prop(vm.path, "Leader")
    assert held_by(leader, vm.file)
    mark = len(vm.console.read_text(errors="replace"))
    await vm.swap(new)
    # The contents came along; the guest keeps its disk (no unplug) and writes into the new file.
    assert at(new, BEFORE, 11) == b"OLD-CONTENT"
    await vm.write("AFTER-SWAP", AFTER)
    assert at(new, AFTER, 10) == b"AFTER-SWAP"
    assert at(vm.file, AFTER, 10) == b"\0" * 10
    assert "VMSPAWN-BLOCK-REMOVE" not in vm.console.read_text(errors="replace")[mark:]
    drives = {d["id"]: d for d in await vm.client.prop(vm.path, "Drives")}
    assert drives[vm.drive]["path"] == new and drives[vm.drive]["state"] == "attached"
    # QEMU let go of the old file: no fd, no node, no fdset of it.
    assert not held_by(leader, vm.file) and held_by(leader, new)
    assert vm.probe.block_nodes() & {f"{vm.drive}-node", f"{vm.drive}-snap"} == set()
    assert f"{vm.drive}-swap" in vm.probe.block_nodes()
    assert [f["fds"][0]["opaque"] for f in vm.probe.fdsets()] == [f"{vm.drive}:0:{new}"]
    assert vm.probe("query-jobs") == []

    # Back again (the drive's own node name), and a snapshot of the swapped drive has both markers.
    back = disk(tmp_path, "back.raw", SIZE)
    await vm.swap(back)
    assert vm.probe.block_nodes() >= {f"{vm.drive}-node"} and f"{vm.drive}-swap" not in vm.probe.block_nodes()
    await vm.snapshot(tmp_path / "snap.raw")
    assert (
        at(tmp_path / "snap.raw", BEFORE, 11) == b"OLD-CONTENT"
        and at(tmp_path / "snap.raw", AFTER, 10) == b"AFTER-SWAP"
    )
    assert not held_by(leader, new)

    # It unplugs like any drive, leaving nothing.
    await vm.client.remove_drive(vm.path, vm.drive)
    assert vm.probe.fdsets() == [] and vm.probe.block_nodes() == set()


async def test_a_job_past_its_timeout_is_cancelled_and_leaves_nothing(vm: Guest, tmp_path: Path) -> None:
    """1 byte/s: QEMU copies its first chunk, then waits for hours; the timeout comes first."""
    before = vm.leftovers()
    drives = await vm.client.prop(vm.path, "Drives")
    slow = {"max_bandwidth": Variant("t", 1), "timeout_usec": Variant("t", 300_000)}
    with pytest.raises(DBusError) as e:
        await vm.snapshot(tmp_path / "slow.raw", **slow)
    assert e.value.type == E + "JobTimeout" and "cancelled" in e.value.text
    assert vm.leftovers() == before
    with pytest.raises(DBusError) as e:
        await vm.swap(disk(tmp_path, "slow-new.raw", SIZE), **slow)
    assert e.value.type == E + "JobTimeout"
    assert vm.leftovers() == before
    assert await vm.client.prop(vm.path, "Drives") == drives
    # The drive is as it was: still the guest's, still in its old file.
    await vm.write("STILL-OLD", BEFORE)
    assert at(vm.file, BEFORE, 9) == b"STILL-OLD"


async def test_one_job_per_drive_and_a_busy_drive_is_not_removed(vm: Guest, tmp_path: Path) -> None:
    slow = {"max_bandwidth": Variant("t", 1), "timeout_usec": Variant("t", 5_000_000)}
    first = asyncio.ensure_future(vm.snapshot(tmp_path / "slow.raw", **slow))
    async with asyncio.timeout(5):
        while vm.probe("query-block-jobs") == []:
            await asyncio.sleep(0.05)
    for call in (
        vm.snapshot(tmp_path / "second.raw"),
        vm.swap(disk(tmp_path, "new.raw", SIZE)),
        vm.client.remove_drive(vm.path, vm.drive),
    ):
        with pytest.raises(DBusError) as e:
            await call
        assert e.value.type == E + "JobInProgress" and "SnapshotDrive of drive" in e.value.text
    # Other requests to the machine are not held up by the copy.
    await vm.call("Pause", "", [])
    await vm.call("Resume", "", [])
    with pytest.raises(DBusError) as e:
        await first
    assert e.value.type == E + "JobTimeout"
    await vm.snapshot(tmp_path / "second.raw")


@pytest.mark.parametrize(
    ("method", "target", "options", "error", "words"),
    [
        ("SnapshotDrive", "nope", {}, "NoSuchDrive", "no drive 'nope'"),
        ("SwapDrive", "nope", {}, "NoSuchDrive", "no drive 'nope'"),
        ("SnapshotDrive", "drive", {"format": Variant("s", "vmdk")}, "InvalidArgument", "unknown format"),
        ("SnapshotDrive", "drive", {"speed": Variant("t", 1)}, "InvalidArgument", "unknown SnapshotDrive option"),
        ("SnapshotDrive", "drive", {"timeout_usec": Variant("t", 0)}, "InvalidArgument", "out of range"),
        ("SnapshotDrive", "read-only fd", {}, "InvalidArgument", "O_RDWR"),
        ("SwapDrive", "drive", {"format": Variant("s", "qcow2")}, "InvalidArgument", "not a qcow2 image"),
        ("SwapDrive", "missing", {}, "InvalidArgument", "does not exist"),
        ("SwapDrive", "relative", {}, "InvalidArgument", "absolute path"),
        ("SwapDrive", "cdrom", {}, "InvalidArgument", "cdrom"),
        ("SnapshotDrive", "cdrom", {}, "InvalidArgument", "cdrom"),
        ("SwapDrive", "read-only drive", {}, "InvalidArgument", "read-only"),
        ("SwapDrive", "smaller", {}, "JobFailed", "QEMU refused SwapDrive"),
    ],
)
async def test_bad_requests_are_refused_and_change_nothing(
    vm: Guest, tmp_path: Path, method: str, target: str, options: dict[str, Variant], error: str, words: str
) -> None:
    cdrom, _ = await vm.client.add_drive(
        vm.path, disk(tmp_path, "cd.iso"), disk_type="virtio-scsi-cdrom", read_only=True
    )
    ro, _ = await vm.client.add_drive(vm.path, disk(tmp_path, "ro.raw"), read_only=True)
    ids = {"nope": "nope", "cdrom": cdrom, "read-only drive": ro}
    files = {"missing": str(tmp_path / "missing.raw"), "relative": "new.raw", "smaller": disk(tmp_path, "s.raw", 4096)}
    before = vm.leftovers(), await vm.client.prop(vm.path, "Drives")
    drive_id = ids.get(target, vm.drive)
    with pytest.raises(DBusError) as e:
        if method == "SwapDrive":
            await vm.call(
                "SwapDrive", "ssa{sv}", [drive_id, files.get(target, disk(tmp_path, "new.raw", SIZE)), options]
            )
        else:
            out = tmp_path / "out.raw"
            out.touch()
            fd = os.open(out, (os.O_RDONLY if target == "read-only fd" else os.O_RDWR) | os.O_CLOEXEC)
            try:
                await vm.call("SnapshotDrive", "sha{sv}", [drive_id, 0, options], (fd,))
            finally:
                os.close(fd)
    assert e.value.type == E + error and words in e.value.text, e.value.text
    assert (vm.leftovers(), await vm.client.prop(vm.path, "Drives")) == before


async def test_after_a_swap_a_restarted_daemon_reattaches_the_drive_on_its_new_file(
    site: Site, guest: Any, tmp_path: Path
) -> None:
    client = await site.client()
    vm = await booted(client, guest, tmp_path, "swaprestart")
    await vm.write("BEFORE-SWAP", BEFORE)
    new = disk(tmp_path, "new.raw", SIZE)
    await vm.swap(new)
    vm.sock.close()
    site.daemon.stop(signal.SIGKILL)
    site.daemon.start()
    client.close()
    vm.client = client = await site.client()
    drives = {d["id"]: d for d in await client.prop(vm.path, "Drives")}
    assert drives[vm.drive]["path"] == new
    vm.sock = await open_console(client, vm.path)
    await vm.write("AFTER-RESTART", AFTER)
    assert at(new, AFTER, 13) == b"AFTER-RESTART" and at(vm.file, AFTER, 13) == b"\0" * 13
    # The restarted daemon knows the drive's node and fdsets: the unplug leaves nothing.
    await client.remove_drive(vm.path, vm.drive)
    assert vm.probe.fdsets() == [] and vm.probe.block_nodes() == set()
    vm.sock.close()
    await client.terminate_all()
    client.close()


async def test_nobody_cannot_swap_to_a_file_it_may_not_open(
    nobody_polkit: System,  # noqa: F811
    root: Client,  # noqa: F811
    tmp_path: Path,
) -> None:
    """polkit lets nobody manage the machine; the new file is still opened with nobody's rights."""
    system = nobody_polkit  # noqa: F811
    probe = Probe(tmp_path / "probe.qmp")
    path = await root.create(
        "swapconf", **(machine_options(new_image(system)) | {"qemu_extra": Probe.extra(probe.path)})
    )
    drive, _ = await root.add_drive(path, owned_file(system, "nobody"))
    before = probe("query-jobs"), probe.block_nodes(), probe.fdsets(), await root.prop(path, "Drives")
    secret = owned_file(system, "root")
    # As AddDrive: the file itself, missing or not nobody's to open, looks the same ...
    result = await gdbus_machine(system, "nobody", path, "SwapDrive", drive, secret, "@a{sv} {}")
    assert (
        result.error == E + "InvalidArgument"
        and f"'{secret}' as uid 65534: it does not exist or uid 65534 may not open it" in result.err
    ), result
    # ... and a layer its header names that nobody may not open is AccessDenied, naming it.
    chained = Path(owned_file(system, "nobody"))
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", secret, "-F", "raw", chained, "1M"], check=True
    )
    result = await gdbus_machine(
        system, "nobody", path, "SwapDrive", drive, str(chained), "@a{sv} {'format': <'qcow2'>}"
    )
    assert result.error == E + "AccessDenied" and f"may not open {secret!r}, the backing file" in result.err, result
    assert (probe("query-jobs"), probe.block_nodes(), probe.fdsets(), await root.prop(path, "Drives")) == before
    # A file of nobody's own is fine.
    mine = owned_file(system, "nobody")
    result = await gdbus_machine(system, "nobody", path, "SwapDrive", drive, mine, "@a{sv} {}")
    assert result.code == 0, result
    assert {d["id"]: d["path"] for d in await root.prop(path, "Drives")}[drive] == mine


async def test_vmspawnctl_snapshot_drive_and_swap_drive(vm: Guest, tmp_path: Path) -> None:
    await vm.write("CTL-MARKER", BEFORE)
    target = tmp_path / "ctl-snap.raw"
    out = json.loads(ok("snapshot-drive", "jobs", vm.drive, str(target), "--json"))
    assert out == {"machine": "jobs", "id": vm.drive, "target": str(target)}
    assert at(target, BEFORE, 10) == b"CTL-MARKER"
    new = disk(tmp_path, "ctl-new.raw", SIZE)
    assert json.loads(ok("swap-drive", "jobs", vm.drive, new, "--json"))["path"] == new
    assert {d["id"]: d["path"] for d in await vm.client.prop(vm.path, "Drives")}[vm.drive] == new
    # The daemon's refusals, with their exit statuses.
    expect_error(
        ctl("swap-drive", "jobs", vm.drive, disk(tmp_path, "x.raw", SIZE), "--format", "qcow2"),
        2, "not a qcow2 image", "",
    )  # fmt: skip
    expect_error(ctl("snapshot-drive", "jobs", "nope", str(target)), 3, "no drive 'nope'", "status")


async def test_a_kept_machine_boots_again_from_the_files_its_drives_were_swapped_to(
    client: Client, tmp_path: Path
) -> None:
    """A boot drive (SwapDrive) and a hotplugged one (SwapDriveFd): the next Start opens the new files."""
    image = blank_image(tmp_path, "root.raw")
    path = await client.create("swapkept", **image_options(image, keep=True))
    hot, _ = await client.add_drive(path, disk(tmp_path, "hot.raw", SIZE))
    # A raw file larger than the drive takes it too.
    moved = {
        "disk0": disk(tmp_path, "root-new.raw", os.stat(image).st_size),
        hot: disk(tmp_path, "hot-new.raw", 2 * SIZE),
    }
    await client.call("SwapDrive", "ssa{sv}", ["disk0", moved["disk0"], {}], path=path, interface=MACHINE_IFACE)
    fd = os.open(moved[hot], os.O_RDWR | os.O_CLOEXEC)
    try:
        await client.call("SwapDriveFd", "sha{sv}", [hot, 0, {}], path=path, interface=MACHINE_IFACE, unix_fds=[fd])
    finally:
        os.close(fd)
    leader = await client.prop(path, "Leader")
    # The boot drive's own file left QEMU too (its fdset of the command line).
    assert not held_by(leader, str(tmp_path / "root.raw")) and not held_by(leader, str(tmp_path / "hot.raw"))
    await client.call("PowerOff", "t", [1_000_000], path=path, interface=MACHINE_IFACE)
    assert await client.prop(path, "State") == "stopped"
    await client.call("Start", path=path, interface=MACHINE_IFACE)
    assert {d["id"]: d["path"] for d in await client.prop(path, "Drives")} == moved
    leader = await client.prop(path, "Leader")
    assert all(held_by(leader, f) for f in moved.values())
    assert not held_by(leader, str(tmp_path / "root.raw")) and not held_by(leader, str(tmp_path / "hot.raw"))
