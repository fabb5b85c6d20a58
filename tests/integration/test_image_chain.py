"""qcow2 chains: every layer opened with the caller's rights and handed to QEMU by fd.

A qcow2 header names other files (a backing file, an external data file);
QEMU left to itself opens them by name, with its own rights. These tests
use the system fixtures of test_system.py (private bus, real polkitd, real
`nobody` and `daemon` accounts): run under `flock /tmp/vmspawnd-polkit.lock`.

That the guest reads through the whole chain is checked with QEMU's own
qemu-io on the guest's block node (HMP, through the test's monitor): it
reads what the device reads, a marker only the bottom layer has.
"""

# The fixtures come from test_system.py: pytest finds them by the names imported here.
# ruff: noqa: F811

import asyncio
import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Variant

from vmspawnd.bus import MACHINE_IFACE

from . import test_system
from .harness import Client, Site, guest_options, wait_console
from .qmp_probe import Probe
from .test_system import (  # noqa: F401
    SITE_PACKAGES,
    SYSTEM_PYTHON,
    System,
    gdbus_machine,
    gdbus_manager,
    gvariant_options,
    image,
    machine_options,
    owned_file,
    polkit,
    root,
    run_as,
    system,
    system_python_matches,
)

MARK_OFFSET = 1 << 20
MARK = 0x5A
NOBODY_RULES = """\
// Installed by vmspawnd's tests/integration/test_image_chain.py for one test, then removed.
polkit.addRule(function(action, subject) {
    if (action.id.indexOf("org.vmspawnd1.") == 0 && subject.user == "nobody")
        return polkit.Result.YES;
});
"""


def qemu_img(cwd: Path, *args: str) -> None:
    subprocess.run(["qemu-img", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def chown(path: Path, user: str, mode: int = 0o600) -> None:
    account = pwd.getpwnam(user)
    os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(mode)


def drop_backing_format(image: Path) -> None:
    """Turn the backing format extension into an unknown one: the daemon must probe."""
    data = bytearray(image.read_bytes()[:4096])
    at = data.index(bytes.fromhex("e2792aca"))
    data[at : at + 4] = bytes.fromhex("0badf00d")
    with open(image, "r+b") as f:
        f.write(data)


def three_layers(system: System, owner: str = "root") -> list[Path]:
    """top.qcow2 -> mid.qcow2 -> base.raw, by relative names; the marker is in base only.

    top names no backing format (probed), mid names raw."""
    d = system.dir / f"chain-{os.urandom(4).hex()}"
    d.mkdir()
    d.chmod(0o755)
    base = d / "base.raw"
    with open(base, "wb") as f:
        f.truncate(2 << 20)
        f.seek(MARK_OFFSET)
        f.write(bytes([MARK]) * 4096)
    qemu_img(d, "create", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw", "mid.qcow2", "2M")
    qemu_img(d, "create", "-f", "qcow2", "-u", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "2M")
    drop_backing_format(d / "top.qcow2")
    layers = [d / "top.qcow2", d / "mid.qcow2", base]
    for layer in layers:
        chown(layer, owner)
    return layers


def with_data_file(system: System, data_name: str = "data.raw") -> list[Path]:
    """dtop.qcow2 whose guest data lives in an external (raw) data file, marker included."""
    d = system.dir / f"data-{os.urandom(4).hex()}"
    d.mkdir()
    d.chmod(0o755)
    data = d / data_name
    qemu_img(d, "create", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on", "dtop.qcow2", "2M")
    with open(data, "r+b") as f:
        f.seek(MARK_OFFSET)
        f.write(bytes([MARK]) * 4096)
    return [d / "dtop.qcow2", data]


def evil_images(system: System, owner: str) -> dict[str, tuple[Path, str]]:
    """qcow2 images `owner` owns whose headers name files `owner` may not open:
    name -> (image, the file it names)."""
    d = system.dir / f"evil-{os.urandom(4).hex()}"
    d.mkdir()
    d.chmod(0o755)
    qemu_img(d, "create", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", "shadow.qcow2", "1M")
    victim = Path(owned_file(system, "daemon"))
    qemu_img(d, "create", "-f", "qcow2", "-o", f"data_file={d / 'victim.raw'}", "data.qcow2", "1M")
    qemu_img(d, "amend", "-o", f"data_file={victim}", "data.qcow2")
    (d / "victim.raw").unlink()
    for name in ("shadow.qcow2", "data.qcow2"):
        chown(d / name, owner)
    return {"backing": (d / "shadow.qcow2", "/etc/shadow"), "data-file": (d / "data.qcow2", str(victim))}


async def reads_marker(system: System, probe: Probe, machine: str, device: str) -> bool:
    """qemu-io on the device's node: its report goes to QEMU's stdout, the machine's qemu.log."""
    log = system.daemon.runtime_dir / "machines" / machine / "qemu.log"
    start = len(log.read_text(errors="replace"))
    assert (
        probe("human-monitor-command", **{"command-line": f'qemu-io {device}-node "read -P {MARK} {MARK_OFFSET} 4k"'})
        == ""
    )
    report = await wait_console(log, r"^(read 4096/4096 bytes|Pattern verification failed)", timeout=10, start=start)
    return report.group(1).startswith("read")


def qemu_files(pid: int, under: Path) -> set[str]:
    """The files under `under` QEMU holds an fd of (its runtime dir aside)."""
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith(f"{under}/") and "/run/machines/" not in target:
            held.add(target)
    return held


def node_files(probe: Probe) -> list[str]:
    return [str(n["file"]) for n in probe("query-named-block-nodes")]


def opened_by_name(probe: Probe, under: Path) -> list[str]:
    """Block nodes whose file QEMU opened by a name under `under` (not an fd of ours)."""
    return [f for f in node_files(probe) if str(under) in f]


@pytest.fixture
async def nobody_polkit(polkit: System, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[System]:
    monkeypatch.setattr(test_system, "TEST_RULES", NOBODY_RULES)
    await polkit.start_polkit(rules=True)
    yield polkit


# AddDriveFd with options (test_system's client sends none): the caller opens, the daemon follows the chain.
FD_CLIENT = r"""
import asyncio, json, os, sys
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

async def main(machine, file, fmt):
    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    fd = os.open(file, os.O_RDWR | os.O_CLOEXEC)
    reply = await bus.call(Message(
        destination="org.vmspawnd1", path=machine, interface="org.vmspawnd1.Machine",
        member="AddDriveFd", signature="ha{sv}", body=[0, {"format": Variant("s", fmt)}], unix_fds=[fd]))
    if reply.message_type is MessageType.ERROR:
        print(json.dumps({"error": reply.error_name, "message": reply.body[0] if reply.body else ""}))
    else:
        print(json.dumps({"reply": reply.body}))

asyncio.run(main(*sys.argv[1:]))
"""


async def add_drive_fd_as(system: System, user: str, machine: str, file: Path) -> dict[str, Any]:
    result = await run_as(
        system, user, "env", f"PYTHONPATH={SITE_PACKAGES}", SYSTEM_PYTHON, "-c", FD_CLIENT, machine, str(file), "qcow2"
    )
    assert result.code == 0, result
    answer: dict[str, Any] = json.loads(result.out)
    return answer


def qcow2_options(image: Path) -> str:
    return gvariant_options(str(image))[:-1] + ", 'image_format': <'qcow2'>}"


# -- a caller never reaches a file through a header that they may not open ------


async def test_layers_the_caller_may_not_open_are_refused_everywhere(
    nobody_polkit: System, root: Client, image: str, tmp_path: Path
) -> None:
    if not system_python_matches():
        pytest.skip(f"{SYSTEM_PYTHON} is not Python {sys.version_info[:2]}: cannot load the venv's dbus-fast")
    system = nobody_polkit
    probe = Probe(tmp_path / "probe.qmp")
    path = await root.create("chainvm", **(machine_options(image) | {"qemu_extra": Probe.extra(probe.path)}))
    before = (probe.block_nodes(), probe.fdsets(), await root.prop(path, "Drives"))

    for kind, (evil, named) in evil_images(system, "nobody").items():
        for result in (
            await gdbus_manager(system, "nobody", "CreateMachine", "evilvm", qcow2_options(evil)),
            await gdbus_machine(system, "nobody", path, "AddDrive", str(evil), "@a{sv} {'format': <'qcow2'>}"),
        ):
            assert result.error == "org.vmspawnd1.Error.AccessDenied", (kind, result)
            role = "backing file" if kind == "backing" else "external data file"
            assert f"uid 65534 may not open {named!r}, the {role} named by {str(evil)!r}" in result.err, result
        by_fd = await add_drive_fd_as(system, "nobody", path, evil)
        assert by_fd.get("error") == "org.vmspawnd1.Error.AccessDenied", (kind, by_fd)
        assert f"may not open {named!r}, the {role} named by {str(evil)!r}" in by_fd["message"], by_fd

    # Nothing was left behind, in the daemon or in QEMU.
    assert await root.names() == ["chainvm"]
    assert (probe.block_nodes(), probe.fdsets(), await root.prop(path, "Drives")) == before
    assert not list((system.daemon.runtime_dir / "machines").glob("evilvm*"))

    # nobody's own chain (relative names, counted from the fd's directory) is fine.
    mine = three_layers(system, owner="nobody")
    added = await add_drive_fd_as(system, "nobody", path, mine[0])
    assert "reply" in added, added
    drive_id = added["reply"][0]
    assert await reads_marker(system, probe, "chainvm", drive_id)
    leader = await root.prop(path, "Leader")
    assert qemu_files(leader, mine[0].parent) == {str(p) for p in mine}
    assert opened_by_name(probe, mine[0].parent) == []


# -- as root: the chain by fds, the guest reads the bottom layer -----------------


async def test_boot_drives_hand_qemu_every_layer_by_fd(system: System, root: Client, tmp_path: Path) -> None:
    chain = three_layers(system)
    data = with_data_file(system)
    # Root may open anything; a file only root may open still goes to QEMU by fd, read-only.
    secret = with_data_file(system)
    for layer in secret:
        chown(layer, "root", 0o600)
    probe = Probe(tmp_path / "probe.qmp")
    path = await root.create(
        "bootchain",
        **machine_options(str(chain[0])),
        image_format="qcow2",
        drives=[
            {"path": str(data[0]), "format": "qcow2"},
            {"path": str(secret[0]), "format": "qcow2", "read_only": True},
        ],
        qemu_extra=Probe.extra(probe.path),
    )
    for disk in ("disk0", "disk1", "disk2"):
        assert await reads_marker(system, probe, "bootchain", disk)
    leader = await root.prop(path, "Leader")
    for layers in (chain, data, secret):
        assert qemu_files(leader, layers[0].parent) == {str(p) for p in layers}
        assert opened_by_name(probe, layers[0].parent) == []
    assert qemu_files(leader, system.dir) == {str(p) for p in chain + data + secret}


async def test_a_refused_layer_at_boot_leaves_nothing(system: System, root: Client) -> None:
    chain = three_layers(system)
    chain[2].unlink()
    with pytest.raises(DBusError, match=r"backing file of .*mid\.qcow2.*base\.raw.*(No such file|does not exist)") as e:
        await root.create("nobase", **machine_options(str(chain[0])), image_format="qcow2")
    assert e.value.type == "org.vmspawnd1.Error.InvalidArgument"
    assert await root.names() == []
    assert not (system.daemon.runtime_dir / "machines" / "nobase").exists()


async def test_hotplugged_chains_are_passed_layer_by_layer_and_removed_whole(
    system: System, root: Client, guest: Any, tmp_path: Path
) -> None:
    probe = Probe(tmp_path / "probe.qmp")
    path = await root.create("hotchain", **guest_options(guest, hotplug_spares=3, qemu_extra=Probe.extra(probe.path)))
    console = Path(await root.prop(path, "ConsoleLog"))
    await wait_console(console, "VMSPAWN-GUEST-READY", timeout=90)
    by_path_chain, by_fd_chain = three_layers(system), three_layers(system)

    by_path, _ = await root.add_drive(path, str(by_path_chain[0]), format="qcow2", serial="bypath")
    fd = os.open(by_fd_chain[0], os.O_RDWR | os.O_CLOEXEC)
    try:
        options = {"format": Variant("s", "qcow2"), "serial": Variant("s", "byfd")}
        by_fd, _ = await root.call(
            "AddDriveFd", "ha{sv}", [0, options], path=path, interface=MACHINE_IFACE, unix_fds=[fd]
        )
    finally:
        os.close(fd)
    await wait_console(console, r"VMSPAWN-BLOCK-ADD \S+ serial=bypath")
    await wait_console(console, r"VMSPAWN-BLOCK-ADD \S+ serial=byfd")
    assert await reads_marker(system, probe, "hotchain", by_path)
    assert await reads_marker(system, probe, "hotchain", by_fd)

    # One fdset per layer, each named by drive, layer and path.
    expected = {
        f"{dev}:{i}:{p}" for dev, chain in ((by_path, by_path_chain), (by_fd, by_fd_chain)) for i, p in enumerate(chain)
    }
    assert {f["fds"][0]["opaque"] for f in probe.fdsets()} == expected
    assert all(len(f["fds"]) == 1 for f in probe.fdsets())
    leader = await root.prop(path, "Leader")
    assert qemu_files(leader, system.dir) == {str(p) for p in by_path_chain + by_fd_chain}
    assert opened_by_name(probe, system.dir) == []

    await asyncio.gather(root.remove_drive(path, by_path), root.remove_drive(path, by_fd))
    assert probe.fdsets() == []
    assert probe.block_nodes() == set()
    assert qemu_files(leader, system.dir) == set()


async def test_after_a_restart_every_fdset_of_a_drive_is_found_by_its_opaque(
    site: Site, guest: Any, tmp_path: Path
) -> None:
    client = await site.client()
    probe = Probe(tmp_path / "probe.qmp")
    path = await client.create(
        "restartchain", **guest_options(guest, hotplug_spares=2, qemu_extra=Probe.extra(probe.path))
    )
    console = Path(await client.prop(path, "ConsoleLog"))
    await wait_console(console, "VMSPAWN-GUEST-READY", timeout=90)
    d = site.dir / "chain"
    d.mkdir()
    qemu_img(d, "create", "-f", "raw", "base.raw", "1M")
    qemu_img(d, "create", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw", "mid.qcow2", "1M")
    qemu_img(d, "create", "-f", "qcow2", "-u", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "1M")
    drive_id, _ = await client.add_drive(path, str(d / "top.qcow2"), format="qcow2", serial="restarted")
    added = await wait_console(console, r"VMSPAWN-BLOCK-ADD (\S+) serial=restarted")
    assert len(probe.fdsets()) == 3

    # Killed, and state.json from an older daemon: one "fdset", the image's alone.
    site.daemon.stop(signal.SIGKILL)
    state_file = site.daemon.runtime_dir / "machines" / "restartchain" / "state.json"
    record = json.loads(state_file.read_text())
    for drive in record["drives"]:
        drive["fdset"] = drive.pop("fdsets", [None])[0]
    state_file.write_text(json.dumps(record))
    site.daemon.start()
    client.close()
    client = await site.client()

    mark = len(console.read_text())
    await client.remove_drive(path, drive_id)
    await wait_console(console, rf"VMSPAWN-BLOCK-REMOVE {added.group(1)}", start=mark)
    assert probe.fdsets() == []
    assert probe.block_nodes() == set()
    await client.terminate_all()
    client.close()
