"""POSIX ACLs: let one more uid read a file of root's.

A machine's owner reads its console.log, a root file in a root directory.
Giving the file to the owner would take CAP_CHOWN, which the unit does not
have (systemd-analyze counts it at 0.2); an ACL entry needs no capability,
only the file's owner (the daemon). The encoding is the kernel's
`system.posix_acl_access` xattr (linux/posix_acl_xattr.h), so no libacl.
"""

from __future__ import annotations

import errno
import os
import struct

XATTR = "system.posix_acl_access"
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
READ = 4


def reader_acl(mode: int, uid: int) -> bytes:
    """The ACL of a file with permission bits `mode` plus read for `uid`.

    The group class bits become the mask (the kernel shows them as the
    mode's group bits), wide enough for the group and the new entry.
    """
    group = mode >> 3 & 7
    entries = [
        (USER_OBJ, mode >> 6 & 7, UNDEFINED_ID),
        (USER, READ, uid),
        (GROUP_OBJ, group, UNDEFINED_ID),
        (MASK, group | READ, UNDEFINED_ID),
        (OTHER, mode & 7, UNDEFINED_ID),
    ]
    return struct.pack("<I", VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def grant_read(fd: int, uid: int) -> None:
    """`uid` may read the open file `fd` (root needs no entry)."""
    if uid != 0:
        os.setxattr(fd, XATTR, reader_acl(os.fstat(fd).st_mode & 0o777, uid))


def copy(source: int, target: int) -> None:
    """The ACL of `source`, if it has one, onto `target`."""
    try:
        value = os.getxattr(source, XATTR)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return
        raise
    os.setxattr(target, XATTR, value)
