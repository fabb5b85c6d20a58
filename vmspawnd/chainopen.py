"""Open a drive's image chain layer by layer with the caller's rights.

The I/O edge of imagechain: each header is read from an fd the caller's
rights already opened, and each file it names is opened the same way, so
QEMU is handed every layer by fd and opens nothing a header names.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from dataclasses import dataclass

from .errors import AccessDenied, InvalidArgument
from .imagechain import (
    MAX_DEPTH,
    PREFIX,
    Layer,
    Role,
    data_label,
    header_size,
    level_label,
    parse,
    probe_format,
    resolve,
)
from .model import ImageFormat
from .opener import open_as


@dataclass(frozen=True)
class OpenedChain:
    top: Layer
    # Layer label -> the daemon's fd for it.
    fds: dict[str, int]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


@dataclass(frozen=True)
class _Level:
    label: str
    path: str
    role: Role
    format: ImageFormat
    read_only: bool
    data_file: Layer | None


def _read(fd: int, path: str) -> bytes:
    """The first cluster (or less) of a layer; only files and block devices,
    which never block a reader indefinitely."""
    try:
        if not stat.S_ISREG(mode := os.fstat(fd).st_mode) and not stat.S_ISBLK(mode):
            raise InvalidArgument(f"{path!r} is not a regular file or block device; an image layer must be one")
        prefix = os.pread(fd, PREFIX, 0)
        size = header_size(prefix)
        return os.pread(fd, size, 0) if size > len(prefix) == PREFIX else prefix
    except OSError as e:
        raise InvalidArgument(f"cannot read the header of {path!r}: {e.strerror}") from e


# A caller learns no more from a backing name than from opening it: missing and hidden look the same.
HIDDEN = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP}


async def _open_layer(uid: int, path: str, read_only: bool, role: Role, image: str) -> int:
    try:
        return await open_as(uid, path, read_only, f"{role} of {image!r}")
    except InvalidArgument as e:
        cause = e.__cause__
        code = cause.errno if isinstance(cause, OSError) else None
        if code in (errno.EACCES, errno.EPERM) or (uid != 0 and code in HIDDEN):
            raise AccessDenied(
                f"uid {uid} may not open {path!r}, the {role} named by {image!r} (it is missing, or uid {uid} "
                f"lacks the rights): every layer of an image is opened with the caller's rights; use files you may "
                f"{'read' if read_only else 'read and write'}"
            ) from e
        raise


async def open_chain(
    uid: int, path: str, fmt: ImageFormat, read_only: bool, what: str = "drive", fd: int | None = None
) -> OpenedChain:
    """Every layer of the image at `path`, opened as `uid`; `fd`, when given,
    is the image itself, already open (and from now on the chain's to close)."""
    fds: dict[str, int] = {}
    try:
        fds[level_label(0)] = fd if fd is not None else await open_as(uid, path, read_only, what)
        seen: dict[tuple[int, int], str] = {}

        def check_loop(label: str, layer_path: str, named_by: str) -> None:
            st = os.fstat(fds[label])
            if (st.st_dev, st.st_ino) in seen:
                raise InvalidArgument(
                    f"the image chain of {path!r} loops: {named_by!r} names {layer_path!r}, which is already "
                    f"in the chain (as {seen[st.st_dev, st.st_ino]!r}); fix it with 'qemu-img rebase -u'"
                )
            seen[st.st_dev, st.st_ino] = layer_path

        check_loop(level_label(0), path, path)
        levels: list[_Level] = []
        image, image_fmt, image_ro, role = path, fmt, read_only, Role.IMAGE
        for depth in range(MAX_DEPTH + 1):
            label = level_label(depth)
            header = None
            if image_fmt is ImageFormat.QCOW2:
                header = parse(await asyncio.to_thread(_read, fds[label], image), image)
            data_file = None
            if header is not None and header.data_file is not None:
                data_path = resolve(header.data_file, image, str(Role.DATA_FILE))
                fds[data_label(depth)] = await _open_layer(uid, data_path, image_ro, Role.DATA_FILE, image)
                check_loop(data_label(depth), data_path, image)
                data_file = Layer(data_label(depth), data_path, Role.DATA_FILE, ImageFormat.RAW, image_ro)
            levels.append(_Level(label, image, role, image_fmt, image_ro, data_file))
            if header is None or header.backing is None:
                break
            if depth == MAX_DEPTH:
                raise InvalidArgument(
                    f"the backing chain of {path!r} is deeper than {MAX_DEPTH} images; flatten it "
                    "('qemu-img convert' or 'qemu-img rebase')"
                )
            backing = resolve(header.backing, image, str(Role.BACKING))
            below = level_label(depth + 1)
            fds[below] = await _open_layer(uid, backing, True, Role.BACKING, image)
            check_loop(below, backing, image)
            backing_fmt = header.backing_format
            if backing_fmt is None:
                backing_fmt = probe_format(await asyncio.to_thread(_read, fds[below], backing))
            image, image_fmt, image_ro, role = backing, backing_fmt, True, Role.BACKING
    except BaseException:
        for opened in fds.values():
            os.close(opened)
        raise
    top: Layer | None = None
    for level in reversed(levels):
        top = Layer(level.label, level.path, level.role, level.format, level.read_only, top, level.data_file)
    assert top is not None
    return OpenedChain(top, fds)
