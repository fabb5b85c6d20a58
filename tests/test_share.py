"""virtiofs shares: virtiofsd's argv, who the guest's root is, the open-and-check on a handle."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd import share
from vmspawnd.cmdline import Share
from vmspawnd.errors import AccessDenied, InvalidArgument
from vmspawnd.model import MachineSpec, MountSpec
from vmspawnd.share import SQUASHED, OpenShare, Virtiofsd, guest_root, virtiofsd_argv

OPENED = OpenShare(Share("fs0", Path("/home/u/a,source=/etc"), "a"), fd=9, uid=1000, gid=1001)
CONFINE = [
    "setpriv", "--reuid=1000", "--regid=1001", "--clear-groups", "--inh-caps=-all", "--no-new-privs", "--",
    "unshare", "--user", "--map-root-user", "--",
]  # fmt: skip


def test_c_virtiofsd_gets_the_handle_never_the_path() -> None:
    argv = virtiofsd_argv(Virtiofsd("/usr/lib/qemu/virtiofsd", rust=False), OPENED)
    assert argv == [
        *CONFINE,
        "/usr/lib/qemu/virtiofsd",
        "--fd=1",
        "-o", "source=/proc/self/fd/0/",
        "-o", "sandbox=chroot",
        "-o", "cache=auto",
        "-o", "modcaps=-mknod:-setfcap",
    ]  # fmt: skip
    assert "/home/u" not in " ".join(argv)


def test_rust_virtiofsd_gets_the_handle_never_the_path() -> None:
    argv = virtiofsd_argv(Virtiofsd("/usr/libexec/virtiofsd", rust=True), OPENED)
    assert argv == [
        *CONFINE,
        "/usr/libexec/virtiofsd",
        "--fd=1",
        "--shared-dir=/proc/self/fd/0/",
        "--sandbox=chroot",
        "--cache=auto",
        "--modcaps=-mknod:-setfcap",
    ]


@given(st.integers(1, 2**32 - 2), st.integers(0, 2**32 - 2), st.none() | st.integers(0, 2**32 - 2))
def test_the_guests_root_is_the_owner_never_root(uid: int, gid: int, primary: int | None) -> None:
    assert guest_root(uid, gid, primary) == (uid, gid if primary is None else primary)
    assert guest_root(0, gid, primary) == SQUASHED
    assert 0 not in guest_root(0, gid, primary)


def test_share_checks_before_opening() -> None:
    with pytest.raises(InvalidArgument, match="not an existing directory"):
        share.check(MachineSpec("m", directory=Path("/nonexistent/dir")))
    with pytest.raises(InvalidArgument, match="tag"):
        share.check(MachineSpec("m", mounts=(MountSpec(Path("/tmp"), "a b"),)))
    with pytest.raises(InvalidArgument, match="unique"):
        share.check(MachineSpec("m", mounts=(MountSpec(Path("/tmp"), "a"), MountSpec(Path("/"), "a"))))


def test_a_hotplugged_share_is_checked_as_a_boot_time_one() -> None:
    with pytest.raises(InvalidArgument, match="not an existing directory"):
        share.check_share(Share("", Path("relative"), "t"))
    with pytest.raises(InvalidArgument, match="not an existing directory"):
        share.check_share(Share("", Path("/etc/hostname"), "t"))
    with pytest.raises(InvalidArgument, match="virtiofs tag"):
        share.check_share(Share("", Path("/tmp"), "x" * 37))
    with pytest.raises(InvalidArgument, match="read-only"):
        share.check_share(Share("", Path("/tmp"), "t"), read_only=True)
    share.check_share(Share("", Path("/tmp"), "t"))


def test_read_only_mounts_are_refused_whichever_mount_it_is() -> None:
    mounts = (MountSpec(Path("/tmp"), "a"), MountSpec(Path("/tmp"), "b", read_only=True))
    with pytest.raises(InvalidArgument, match="read-only"):
        share.check(MachineSpec("m", directory=Path("/tmp"), mounts=mounts))
    share.check(MachineSpec("m", directory=Path("/tmp"), mounts=mounts[:1]))


def test_open_share_checks_the_owner_on_the_handle(world_dir: Path) -> None:
    mine = world_dir / "mine"
    mine.mkdir()
    opened = asyncio.run(share.open_share(0, Share("fs0", mine, "t")))
    try:
        assert os.path.samestat(os.fstat(opened.fd), mine.stat())
        assert (opened.uid, opened.gid) == SQUASHED  # root's own directory
    finally:
        os.close(opened.fd)
    os.chown(mine, 1, 1)
    with pytest.raises(AccessDenied, match="belongs to uid 1"):
        asyncio.run(share.open_share(65534, Share("fs0", mine, "t")))
    link = world_dir / "link"
    link.symlink_to(mine)
    with pytest.raises(InvalidArgument, match="symbolic link is not followed"):
        asyncio.run(share.open_share(0, Share("fs0", link, "t")))


def test_errors_are_the_logs_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "virtiofsd.log"
    assert share.errors(log) == "(no output)"
    log.write_text("a\n\nb\nc\nsetpriv: setresuid failed: Operation not permitted\n")
    assert share.errors(log) == "b; c; setpriv: setresuid failed: Operation not permitted"
