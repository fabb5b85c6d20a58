"""The state writer: real files in a temp dir, real threads, one event loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vmspawnd import state
from vmspawnd.errors import NoSpace
from vmspawnd.model import MachineSpec
from vmspawnd.statewriter import StateWriter

REAL_WRITE = state.write


class Machine:
    """What the writer snapshots: a record that changes under it."""

    def __init__(self) -> None:
        self.pid = 1
        self.threads: set[int] = set()

    def record(self) -> state.MachineRecord:
        self.threads.add(threading.get_ident())
        return state.MachineRecord(MachineSpec("m"), "0" * 32, 0, self.pid, 7, (), 1, 1)


class Disk:
    """state.write, watched: how many run at once, which pids landed, in order;
    it can hold a write in the thread until the test lets it go."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.landed: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail: list[OSError] = []

    def write(self, directory: Path, record: state.MachineRecord) -> None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.entered.set()
            assert self.gate.wait(10), "the test never let the write go"
            if self.fail:
                # As state.write reports it: a full disk is NoSpace.
                with state.space_of(directory):
                    raise self.fail.pop(0)
            REAL_WRITE(directory, record)
            self.landed.append(record.pid)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    d = Disk()
    monkeypatch.setattr(state, "write", d.write)
    yield d
    d.gate.set()


def on_disk(directory: Path) -> int:
    return state.read(directory).pid


def temps(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name != state.FILE]


async def held(disk: Disk) -> None:
    """Wait (bounded) until a write is inside state.write."""
    assert await asyncio.to_thread(disk.entered.wait, 10)
    disk.entered.clear()


async def test_a_burst_of_saves_is_one_or_two_writes_of_the_latest_state(tmp_path: Path, disk: Disk) -> None:
    m = Machine()
    w = StateWriter(tmp_path, m.record, "m")
    w.start()
    for pid in range(2, 102):
        m.pid = pid
        w.save()
    await w.close()
    assert on_disk(tmp_path) == 101
    assert 1 <= len(disk.landed) <= 2
    assert temps(tmp_path) == []


async def test_the_snapshot_is_taken_on_the_event_loop(tmp_path: Path, disk: Disk) -> None:
    m = Machine()
    w = StateWriter(tmp_path, m.record, "m")
    w.start()
    w.save()
    await w.write_now()
    await w.close()
    assert m.threads == {threading.get_ident()}


async def mid_write(tmp_path: Path, disk: Disk) -> tuple[Machine, StateWriter]:
    """A writer whose write of pid 1 is held in its thread, and pid 2 saved meanwhile."""
    m = Machine()
    w = StateWriter(tmp_path, m.record, "m")
    w.start()
    disk.gate.clear()
    w.save()
    await held(disk)
    m.pid = 2
    w.save()
    return m, w


async def after_the_held_write(disk: Disk, call: Coroutine[Any, Any, None], what: str) -> None:
    """`call` does not return while the write is held; let it go, then it does."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=0.2)
    assert not done, f"{what} must wait for the write in flight"
    disk.gate.set()
    await task


async def test_close_waits_for_the_write_in_flight_then_writes_the_last_state(tmp_path: Path, disk: Disk) -> None:
    _, w = await mid_write(tmp_path, disk)
    await after_the_held_write(disk, w.close(), "close()")
    assert disk.landed == [1, 2]
    assert disk.most == 1
    assert on_disk(tmp_path) == 2
    assert temps(tmp_path) == []


async def test_a_cancelled_writer_never_lets_an_older_state_land_after_a_newer(tmp_path: Path, disk: Disk) -> None:
    """Finding 9: the old close() cancelled the saver while its thread still
    wrote, then wrote again itself: two writes at once, into one temp file."""
    _, w = await mid_write(tmp_path, disk)
    assert w._task is not None
    w._task.cancel()
    # close() writes pid 2 in a thread of its own while pid 1's thread is held.
    await after_the_held_write(disk, w.close(), "close()")
    assert disk.most == 1
    assert disk.landed == [1, 2]
    assert on_disk(tmp_path) == 2
    assert temps(tmp_path) == []


async def test_many_writers_of_one_directory_never_share_a_temp_file(tmp_path: Path) -> None:
    """Even without the writer's lock: state.write's temp file is its own."""
    records = [state.MachineRecord(MachineSpec("m"), "0" * 32, 0, pid, 7, (), 1, 1) for pid in range(40)]
    await asyncio.gather(*(asyncio.to_thread(state.write, tmp_path, r) for r in records))
    assert on_disk(tmp_path) in range(40)
    assert temps(tmp_path) == []


async def test_many_saves_from_many_tasks(tmp_path: Path, disk: Disk) -> None:
    m = Machine()
    w = StateWriter(tmp_path, m.record, "m")
    w.start()

    async def changer(start: int) -> None:
        for i in range(50):
            m.pid = max(m.pid, start + i)
            w.save()
            await asyncio.sleep(0)

    await asyncio.gather(*(changer(1000 * k) for k in range(1, 6)))
    await w.close()
    assert disk.most == 1
    assert disk.landed == sorted(disk.landed)
    assert on_disk(tmp_path) == m.pid == 5049
    assert temps(tmp_path) == []


async def test_stop_lets_nothing_land_after_it(tmp_path: Path, disk: Disk) -> None:
    m, w = await mid_write(tmp_path, disk)
    await after_the_held_write(disk, w.stop(), "stop()")
    assert disk.landed == [1]
    # The machine's directory goes; nothing may be written into it again.
    (tmp_path / state.FILE).unlink()
    m.pid = 3
    w.save()
    await w.write_now()
    await w.close()
    assert disk.landed == [1]
    assert list(tmp_path.iterdir()) == []


async def test_no_space_is_logged_and_surfaced_and_the_writer_goes_on(
    tmp_path: Path, disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    m = Machine()
    w = StateWriter(tmp_path, m.record, "m")
    w.start()
    await w.write_now()
    disk.fail = [OSError(errno.ENOSPC, "No space left on device")]
    m.pid = 2
    with caplog.at_level(logging.WARNING, "vmspawnd.statewriter"):
        w.save()
        for _ in range(100):
            if w.error is not None:
                break
            await asyncio.sleep(0.01)
    assert isinstance(w.error, NoSpace)
    assert f"no space left for {tmp_path}" in str(w.error)
    assert "cannot write state.json: no space left for" in caplog.text
    assert w._task is not None and not w._task.done()
    assert on_disk(tmp_path) == 1
    # Space again: the next save writes the latest state and clears the error.
    m.pid = 3
    w.save()
    await w.close()
    assert on_disk(tmp_path) == 3
    assert w.error is None
    assert temps(tmp_path) == []


async def test_write_now_raises_no_space(tmp_path: Path, disk: Disk) -> None:
    m = Machine()
    w = StateWriter(tmp_path, m.record, "m")
    disk.fail = [OSError(errno.ENOSPC, "No space left on device")]
    with pytest.raises(NoSpace):
        await w.write_now()
    disk.fail = [OSError(errno.EACCES, "Permission denied")]
    with pytest.raises(PermissionError):
        await w.write_now()
    # Unsaved: close() tries once more.
    await w.close()
    assert on_disk(tmp_path) == 1


async def test_start_clears_temp_files_a_crash_left(tmp_path: Path) -> None:
    (tmp_path / f".{state.FILE}.tmp").write_text("old daemon")
    (tmp_path / f".{state.FILE}.x1y2.tmp").write_text("crashed")
    (tmp_path / "qemu.log").write_text("kept")
    w = StateWriter(tmp_path, Machine().record, "m")
    w.start()
    await w.close()
    assert sorted(os.listdir(tmp_path)) == ["qemu.log"]


async def test_a_failing_snapshot_is_logged_not_lost(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Any:
        raise RuntimeError("bug")

    w = StateWriter(tmp_path, broken, "m")
    with caplog.at_level(logging.ERROR, "vmspawnd.statewriter"):
        w.start()
        w.save()
        assert w._task is not None
        await asyncio.wait({w._task})
    assert "machine m: the state writer failed" in caplog.text
    assert "RuntimeError: bug" in caplog.text


def test_records_are_frozen() -> None:
    """Written in a thread: what the loop snapshotted cannot change under it."""
    r = Machine().record()
    with pytest.raises(AttributeError):
        r.pid = 2  # type: ignore[misc]
    assert replace(r, pid=2).pid == 2
