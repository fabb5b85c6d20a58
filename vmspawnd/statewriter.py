"""One writer of a machine's state.json, off the request path.

save() only marks the state dirty (fsync costs milliseconds, and QMP, not
state.json, is the truth for drives on re-attach). The writer's own task
takes the snapshot on the event loop, never in the worker thread (where the
machine's dicts could change under it), and writes it in a thread with
state.write (a temp file of its own, fsync, rename, fsync of the directory).
A burst of saves coalesces into one write. Writes are numbered and run one
at a time under a thread lock, so an older snapshot never replaces a newer
one, even when a cancelled task's thread is still writing; after stop()
nothing lands in the directory any more.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from . import state
from .errors import NoSpace

log = logging.getLogger(__name__)


class StateWriter:
    def __init__(self, directory: Path, snapshot: Callable[[], state.MachineRecord], machine: str) -> None:
        self.directory = directory
        self.machine = machine
        self._snapshot = snapshot
        self._wake = asyncio.Event()
        self._dirty = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # Held by a worker thread for a whole write; guards the two below.
        self._lock = threading.Lock()
        self._sealed = False
        self._on_disk = 0
        # Numbers the snapshots, on the event loop.
        self._taken = 0
        # Set while the last write failed for lack of space (state.write's
        # NoSpace); a later write that works clears it.
        self.error: NoSpace | None = None

    def start(self) -> None:
        """Clear temp files a crashed writer left, then start writing on save()."""
        for stale in self.directory.glob(f".{state.FILE}*.tmp"):
            stale.unlink(missing_ok=True)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"state.json of {self.machine}")
        self._task.add_done_callback(self._task_ended)

    def save(self) -> None:
        """Write the state soon; returns at once."""
        self._dirty = True
        self._wake.set()

    async def write_now(self) -> None:
        """Write the state and return once it is on disk (NoSpace, OSError)."""
        self._dirty = False
        try:
            await self._write()
        except (OSError, NoSpace) as e:
            self._failed(e)
            raise

    async def close(self) -> None:
        """Daemon shutdown: let a write in flight finish (a thread is never
        cancelled mid-write), then write what is still unsaved."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            # asyncio.wait: were close() cancelled, the task still ends on its own.
            await asyncio.wait({self._task})
        await self._write_if_dirty()

    async def stop(self) -> None:
        """The machine ended: once this returns, no write lands in its directory."""
        self._closing = True
        self._dirty = False
        self._wake.set()
        # Taking the lock waits for a write in flight; the seal turns away any later one.
        await asyncio.to_thread(self._seal)
        if self._task is not None:
            await asyncio.wait({self._task})

    # -- inside ---------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            if not self._closing:
                await self._write_if_dirty()

    async def _write_if_dirty(self) -> None:
        if self._dirty:
            self._dirty = False
            try:
                await self._write()
            except (OSError, NoSpace) as e:
                self._failed(e)

    async def _write(self) -> None:
        self._taken += 1
        number, record = self._taken, self._snapshot()
        if await asyncio.to_thread(self._write_locked, number, record) and self.error is not None:
            log.info("machine %s: state.json is written again", self.machine, extra={"MACHINE": self.machine})
            self.error = None

    def _write_locked(self, number: int, record: state.MachineRecord) -> bool:
        with self._lock:
            if self._sealed or number <= self._on_disk:
                return False
            state.write(self.directory, record)
            self._on_disk = number
            return True

    def _seal(self) -> None:
        with self._lock:
            self._sealed = True

    def _failed(self, e: OSError | NoSpace) -> None:
        # Not written: the next save() or close() tries again with the latest state.
        self._dirty = True
        self.error = e if isinstance(e, NoSpace) else None
        log.warning("machine %s: cannot write state.json: %s", self.machine, e, extra={"MACHINE": self.machine})

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error("machine %s: the state writer failed", self.machine, exc_info=e, extra={"MACHINE": self.machine})
