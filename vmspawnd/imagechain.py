"""qcow2 image chains, pure: a header from its bytes, the names of the next layers.

A qcow2 image may name a backing file and an external data file in its
header. QEMU, left to itself, opens those by name with its own rights; the
daemon instead opens every layer with the caller's rights (chainopen.py, the
I/O edge) and hands QEMU the whole chain as explicit nodes. This module only
reads bytes it is given and combines names (docs/interop/qcow2.txt: all
numbers big-endian).
"""

from __future__ import annotations

import enum
import os
import posixpath
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument
from .model import ImageFormat

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
# QEMU's own limit (2 MiB clusters): the header and its extensions live in the first cluster.
MAX_CLUSTER_BITS = 21
MAX_BACKING_NAME = 1023
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
INCOMPATIBLE_DATA_FILE = 1 << 2
# What the edge reads first: enough for every fixed header field.
PREFIX = 4096
# Layers below the top image, at most: QEMU has no limit, a caller's request must.
MAX_DEPTH = 16
FORMAT_NAMES = {"raw": ImageFormat.RAW, "qcow2": ImageFormat.QCOW2}


@dataclass(frozen=True)
class Header:
    """What a qcow2 header says about other files."""

    version: int
    cluster_size: int
    # The names as stored (not resolved), None when absent.
    backing: str | None = None
    backing_format: ImageFormat | None = None
    data_file: str | None = None
    # Incompatible feature bit 2: guest data lives in an external data file.
    external_data: bool = False


def is_qcow2(prefix: bytes) -> bool:
    return prefix[:4] == MAGIC


def probe_format(prefix: bytes) -> ImageFormat:
    """A backing file whose format its image does not name: qcow2 by its magic, raw otherwise."""
    return ImageFormat.QCOW2 if is_qcow2(prefix) else ImageFormat.RAW


def header_size(prefix: bytes) -> int:
    """How many bytes from the start of the file parse() wants: the first cluster."""
    if len(prefix) < 24 or not is_qcow2(prefix):
        return len(prefix)
    bits = int.from_bytes(prefix[20:24], "big")
    return 1 << min(max(bits, MIN_CLUSTER_BITS), MAX_CLUSTER_BITS)


def _name(raw: bytes, what: str, image: str) -> str:
    if b"\0" in raw:
        raise InvalidArgument(f"qcow2 image {image!r}: its {what} name contains a NUL byte; the header is damaged")
    return os.fsdecode(raw)


def _bad(image: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{image!r} is not a usable qcow2 image: {why}; check it with 'qemu-img check'")


def parse(data: bytes, image: str) -> Header:
    """The header of the qcow2 image whose first bytes are `data` (at most
    its first cluster; shorter if the file is). InvalidArgument if it is not
    one, or one this daemon cannot follow safely."""
    if len(data) < V2_HEADER_LENGTH:
        raise _bad(image, f"{len(data)} bytes is shorter than a qcow2 header")
    if not is_qcow2(data):
        raise InvalidArgument(
            f"{image!r} is not a qcow2 image (no QFI\\xfb magic); give its real format (format 'raw'?)"
        )
    version, backing_offset, backing_size, cluster_bits = struct.unpack_from(">IQII", data, 4)
    if version not in (2, 3):
        raise _bad(image, f"version {version} (vmspawnd knows 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _bad(image, f"cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cluster_size = 1 << cluster_bits
    incompatible = 0
    header_length = V2_HEADER_LENGTH
    if version == 3:
        if len(data) < V3_MIN_HEADER_LENGTH:
            raise _bad(image, f"{len(data)} bytes is shorter than a version 3 header")
        (incompatible,) = struct.unpack_from(">Q", data, 72)
        (header_length,) = struct.unpack_from(">I", data, 100)
        if not V3_MIN_HEADER_LENGTH <= header_length <= cluster_size:
            raise _bad(image, f"header_length {header_length} is outside {V3_MIN_HEADER_LENGTH}..{cluster_size}")
    backing = None
    if backing_offset:
        if backing_size > MAX_BACKING_NAME or backing_offset > cluster_size - backing_size:
            raise _bad(image, "its backing file name is too long or lies outside the first cluster")
        if backing_offset + backing_size > len(data):
            raise _bad(image, "the file ends inside its backing file name")
        backing = _name(data[backing_offset : backing_offset + backing_size], "backing file", image) or None
    # Extensions run from the header's end to the backing name (or the cluster's end).
    end = backing_offset if backing_offset else cluster_size
    backing_format = None
    data_file = None
    for kind, payload in _extensions(data, header_length, end, image):
        if kind == EXT_BACKING_FORMAT:
            fmt = payload.decode("ascii", "replace")
            if fmt not in FORMAT_NAMES:
                raise InvalidArgument(
                    f"qcow2 image {image!r} names backing format {fmt[:32]!r}; vmspawnd follows raw and qcow2 "
                    "backing files only"
                )
            backing_format = FORMAT_NAMES[fmt]
        elif kind == EXT_DATA_FILE:
            data_file = _name(payload, "external data file", image) or None
    external = bool(incompatible & INCOMPATIBLE_DATA_FILE)
    if external and data_file is None:
        raise InvalidArgument(
            f"qcow2 image {image!r} keeps its data in an external data file but does not name it; "
            "set one with 'qemu-img amend -o data_file=PATH'"
        )
    return Header(
        version, cluster_size, backing, backing_format if backing else None, data_file if external else None, external
    )


def _extensions(data: bytes, start: int, end: int, image: str) -> Iterator[tuple[int, bytes]]:
    offset = start
    # Past the end of a short file there are only zeros, which is the end marker.
    while offset + 8 <= min(end, len(data)):
        kind, length = struct.unpack_from(">II", data, offset)
        offset += 8
        if kind == EXT_END:
            return
        if length > end - offset:
            raise _bad(image, f"header extension {kind:#010x} is larger than the header area")
        if offset + length > len(data):
            raise _bad(image, "the file ends inside a header extension")
        yield kind, data[offset : offset + length]
        offset += (length + 7) & ~7


def resolve(name: str, image: str, what: str) -> str:
    """The path `name` (a backing or data file named by `image`) means: relative
    names count from the directory of the image that names them, as in QEMU."""
    # QEMU takes "proto:..." (a colon before any slash) and "json:{...}" for non-file protocols.
    if ":" in name.partition("/")[0]:
        raise InvalidArgument(
            f"{image!r} names {what} {name[:200]!r}, a QEMU protocol or json: name; vmspawnd follows file "
            "paths only: point it at a file ('qemu-img rebase -u -b PATH' or 'qemu-img amend -o data_file=PATH')"
        )
    if posixpath.isabs(name):
        return name
    if not posixpath.isabs(image):
        raise InvalidArgument(
            f"{what} {name!r} of {image!r} is relative, and the image has no directory to count from; "
            "give the image by path or use an absolute name"
        )
    return posixpath.join(posixpath.dirname(image), name)


class Role(enum.StrEnum):
    IMAGE = "image"
    BACKING = "backing file"
    DATA_FILE = "external data file"


@dataclass(frozen=True)
class Layer:
    """One file of an image chain, as QEMU is to see it.

    `label` names it within its drive ("0" the image, "1" its backing file,
    "1d" that one's external data file, ...): never a ':' nor a leading '/'.
    """

    label: str
    path: str
    role: Role
    format: ImageFormat
    read_only: bool
    backing: Layer | None = None
    data_file: Layer | None = None

    def walk(self) -> Iterator[Layer]:
        """Every layer, top first."""
        yield self
        if self.data_file is not None:
            yield from self.data_file.walk()
        if self.backing is not None:
            yield from self.backing.walk()


def single(path: str, fmt: ImageFormat, read_only: bool) -> Layer:
    """A drive that is one file: raw, or qcow2 with no backing file."""
    return Layer("0", path, Role.IMAGE, fmt, read_only)


def level_label(depth: int) -> str:
    return str(depth)


def data_label(depth: int) -> str:
    return f"{depth}d"


def opaque(device_id: str, layer: Layer) -> str:
    """add-fd's opaque for a layer's fd: whose it is, found again after a restart."""
    return f"{device_id}:{layer.label}:{layer.path}"


def parse_opaque(text: str) -> tuple[str, str, str]:
    """(device id, layer label, path); older daemons wrote "device-id:path" for the image alone."""
    device_id, _, rest = text.partition(":")
    if rest.startswith("/") or ":" not in rest:
        return device_id, level_label(0), rest
    label, _, path = rest.partition(":")
    return device_id, label, path


def opened_by_name(known: set[str], nodes: Iterable[dict[str, Any]], fd_names: set[str]) -> list[str]:
    """Files of block nodes (query-named-block-nodes) not in `known` that QEMU
    opened by a name rather than from `fd_names`. Never any, unless a header
    changed between the daemon reading it and QEMU opening the image (an
    external data file bit set meanwhile makes QEMU open the named file)."""
    return [
        str(n.get("file"))
        for n in nodes
        if n.get("node-name") not in known
        and not str(n.get("file")).startswith("json:")
        and n.get("file") not in fd_names
    ]
