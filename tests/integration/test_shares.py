"""virtiofs shares: the directory a user names is the one exported, and the guest's root is not the host's.

Issue 11: (2) the daemon checked the share's owner by path, then virtiofsd
looked the path up again, so a symlink swapped in between exported the
host's /; (3) virtiofsd ran as root, so the guest's root created root-owned
setuid binaries and device nodes on the host. A non-root creator goes
through polkit (test_system's fixtures and rules: `daemon` may create).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import select
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .harness import guest_options, virtiofsd_pids, wait_console

# Fixtures of test_system's (the parameters below reuse their names: F811).
from .test_system import System, gdbus_machine, gdbus_manager, owned_file, polkit, root, system  # noqa: F401

DAEMON = pwd.getpwnam("daemon")
IN_OPEN = 0x20
RENAME_EXCHANGE = 2
libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): `a` and `b` trade places atomically."""
    if libc.renameat2(-100, bytes(a), -100, bytes(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


@contextlib.contextmanager
def swap_on_open(watched: str, a: Path, b: Path) -> Iterator[threading.Event]:
    """Exchange `a` and `b` the moment anybody opens `watched` (the daemon opening
    the boot image: after its share checks, before virtiofsd starts)."""
    fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    assert fd >= 0 and libc.inotify_add_watch(fd, watched.encode(), IN_OPEN) >= 0
    swapped, stop = threading.Event(), threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if select.select([fd], [], [], 0.1)[0]:
                os.read(fd, 4096)
                exchange(a, b)
                swapped.set()
                return

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        yield swapped
    finally:
        stop.set()
        thread.join()
        os.close(fd)


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def gvariant(options: dict[str, str]) -> str:
    return "{" + ", ".join(f"'{k}': <{v}>" for k, v in options.items()) + "}"


async def test_a_symlink_swapped_in_during_create_never_exports_more_than_the_share(polkit: System, root: Any) -> None:  # noqa: F811
    """The share's path is W/sw/tmp/..: W/sw while sw is the user's directory (with a tmp/ in it),
    the host's / once sw is a symlink to /. The swap happens when the daemon opens the boot image."""
    await polkit.start_polkit(rules=True)
    work = polkit.dir / f"race-{os.urandom(3).hex()}"
    work.mkdir()
    os.chown(work, DAEMON.pw_uid, DAEMON.pw_gid)
    real, link = work / "sw", work / "lnk"
    (real / "tmp").mkdir(parents=True)
    (real / "marker").write_text("share")
    for p in (real, real / "tmp", real / "marker"):
        os.chown(p, DAEMON.pw_uid, DAEMON.pw_gid)
    share_stat = real.stat()
    source = f"{work}/sw/tmp/.."
    daemon_pid = polkit.daemon.proc.pid if polkit.daemon.proc else 0
    outcomes = []
    for i in range(6):
        link.symlink_to("/")
        image = owned_file(polkit, "daemon")
        options = {"image": f"'{image}'", "firmware": "'bios'", "accel": "'tcg'", "memory": f"uint64 {64 << 20}",
                   "hotplug_spares": "uint32 1", "directory": f"'{source}'"}  # fmt: skip
        with swap_on_open(image, real, link) as swapped:
            created = await gdbus_manager(polkit, "daemon", "CreateMachine", f"race{i}", gvariant(options))
        assert swapped.is_set()
        if created.error:
            assert created.error == "org.vmspawnd1.Error.AccessDenied", created
            outcomes.append("refused")
        else:
            [pid] = virtiofsd_pids(daemon_pid)
            exported = os.stat(f"/proc/{pid}/root")
            assert not same_file(exported, os.stat("/")), f"try {i}: virtiofsd exports the host's /"
            assert same_file(exported, share_stat), f"try {i}: virtiofsd exports something else"
            outcomes.append("shared")
            await root.call("TerminateMachine", "s", [f"race{i}"])
        # Back to the start: sw the directory, lnk the symlink.
        exchange(real, link)
        link.unlink()
    assert outcomes, outcomes


async def test_the_guests_root_is_the_share_owner_on_the_host(system: System, root: Any, guest: Any) -> None:  # noqa: F811
    """The guest, as root, creates a setuid-root binary and a device node in a share of `daemon`'s
    and a file in a world-writable root-owned share: on the host none of it belongs to root, the
    setuid binary gives its owner's rights only, and no device node exists."""
    base = system.dir / f"owner-{os.urandom(3).hex()}"
    mine, roots = base / "mine", base / "roots"
    mine.mkdir(parents=True)
    roots.mkdir()
    base.chmod(0o755)
    os.chown(mine, DAEMON.pw_uid, DAEMON.pw_gid)
    roots.chmod(0o777)
    (mine / "run.sh").write_text(
        "cp /bin/busybox /mnt/mine/suid && chmod 4755 /mnt/mine/suid\n"
        "chmod 2755 /mnt/mine/suid; ls -ln /mnt/mine/suid\n"
        "mknod /mnt/mine/null c 1 3; mknod /mnt/mine/sda b 8 0\n"
        "echo x > /mnt/roots/made-by-guest\n"
        "true\n"
    )
    options = guest_options(
        guest, mounts=[{"source": str(mine), "tag": "mine"}, {"source": str(roots), "tag": "roots"}]
    )
    options["cmdline"] += " tinyguest.mount=mine tinyguest.mount=roots tinyguest.run=mine"
    path = await root.create("owner", **options)
    console = await root.prop(path, "ConsoleLog")
    await wait_console(console, r"VMSPAWN-RUN mine rc=\d+", timeout=120)
    assert "VMSPAWN-MOUNT mine files=run.sh" in Path(console).read_text()
    suid = (mine / "suid").stat()
    assert suid.st_uid == DAEMON.pw_uid and suid.st_gid == DAEMON.pw_gid, suid
    assert not [p.name for p in mine.iterdir() if p.is_char_device() or p.is_block_device()]
    # A setuid bit the guest set gives whoever runs the file the owner's uid: daemon's, never root's.
    assert (roots / "made-by-guest").stat().st_uid == 65534
    await root.call("TerminateMachine", "s", ["owner"])


async def test_a_share_the_creator_cannot_open_is_refused(polkit: System, root: Any) -> None:  # noqa: F811
    await polkit.start_polkit(rules=True)
    private = polkit.dir / f"private-{os.urandom(3).hex()}"
    private.mkdir(mode=0o700)
    options = {"image": f"'{owned_file(polkit, 'daemon')}'", "firmware": "'bios'", "accel": "'tcg'",
               "memory": f"uint64 {64 << 20}", "directory": f"'{private}'"}  # fmt: skip
    created = await gdbus_manager(polkit, "daemon", "CreateMachine", "private", gvariant(options))
    assert created.error in ("org.vmspawnd1.Error.AccessDenied", "org.vmspawnd1.Error.InvalidArgument"), created
    assert str(private) in created.err


async def test_add_share_opens_and_checks_the_directory_as_its_caller(polkit: System, root: Any) -> None:  # noqa: F811
    """AddShare by `daemon` (polkit lets it manage its own machine): a directory of root's is
    refused naming it, a private one it cannot open too, its own is shared and its virtiofsd runs
    as daemon, never root."""
    await polkit.start_polkit(rules=True)
    base = polkit.dir / f"hot-{os.urandom(3).hex()}"
    roots, private, mine = base / "roots", base / "private", base / "mine"
    for d in (roots, private, mine):
        d.mkdir(parents=True)
    base.chmod(0o755)
    roots.chmod(0o755)
    private.chmod(0o700)
    os.chown(mine, DAEMON.pw_uid, DAEMON.pw_gid)
    options = {"image": f"'{owned_file(polkit, 'daemon')}'", "firmware": "'bios'", "accel": "'tcg'",
               "memory": f"uint64 {64 << 20}", "hotplug_spares": "uint32 2"}  # fmt: skip
    created = await gdbus_manager(polkit, "daemon", "CreateMachine", "hotshare", gvariant(options))
    assert created.error == "", created.err
    path = re.search(r"'(/org/vmspawnd1/machine/\w+)'", created.out).group(1)  # type: ignore[union-attr]
    daemon_pid = polkit.daemon.proc.pid if polkit.daemon.proc else 0
    try:
        refused = await gdbus_machine(polkit, "daemon", path, "AddShare", str(roots), "{'tag': <'r'>}")
        assert refused.error == "org.vmspawnd1.Error.AccessDenied", refused.err
        assert str(roots) in refused.err and "share a directory you own" in refused.err
        refused = await gdbus_machine(polkit, "daemon", path, "AddShare", str(private), "{'tag': <'p'>}")
        # The opener's own words, as for a boot-time share (test_a_share_the_creator_cannot_open_is_refused).
        assert refused.error in ("org.vmspawnd1.Error.AccessDenied", "org.vmspawnd1.Error.InvalidArgument")
        assert str(private) in refused.err and "Permission denied" in refused.err
        assert virtiofsd_pids(daemon_pid) == []
        added = await gdbus_machine(polkit, "daemon", path, "AddShare", str(mine), "{'tag': <'m'>}")
        assert added.error == "", added.err
        assert "share0" in added.out
        [pid] = virtiofsd_pids(daemon_pid)
        uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
        # Root of its own user namespace, the share's owner outside it.
        assert Path(f"/proc/{pid}/uid_map").read_text().split()[:2] == ["0", str(DAEMON.pw_uid)], uids
    finally:
        await root.call("TerminateMachine", "s", ["hotshare"])
