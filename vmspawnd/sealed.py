"""Sealed in-memory copies of the files QEMU loads by name (kernel, initrd).

QEMU 7.2's -kernel/-initrd open a path and know no fdsets; QEMU runs as a
uid that may not reopen the caller's file through /proc/self/fd/N (that
checks the inode's mode). A memfd's inode lets anyone reopen it, and its
seals make it read-only for good, so the copy is exactly what the caller
could read when they asked. QEMU maps both (an ELF kernel and the initrd
are served to the guest from the mapping, again on every reset): the copy
lives as long as QEMU, so it is made only for files QEMU could not reopen.
"""

from __future__ import annotations

import fcntl
import os

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def copy(fd: int, name: str, limit: int) -> int:
    """A sealed memfd holding what `fd` holds (at most `limit` bytes, or TooLarge)."""
    # lseek, not fstat: a block device's size is 0 to fstat.
    size = os.lseek(fd, 0, os.SEEK_END)
    if size > limit:
        raise TooLarge(size)
    memfd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        done = 0
        while done < size and (n := os.sendfile(memfd, fd, done, size - done)):
            done += n
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(memfd)
        raise
    return memfd
