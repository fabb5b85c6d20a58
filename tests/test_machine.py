"""Machine's life cycle and hotplug transactions against a fake QEMU monitor.

The fake keeps what the real one would (devices, block nodes, fdsets with
QEMU's rule that removed fds are closed only while the VM runs) and sends
DEVICE_DELETED when asked to unplug, so the tests run in milliseconds.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.devtypes import TYPES
from vmspawnd import state
from vmspawnd.accel import INTERNAL_ERROR
from vmspawnd.chainopen import OpenedChain
from vmspawnd.errors import AccessDenied, InvalidArgument, NoFreePort, NotRunning, UnplugTimeout
from vmspawnd.imagechain import single
from vmspawnd.machine import Machine
from vmspawnd.model import Accel, DiskType, Drive, DriveSpec, ImageFormat, MachineSpec, MachineState
from vmspawnd.qmp import QmpError
from vmspawnd.topology import plan_machine


class FakeQemu:
    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.devices: dict[str, str] = {}
        # node name -> file; a node QEMU opened by name for another sits under its parent's name.
        self.nodes: dict[str, str] = {}
        self.children: dict[str, str] = {}
        # A file the next blockdev-add opens by name (a header changed under the daemon).
        self.stray = ""
        self.commands: list[str] = []
        # fdset id -> [opaque, removed]
        self.fdsets: dict[int, list[Any]] = {}
        self.running = True
        # Device ids whose unplug the guest does not answer.
        self.deaf: set[str] = set()
        # Commands that raise once, as a broken handler would.
        self.broken: dict[str, BaseException] = {}
        self.refuse: dict[str, str] = {}
        # query-status's status (QEMU's RunState) while the VM is stopped.
        self.runstate = "paused"
        # Set while the dispatcher waits for an event and none is queued: all handled.
        self.idle = asyncio.Event()

    def emit(self, name: str, **data: Any) -> None:
        self.idle.clear()
        self.events.put_nowait((name, data))

    async def drained(self) -> None:
        await asyncio.wait_for(self.idle.wait(), 5)

    def _cleanup(self) -> None:
        # QEMU's monitor_fdset_cleanup: removed fds go only while the VM runs.
        for i in [i for i, (_, removed) in self.fdsets.items() if removed and self.running]:
            del self.fdsets[i]

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        args = args or {}
        self.commands.append(cmd)
        if cmd in self.broken:
            raise self.broken.pop(cmd)
        if cmd in self.refuse:
            raise QmpError(self.refuse.pop(cmd))
        if cmd == "device_add":
            self.devices[args["id"]] = args["bus"]
        elif cmd == "device_del":
            if args["id"] not in self.deaf:
                del self.devices[args["id"]]
                self.emit("DEVICE_DELETED", device=args["id"])
        elif cmd == "blockdev-add":
            self.nodes[args["node-name"]] = "json:{}"
            if self.stray:
                self.children[args["node-name"]] = child = f"#block{len(self.commands)}"
                self.nodes[child] = self.stray
        elif cmd == "blockdev-del":
            del self.nodes[args["node-name"]]
            if child := self.children.pop(args["node-name"], ""):
                del self.nodes[child]
        elif cmd == "remove-fd":
            if args["fdset-id"] not in self.fdsets:
                raise QmpError(f"File descriptor named 'fdset-id:{args['fdset-id']}' not found")
            self.fdsets[args["fdset-id"]][1] = True
            self._cleanup()
        elif cmd == "query-named-block-nodes":
            return [{"node-name": n, "file": f} for n, f in self.nodes.items()]
        elif cmd == "query-fdsets":
            return [{"fdset-id": i, "fds": [{"fd": 100 + i, "opaque": o}]} for i, (o, _) in self.fdsets.items()]
        elif cmd == "query-status":
            return {"running": self.running, "status": "running" if self.running else self.runstate}
        elif cmd in ("stop", "cont"):
            self.running = cmd == "cont"
            if self.running:
                self.emit("RESUME")
        return {}

    async def pass_fd(self, fd: int, fdset_id: int, opaque: str, timeout: float = 10) -> int:
        self.fdsets[fdset_id] = [opaque, False]
        return 100 + fdset_id

    async def next_event(self) -> tuple[str, dict[str, Any]]:
        if self.events.empty():
            self.idle.set()
        return await self.events.get()

    async def close(self, timeout: float = 10) -> None:
        pass


class FakeProcess:
    def __init__(self, child: bool = True) -> None:
        self.pid = os.getpid()
        self.start_time = 1
        self.returncode: int | None = None
        self.child = child
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def exit(self, code: int) -> None:
        # A re-attached QEMU is not our child: no exit status.
        self.returncode = code if self.child else None
        self.exited.set_result(None)

    async def wait(self, timeout: float) -> bool:
        await asyncio.wait({self.exited}, timeout=timeout)
        return self.exited.done()


class Observer:
    """A bus adapter with a bug: it raises when told a drive went."""

    def __init__(self) -> None:
        self.removed: list[str] = []
        self.states: list[str] = []

    def changed(self, machine: Machine, properties: set[str]) -> None:
        if "State" in properties:
            self.states.append(str(machine.state))

    def drive_added(self, machine: Machine, drive: Drive) -> None:
        pass

    def drive_removed(self, machine: Machine, drive_id: str) -> None:
        self.removed.append(drive_id)
        raise RuntimeError("observer bug")


async def machine(tmp_path: Path, qemu: FakeQemu, spares: int = 3, child: bool = True) -> Machine:
    spec = MachineSpec("m", kernel=Path("/k"), hotplug_spares=spares)
    m = Machine(spec, plan_machine(spec, TYPES), "0" * 32, tmp_path / "m", 0)
    m.dir.mkdir(parents=True)
    m._monitor = qemu  # type: ignore[assignment]
    m.process = FakeProcess(child)  # type: ignore[assignment]
    m.observer = Observer()
    await m._running(must_persist=True)
    return m


@pytest.fixture
def qemu() -> FakeQemu:
    return FakeQemu()


@pytest.fixture
async def lost() -> AsyncIterator[list[dict[str, Any]]]:
    """What the loop reports as never retrieved (gc runs the futures' __del__)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    loop.set_exception_handler(old)


@pytest.fixture
async def files(tmp_path: Path) -> AsyncIterator[list[OpenedChain]]:
    """Drive files as AddDrive hands them over: opened, one layer each."""
    chains = []
    for i in range(6):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"\0" * 512)
        chains.append(OpenedChain(single(str(path), ImageFormat.RAW, False), {"0": os.open(path, os.O_RDWR)}))
    yield chains
    for chain in chains:
        chain.close()


def spec(name: str = "/d", disk_type: DiskType = DiskType.VIRTIO_BLK) -> DriveSpec:
    return DriveSpec(Path(name), disk_type)


async def end(m: Machine, code: int = 0) -> None:
    assert isinstance(m.process, FakeProcess)
    m.process.exit(code)
    await asyncio.wait_for(m._ended.wait(), 5)


async def test_an_observer_that_raises_does_not_stop_later_unplugs(
    tmp_path: Path, qemu: FakeQemu, caplog: pytest.LogCaptureFixture, files: list[OpenedChain]
) -> None:
    """Finding 10: the observer's exception ended _dispatch_events, and every
    later RemoveDrive waited for an event nobody read, until UnplugTimeout."""
    m = await machine(tmp_path, qemu)
    drives = [await m.add_drive(spec(f"/d{i}"), files[i]) for i in range(3)]
    for d in drives:
        await m.remove_drive(d.id, 2)
    assert m.observer.removed == [d.id for d in drives]  # type: ignore[union-attr]
    assert m.drives == {} and m.ports.free_count == 3
    assert "the observer failed" in caplog.text
    await end(m)


async def test_a_handler_that_raises_costs_one_event_not_the_loop(
    tmp_path: Path, qemu: FakeQemu, caplog: pytest.LogCaptureFixture, files: list[OpenedChain]
) -> None:
    m = await machine(tmp_path, qemu)
    a, b = await m.add_drive(spec("/a"), files[0]), await m.add_drive(spec("/b"), files[1])
    qemu.broken["blockdev-del"] = RuntimeError("handler bug")
    # The first event's handling fails: its caller waits in vain, and says so.
    with pytest.raises(UnplugTimeout):
        await m.remove_drive(a.id, 0.3)
    await m.remove_drive(b.id, 2)
    assert b.id not in m.drives
    assert "handling QMP event DEVICE_DELETED failed" in caplog.text
    assert m.state is MachineState.RUNNING
    await end(m)


async def test_a_failed_task_of_the_machine_is_shown_not_lost(tmp_path: Path, qemu: FakeQemu) -> None:
    m = await machine(tmp_path, qemu)

    async def broken() -> None:
        raise RuntimeError("bug")

    m._spawn(broken(), "broken")
    for _ in range(10):
        await asyncio.sleep(0)
    assert m.state is MachineState.FAILED
    assert m.observer.states == ["failed"]  # type: ignore[union-attr]
    await end(m)


async def test_an_unplug_given_up_leaves_no_future_unretrieved(
    tmp_path: Path, qemu: FakeQemu, lost: list[dict[str, Any]], files: list[OpenedChain]
) -> None:
    """Finding 10: 'Future exception was never retrieved ... NotRunning' in
    the daemon's log, from waiters nobody awaited any more (a timed-out
    RemoveDrive, a SCSI controller's unplug) failed when the machine ended."""
    m = await machine(tmp_path, qemu)
    d = await m.add_drive(spec(), files[0])
    s1 = await m.add_drive(spec("/s1", DiskType.VIRTIO_SCSI), files[1])
    qemu.deaf = {d.id, "scsi1"}
    with pytest.raises(UnplugTimeout):
        await m.remove_drive(d.id, 0.05)
    # The controller goes with its last drive, and never answers.
    await m.remove_drive(s1.id, 2)
    await end(m)
    gc.collect()
    assert [c["message"] for c in lost] == []


async def test_a_waiting_unplug_hears_that_the_machine_stopped(
    tmp_path: Path, qemu: FakeQemu, files: list[OpenedChain]
) -> None:
    m = await machine(tmp_path, qemu)
    d = await m.add_drive(spec(), files[0])
    qemu.deaf = {d.id}
    waiting = asyncio.ensure_future(m.remove_drive(d.id, 5))
    await asyncio.sleep(0.05)
    await end(m)
    with pytest.raises(NotRunning, match="stopped during the unplug"):
        await waiting


async def test_no_free_port_on_a_paused_vm_hands_qemu_no_fd(
    tmp_path: Path, qemu: FakeQemu, files: list[OpenedChain]
) -> None:
    """Finding 12: the fd went to QEMU before the port was taken; on a paused
    VM remove-fd does not close it, so each NoFreePort left an fdset behind."""
    m = await machine(tmp_path, qemu, spares=2)
    await qemu.execute("stop")
    for chain in files[:2]:
        await m.add_drive(spec(), chain)
    attached = set(qemu.fdsets)
    for chain in files[2:]:
        with pytest.raises(NoFreePort):
            await m.add_drive(spec(), chain)
    assert set(qemu.fdsets) == attached
    await end(m)


async def test_an_fd_rolled_back_on_a_paused_vm_is_freed_when_it_resumes(
    tmp_path: Path, qemu: FakeQemu, files: list[OpenedChain]
) -> None:
    m = await machine(tmp_path, qemu)
    await qemu.execute("stop")
    qemu.refuse["device_add"] = "Failed to get 'write' lock"
    with pytest.raises(Exception, match="write"):
        await m.add_drive(spec(), files[0])
    # QEMU keeps it while paused ...
    assert list(qemu.fdsets) == [1]
    await qemu.execute("cont")
    for _ in range(20):
        if not qemu.fdsets:
            break
        await asyncio.sleep(0.01)
    # ... and the daemon removes it again once the VM runs.
    assert qemu.fdsets == {}
    assert m.ports.free_count == 3
    await end(m)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [("guest-shutdown", "stopped"), ("host-qmp-quit", "stopped"), ("host-signal", "stopped"), (None, "failed")],
)
async def test_a_reattached_qemu_that_shut_down_is_stopped_not_failed(
    tmp_path: Path, qemu: FakeQemu, caplog: pytest.LogCaptureFixture, reason: str | None, expected: str
) -> None:
    """Finding 11: a re-attached QEMU is not our child: its exit status is
    unknown, and a clean power-off was reported as 'exited unexpectedly (None)'."""
    m = await machine(tmp_path, qemu, child=False)
    (m.dir / state.CONSOLE).write_text("guest said goodbye\n")
    if reason:
        qemu.emit("SHUTDOWN", guest=reason.startswith("guest"), reason=reason)
        await asyncio.sleep(0.01)
    await end(m)
    assert str(m.state) == expected
    assert ("exited unexpectedly" in caplog.text) == (expected == "failed")
    # Stopped or failed, the console log stays for its user.
    assert (m.dir / state.CONSOLE).read_text() == "guest said goodbye\n"
    assert sorted(os.listdir(m.dir)) == [state.CONSOLE]


async def test_a_child_qemu_is_judged_by_its_exit_status(tmp_path: Path, qemu: FakeQemu) -> None:
    ok, bad = await machine(tmp_path / "a", qemu), await machine(tmp_path / "b", FakeQemu())
    await end(ok, 0)
    await end(bad, 1)
    assert (ok.state, bad.state) == (MachineState.STOPPED, MachineState.FAILED)


async def test_state_json_follows_the_drives_and_nothing_lands_after_the_end(
    tmp_path: Path, qemu: FakeQemu, files: list[OpenedChain]
) -> None:
    m = await machine(tmp_path, qemu)
    d = await m.add_drive(spec(), files[0])
    await m._writer.write_now()
    assert [x.id for x in state.read(m.dir).drives] == [d.id]
    m.save()
    await end(m)
    assert not (m.dir / state.FILE).exists()


async def test_an_add_after_the_first_asks_for_the_block_nodes_once(
    tmp_path: Path, qemu: FakeQemu, files: list[OpenedChain]
) -> None:
    """AddDrive's share of a QMP round trip matters (bench/hotplug.py): the
    node list from before blockdev-add is the one the last add saw."""
    m = await machine(tmp_path, qemu)
    await m.add_drive(spec(), files[0])
    qemu.commands.clear()
    await m.add_drive(spec(), files[1])
    assert qemu.commands.count("query-named-block-nodes") == 1
    await end(m)


async def test_a_node_another_monitor_added_is_not_taken_for_a_stray(
    tmp_path: Path, qemu: FakeQemu, files: list[OpenedChain]
) -> None:
    m = await machine(tmp_path, qemu)
    await m.add_drive(spec(), files[0])
    qemu.nodes["theirs"] = "/srv/their.img"
    drive = await m.add_drive(spec(), files[1])
    assert drive.id in qemu.devices and "theirs" in qemu.nodes
    await end(m)


@pytest.mark.parametrize("earlier_adds", [0, 1])
async def test_a_file_qemu_opened_by_name_is_refused_and_leaves_nothing(
    tmp_path: Path, qemu: FakeQemu, files: list[OpenedChain], earlier_adds: int
) -> None:
    """A header changed under the daemon: QEMU opened a file it named. With
    and without a node list from an earlier add."""
    m = await machine(tmp_path, qemu)
    for chain in files[:earlier_adds]:
        await m.add_drive(spec(), chain)
    before = (dict(qemu.nodes), dict(qemu.devices), m.ports.free_spares)
    qemu.stray = "/etc/shadow"
    with pytest.raises(AccessDenied, match="/etc/shadow"):
        await m.add_drive(spec(), files[earlier_adds])
    assert (qemu.nodes, qemu.devices, m.ports.free_spares) == before
    assert all(removed for _, removed in list(qemu.fdsets.values())[earlier_adds:])
    await end(m)


async def test_a_drive_id_too_long_for_its_block_node_is_the_callers_to_shorten(
    tmp_path: Path, qemu: FakeQemu, files: list[OpenedChain]
) -> None:
    """QEMU refused a 27-32 character id ("Node name too long") after the
    daemon had taken it as valid; the longest id now fits QEMU's 31."""
    m = await machine(tmp_path, qemu)
    qemu.commands.clear()
    with pytest.raises(InvalidArgument, match="1-26 letters"):
        await m.add_drive(spec(), files[0], "a" * 27)
    assert qemu.commands == []
    drive = await m.add_drive(spec(), files[0], "a" * 26)
    assert all(len(node) <= 31 for node in qemu.nodes) and drive.id in qemu.devices
    await end(m)


@pytest.mark.parametrize("asked", [Accel.AUTO, Accel.KVM])
async def test_kvm_failing_under_the_guest_is_told_to_the_manager_once_only_for_auto(
    tmp_path: Path, qemu: FakeQemu, caplog: pytest.LogCaptureFixture, asked: Accel
) -> None:
    m = await machine(tmp_path, qemu)
    m.spec, m.accel = replace(m.spec, accel=asked), "kvm"
    told: list[Machine] = []
    m.on_kvm_failed = told.append
    # A Pause is a stop like any other.
    await m.pause()
    qemu.emit("STOP")
    await qemu.drained()
    assert told == [] and "failed" not in caplog.text
    await m.resume()
    # QEMU stops the guest itself where KVM cannot go on (one STOP per vCPU at worst).
    qemu.running, qemu.runstate = False, INTERNAL_ERROR
    qemu.emit("STOP")
    qemu.emit("STOP")
    await qemu.drained()
    assert m.state is MachineState.PAUSED
    if asked is Accel.AUTO:
        assert told == [m] and m.kvm_failed == INTERNAL_ERROR
    else:
        # Asked for, KVM is not replaced: the machine stays paused and the log says why.
        assert told == [] and not m.kvm_failed
        assert "machine m: KVM failed: QEMU stopped the guest in runstate internal-error" in caplog.text
        assert "it stays paused, as accel=kvm asked for KVM only" in caplog.text


def test_a_failed_start_leaves_a_kept_machine_stopped_and_one_not_kept_failed(tmp_path: Path) -> None:
    for keep, expected in ((True, MachineState.STOPPED), (False, MachineState.FAILED)):
        spec = MachineSpec("m", kernel=Path("/k"), keep=keep)
        m = Machine(spec, plan_machine(spec, TYPES), "0" * 32, tmp_path / "m", 0)
        m.start_failed("QEMU exited during start-up")
        assert m.state is expected
        assert m.reason == "the last Start() failed: QEMU exited during start-up"
