"""imagechain: qcow2 headers from bytes, names resolved; and the chain walk on real files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmspawnd import imagechain
from vmspawnd.chainopen import open_chain
from vmspawnd.errors import AccessDenied, InvalidArgument
from vmspawnd.imagechain import (
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    MAX_DEPTH,
    Header,
    Layer,
    Role,
    header_size,
    opaque,
    parse,
    parse_opaque,
    probe_format,
    resolve,
)
from vmspawnd.model import ImageFormat

CLUSTER_BITS = 16


def ext(kind: int, payload: bytes) -> bytes:
    return struct.pack(">II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def qcow2(
    version: int = 3,
    backing: bytes | None = None,
    extensions: bytes = b"",
    incompatible: int = 0,
    cluster_bits: int = CLUSTER_BITS,
    header_length: int = 112,
    size: int | None = None,
    end_marker: bool = True,
) -> bytes:
    """A qcow2 header as qemu-img lays it out: header, extensions, end, backing name."""
    length = 72 if version == 2 else header_length
    ext_area = extensions + (struct.pack(">II", 0, 0) if end_marker else b"")
    backing_offset = length + len(ext_area) if backing is not None else 0
    head = struct.pack(">4sIQII", b"QFI\xfb", version, backing_offset, len(backing or b""), cluster_bits)
    head += b"\0" * (72 - len(head))
    if version == 3:
        head += struct.pack(">QQQII", incompatible, 0, 0, 4, header_length)
        head += b"\0" * (header_length - len(head))
    data = head + ext_area + (backing or b"")
    cluster = size if size is not None else 1 << cluster_bits
    return data + b"\0" * max(0, cluster - len(data))


# -- parse ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_no_backing_no_data_file(version: int) -> None:
    assert parse(qcow2(version), "/i") == Header(version, 1 << CLUSTER_BITS)


@pytest.mark.parametrize("version", [2, 3])
def test_backing_with_format(version: int) -> None:
    h = parse(qcow2(version, b"base.raw", ext(EXT_BACKING_FORMAT, b"raw")), "/i")
    assert (h.backing, h.backing_format) == ("base.raw", ImageFormat.RAW)
    h = parse(qcow2(version, b"/abs/mid.qcow2", ext(EXT_BACKING_FORMAT, b"qcow2")), "/i")
    assert (h.backing, h.backing_format) == ("/abs/mid.qcow2", ImageFormat.QCOW2)


def test_backing_without_format_is_left_to_the_probe() -> None:
    h = parse(qcow2(3, b"base"), "/i")
    assert (h.backing, h.backing_format) == ("base", None)


def test_empty_backing_name_is_no_backing() -> None:
    assert parse(qcow2(3, b""), "/i").backing is None


def test_unknown_extensions_and_feature_table_are_skipped() -> None:
    table = ext(0x6803F857, b"\0\0dirty bit".ljust(48, b"\0"))
    h = parse(qcow2(3, b"b", ext(0x12345678, b"xyz") + table + ext(EXT_BACKING_FORMAT, b"qcow2")), "/i")
    assert (h.backing, h.backing_format) == ("b", ImageFormat.QCOW2)


def test_external_data_file() -> None:
    h = parse(qcow2(3, extensions=ext(EXT_DATA_FILE, b"data.raw"), incompatible=4), "/i")
    assert (h.external_data, h.data_file) == (True, "data.raw")


def test_data_file_name_without_the_feature_bit_is_not_used() -> None:
    h = parse(qcow2(3, extensions=ext(EXT_DATA_FILE, b"data.raw")), "/i")
    assert (h.external_data, h.data_file) == (False, None)


def test_external_data_bit_without_a_name_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="does not name it"):
        parse(qcow2(3, incompatible=4), "/i")


def test_unsupported_backing_format_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="backing format 'vmdk'"):
        parse(qcow2(3, b"b", ext(EXT_BACKING_FORMAT, b"vmdk")), "/i")


def test_a_v3_header_length_moves_the_extensions() -> None:
    h = parse(qcow2(3, b"b", ext(EXT_BACKING_FORMAT, b"raw"), header_length=128), "/i")
    assert h.backing_format is ImageFormat.RAW


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "shorter than a qcow2 header"),
        (qcow2()[:71], "shorter than a qcow2 header"),
        (b"\0" * 512, "not a qcow2 image"),
        (qcow2(version=1), "version 1"),
        (qcow2(version=4), "version 4"),
        (qcow2(3)[:100], "shorter than a version 3 header"),
        (qcow2(cluster_bits=8, size=4096), "cluster_bits 8"),
        (qcow2(cluster_bits=22, size=4096), "cluster_bits 22"),
        (qcow2(3, header_length=96), "header_length 96"),
        (qcow2(3, b"x" * 1024), "backing file name is too long"),
        (qcow2(3, b"base")[:122], "ends inside its backing file name"),
        (qcow2(3, b"a\0b"), "NUL"),
        (qcow2(3, extensions=struct.pack(">II", 7, 1 << 20)), "larger than the header area"),
        (qcow2(3, extensions=ext(EXT_DATA_FILE, b"d" * 64), incompatible=4)[:140], "ends inside a header"),
        (qcow2(3, extensions=ext(EXT_DATA_FILE, b"a\0"), incompatible=4), "NUL"),
    ],
)
def test_broken_headers_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        parse(data, "/i")


def test_a_short_file_ends_its_extensions() -> None:
    # A file shorter than a cluster: past its end there are only zeros, the end marker.
    data = qcow2(3, extensions=ext(EXT_BACKING_FORMAT, b"raw"), end_marker=False, size=0)
    assert parse(data, "/i") == Header(3, 1 << CLUSTER_BITS)


def test_backing_name_outside_the_first_cluster_is_refused() -> None:
    data = bytearray(qcow2(3, b"base", cluster_bits=9))
    struct.pack_into(">Q", data, 8, 600)
    with pytest.raises(InvalidArgument, match="outside the first cluster"):
        parse(bytes(data), "/i")


def test_errors_name_the_image() -> None:
    with pytest.raises(InvalidArgument, match=r"'/some/top\.qcow2'"):
        parse(b"\0" * 100, "/some/top.qcow2")


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_header_or_invalid_argument(data: bytes) -> None:
    with contextlib.suppress(InvalidArgument):
        parse(data, "/i")


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 400), st.sampled_from([2, 3]))
def test_any_bytes_after_a_valid_start_give_a_header_or_invalid_argument(tail: bytes, cut: int, version: int) -> None:
    head = qcow2(version, b"base", ext(EXT_DATA_FILE, b"d"), incompatible=4, cluster_bits=9)
    data = head[:cut] + tail
    try:
        h = parse(data, "/i")
    except InvalidArgument:
        return
    assert h.version in (2, 3) and h.cluster_size >= 512


def test_probe_and_header_size() -> None:
    assert probe_format(qcow2()) is ImageFormat.QCOW2
    assert probe_format(b"QFI") is ImageFormat.RAW
    assert probe_format(b"\0" * 512) is ImageFormat.RAW
    assert header_size(qcow2(cluster_bits=16)[:4096]) == 1 << 16
    assert header_size(qcow2(cluster_bits=30, size=4096)[:4096]) == 1 << 21
    assert header_size(b"\0" * 4096) == 4096


# -- names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "image", "path"),
    [
        ("base.raw", "/a/b/top.qcow2", "/a/b/base.raw"),
        ("../base.raw", "/a/b/top.qcow2", "/a/b/../base.raw"),
        ("sub/base", "/top", "/sub/base"),
        ("/abs/base", "/a/top", "/abs/base"),
        ("/x:y/base", "/a/top", "/x:y/base"),
        ("dir/a:b", "/a/top", "/a/dir/a:b"),
    ],
)
def test_resolve(name: str, image: str, path: str) -> None:
    assert resolve(name, image, "backing file") == path


@pytest.mark.parametrize("name", ['json:{"driver": "file"}', "nbd://host/x", "file:/etc/shadow", "a:b"])
def test_protocol_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="protocol or json"):
        resolve(name, "/a/top", "backing file")


def test_relative_names_need_an_image_with_a_directory() -> None:
    with pytest.raises(InvalidArgument, match="is relative"):
        resolve("base", "pipe-ish", "backing file")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("disk3:0:/a/top.qcow2", ("disk3", "0", "/a/top.qcow2")),
        ("disk3:1d:/a/x:y", ("disk3", "1d", "/a/x:y")),
        # Before image chains: "drive-id:path", the image alone.
        ("disk3:/a/b", ("disk3", "0", "/a/b")),
        ("disk3:/a:0:b", ("disk3", "0", "/a:0:b")),
        ("", ("", "0", "")),
    ],
)
def test_parse_opaque(text: str, parsed: tuple[str, str, str]) -> None:
    assert parse_opaque(text) == parsed


@given(st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,31}", fullmatch=True), st.integers(0, 16), st.booleans(), st.text())
def test_opaque_round_trips(dev: str, depth: int, data: bool, tail: str) -> None:
    label = imagechain.data_label(depth) if data else imagechain.level_label(depth)
    layer = Layer(label, "/" + tail, Role.IMAGE, ImageFormat.RAW, False)
    assert parse_opaque(opaque(dev, layer)) == (dev, label, "/" + tail)


def test_walk_is_top_first() -> None:
    base = Layer("2", "/b", Role.BACKING, ImageFormat.RAW, True)
    data = Layer("1d", "/d", Role.DATA_FILE, ImageFormat.RAW, True)
    mid = Layer("1", "/m", Role.BACKING, ImageFormat.QCOW2, True, base, data)
    top = Layer("0", "/t", Role.IMAGE, ImageFormat.QCOW2, False, mid)
    assert [layer.label for layer in top.walk()] == ["0", "1", "1d", "2"]


# -- the walk, on files qemu-img made ----------------------------------------------------


def qemu_img(cwd: Path, *args: str) -> None:
    subprocess.run(["qemu-img", *args], cwd=cwd, check=True, capture_output=True)


needs_qemu_img = pytest.mark.skipif(not Path("/usr/bin/qemu-img").exists(), reason="no qemu-img")


def walk(path: Path, fmt: ImageFormat = ImageFormat.QCOW2, read_only: bool = False) -> list[tuple[str, str, str, bool]]:
    chain = asyncio.run(open_chain(os.getuid(), str(path), fmt, read_only))
    try:
        assert set(chain.fds) == {layer.label for layer in chain.top.walk()}
        return [(layer.label, layer.path, str(layer.format), layer.read_only) for layer in chain.top.walk()]
    finally:
        chain.close()


@needs_qemu_img
def test_a_relative_chain_with_a_data_file(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(b"\0" * 4096)
    (tmp_path / "sub").mkdir()
    qemu_img(tmp_path, "create", "-f", "qcow2", "-o", f"data_file={tmp_path}/sub/mid.data", "sub/mid.qcow2", "1M")
    qemu_img(tmp_path, "rebase", "-u", "-b", "../base.raw", "-F", "raw", "sub/mid.qcow2")
    qemu_img(tmp_path, "create", "-f", "qcow2", "-u", "-b", "sub/mid.qcow2", "-F", "qcow2", "top.qcow2", "1M")
    t = str(tmp_path)
    assert walk(tmp_path / "top.qcow2") == [
        ("0", f"{t}/top.qcow2", "qcow2", False),
        ("1", f"{t}/sub/mid.qcow2", "qcow2", True),
        ("1d", f"{t}/sub/mid.data", "raw", True),
        ("2", f"{t}/sub/../base.raw", "raw", True),
    ]


@needs_qemu_img
def test_a_raw_image_is_one_layer_whatever_it_holds(tmp_path: Path) -> None:
    qemu_img(tmp_path, "create", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", "q.qcow2", "1M")
    assert walk(tmp_path / "q.qcow2", ImageFormat.RAW, True) == [("0", f"{tmp_path}/q.qcow2", "raw", True)]


@needs_qemu_img
def test_an_unnamed_backing_format_is_probed(tmp_path: Path) -> None:
    qemu_img(tmp_path, "create", "-f", "qcow2", "base.qcow2", "1M")
    qemu_img(tmp_path, "create", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "1M")
    data = (tmp_path / "top.qcow2").read_bytes()
    at = data.index(struct.pack(">I", EXT_BACKING_FORMAT))
    with open(tmp_path / "top.qcow2", "r+b") as f:
        f.seek(at)
        f.write(b"\x0b\xad\xf0\x0d")
    assert [layer[2] for layer in walk(tmp_path / "top.qcow2")] == ["qcow2", "qcow2"]
    (tmp_path / "base.qcow2").write_bytes(b"\0" * 4096)
    assert [layer[2] for layer in walk(tmp_path / "top.qcow2")] == ["qcow2", "raw"]


@needs_qemu_img
def test_loops_are_refused(tmp_path: Path) -> None:
    qemu_img(tmp_path, "create", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", "1M")
    qemu_img(tmp_path, "create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M")
    with pytest.raises(InvalidArgument, match="loops"):
        walk(tmp_path / "a.qcow2")
    qemu_img(tmp_path, "create", "-f", "qcow2", "-u", "-b", "self.qcow2", "-F", "qcow2", "s.qcow2", "1M")
    (tmp_path / "s.qcow2").rename(tmp_path / "self.qcow2")
    with pytest.raises(InvalidArgument, match="loops"):
        walk(tmp_path / "self.qcow2")
    # A data file that is another layer of the chain is a loop too.
    qemu_img(tmp_path, "create", "-f", "qcow2", "-o", f"data_file={tmp_path}/d.qcow2", "d2.qcow2", "1M")
    (tmp_path / "d2.qcow2").rename(tmp_path / "d.qcow2")
    with pytest.raises(InvalidArgument, match="loops"):
        walk(tmp_path / "d.qcow2")


@needs_qemu_img
def test_depth_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "l0").write_bytes(b"\0" * 4096)
    for i in range(1, MAX_DEPTH + 2):
        qemu_img(
            tmp_path,
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            f"l{i - 1}",
            "-F",
            "raw" if i == 1 else "qcow2",
            f"l{i}",
            "1M",
        )
    assert len(walk(tmp_path / f"l{MAX_DEPTH}")) == MAX_DEPTH + 1
    with pytest.raises(InvalidArgument, match=f"deeper than {MAX_DEPTH}"):
        walk(tmp_path / f"l{MAX_DEPTH + 1}")


@needs_qemu_img
def test_a_missing_layer_is_named_and_nothing_stays_open(tmp_path: Path) -> None:
    qemu_img(tmp_path, "create", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", "top.qcow2", "1M")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(
        InvalidArgument, match=r"backing file of .*top\.qcow2.*gone\.raw.*(No such file|does not exist)"
    ):
        walk(tmp_path / "top.qcow2")
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_fifo_is_never_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "f")
    fd = os.open(tmp_path / "f", os.O_RDWR)
    with pytest.raises(InvalidArgument, match="not a regular file or block device"):
        asyncio.run(open_chain(os.getuid(), str(tmp_path / "f"), ImageFormat.QCOW2, False, fd=fd))


def test_files_qemu_opened_by_name_are_found() -> None:
    nodes = [
        {"node-name": "disk0-node", "file": "/proc/self/fd/7"},
        {"node-name": "disk3-node", "file": 'json:{"driver": "qcow2", "data-file": "/etc/shadow"}'},
        {"node-name": "#block1", "file": "/dev/fdset/4"},
        {"node-name": "#block2", "file": "/etc/shadow"},
    ]
    fds = {"/dev/fdset/4"}
    assert imagechain.opened_by_name({"disk0-node"}, nodes, fds) == ["/etc/shadow"]
    assert imagechain.opened_by_name({"disk0-node", "#block2"}, nodes, fds) == []


@needs_qemu_img
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as nobody")
def test_for_others_a_missing_layer_and_a_forbidden_one_look_the_same() -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    # nobody may walk this directory (pytest's own is root's alone).
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        os.chmod(d, 0o755)
        messages = missing_and_forbidden(Path(d), nobody)
    assert messages[0] == messages[1]
    assert f"uid {nobody} may not open '{d}/X', the backing file named by '{d}/top.qcow2'" in messages[0]


def missing_and_forbidden(tmp_path: Path, uid: int) -> list[str]:
    (tmp_path / "secret.raw").write_bytes(b"\0" * 4096)
    (tmp_path / "secret.raw").chmod(0o600)
    messages = []
    for backing in ("gone.raw", "secret.raw"):
        qemu_img(tmp_path, "create", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", "top.qcow2", "1M")
        fd = os.open(tmp_path / "top.qcow2", os.O_RDONLY)
        with pytest.raises(AccessDenied) as e:
            asyncio.run(open_chain(uid, str(tmp_path / "top.qcow2"), ImageFormat.QCOW2, True, fd=fd))
        messages.append(str(e.value).replace(backing, "X"))
    return messages
