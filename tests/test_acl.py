"""The console's reader ACL (vmspawnd/acl.py): the kernel's encoding, and what it lets a uid do."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from vmspawnd import acl


@given(st.integers(0, 0o777), st.integers(1, 2**32 - 2))
def test_reader_acl_keeps_the_mode_and_adds_read_for_one_uid(mode: int, uid: int) -> None:
    data = acl.reader_acl(mode, uid)
    assert struct.unpack_from("<I", data) == (acl.VERSION,)
    entries = [struct.unpack_from("<HHI", data, 4 + 8 * i) for i in range((len(data) - 4) // 8)]
    assert [tag for tag, _, _ in entries] == sorted(tag for tag, _, _ in entries)  # the kernel's order
    by_tag = {tag: (perm, ident) for tag, perm, ident in entries}
    assert by_tag[acl.USER] == (acl.READ, uid)
    assert by_tag[acl.USER_OBJ][0] == mode >> 6 and by_tag[acl.OTHER][0] == mode & 7
    assert by_tag[acl.GROUP_OBJ][0] == mode >> 3 & 7
    assert by_tag[acl.MASK][0] == (mode >> 3 & 7) | acl.READ


def test_the_uid_reads_a_root_file_others_do_not(world_dir: Path) -> None:
    tmp_path = world_dir
    log = tmp_path / "console.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"hello\n")
        acl.grant_read(fd, 65534)
        copy = os.open(tmp_path / "console.log.1", os.O_WRONLY | os.O_CREAT, 0o600)
        acl.copy(fd, copy)
        os.close(copy)
    finally:
        os.close(fd)
    for name in ("console.log", "console.log.1"):
        path = str(tmp_path / name)
        assert os.stat(path).st_uid == 0
        assert as_uid(65534, path) == (0, "hello\n" if name == "console.log" else "")
        assert as_uid(1, path)[0] != 0


def as_uid(uid: int, path: str) -> tuple[int, str]:
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "cat", path]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout
