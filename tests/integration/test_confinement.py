"""QEMU runs confined: its own unprivileged identity, no capabilities, a
seccomp sandbox; the runtime files are private."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmspawnd import process

from .harness import Client, Daemon, blank_image, guest_options, image_options, qemu_status, shared_dir, wait_console
from .qmp_probe import Probe

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory anyone may write to: a QEMU allowed to run commands could create files here."""
    with shared_dir("vmspawnd-confine-", 0o777) as path:
        yield path


async def test_each_qemu_runs_as_its_own_unprivileged_identity(
    client: Client, daemon: Daemon, guest: Any, tmp_path: Path
) -> None:
    # One direct kernel boot (kernel and initrd as sealed memfds), one image boot (an fdset).
    paths = await asyncio.gather(
        client.create("conf-a", **guest_options(guest)),
        client.create("conf-b", **image_options(blank_image(tmp_path, "b.raw"))),
    )
    uids = []
    for name, path in zip(("conf-a", "conf-b"), paths, strict=True):
        leader = await client.prop(path, "Leader")
        st = qemu_status(leader)
        uid = int(st["Uid"].split()[0])
        assert uid != 0 and st["Uid"].split() == [str(uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(uid)] * 4, st["Gid"]
        assert st["CapEff"] == st["CapPrm"] == st["CapInh"] == st["CapAmb"] == "0000000000000000"
        assert st["CapBnd"] == "0000000000000000"
        assert st["NoNewPrivs"] == "1"
        assert st["Seccomp"] == "2"
        record = json.loads((daemon.runtime_dir / "machines" / name / "state.json").read_text())
        assert (record["qemu_uid"], record["qemu_gid"]) == (uid, uid)
        uids.append(uid)
    assert uids[0] != uids[1]
    argv = (daemon.runtime_dir / "machines" / "conf-a" / "argv").read_text().splitlines()
    assert "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny" in argv
    # The guest booted from what the daemon handed over.
    assert await client.prop(paths[0], "State") == "running"


async def test_a_kernel_only_root_may_read_boots_and_reboots_from_sealed_copies(
    client: Client, guest: Any, tmp_path: Path
) -> None:
    """QEMU's uid may not reopen a 0600 kernel or initrd: it gets memfd copies, mapped again on a reset."""
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    for copy, original in ((kernel, guest.kernel), (initrd, guest.initrd)):
        shutil.copyfile(original, copy)
        copy.chmod(0o600)
    monitor = tmp_path / "reboot.qmp"
    options = guest_options(guest, kernel=str(kernel), initrd=str(initrd), qemu_extra=Probe.extra(monitor))
    path = await client.create("reboot", **options)
    leader = await client.prop(path, "Leader")
    links = {os.readlink(f"/proc/{leader}/fd/{fd}") for fd in os.listdir(f"/proc/{leader}/fd")}
    assert {"/memfd:kernel (deleted)", "/memfd:initrd (deleted)"} <= links
    console = await client.prop(path, "ConsoleLog")
    await wait_console(console, r"VMSPAWN-GUEST-READY", timeout=90)
    mark = len(Path(console).read_text(errors="replace"))
    Probe(monitor)("system_reset")
    await wait_console(console, r"VMSPAWN-GUEST-READY", timeout=90, start=mark)
    assert await client.prop(path, "State") == "running"


async def test_a_monitor_command_cannot_run_commands_on_the_host(
    client: Client, daemon: Daemon, world_dir: Path, tmp_path: Path
) -> None:
    """`migrate exec:` is what a guest escape would use to run host commands."""
    monitor = tmp_path / "escape.qmp"
    path = await client.create(
        "escape", **image_options(blank_image(world_dir, "e.raw"), qemu_extra=Probe.extra(monitor))
    )
    leader = await client.prop(path, "Leader")
    pwned = world_dir / "pwned"
    probe = Probe(monitor)
    # The sandbox kills QEMU on the spot.
    with contextlib.suppress(ConnectionError, json.JSONDecodeError):
        probe("migrate", uri=f"exec:touch {pwned}")
    # Until the command ran (the file) or cannot run any more (QEMU gone, migration over).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not pwned.exists() and Path(f"/proc/{leader}").exists() and loop.time() < deadline:
        try:
            if probe("query-migrate").get("status") in ("failed", "completed"):
                break
        except (ConnectionError, json.JSONDecodeError):
            break
        await asyncio.sleep(0.1)
    assert not pwned.exists(), f"QEMU ran a host command as uid {pwned.stat().st_uid}"


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=30)


async def test_runtime_files_are_private(client: Client, daemon: Daemon, guest: Any, tmp_path: Path) -> None:
    path = await client.create("private", **image_options(blank_image(tmp_path, "p.raw")))
    machines = daemon.runtime_dir / "machines"
    directory = machines / "private"
    for name in ("console.log", "qemu.log", "state.json", "argv"):
        result = as_nobody("cat", str(directory / name))
        assert result.returncode != 0 and "Permission denied" in result.stderr, (name, result)
        assert (directory / name).stat().st_mode & 0o077 == 0, name
    for listed in (machines, directory):
        result = as_nobody("ls", str(listed))
        assert result.returncode != 0 and "Permission denied" in result.stderr, (listed, result)
    for sock in ("qmp.sock", "console.sock"):
        result = as_nobody(
            "/usr/bin/python3",
            "-c",
            f"import socket; socket.socket(socket.AF_UNIX).connect({str(directory / sock)!r})",
        )
        assert result.returncode != 0 and "PermissionError" in result.stderr, (sock, result)
    # Root's own machine: root reads its console.
    assert Path(await client.prop(path, "ConsoleLog")).stat().st_uid == 0


def test_the_confined_identity_can_open_dev_kvm() -> None:
    """KVM guests cannot run on this host, but the identity QEMU gets must be able to open /dev/kvm."""
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm on this host")
    confined = process.setpriv_argv(process.Confinement(0x7A00FFFF, 0x7A00FFFF, process.kvm_groups()))
    probe = "import os; os.close(os.open('/dev/kvm', os.O_RDWR | os.O_CLOEXEC)); print('opened')"
    result = subprocess.run([*confined, "/usr/bin/python3", "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "opened", result.stderr
    # And without the kvm group it could not: the group is what grants it.
    bare = process.setpriv_argv(process.Confinement(0x7A00FFFF, 0x7A00FFFF, ()))
    result = subprocess.run([*bare, "/usr/bin/python3", "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "Permission denied" in result.stderr, result
