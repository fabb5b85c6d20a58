"""state.json: round trip, version check, atomic replacement."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmspawnd.model import (
    Accel,
    DiskType,
    Drive,
    DriveSpec,
    DriveState,
    Firmware,
    ImageFormat,
    MachineSpec,
    MiB,
    MountSpec,
    Network,
    NetworkMode,
)
from vmspawnd.state import FILE, VERSION, MachineRecord, dumps, loads, read, write

# Every exception Manager.recover() turns into "its state.json is unreadable".
UNREADABLE = (ValueError, KeyError, TypeError, OSError)


def record(**kw: Any) -> MachineRecord:
    spec = MachineSpec(
        "m",
        kernel=Path("/boot/vmlinuz"),
        image=DriveSpec(Path("/img"), DiskType.NVME, ImageFormat.QCOW2),
        drives=(DriveSpec(Path("/d"), DiskType.VIRTIO_SCSI, read_only=True, serial="S"),),
        mounts=(MountSpec(Path("/srv"), "srv", True),),
        network=Network(NetworkMode.TAP, "tap0"),
        vsock=True,
        memory=1024 * MiB,
        cpus=2,
        accel=Accel.TCG,
        qemu_extra=("-smp", "2"),
        firmware=Firmware.UEFI,
    )
    base: dict[str, Any] = dict(
        spec=spec,
        id="0123456789abcdef0123456789abcdef",
        owner_uid=1000,
        pid=4242,
        start_time=123456789,
        drives=(
            Drive("disk0", "/img", DiskType.NVME, "rp0"),
            Drive("hp1", "/proc/self/fd/9", DiskType.VIRTIO_SCSI, "rp5", DriveState.REMOVING, 3, "scsi1"),
        ),
        next_fdset=4,
        next_controller=2,
    )
    return MachineRecord(**(base | kw))


# -- round trip ----------------------------------------------------------


def test_round_trip() -> None:
    r = record()
    assert loads(dumps(r)) == r


def test_round_trip_of_the_smallest_spec() -> None:
    r = record(spec=MachineSpec("m"), drives=())
    assert loads(dumps(r)) == r


def test_dumps_is_versioned_sorted_json() -> None:
    text = dumps(record())
    d = json.loads(text)
    assert d["version"] == VERSION == 1
    assert list(d) == sorted(d)
    assert d["spec"]["image"]["path"] == "/img"
    assert d["drives"][1] == {
        "id": "hp1",
        "path": "/proc/self/fd/9",
        "disk_type": "virtio-scsi",
        "port": "rp5",
        "state": "removing",
        "fdset": 3,
        "controller": "scsi1",
    }
    # Stable: dumping what was loaded gives the same text.
    assert dumps(loads(text)) == text


texts = st.text(max_size=12)
paths = st.builds(Path, texts)
drive_specs = st.builds(
    DriveSpec, paths, st.sampled_from(list(DiskType)), st.sampled_from(list(ImageFormat)), st.booleans(), texts
)
specs = st.builds(
    MachineSpec,
    name=texts,
    kernel=st.none() | paths,
    initrd=st.none() | paths,
    cmdline=texts,
    image=st.none() | drive_specs,
    drives=st.lists(drive_specs, max_size=4).map(tuple),
    directory=st.none() | paths,
    mounts=st.lists(st.builds(MountSpec, paths, texts, st.booleans()), max_size=3).map(tuple),
    network=st.builds(Network, st.sampled_from(list(NetworkMode)), texts),
    vsock=st.booleans(),
    memory=st.integers(0, 2**64),
    cpus=st.integers(0, 2**32),
    hotplug_spares=st.integers(0, 2**32),
    accel=st.sampled_from(list(Accel)),
    qemu_extra=st.lists(texts, max_size=4).map(tuple),
    firmware=st.sampled_from(list(Firmware)),
)
drives = st.builds(
    Drive,
    texts,
    texts,
    st.sampled_from(list(DiskType)),
    texts,
    st.sampled_from(list(DriveState)),
    st.none() | st.integers(0, 2**31),
    texts,
)
records = st.builds(
    MachineRecord,
    spec=specs,
    id=texts,
    owner_uid=st.integers(0, 2**32),
    pid=st.integers(1, 2**22),
    start_time=st.integers(0, 2**63),
    drives=st.lists(drives, max_size=5).map(tuple),
    next_fdset=st.integers(0, 2**31),
    next_controller=st.integers(0, 2**31),
)


@settings(deadline=None)
@given(records)
def test_any_record_round_trips(r: MachineRecord) -> None:
    text = dumps(r)
    assert loads(text) == r
    assert dumps(loads(text)) == text


@settings(max_examples=25, deadline=None)
@given(records)
def test_any_record_round_trips_through_the_file(r: MachineRecord) -> None:
    with tempfile.TemporaryDirectory() as d:
        write(Path(d), r)
        assert read(Path(d)) == r
        assert os.listdir(d) == [FILE]


# -- refusals --------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5])
def test_version_mismatch_refused(version: object) -> None:
    d = json.loads(dumps(record()))
    d["version"] = version
    with pytest.raises(ValueError, match=f"state version {version!r}, expected 1"):
        loads(json.dumps(d))


def test_missing_version_refused() -> None:
    d = json.loads(dumps(record()))
    del d["version"]
    with pytest.raises(ValueError, match="state version None, expected 1"):
        loads(json.dumps(d))


@pytest.mark.parametrize("text", ["", "{", "not json", '{"version": 1', "\0"])
def test_broken_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        loads(text)


@pytest.mark.parametrize("key", ["spec", "id", "owner_uid", "pid", "start_time", "drives", "next_fdset"])
def test_missing_field_is_unreadable(key: str) -> None:
    d = json.loads(dumps(record()))
    del d[key]
    with pytest.raises(KeyError):
        loads(json.dumps(d))


@pytest.mark.parametrize("text", ["[]", "null", "1", '"state"', "true"])
def test_non_object_json_is_unreadable(text: str) -> None:
    with pytest.raises(UNREADABLE):
        loads(text)


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.sampled_from(["raw", "nvme", "/x"])
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    )


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += json_paths(v, (*prefix, i))
    return out


@settings(deadline=None)
@given(st.data(), json_values(), st.booleans())
def test_any_corrupted_field_is_unreadable_or_loads(data: st.DataObject, junk: Any, delete: bool) -> None:
    """Manager.recover() must be able to skip whatever a damaged state.json holds."""
    d = json.loads(dumps(record()))
    where = data.draw(st.sampled_from(json_paths(d)))
    parent = d
    for step in where[:-1]:
        parent = parent[step]
    if delete:
        del parent[where[-1]]
    else:
        parent[where[-1]] = junk
    with contextlib.suppress(*UNREADABLE):
        loads(json.dumps(d))


# -- files ----------------------------------------------------------------


def test_write_then_read(tmp_path: Path) -> None:
    r = record()
    write(tmp_path, r)
    assert (tmp_path / FILE).read_text() == dumps(r)
    assert read(tmp_path) == r
    assert os.listdir(tmp_path) == [FILE]


def test_read_of_a_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read(tmp_path)
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "no-such-machine")


def test_a_leftover_temp_file_is_not_state(tmp_path: Path) -> None:
    (tmp_path / f".{FILE}.tmp").write_text(dumps(record()))
    with pytest.raises(FileNotFoundError):
        read(tmp_path)


def test_write_replaces_a_previous_state_whole(tmp_path: Path) -> None:
    target = tmp_path / FILE
    target.write_text(json.dumps({"version": 1, "junk": "x" * 100_000}))
    old = tmp_path / "old-link"
    os.link(target, old)
    r = record(spec=MachineSpec("m"), drives=())
    write(tmp_path, r)
    # Nothing of the longer old file is left in the new one ...
    assert target.read_text() == dumps(r)
    # ... and the old inode was replaced, not rewritten in place.
    assert old.read_text().startswith('{"version": 1, "junk": "xxx')
    assert target.stat().st_ino != old.stat().st_ino
    assert sorted(os.listdir(tmp_path)) == sorted([FILE, "old-link"])


def test_write_goes_through_a_temp_file_fsynced_then_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r1, r2 = record(pid=1), record(pid=2)
    write(tmp_path, r1)
    events: list[tuple[str, Any]] = []
    real_rename, real_fsync = os.replace, os.fsync

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        src, dst = Path(src), Path(dst)
        # At the moment of the rename, the temp file holds the whole new state
        # and state.json still holds the whole old one.
        assert src.parent == dst.parent == tmp_path
        assert src != dst and dst.name == FILE
        assert src.read_text() == dumps(r2)
        assert dst.read_text() == dumps(r1)
        events.append(("rename", src.name))
        real_rename(src, dst)

    # os.replace would do as well as os.rename.
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", rename)
    monkeypatch.setattr(os, "fsync", fsync)
    write(tmp_path, r2)
    # The file is fsynced before the rename, the directory after it.
    assert events == [("fsync", False), ("rename", f".{FILE}.tmp"), ("fsync", True)]
    assert read(tmp_path) == r2
    assert os.listdir(tmp_path) == [FILE]


@pytest.mark.parametrize("fail", ["rename", "fsync"])
def test_a_write_cut_short_leaves_the_old_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str) -> None:
    old = record(pid=1)
    write(tmp_path, old)

    def boom(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, fail, boom)
    if fail == "rename":
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path, record(pid=2))
    monkeypatch.undo()
    assert read(tmp_path) == old


def test_write_over_a_stale_temp_file(tmp_path: Path) -> None:
    (tmp_path / f".{FILE}.tmp").write_text("x" * 100_000)
    r = record()
    write(tmp_path, r)
    assert read(tmp_path) == r
    assert os.listdir(tmp_path) == [FILE]


def test_write_into_a_missing_directory_fails_without_creating_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write(tmp_path / "gone", record())
    assert not (tmp_path / "gone").exists()
