"""state.json: round trip, version check, atomic replacement."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmspawnd import state
from vmspawnd.errors import NoSpace
from vmspawnd.model import (
    Accel,
    DiskType,
    Drive,
    DriveSpec,
    DriveState,
    Firmware,
    Graphics,
    ImageFormat,
    MachineShare,
    MachineSpec,
    MiB,
    MountSpec,
    Network,
    NetworkMode,
    Nic,
    PluggedDrive,
)
from vmspawnd.state import (
    FILE,
    VERSION,
    MachineRecord,
    StateError,
    clear_all_but_log,
    dumps,
    loads,
    make_dir,
    read,
    write,
)

# The one exception a damaged state.json gives: nothing else may escape the reader.
UNREADABLE = StateError


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
            Drive("hp1", "/proc/self/fd/9", DiskType.VIRTIO_SCSI, "rp5", DriveState.REMOVING, (3, 5), "scsi1"),
            Drive("hp2", "/new", DiskType.VIRTIO_BLK, "rp6", node="hp2-swap"),
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
    assert d["version"] == VERSION == 2
    assert list(d) == sorted(d)
    assert d["spec"]["image"]["path"] == "/img"
    assert d["drives"][1] == {
        "id": "hp1",
        "path": "/proc/self/fd/9",
        "disk_type": "virtio-scsi",
        "port": "rp5",
        "state": "removing",
        "fdsets": [3, 5],
        "controller": "scsi1",
        "format": "raw",
        "read_only": False,
        "serial": "",
        "node": "",
    }
    assert d["drives"][2]["node"] == "hp2-swap"
    # A record from before SwapDrive has no node: the drive's own.
    del d["drives"][2]["node"]
    assert loads(json.dumps(d)).drives[2].block_node == "hp2-node"
    # Stable: dumping what was loaded gives the same text.
    assert dumps(loads(text)) == text


def v1_text(r: MachineRecord) -> str:
    """`r` as a version 1 daemon wrote it: none of the kept machines' fields."""
    d = json.loads(dumps(r)) | {"version": 1}
    del d["stopped"], d["spec"]["keep"], d["spec"]["plugged"]
    for drive in d["drives"]:
        del drive["format"], drive["read_only"], drive["serial"]
    return json.dumps(d)


def test_a_version_1_record_still_loads_as_a_machine_that_is_not_kept() -> None:
    r = record()
    assert loads(v1_text(r)) == r
    # Its fields are version 2's: a version 2 record missing one is refused.
    d = json.loads(v1_text(r)) | {"version": 2}
    with pytest.raises(StateError, match="missing"):
        loads(json.dumps(d))


def test_a_record_from_before_the_guest_agent_loads_without_one() -> None:
    r = record(spec=replace(record().spec, guest_agent=True))
    d = json.loads(dumps(r))
    assert d["spec"]["guest_agent"] is True
    del d["spec"]["guest_agent"]
    assert loads(json.dumps(d)) == replace(r, spec=replace(r.spec, guest_agent=False))


def test_a_record_from_before_graphics_loads_without_them() -> None:
    r = record(spec=replace(record().spec, graphics=Graphics.SPICE))
    d = json.loads(dumps(r))
    assert d["spec"]["graphics"] == "spice"
    assert loads(json.dumps(d)) == r
    del d["spec"]["graphics"]
    assert loads(json.dumps(d)) == replace(r, spec=replace(r.spec, graphics=Graphics.NONE))
    d["spec"]["graphics"] = "sdl"
    with pytest.raises(StateError, match=r"spec.graphics: 'sdl' is not one of none, vnc, spice"):
        loads(json.dumps(d))


def test_a_stopped_kept_machine_round_trips_with_its_plugged_drives() -> None:
    plugged = (
        PluggedDrive("disk3", DriveSpec(Path("/x.qcow2"), DiskType.NVME, ImageFormat.QCOW2, True, "S3"), "rp4"),
        PluggedDrive("data", DriveSpec(Path("/y"), DiskType.VIRTIO_SCSI), "rp5", "scsi1"),
    )
    spec = replace(record().spec, keep=True, plugged=plugged)
    r = record(spec=spec, pid=0, start_time=0, drives=(), stopped=True)
    assert loads(dumps(r)) == r
    d = json.loads(dumps(r))
    assert d["stopped"] is True and d["spec"]["keep"] is True
    assert d["spec"]["plugged"][1] == {
        "id": "data",
        "drive": {"path": "/y", "disk_type": "virtio-scsi", "format": "raw", "read_only": False, "serial": ""},
        "port": "rp5",
        "controller": "scsi1",
    }


def test_a_suspended_machine_round_trips_and_a_record_from_before_suspend_is_not_suspended() -> None:
    r = record(spec=replace(record().spec, keep=True), pid=0, start_time=0, drives=(), stopped=True, suspended=True)
    assert loads(dumps(r)) == r
    d = json.loads(dumps(r))
    assert d["suspended"] is True and d["version"] == 2
    del d["suspended"]
    assert loads(json.dumps(d)) == replace(r, suspended=False)


def test_clear_all_but_log_keeps_the_saved_state_only_when_asked(tmp_path: Path) -> None:
    for name in (state.SAVED, state.LOG, "state.json", "argv"):
        (tmp_path / name).write_text("x")
    state.clear_all_but_log(tmp_path, keep_saved=True)
    assert {p.name for p in tmp_path.iterdir()} == {state.SAVED, state.LOG}
    state.clear_all_but_log(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {state.LOG}


@pytest.mark.parametrize(("old", "fdsets"), [(3, (3,)), (None, ())])
def test_records_from_before_image_chains_keep_their_fdset(old: int | None, fdsets: tuple[int, ...]) -> None:
    d = json.loads(dumps(record()))
    drive = d["drives"][1]
    del drive["fdsets"]
    drive["fdset"] = old
    assert loads(json.dumps(d)).drives[1].fdsets == fdsets


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
    keep=st.booleans(),
    plugged=st.lists(st.builds(PluggedDrive, texts, drive_specs, texts, texts), max_size=3).map(tuple),
    guest_agent=st.booleans(),
    graphics=st.sampled_from(list(Graphics)),
)
drives = st.builds(
    Drive,
    texts,
    texts,
    st.sampled_from(list(DiskType)),
    texts,
    st.sampled_from(list(DriveState)),
    st.lists(st.integers(0, 2**31), max_size=4).map(tuple),
    texts,
    st.sampled_from(list(ImageFormat)),
    st.booleans(),
    texts,
    texts,
)
machine_shares = st.builds(
    MachineShare,
    texts,
    texts,
    texts,
    texts,
    st.booleans(),
    st.sampled_from(list(DriveState)),
    st.integers(0, 2**22),
    st.integers(0, 2**63),
)
nics = st.builds(Nic, texts, texts, texts, texts, st.sampled_from(list(DriveState)))
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
    qemu_uid=st.integers(0, 2**32 - 2),
    qemu_gid=st.integers(0, 2**32 - 2),
    shares=st.lists(machine_shares, max_size=3).map(tuple),
    stopped=st.booleans(),
    nics=st.lists(nics, max_size=3).map(tuple),
    suspended=st.booleans(),
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


@pytest.mark.parametrize("version", [0, 3, "1", None, 1.5])
def test_version_mismatch_refused(version: object) -> None:
    d = json.loads(dumps(record()))
    d["version"] = version
    with pytest.raises(
        StateError, match=rf"version: {re.escape(repr(version))} is not one this vmspawnd reads \(1, 2\)"
    ):
        loads(json.dumps(d))


def test_missing_version_refused() -> None:
    d = json.loads(dumps(record()))
    del d["version"]
    with pytest.raises(StateError, match="version: None is not one"):
        loads(json.dumps(d))


@pytest.mark.parametrize("text", ["", "{", "not json", '{"version": 1', "\0"])
def test_broken_json_is_a_state_error(text: str) -> None:
    with pytest.raises(StateError, match="not JSON"):
        loads(text)


@pytest.mark.parametrize("key", ["spec", "id", "owner_uid", "pid", "start_time", "drives", "next_fdset"])
def test_missing_field_is_unreadable(key: str) -> None:
    d = json.loads(dumps(record()))
    del d[key]
    with pytest.raises(StateError, match=f"^{key}: missing$"):
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
    with contextlib.suppress(UNREADABLE):
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
    assert [(e, v if e != "rename" else re.fullmatch(rf"\.{FILE}\.\w+\.tmp", v) is not None) for e, v in events] == [
        ("fsync", False),
        ("rename", True),
        ("fsync", True),
    ]
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
    with pytest.raises(NoSpace, match=f"no space left for {tmp_path}"):
        write(tmp_path, record(pid=2))
    monkeypatch.undo()
    assert read(tmp_path) == old
    # The temp file went with the failed write.
    assert os.listdir(tmp_path) == [FILE]


def test_write_beside_a_stale_temp_file(tmp_path: Path) -> None:
    (tmp_path / f".{FILE}.tmp").write_text("x" * 100_000)
    r = record()
    write(tmp_path, r)
    assert read(tmp_path) == r
    assert sorted(os.listdir(tmp_path)) == sorted([FILE, f".{FILE}.tmp"])


def test_write_into_a_missing_directory_fails_without_creating_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write(tmp_path / "gone", record())
    assert not (tmp_path / "gone").exists()


def test_two_writers_never_share_a_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 9: a write still running in its thread and the next one each have their own file."""
    seen: list[str] = []
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        seen.append(str(src))
        if len(seen) == 1:
            # The second write runs whole while the first is between its fsync and its rename.
            write(tmp_path, record(pid=2))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    write(tmp_path, record(pid=1))
    assert len(set(seen)) == 2
    monkeypatch.undo()
    assert read(tmp_path) == record(pid=1)
    assert os.listdir(tmp_path) == [FILE]


WRONG_TYPES = [
    (("pid",), "123", "pid: expected int, got str '123'"),
    (("next_fdset",), "1", "next_fdset: expected int, got str '1'"),
    (("pid",), True, "pid: expected int, got bool"),
    (("owner_uid",), 1.0, "owner_uid: expected int, got float"),
    (("id",), 7, "id: expected str, got int"),
    (("spec", "memory"), "512M", "spec.memory: expected int, got str"),
    (("spec", "accel"), "fast", "spec.accel: 'fast' is not one of kvm, tcg, auto"),
    (("spec", "network"), [], "spec.network: expected dict, got list"),
    (("spec", "network", "mode"), None, "spec.network.mode: expected str, got NoneType"),
    (("spec", "image", "read_only"), 0, "spec.image.read_only: expected bool, got int"),
    (("spec", "drives", 0, "disk_type"), "floppy", r"spec.drives\[0\].disk_type: 'floppy' is not one of"),
    (("spec", "qemu_extra", 1), 2, r"spec.qemu_extra\[1\]: expected str, got int"),
    (("spec", "mounts", 0), "srv", r"spec.mounts\[0\]: expected an object, got str"),
    (("drives", 1, "fdsets"), "3", r"drives\[1\].fdsets: expected list, got str"),
    (("drives", 1, "fdsets", 0), "3", r"drives\[1\].fdsets\[0\]: expected int, got str"),
    (("drives", 0, "state"), "gone", r"drives\[0\].state: 'gone' is not one of attached, removing"),
    (("drives",), {}, "drives: expected list, got dict"),
    (("spec",), None, "spec: expected dict, got NoneType"),
]


@pytest.mark.parametrize(("where", "value", "message"), WRONG_TYPES)
def test_a_wrong_type_is_a_state_error_naming_the_field(where: tuple[Any, ...], value: Any, message: str) -> None:
    """Finding 1: one bad field gives a typed error naming it, never a TypeError later."""
    d = json.loads(dumps(record()))
    parent = d
    for step in where[:-1]:
        parent = parent[step]
    parent[where[-1]] = value
    with pytest.raises(StateError, match=message):
        loads(json.dumps(d))


def test_files_from_before_share_hotplug_still_load() -> None:
    d = json.loads(dumps(record()))
    del d["shares"]
    assert loads(json.dumps(d)).shares == ()


def test_files_without_next_drive_still_load() -> None:
    d = json.loads(dumps(record()))
    del d["next_drive"]
    assert loads(json.dumps(d)).next_drive == 0


@pytest.mark.parametrize("data", [b"\xff\xfe", b'{"version": 1, "id": "\xc3"}'])
def test_bytes_that_are_not_utf8_are_a_state_error(tmp_path: Path, data: bytes) -> None:
    (tmp_path / FILE).write_bytes(data)
    with pytest.raises(StateError, match="not UTF-8"):
        read(tmp_path)


def test_deep_nesting_is_a_state_error() -> None:
    with pytest.raises(StateError):
        loads("[" * 100_000 + "]" * 100_000)


def test_a_record_without_qemu_identity_loads_as_none_of_its_own() -> None:
    d = json.loads(dumps(record(qemu_uid=7, qemu_gid=8)))
    assert (loads(json.dumps(d)).qemu_uid, loads(json.dumps(d)).qemu_gid) == (7, 8)
    del d["qemu_uid"], d["qemu_gid"]
    assert (loads(json.dumps(d)).qemu_uid, loads(json.dumps(d)).qemu_gid) == (0, 0)


def test_state_is_root_only_even_over_a_world_readable_one(tmp_path: Path) -> None:
    (tmp_path / FILE).write_text("{}")
    (tmp_path / FILE).chmod(0o644)
    write(tmp_path, record())
    assert (tmp_path / FILE).stat().st_mode & 0o777 == 0o600


def test_machine_dirs_are_0711_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        make_dir(tmp_path / "a")
        (tmp_path / "b").mkdir(mode=0o777)
        make_dir(tmp_path / "b", exist_ok=True)
    finally:
        os.umask(old)
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in "ab"} == {0o711}


def test_a_dead_machine_keeps_its_logs_and_nothing_else(tmp_path: Path) -> None:
    for name in ("qemu.log", "console.log", "state.json", "argv", "qmp.sock", f".{FILE}.x.tmp"):
        (tmp_path / name).write_text(name)
    (tmp_path / "sub").mkdir()
    removed = clear_all_but_log(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".{FILE}.x.tmp", "argv", "qmp.sock", "state.json", "sub"])
    assert sorted(os.listdir(tmp_path)) == ["console.log", "qemu.log"]
    assert clear_all_but_log(tmp_path / "gone") == []


def test_a_record_from_before_nic_hotplug_has_no_nics() -> None:
    d = json.loads(dumps(record()))
    del d["nics"]
    assert loads(json.dumps(d)).nics == ()


def test_a_recorded_nic_round_trips() -> None:
    card = Nic("nic1", "tap:tap0", "02:00:00:00:00:01", "rp3", DriveState.REMOVING)
    assert loads(dumps(record(nics=(card,)))).nics == (card,)
