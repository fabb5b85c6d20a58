"""Open a path with a caller's rights, never more than the caller has.

For root it is a plain open. For anyone else a forked child drops to the
caller's uid and groups, opens the path and sends the fd back over a
socketpair: the kernel decides, exactly as for the caller itself.

Every open is O_NONBLOCK (cleared afterwards), so a FIFO cannot block it;
anything but a regular file or block device is refused. An open that hangs
all the same (a stuck NFS server) is given up on after OPEN_TIMEOUT and its
child killed. Each uid has its own few slots: one user's stuck opens never
hold up another's, and root's never wait at all.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import os
import pwd
import signal
import socket
import stat
from collections import defaultdict

from .errors import InvalidArgument, OpenTimeout

OPEN_TIMEOUT = 10.0
# Opens one uid may have in flight at once (root's slots are root's own).
OPENS_PER_UID = 4
# Errors that would tell a caller whether a path they may not look at exists.
HIDDEN = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP}

_slots: defaultdict[int, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(OPENS_PER_UID))


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


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _receive(parent: socket.socket, path: str) -> int:
    msg, ancdata, _, _ = parent.recvmsg(16, socket.CMSG_SPACE(4))
    if ancdata:
        return int(array.array("i", ancdata[0][2])[0])
    code = int(msg or str(errno.EIO).encode())
    raise OSError(code, os.strerror(code), path)


def _close_late(opening: asyncio.Future[int]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())


def _timed_out(path: str, uid: int) -> OpenTimeout:
    return OpenTimeout(
        f"opening {path!r} as uid {uid} did not finish in {OPEN_TIMEOUT:.0f} s (a hung file system?); "
        "try again later or give another file"
    )


async def _open_as_root(path: str, flags: int) -> int:
    """Root's open needs no identity of its own: a thread, not a child (a
    fork costs milliseconds on every AddDrive). A hung one is given up on
    all the same; its thread stays until the open returns, and the fd is
    closed then."""
    opening = asyncio.ensure_future(asyncio.to_thread(os.open, path, flags))
    try:
        return await asyncio.wait_for(asyncio.shield(opening), OPEN_TIMEOUT)
    except TimeoutError:
        opening.add_done_callback(_close_late)
        raise _timed_out(path, 0) from None


async def _open_as(uid: int, path: str, flags: int) -> int:
    """Anyone but root: the open runs in a child with the caller's ids, so a
    hung one can be killed."""
    if uid == 0:
        return await _open_as_root(path, flags)
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        raise InvalidArgument(f"uid {uid} has no user account: cannot open {path!r} with its rights") from None
    gid, groups = user.pw_gid, os.getgrouplist(user.pw_name, user.pw_gid)
    parent, child = socket.socketpair()
    with parent, child:
        pid = os.fork()
        if pid == 0:
            # Only raw system calls here: the child must never return into the daemon.
            os._exit(_child(uid, gid, groups, path, flags, child))
        child.close()
        parent.setblocking(False)
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        loop.add_reader(parent.fileno(), _wake, answered)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                await answered
        except TimeoutError:
            raise _timed_out(path, uid) from None
        finally:
            loop.remove_reader(parent.fileno())
            if not answered.done() or answered.cancelled():
                os.kill(pid, signal.SIGKILL)
            # The child has answered or is killed: it is gone at once.
            await asyncio.shield(asyncio.to_thread(os.waitpid, pid, 0))
        return _receive(parent, path)


def _refuse_kind(mode: int) -> str:
    """'' for what QEMU may take (a regular file or block device), else what it is."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return ""
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


async def open_as(uid: int, path: str, read_only: bool, what: str = "drive") -> int:
    """An fd for `path` opened with `uid`'s rights, or InvalidArgument saying why not."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        async with _slots[uid]:
            fd = await _open_as(uid, path, flags)
    except OSError as e:
        if e.errno == errno.ENOENT and uid == 0:
            raise InvalidArgument(f"{what} {path!r} does not exist") from e
        if e.errno in HIDDEN:
            # The same words whether it is missing or hidden: a caller must not learn which.
            raise InvalidArgument(
                f"cannot open {what} {path!r} as uid {uid}: it does not exist or uid {uid} may not open it; "
                "check the path and its permissions"
            ) from e
        if e.errno == errno.EISDIR:
            raise InvalidArgument(f"{what} {path!r} is a directory; give a file") from e
        raise InvalidArgument(f"cannot open {what} {path!r} as uid {uid}: {e.strerror}") from e
    try:
        if kind := _refuse_kind(os.fstat(fd).st_mode):
            raise InvalidArgument(f"{what} {path!r} is {kind}; give a regular file or a block device")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def open_dir_as(uid: int, path: str, what: str = "shared directory") -> int:
    """An fd for the directory `path` opened with `uid`'s rights, or InvalidArgument saying why not.

    The last component must be the directory itself, not a symbolic link
    to it: what is checked and shared is what the caller named.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        async with _slots[uid]:
            return await _open_as(uid, path, flags)
    except OSError as e:
        # O_NOFOLLOW|O_DIRECTORY on a symbolic link gives ENOTDIR.
        hint = (
            "give a directory (a symbolic link is not followed: name the directory it points to)"
            if e.errno in (errno.ENOTDIR, errno.ELOOP)
            else "check the path and its permissions"
        )
        raise InvalidArgument(f"cannot open {what} {path!r} as uid {uid}: {e.strerror}; {hint}") from e
