"""Open a path with a caller's rights, never more than the caller has.

For root it is a plain open. For anyone else a forked child drops to the
caller's uid and groups, opens the path and sends the fd back over a
socketpair: the kernel decides, exactly as for the caller itself.
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
import pwd
import socket
import stat

from .errors import InvalidArgument


def _child(uid: int, gid: int, groups: list[int], path: str, flags: int, sock: socket.socket) -> int:
    try:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        fd = os.open(path, flags)
    except OSError as e:
        sock.send(str(e.errno or errno.EIO).encode())
        return 1
    sock.sendmsg([b"0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    return 0


def _open_as(uid: int, path: str, flags: int) -> int:
    if uid == 0:
        return os.open(path, flags)
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        raise OSError(errno.EPERM, f"uid {uid} has no user account", path) from None
    groups = os.getgrouplist(user.pw_name, user.pw_gid)
    parent, child = socket.socketpair()
    with parent, child:
        pid = os.fork()
        if pid == 0:
            # Only raw system calls here: the child must never return into the daemon.
            os._exit(_child(uid, user.pw_gid, groups, path, flags, child))
        os.waitpid(pid, 0)
        msg, ancdata, _, _ = parent.recvmsg(16, socket.CMSG_SPACE(4))
        if ancdata:
            return int(array.array("i", ancdata[0][2])[0])
        code = int(msg or str(errno.EIO).encode())
        raise OSError(code, os.strerror(code), path)


async def open_as(uid: int, path: str, read_only: bool, what: str = "drive") -> int:
    """An fd for `path` opened with `uid`'s rights, or InvalidArgument saying why not."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = await asyncio.get_running_loop().run_in_executor(None, _open_as, uid, path, flags)
    except OSError as e:
        hint = "check the path and its permissions" if e.errno != errno.EISDIR else "give a file, not a directory"
        raise InvalidArgument(f"cannot open {what} {path!r} as uid {uid}: {e.strerror}; {hint}") from e
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"{what} {path!r} is a directory; give a file")
    return fd


async def open_dir_as(uid: int, path: str, what: str = "shared directory") -> int:
    """An fd for the directory `path` opened with `uid`'s rights, or InvalidArgument saying why not.

    The last component must be the directory itself, not a symbolic link
    to it: what is checked and shared is what the caller named.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return await asyncio.get_running_loop().run_in_executor(None, _open_as, uid, path, flags)
    except OSError as e:
        # O_NOFOLLOW|O_DIRECTORY on a symbolic link gives ENOTDIR.
        hint = (
            "give a directory (a symbolic link is not followed: name the directory it points to)"
            if e.errno in (errno.ENOTDIR, errno.ELOOP)
            else "check the path and its permissions"
        )
        raise InvalidArgument(f"cannot open {what} {path!r} as uid {uid}: {e.strerror}; {hint}") from e
