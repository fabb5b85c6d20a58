"""One virtual machine: its QEMU process, its monitor, its ports and drives."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from . import accel, acl, blockjob, blockstats, cmdline, imagechain, keep, nic, qemulog, qga, reconcile, share, state
from .chainopen import OpenedChain
from .console import Console
from .errors import (
    AccessDenied,
    AgentUnavailable,
    AlreadyRunning,
    InvalidArgument,
    JobFailed,
    JobInProgress,
    JobTimeout,
    MigrationFailed,
    MigrationInProgress,
    NoGraphics,
    NoSpace,
    NoSuchDrive,
    NoSuchNetwork,
    NoSuchShare,
    NotMigrating,
    NotRunning,
    QemuFailed,
    QemuUnresponsive,
    UnplugInProgress,
    UnplugTimeout,
    Unsupported,
    VmspawndError,
)
from .identity import Identity
from .model import (
    Accel,
    DiskType,
    Drive,
    DriveSpec,
    DriveState,
    Graphics,
    ImageFormat,
    MachineShare,
    MachineSpec,
    MachineState,
    Nic,
)
from .porttable import PortTable
from .process import Process, confinement_for
from .process import start_time as process_start_time
from .qmp import TIMEOUT, Monitor, QmpDisconnected, QmpError
from .statewriter import StateWriter
from .topology import Plan, drive_id
from .units import Service, Systemd

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
QUIT_TIMEOUT = 5.0
# PowerOff presses the ACPI button again this often: a guest still booting
# has not enabled the button yet, and a press before that is lost.
BUTTON_REPEAT = 2.0
CONSOLE_SOCK = "console.sock"
# QEMU's end of the guest agent's virtio-serial port (guest_agent machines).
AGENT_SOCK = "agent.sock"
# SetUserPassword: Linux's useradd takes names of at most 32 characters; 256 leaves room for others.
USER_NAME_MAX = 256
USER_NAME = re.compile(rf"[^:/\s\x00-\x1f\x7f]{{1,{USER_NAME_MAX}}}")
PASSWORD_MAX = 4096
# How long terminate() waits for quit's reply: a QEMU that cannot answer it
# cannot act on SIGTERM either, so it is killed.
QUIT_REPLY_TIMEOUT = 2.0
# The guest cuts longer serials (nvme and virtio-blk: 20 bytes); QEMU's scsi-disk refuses over 36.
SERIAL_MAX = {DiskType.VIRTIO_BLK: 20, DiskType.NVME: 20, DiskType.VIRTIO_SCSI: 36, DiskType.VIRTIO_SCSI_CDROM: 36}
# 26: the block node of a drive is "<id>-node", and QEMU's node names hold at most 31.
DRIVE_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,25}")
# A hotplugged share's chardev: QEMU's end of its virtiofsd connection.
SHARE_CHARDEV = "{}" + reconcile.CHARDEV_SUFFIX
# Ids the daemon gives its own devices.
CONTROLLER_ID = re.compile(r"scsi\d+")
BOOT_NIC = "net0"
RESERVED_ID = re.compile(r"(rp|scsi|implicit|fs|sw)\d+|sw\d+p\d+|net0|vsock0|rootfs|qga0")
# QEMU >= 6.2 refuses device_del while the slot's power indicator blinks
# (the guest is still handling the last plug); it clears on its own.
GUEST_BUSY = "guest is busy"
BUSY_RETRY = 0.1
# Test-only: the daemon kills itself at this point of a request, to prove
# that a restart reconciles what was left half done.
FAULT = os.environ.get("VMSPAWND_TEST_FAULT", "")
# QMP events that tell the run state, whoever caused them.
RUN_STATE_EVENTS = {"STOP": MachineState.PAUSED, "RESUME": MachineState.RUNNING}
# SHUTDOWN reasons of a QEMU that stopped as asked: a re-attached QEMU is not
# our child, so its exit status is not ours to read and the event tells.
CLEAN_SHUTDOWN = {"guest-shutdown", "host-qmp-quit", "host-signal"}
# How long a re-attached QEMU's SHUTDOWN event may trail its exit: it is in
# our socket before QEMU exits, reading it takes milliseconds.
SHUTDOWN_EVENT_TIMEOUT = 2.0
# Suspend and its resume: the name QEMU holds the saved state's fd under
# (getfd, then `fd:` migration: QEMU 7.2 has no `file:` URI and the sandbox
# forbids `exec:`), and how long writing or reading it may take: a fixed part
# plus some per GiB of guest memory (a local file takes a fraction of it).
SAVED_FD = "vmstate"
MIGRATION_TIMEOUT = 30.0
MIGRATION_TIMEOUT_PER_GIB = 30.0
MIGRATION_ENDS = ("completed", "failed", "cancelled")
EVENTS_CAPABILITY: dict[str, object] = {"capabilities": [{"capability": "events", "state": True}]}


def migration_timeout(memory: int) -> float:
    return MIGRATION_TIMEOUT + MIGRATION_TIMEOUT_PER_GIB * memory / (1 << 30)


# A live migration's stream: the name QEMU holds its fd under (getfd).
MIGRATION_FD = "migration"
# OpenGraphics: the name a new display client's socket has in QEMU until add_client takes it.
GRAPHICS_FD = "graphics"


class Outgoing:
    """A migration out of this machine (Migrate) while it runs."""

    def __init__(self) -> None:
        # ForceCompleteMigration stopped the guest: a failed migration resumes it.
        self.paused = False
        # Set once Migrate is done with it (the guest runs again here, or the machine is gone).
        self.finished = asyncio.Event()
        # Its last MIGRATION status, once it ended.
        self.end: asyncio.Future[str] = asyncio.get_running_loop().create_future()


class BlockJob:
    """A block job of ours in QEMU (SnapshotDrive, SwapDrive): the statuses its JOB_STATUS_CHANGE events told."""

    def __init__(self, job_id: str, method: str) -> None:
        self.id = job_id
        self.method = method
        self._seen: set[str] = set()
        self._changed = asyncio.Event()

    def status(self, status: str) -> None:
        self._seen.add(status)
        self._changed.set()

    async def reach(self, wanted: set[str]) -> str:
        """The first of `wanted` the job got to (concluded before any other), GONE once QEMU exited."""
        while not (hit := (wanted | {blockjob.GONE}) & self._seen):
            self._changed.clear()
            await self._changed.wait()
        for first in (blockjob.GONE, blockjob.CONCLUDED):
            if first in hit:
                return first
        return hit.pop()


def check_target_fd(fd: int, method: str) -> None:
    """A copy's target: a regular file or block device the caller opened for reading and writing."""
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode) and not stat.S_ISBLK(mode):
        raise InvalidArgument(f"{method} writes into a regular file or a block device; the fd passed is neither")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_ACCMODE != os.O_RDWR or flags & os.O_APPEND:
        raise InvalidArgument(
            f"{method}: the fd passed is not open for reading and writing (O_RDWR, without O_APPEND); "
            "QEMU writes the copy through it"
        )


def prepare_target(fd: int, fmt: ImageFormat, size: int) -> None:
    """A regular file becomes the drive's size (raw) or empty (qcow2, formatted
    anew); a block device stays as it is (the raw node is cut to the size)."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        try:
            os.ftruncate(fd, size if fmt is ImageFormat.RAW else 0)
        except OSError as e:
            raise JobFailed(f"cannot make the target file {size} bytes long: {e.strerror}; nothing was copied") from e


def refuse_read_only(drive: Drive) -> None:
    if drive.read_only:
        raise InvalidArgument(
            f"SwapDrive: drive {drive.id} is read-only: nothing writes to it, so nothing needs to move; "
            "remove it and add the other file instead"
        )


class Observer(Protocol):
    def changed(self, machine: Machine, properties: set[str]) -> None: ...
    def drive_added(self, machine: Machine, drive: Drive) -> None: ...
    def drive_removed(self, machine: Machine, drive_id: str) -> None: ...
    def share_added(self, machine: Machine, added: MachineShare) -> None: ...
    def share_removed(self, machine: Machine, share_id: str) -> None: ...
    def network_added(self, machine: Machine, card: Nic) -> None: ...
    def network_removed(self, machine: Machine, nic_id: str) -> None: ...


@contextlib.contextmanager
def _listening(path: str) -> Iterator[socket.socket]:
    """A listening socket for QEMU to hold (the monitor, the console, the
    guest agent); only root connects by its path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen()
        yield sock


def check_password_request(user: str, password: str) -> None:
    """What SetUserPassword may pass to the agent (qemu-ga writes "user:password"
    to chpasswd: a ':' in the name or a line break in either would be a second entry)."""
    if not USER_NAME.fullmatch(user):
        raise InvalidArgument(
            f"user name {user[:64]!r} is invalid: give 1-{USER_NAME_MAX} characters without ':', '/', "
            "white space or control characters"
        )
    if not password:
        raise InvalidArgument("the password is empty")
    if len(password) > PASSWORD_MAX:
        raise InvalidArgument(f"the password is longer than {PASSWORD_MAX} characters")
    if any(ord(c) < 0x20 or c == "\x7f" for c in password):
        raise InvalidArgument("the password contains a line break or another control character")


def qemu_errors(log_path: Path) -> str:
    """QEMU's own error lines from its stderr log, the most useful first."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no QEMU output)"
    errors = [line for line in lines if line.startswith(cmdline.QEMU + ":")]
    return "; ".join(errors or lines[-3:]) or "(no QEMU output)"


class Machine:
    def __init__(
        self,
        spec: MachineSpec,
        plan: Plan,
        machine_id: str,
        directory: Path,
        owner_uid: int,
        identity: Identity | None = None,
        systemd: Systemd | None = None,
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.id = machine_id
        self.dir = directory
        self.owner_uid = owner_uid
        # The uid/gid its QEMU runs as; None: the daemon's own (not root).
        self.identity = identity
        # Where systemd is PID 1: each virtiofsd is a transient service.
        self.systemd = systemd
        self.state = MachineState.STARTING
        # Why the machine is unmanaged (or was refused); "" when all is well.
        self.reason = ""
        # The accelerator QEMU runs with ("kvm" or "tcg"), once it is known.
        self.accel = ""
        # Set while a command has gone unanswered: requests are refused at
        # once until QEMU answers again.
        self._unresponsive = ""
        # Created with `incoming`: QEMU waits for the migration stream Incoming() feeds it.
        self.incoming = False
        # The migration out of this machine in flight (Migrate).
        self._outgoing: Outgoing | None = None
        # QEMU's MIGRATION status of the last migration in or out ("" before any).
        self.migration_status = ""
        self.observer: Observer | None = None
        self.on_ended: Callable[[Machine], None] | None = None
        # KVM failed under this "auto" machine (accel.on_stop): the manager starts it again with TCG.
        self.on_kvm_failed: Callable[[Machine], None] | None = None
        # The runstate QEMU stopped the guest in when KVM failed ("" while it has not).
        self.kvm_failed = ""
        # Its QEMU stops only to start again at once (stop_for_relaunch): it stays listed meanwhile.
        self._relaunch = False
        # A next run (successor) starts in its predecessor's directory, there already with its logs.
        self._reuses_dir = False
        self.process: Process | None = None
        self._virtiofsd: list[tuple[share.OpenShare, Process | Service]] = []
        # Where QEMU's stderr goes, for a start that fails (its words are in qemu.log).
        self._qemu_output: qemulog.QemuLog | None = None
        # virtiofsd logs a failed start keeps, for the error that names them.
        self._kept_logs: list[Path] = []
        self._monitor = Monitor(spec.name)
        self.console = Console(spec.name, self.console_log, lambda: self._notify("ConsoleClients"))
        self.ports = PortTable(plan.ports, spec.name)
        self.drives: dict[str, Drive] = {}
        # Boot-time shares (on builtin ports, for good) and hotplugged ones.
        self.shares: dict[str, MachineShare] = {
            s.device: MachineShare(s.device, s.tag, str(s.source), plan.port_carrying(s.device).id)
            for s in cmdline.shares(spec)
        }
        self._boot_shares = frozenset(self.shares)
        self._next_share = 0
        # Whether QEMU's guest memory is shareable (vhost-user needs it); asked once.
        self._shared_memory: bool | None = None
        # Hotplugged network interfaces (the boot NIC, net0, is the plan's).
        self.nics: dict[str, Nic] = {}
        self._next_nic = 1
        # Serialises the requests to this machine; different machines run in parallel.
        self._lock = asyncio.Lock()
        # Guest agent calls wait on the guest, not on QEMU: one at a time, apart from the requests.
        self._agent_lock = asyncio.Lock()
        # RemoveDrive calls waiting for their DEVICE_DELETED; each is awaited by its caller.
        self._waiters: dict[str, asyncio.Future[None]] = {}
        # SCSI controllers unplugged with their last drive, until their DEVICE_DELETED.
        self._leaving: set[str] = set()
        # fdsets QEMU kept after remove-fd (it frees them only while the VM runs).
        self._unfreed_fdsets: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ended = asyncio.Event()
        # PowerOff asked the guest to power down: an exit then is a clean one,
        # even when its status is unknown (a re-attached QEMU is not our child).
        self._powering_off = False
        # Terminate() ends a kept machine for good; any other stop keeps it defined.
        self._forget = False
        # QEMU's SHUTDOWN event and its reason: how a re-attached QEMU ended.
        self._shutdown = asyncio.Event()
        self._shutdown_reason = ""
        self._writer = StateWriter(directory, self.record, spec.name)
        # QEMU saved the guest's state to state.SAVED (Suspend): at rest the machine is suspended.
        self.suspended = False
        # This run resumes from state.SAVED (Start() of a suspended machine).
        self.resuming = False
        # Suspend waiting for QEMU's MIGRATION event that ends the save.
        self._migration: asyncio.Future[str] | None = None
        self._next_fdset = 1
        self._next_controller = 1
        self._next_drive = len(spec.boot_drives)
        # Drive id -> the SnapshotDrive or SwapDrive running on it (one at a time per drive).
        self._busy: dict[str, str] = {}
        # Job id -> our block job in QEMU, for its JOB_STATUS_CHANGE events.
        self._jobs: dict[str, BlockJob] = {}
        # Drive ids whose block node QEMU would not give back.
        self._stuck_ids: set[str] = set()
        # The block node names of the last query-named-block-nodes; None before the first.
        self._nodes: set[str] | None = None
        for i, drive in enumerate(spec.boot_drives):
            dev = drive_id(i)
            controller = plan.scsi_controller if drive.disk_type.is_scsi else ""
            port = plan.port_carrying(controller or dev).id
            self.drives[dev] = Drive(
                dev, str(drive.path), drive.disk_type, port, controller=controller, format=drive.format,
                read_only=drive.read_only, serial=drive.serial,
            )  # fmt: skip
        for plugged in spec.plugged:
            self.drives[plugged.id] = keep.plugged_drive(plugged)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def console_log(self) -> Path:
        return self.dir / state.CONSOLE

    @property
    def qemu_log(self) -> Path:
        return self.dir / state.LOG

    @property
    def leader(self) -> int:
        return self.process.pid if self.process and not self.state.at_rest else 0

    @property
    def defined(self) -> bool:
        """A kept machine not terminated: it stays listed when it stops
        (not while it waits for its incoming migration: a failed one removes it)."""
        return (self.spec.keep or self._relaunch) and not self._forget and not self.incoming

    def loaded_stopped(self, record: state.MachineRecord) -> None:
        """A kept, stopped (or suspended) machine read back from its record
        (daemon start); suspended only while its saved state is there."""
        self.suspended = record.suspended and (self.dir / state.SAVED).is_file()
        self.state = MachineState.SUSPENDED if self.suspended else MachineState.STOPPED
        self._next_drive = max(self._next_drive, record.next_drive)
        self._next_controller = record.next_controller
        self._ended.set()

    def successor(self, spec: MachineSpec, plan: Plan, identity: Identity | None) -> Machine:
        """The next run of this kept, stopped machine: `spec` (its own, the
        hotplugged drives folded in), its id, directory and owner; ids it gave
        out stay used."""
        after = Machine(spec, plan, self.id, self.dir, self.owner_uid, identity, self.systemd)
        after._next_drive = max(after._next_drive, self._next_drive)
        after._next_controller = self._next_controller
        after.resuming = self.suspended
        after._reuses_dir = True
        return after

    # -- life cycle ---------------------------------------------------------

    def record(self) -> state.MachineRecord:
        assert self.process is not None
        return state.MachineRecord(
            self.spec,
            self.id,
            self.owner_uid,
            self.process.pid,
            self.process.start_time,
            tuple(self.drives.values()),
            self._next_fdset,
            self._next_controller,
            self._next_drive,
            self.identity.uid if self.identity else 0,
            self.identity.gid if self.identity else 0,
            tuple(s for dev, s in self.shares.items() if dev not in self._boot_shares),
            nics=tuple(self.nics.values()),
            suspended=self.suspended,
        )

    def starting(self) -> None:
        """Start() took this stopped machine: its next run is on the way."""
        self.state = MachineState.STARTING
        self.reason = ""
        self._notify("State", "StateReason")

    def start_failed(self, why: str) -> None:
        # A suspended machine stays suspended, its saved state kept for the
        # next Start(); one not kept (its start with TCG after KVM failed) has failed.
        at_rest = MachineState.STOPPED if self.spec.keep else MachineState.FAILED
        self.state = MachineState.SUSPENDED if self.suspended else at_rest
        self.reason = f"the last Start() failed: {why}"
        self._notify("State", "StateReason")

    def stopped_record(self) -> state.MachineRecord:
        """A kept machine at rest: its spec (drives on spare ports folded in), no process."""
        return state.MachineRecord(
            self.spec,
            self.id,
            self.owner_uid,
            0,
            0,
            (),
            1,
            self._next_controller,
            self._next_drive,
            stopped=True,
            suspended=self.suspended,
        )

    async def save_stopped(self) -> None:
        """Write the stopped record now; a failure is logged: the machine stays
        listed, but a daemon restart would not find it again."""
        try:
            with state.space_of(self.dir):
                await asyncio.to_thread(state.write, self.dir, self.stopped_record())
        except (OSError, NoSpace) as e:
            log.error(
                "machine %s: cannot write its stopped record (%s); it is lost at the next daemon start",
                self.name, e, extra={"MACHINE": self.name},
            )  # fmt: skip

    def save(self) -> None:
        """Persist soon, off the request path (see StateWriter)."""
        self._writer.save()

    async def start(
        self,
        vsock_cid: int,
        opened: dict[str, int],
        shares: Sequence[share.OpenShare] = (),
        tap_fd: int | None = None,
        chains: dict[str, imagechain.Layer] | None = None,
        kernel_fd: int | None = None,
        initrd_fd: int | None = None,
        plugged: dict[str, OpenedChain] | None = None,
        confine: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Start QEMU; returns once its monitor answered qmp_capabilities.

        `opened`: caller's path -> the fd the daemon opened for it, each
        handed to QEMU as an fdset (each layer of `chains`, a boot drive's
        id -> its image chain, too); `shares` the opened share directories;
        `tap_fd` the attached tap; kernel and initrd as fds QEMU may reopen
        (manager.open_for_qemu); `plugged` a kept machine's hotplugged drives
        (spec.plugged) by id: all the caller's to close. QEMU opens nothing by
        name that a caller named. `confine` (QEMU into its cgroup) runs while
        QEMU starts up: its time is hidden behind QEMU's own.
        """
        state.make_dir(self.dir, exist_ok=self._reuses_dir)
        files, self._next_fdset = cmdline.plugged_files(
            {dev: (c.top, c.fds) for dev, c in (plugged or {}).items()}, 1, self.plan.taken_fdsets
        )
        for dev, f in files.items():
            self.drives[dev] = replace(self.drives[dev], fdsets=tuple(fs.id for fs in f.fdsets.values()))
        with (
            self._sock_path() as sock_path,
            self._sock_path(CONSOLE_SOCK) as serial_path,
            self._sock_path(AGENT_SOCK) as agent_path,
            contextlib.ExitStack() as held,
        ):
            listener = held.enter_context(_listening(sock_path))
            serial = held.enter_context(_listening(serial_path))
            agent = held.enter_context(_listening(agent_path)) if self.spec.guest_agent else None
            console = self._open_console()
            fs_fds: dict[str, int] = {}
            output: int | None = None
            try:
                output = await self._open_qemu_log()
                fs_fds = await self._start_virtiofsd(shares)
                rt = cmdline.Runtime(
                    self.id, listener.fileno(), self.console_log, console, vsock_cid, opened, kernel_fd, initrd_fd,
                    fs_fds, tap_fd, chains or {}, serial.fileno(), files, incoming=self.resuming or self.incoming,
                    autostart=self.incoming, agent_sock=agent.fileno() if agent else -1,
                )  # fmt: skip
                argv = cmdline.build_argv(self.spec, self.plan, rt)
                state.write_private(self.dir / "argv", "\n".join(argv) + "\n")
                inherited = (listener.fileno(), serial.fileno(), console, *opened.values(), *fs_fds.values())
                inherited += (agent.fileno(),) if agent else ()
                inherited += tuple(fs.fd for f in files.values() for fs in f.fdsets.values())
                boot = tuple(fd for fd in (kernel_fd, initrd_fd, tap_fd) if fd is not None)
                self.process = Process.spawn(
                    argv, output, pass_fds=inherited + boot, confinement=confinement_for(self.identity)
                )
            finally:
                os.close(console)
                if output is not None:
                    os.close(output)
                for fd in fs_fds.values():
                    os.close(fd)
            # The sockets are QEMU's now: were we to keep them open, a dead QEMU
            # would leave our connections hanging in the backlog.
            held.close()
            conn: socket.socket | None = None
            attempt = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                attempt.connect(sock_path)
                conn = attempt
            except OSError:
                # Nobody holds the listener: QEMU (or setpriv before it) is gone already.
                attempt.close()
        try:
            if conn is None:
                await self.process.wait(QUIT_TIMEOUT)
                raise QemuFailed(f"QEMU exited during start-up: {await self._qemu_errors()}")
            await self._await_monitor_and(conn, confine)
        except QemuFailed as e:
            # QEMU only says "vhost_backend_init failed: Protocol error": virtiofsd's own words say why.
            if failed := await self._virtiofsd_failures():
                raise QemuFailed(f"{e}; {failed}") from e
            raise
        if self.resuming:
            await self._restore()
        # Known before any event is handled: a STOP is judged by it (accel.on_stop).
        await self._query_accel()
        await self._running(must_persist=True)
        await self._connect_console()
        await self._sync_run_state()
        log.info("machine %s running, QEMU pid %d", self.name, self.leader, extra={"MACHINE": self.name})

    async def _open_qemu_log(self) -> int:
        """QEMU's stdout and stderr: qemu.log, and the journal where systemd is PID 1 (qemulog.py)."""
        try:
            self._qemu_output = await qemulog.open_qemu_log(self.systemd, self.name, self.qemu_log)
        except OSError as e:
            raise QemuFailed(f"cannot start the copy of QEMU's stderr to qemu.log and the journal: {e}") from e
        return self._qemu_output.fd

    async def _qemu_errors(self) -> str:
        """QEMU's own words, once every line it wrote is in qemu.log."""
        if self._qemu_output is not None:
            await self._qemu_output.finished(QUIT_TIMEOUT)
        return qemu_errors(self.qemu_log)

    def _open_console(self) -> int:
        """console.log for QEMU to write; its owner reads it by its path
        (the dirs are 0711, an ACL entry lets the owner read), nobody else can."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.console_log, flags, 0o600)
        try:
            acl.grant_read(fd, self.owner_uid)
        except OSError:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _sock_path(self, name: str = "qmp.sock") -> Iterator[str]:
        """A socket in the runtime dir named through a dirfd, so a long
        runtime dir does not hit sun_path's 108 bytes."""
        dirfd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY)
        try:
            yield f"/proc/self/fd/{dirfd}/{name}"
        finally:
            os.close(dirfd)

    async def _connect_console(self) -> None:
        """Connect to QEMU's console chardev (again, after a daemon restart:
        QEMU listens for a new client once the old one went)."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.setblocking(False)
        try:
            with self._sock_path(CONSOLE_SOCK) as path:
                conn.connect(path)
            await self.console.connect(conn)
        except OSError as e:
            conn.close()
            # Only the live stream is missing (QEMU still writes console.log): the machine itself is fine.
            self.console.unavailable(f"cannot connect to QEMU's console socket: {e.strerror or e}")
            log.warning("machine %s: no interactive console: %s", self.name, e, extra={"MACHINE": self.name})

    async def _running(self, must_persist: bool) -> None:
        self.state = MachineState.INCOMING if self.incoming else MachineState.RUNNING
        self._writer.start()
        # Before the machine is announced: a daemon killed right after still
        # finds it. A re-attached machine has its record already: it goes on
        # (the writer tries again with the next change).
        try:
            await self._writer.write_now()
        except (OSError, NoSpace):
            if must_persist:
                raise
        self._spawn(self._watch_exit(), "exit watch")
        self._spawn(self._dispatch_events(), "QMP events")

    async def attach(self, record: state.MachineRecord, timeout: float) -> None:
        """Take a running QEMU back after a daemon restart; QMP is the truth.

        The caller has checked that record.pid is this machine's QEMU (its
        start time and the uuid in its argv); the QEMU on the monitor socket
        must report the same uuid. Everything is bounded by `timeout`
        (QemuUnresponsive); nothing here needs to write to succeed.
        """
        self.process = Process.attach(record.pid)
        if self.process.start_time != record.start_time:
            raise QemuFailed(f"pid {record.pid} is another process now")
        with self._sock_path() as sock_path:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.setblocking(False)
            try:
                conn.connect(sock_path)
            except BlockingIOError:
                conn.close()
                raise QemuUnresponsive(f"QEMU pid {record.pid} accepts no monitor connection (backlog full)") from None
        try:
            async with asyncio.timeout(timeout):
                await self._monitor.connect(conn)
                answered = (await self._monitor.execute("query-uuid"))["UUID"]
                if uuid.UUID(answered) != uuid.UUID(self.id):
                    raise QemuFailed(f"the QEMU on {self.dir / 'qmp.sock'} is machine {answered}, not {self.id}")
                self._next_fdset = record.next_fdset
                self._next_controller = record.next_controller
                self._next_drive = max(self._next_drive, record.next_drive)
                # A record written as stopped by a Start cut short: the spec says what QEMU booted with.
                if record.stopped:
                    await self._reconcile(dict(self.drives), (), {})
                else:
                    await self._reconcile(
                        {d.id: d for d in record.drives}, record.shares, {n.id: n for n in record.nics}
                    )
                await self._query_accel()
        except TimeoutError:
            await self._monitor.close(QUIT_REPLY_TIMEOUT)
            raise QemuUnresponsive(
                f"QEMU pid {record.pid} did not answer on its monitor within {timeout:g} s "
                "(stopped, hung, or another client holds the monitor); retrying in the background"
            ) from None
        except (QmpDisconnected, QmpError, QemuFailed) as e:
            await self._monitor.close(QUIT_REPLY_TIMEOUT)
            raise QemuFailed(f"QEMU pid {record.pid} on {self.dir / 'qmp.sock'}: {e}") from e
        # A QEMU that outlived a Suspend cut short (the daemon died before
        # it quit) runs on: it is the truth, its saved state is stale.
        if record.suspended and not record.stopped:
            (self.dir / state.SAVED).unlink(missing_ok=True)
        await self._running(must_persist=False)
        await self._connect_console()
        await self._sync_run_state()
        log.info(
            "machine %s re-attached, QEMU pid %d, %d drives, %d shares", self.name, self.leader, len(self.drives),
            len(self.shares),
            extra={"MACHINE": self.name},
        )  # fmt: skip

    async def _reconcile(
        self, recorded: dict[str, Drive], shares: Sequence[MachineShare], recorded_nics: dict[str, Nic]
    ) -> None:
        """Rebuild drives, shares, NICs and ports from QEMU (see reconcile.py); log where state.json disagreed."""
        execute = self._monitor.execute
        peripheral = reconcile.parse_peripheral(await execute("qom-list", {"path": "/machine/peripheral"}))
        parents = {}
        for dev in reconcile.wanted_parents(peripheral, {p.id for p in self.plan.ports}):
            bus = await execute("qom-get", {"path": f"/machine/peripheral/{dev}", "property": "parent_bus"})
            parents[dev] = reconcile.bus_name(str(bus))
        macs = {}
        for dev in reconcile.wanted_macs(peripheral, parents, self.ports.spares):
            macs[dev] = str(await execute("qom-get", {"path": f"/machine/peripheral/{dev}", "property": "mac"}))
        named = await execute("query-named-block-nodes")
        nodes = reconcile.parse_nodes(named)
        self._nodes = set(nodes)
        # Those of the command line (console, boot drives, qemu_extra's) are QEMU's for good.
        fdsets = {
            i: opaques
            for i, opaques in reconcile.parse_fdsets(await execute("query-fdsets")).items()
            if i < cmdline.BOOT_FDSETS and i not in self.plan.taken_fdsets
        }
        snap = reconcile.Snapshot(peripheral, parents, nodes, fdsets, macs, reconcile.parse_formats(named))
        found = reconcile.reconcile(snap, recorded, self.ports.spares, self._next_fdset, recorded_nics)
        for message in found.messages:
            log.warning("machine %s: %s", self.name, message, extra={"MACHINE": self.name})
        for node in found.orphan_nodes:
            with contextlib.suppress(QmpError):
                await execute("blockdev-del", {"node-name": node})
        for fdset in found.orphan_fdsets:
            await self._remove_fdset(fdset)
        self._next_fdset = found.next_fdset
        self.drives = found.drives
        self.nics = found.nics
        self.ports = PortTable(self.plan.ports, self.name, observed=found.ports)
        await self._reconcile_shares(snap, {s.id: s for s in shares})

    async def _reconcile_shares(self, snap: reconcile.Snapshot, recorded: dict[str, MachineShare]) -> None:
        """Hotplugged shares from QEMU; their virtiofsd adopted when it is still the one recorded."""
        execute = self._monitor.execute
        tags = {}
        for dev in reconcile.unrecorded_shares(snap.peripheral, recorded, self._boot_shares):
            path = f"/machine/peripheral/{dev}/virtio-backend"
            tags[dev] = str(await execute("qom-get", {"path": path, "property": "tag"}))
        chardevs = {str(c["label"]) for c in await execute("query-chardev")}
        found = reconcile.reconcile_shares(snap, chardevs, recorded, tags)
        messages = list(found.messages)
        for chardev in found.orphan_chardevs:
            with contextlib.suppress(QmpError):
                await execute("chardev-remove", {"id": chardev})
        for dev, hot in found.shares.items():
            self.shares[dev] = hot
            if process := self._adopt_virtiofsd(hot):
                self._virtiofsd.append(
                    (share.OpenShare(cmdline.Share(dev, Path(hot.directory), hot.tag), -1, 0, 0), process)
                )
                self._spawn(self._watch_virtiofsd(dev, process), f"virtiofsd watch of {dev}")
            elif hot.pid:
                messages.append(
                    f"share {dev}: its virtiofsd (pid {hot.pid}) is gone; the guest's mount of tag "
                    f"{hot.tag!r} fails until RemoveShare {dev} and AddShare again"
                )
            else:
                messages.append(f"share {dev}: its virtiofsd is not known; it ends when the share is removed")
        self._next_share = max(
            [self._next_share, *(int(d[5:]) + 1 for d in found.shares if re.fullmatch(r"share\d+", d))]
        )
        for message in messages:
            log.warning("machine %s: %s", self.name, message, extra={"MACHINE": self.name})

    @staticmethod
    def _adopt_virtiofsd(hot: MachineShare) -> Process | None:
        """The recorded virtiofsd, if that very process (pid and start time) still runs."""
        if not hot.pid:
            return None
        try:
            if process_start_time(hot.pid) != hot.start_time:
                return None
            return Process.attach(hot.pid)
        except (OSError, ValueError, IndexError):
            return None

    async def _start_virtiofsd(self, shares: Sequence[share.OpenShare]) -> dict[str, int]:
        """One virtiofsd per share; returns QEMU's ends of their connections.

        Async: where systemd is PID 1 starting one waits on the system bus.
        """
        fs_fds: dict[str, int] = {}
        binary = share.find_virtiofsd() if shares else None
        try:
            for opened in shares:
                assert binary is not None
                process, fs_fds[opened.share.device] = await share.start(
                    binary, opened, share.log_path(self.dir, opened.share), self.systemd, self.name
                )
                self._virtiofsd.append((opened, process))
        except BaseException:
            for fd in fs_fds.values():
                os.close(fd)
            raise
        return fs_fds

    async def _stop_virtiofsd(self) -> None:
        """They end on their own once QEMU's end of their connection is closed
        (QEMU gone, or never started); one that does not is stopped."""
        if running := [p.exited for _, p in self._virtiofsd if not p.exited.done()]:
            await asyncio.wait(running, timeout=QUIT_TIMEOUT)
        await asyncio.gather(*(p.stop(QUIT_TIMEOUT) for _, p in self._virtiofsd if not p.exited.done()))

    async def _virtiofsd_failures(self) -> str:
        """Each virtiofsd that failed, in its own words, with its log (kept)."""
        await self._stop_virtiofsd()
        failed = []
        for opened, process in self._virtiofsd:
            if process.returncode not in (0, None, -signal.SIGTERM):
                log_path = share.log_path(self.dir, opened.share)
                self._kept_logs.append(log_path)
                failed.append(
                    f"virtiofsd for share {opened.share.tag!r} ({opened.share.source}) exited with "
                    f"{process.returncode}: {share.errors(log_path)} (its log: {log_path})"
                )
        return "; ".join(failed)

    async def _await_monitor_and(self, conn: socket.socket, confine: Callable[[], Awaitable[None]] | None) -> None:
        """The QMP handshake, with `confine` run meanwhile; both must succeed."""
        if confine is None:
            await self._await_monitor(conn)
            return
        confining = asyncio.ensure_future(confine())
        try:
            await self._await_monitor(conn)
        except BaseException:
            confining.cancel()
            # Its own failure, if any, is not the one to report: QEMU's is.
            await asyncio.wait({confining})
            if not confining.cancelled():
                confining.exception()
            raise
        await confining

    async def _await_monitor(self, conn: socket.socket) -> None:
        assert self.process is not None
        connect = asyncio.ensure_future(self._monitor.connect(conn))
        try:
            await asyncio.wait(
                {connect, self.process.exited}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if self.process.exited.done():
                # QEMU is gone: the connection fails on its own, and
                # cancelling qemu.qmp mid-teardown upsets it.
                await asyncio.wait({connect}, timeout=QUIT_TIMEOUT)
        finally:
            connect.cancel()
        if connect.done() and not connect.cancelled() and connect.exception() is None:
            return
        # A broken monitor usually means QEMU is on its way out: let it finish
        # so its stderr is complete.
        if (connect.done() and not connect.cancelled()) or self.process.exited.done():
            if await self.process.wait(QUIT_TIMEOUT):
                raise QemuFailed(f"QEMU exited during start-up: {await self._qemu_errors()}")
            await self.process.stop(QUIT_TIMEOUT)
            raise QemuFailed(f"QEMU's monitor failed during start-up: {await self._qemu_errors()}")
        await self.process.stop(QUIT_TIMEOUT)
        raise QemuFailed(
            f"QEMU did not answer on its monitor within {START_TIMEOUT:.0f} s: {await self._qemu_errors()}"
        )

    async def discard(self, keep_dir: bool = False) -> None:
        """Undo a start that failed: no process, no runtime dir left behind
        (`keep_dir`: a kept machine's, its logs stay, its record is rewritten)."""
        if self.process is not None and not self.process.exited.done():
            await self.process.stop(QUIT_TIMEOUT)
        await self._stop_virtiofsd()
        await self._monitor.close()
        await self._writer.stop()
        if self._kept_logs or keep_dir:
            state.clear_all_but_log(self.dir, keep_saved=self.resuming)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """A task the machine owns: cancelled when it ends, its failure logged and shown."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}: {what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (e := task.exception()) is None:
            return
        log.error("machine %s: %s failed", self.name, task.get_name(), exc_info=e, extra={"MACHINE": self.name})
        if not self._ended.is_set():
            # Without its exit watch or its events the machine is not managed
            # any more: say so rather than answer requests that cannot finish.
            self.state = MachineState.FAILED
            self.reason = f"{task.get_name()} failed: {e}"
            self._notify("State", "StateReason")

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def unmanaged(self, reason: str, process: Process | None) -> None:
        """Keep the machine listed (and its directory) though it cannot be
        managed; its QEMU, when known, is watched so its exit is seen."""
        self.state = MachineState.UNMANAGED
        self.reason = reason
        if process is not None and self.process is None:
            self.process = process
        if self.process is not None:
            self._spawn(self._watch_exit(), "exit watch")
        self._notify("State", "StateReason", "Leader")

    async def release(self) -> None:
        """Let go of an unmanaged machine that a fresh re-attach replaces."""
        await self._cancel_tasks()
        if self.process is not None:
            self.process.release()
        await self._monitor.close(QUIT_REPLY_TIMEOUT)

    async def _watch_exit(self) -> None:
        assert self.process is not None
        await self.process.exited
        code = self.process.returncode
        if code is None and self.state is not MachineState.STOPPING and not self._powering_off:
            # Re-attached: no exit status; a SHUTDOWN event says it was asked to stop.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shutdown.wait(), SHUTDOWN_EVENT_TIMEOUT)
        clean = self.state is MachineState.STOPPING or code == 0
        clean = clean or (code is None and (self._powering_off or self._shutdown_reason in CLEAN_SHUTDOWN))
        why = ""
        if not clean:
            reason = f"exit status {code}" if code is not None else f"shutdown reason {self._shutdown_reason or 'none'}"
            why = f"QEMU exited unexpectedly ({reason}); its log: {self.qemu_log}"
            log.warning("machine %s: %s", self.name, why, extra={"MACHINE": self.name})
        if self.defined:
            # Stopped once its record is written: a Start may follow at once.
            self.state = MachineState.STOPPING
            self.reason = why
            self._notify("State", "StateReason")
        else:
            self.state = MachineState.STOPPED if clean else MachineState.FAILED
            self._notify("State")
        await self._finish()

    async def _finish(self) -> None:
        """QEMU is gone: release everything; the logs stay (state.is_log).
        A kept machine stays, stopped, its hotplugged drives folded into its
        spec (keep.fold) and written down for the next Start or daemon start."""
        self.console.close()
        try:
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(NotRunning(f"machine {self.name} stopped during the unplug"))
            for job in self._jobs.values():
                job.status(blockjob.GONE)
            await self._monitor.close()
            await self._stop_virtiofsd()
            # No state write may land in the directory after it is cleaned.
            await self._writer.stop()
            state.clear_all_but_log(self.dir, keep_saved=self.suspended and self.defined)
            if self.defined:
                self.spec = keep.fold(self.spec, self.drives.values())
                await self.save_stopped()
                if not self.defined:
                    # A Terminate() while the record was being written: it goes too.
                    state.clear_all_but_log(self.dir)
        finally:
            if self.state is MachineState.STOPPING and self._relaunch and self.defined:
                # Never at rest between its two runs: nobody may Start() it meanwhile.
                self.state = MachineState.STARTING
            elif self.state is MachineState.STOPPING:
                self.state = MachineState.SUSPENDED if self.suspended else MachineState.STOPPED
            self._ended.set()
        if self.on_ended:
            self.on_ended(self)
        if self.defined:
            self._notify("State", "Leader")
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    async def terminate(self, forget: bool = True) -> None:
        """quit over QMP, then SIGTERM, then SIGKILL; returns once cleaned up.
        `forget`: Terminate() asked, a kept machine goes for good, its
        runtime dir too when it was stopped."""
        if self.state is MachineState.STARTING and self._ended.is_set():
            raise NotRunning(f"machine {self.name} is being started; terminate it once Start() returned")
        self._forget = self._forget or forget
        if self.spec.keep and self._forget and self.state.at_rest:
            shutil.rmtree(self.dir, ignore_errors=True)
            log.info("machine %s terminated, its record removed", self.name, extra={"MACHINE": self.name})
            if self.on_ended:
                self.on_ended(self)
            return
        if self.process is None or self._ended.is_set():
            return
        self.state = MachineState.STOPPING
        self._notify("State")
        try:
            await self._monitor.execute("quit", timeout=QUIT_REPLY_TIMEOUT)
        except QemuUnresponsive as e:
            log.warning("machine %s: %s; killing it", self.name, e, extra={"MACHINE": self.name})
            self.process.signal(signal.SIGKILL)
        except (QmpDisconnected, QmpError):
            pass  # quit's reply often loses the race with QEMU's exit
        if not await self.process.wait(QUIT_TIMEOUT):
            await self.process.stop(QUIT_TIMEOUT)
        await self._ended.wait()

    async def stop_for_relaunch(self) -> None:
        """Stop QEMU so the manager starts the machine again at once (KVM
        failed under it): it stays listed through the stop as a kept one does,
        its hotplugged drives folded into its spec, starting once QEMU is gone."""
        self._relaunch = True
        await self.terminate(forget=False)

    async def close(self) -> None:
        """Let go of QEMU without stopping it (daemon shutdown)."""
        await self._cancel_tasks()
        # A write in flight lands first, then the last unsaved state; an
        # unmanaged machine's record is never written over.
        if self.state is not MachineState.UNMANAGED:
            await self._writer.close()
        self.console.close()
        await self._monitor.close(QUIT_REPLY_TIMEOUT)
        # Each virtiofsd runs on with QEMU; nothing of ours waits for it.
        for _, process in self._virtiofsd:
            process.release()

    def _tell(self, call: Callable[[Observer], None]) -> None:
        """Tell the observer; its failure is logged and never undoes the machine's own bookkeeping."""
        if self.observer is None:
            return
        try:
            call(self.observer)
        except Exception:  # whatever a bus adapter gets wrong, the machine goes on
            log.exception("machine %s: the observer failed", self.name, extra={"MACHINE": self.name})

    def _notify(self, *properties: str) -> None:
        self._tell(lambda o: o.changed(self, set(properties)))

    def _check_live(self) -> None:
        """Running or paused: QEMU is there and takes commands."""
        if self.state is MachineState.UNMANAGED:
            raise NotRunning(f"machine {self.name} is unmanaged: {self.reason}")
        if self.state is MachineState.INCOMING:
            raise NotRunning(f"machine {self.name} waits for its incoming migration (Incoming); it runs after it")
        if not self.state.is_live:
            again = "Start()" if self.spec.keep else "CreateMachine"
            raise NotRunning(f"machine {self.name} is {self.state}, not running; start it again with {again}")

    def check_startable(self) -> None:
        """Only a kept machine that stopped (or was suspended) may be started (Start)."""
        if self.state.at_rest and self.spec.keep:
            return
        if self.state is MachineState.UNMANAGED:
            raise NotRunning(f"machine {self.name} is unmanaged: {self.reason}")
        if self.state in (MachineState.RUNNING, MachineState.PAUSED, MachineState.STARTING):
            raise AlreadyRunning(f"machine {self.name} is {self.state} already; Start() boots a stopped machine")
        raise NotRunning(
            f"machine {self.name} is {self.state} and was not created with keep: it cannot be started again; "
            "create it anew with CreateMachine"
            if not self.spec.keep
            else f"machine {self.name} is {self.state}; wait until it is stopped, then Start() it"
        )

    @contextlib.asynccontextmanager
    async def _request(self, what: str) -> Any:
        """One request at a time per machine, each bounded: a QEMU that left
        a command unanswered refuses the next ones at once. A paused machine
        takes requests too: QEMU plugs and unplugs devices while its vCPUs
        stand still (the guest sees them when it runs again), as libvirt allows."""
        self._check_live()
        self._check_not_migrating(what)
        if self._unresponsive:
            raise QemuUnresponsive(f"machine {self.name}: {self._unresponsive}; {what} refused until it answers")
        try:
            async with asyncio.timeout(TIMEOUT):
                await self._lock.acquire()
        except TimeoutError:
            raise QemuUnresponsive(
                f"machine {self.name} is still busy with an earlier request; {what} refused"
            ) from None
        try:
            self._check_live()
            yield
        finally:
            self._lock.release()

    def _unanswered(self, e: QemuUnresponsive, then: Callable[[], Awaitable[None]] | None = None) -> None:
        """A command timed out but may still be carried out when QEMU wakes:
        refuse requests until QEMU answers again, then run `then` (the undo)."""
        self._unresponsive = str(e)
        log.warning("machine %s: %s", self.name, e, extra={"MACHINE": self.name})
        self._spawn(self._when_back(then), "wait for QEMU to answer")

    async def _when_back(self, then: Callable[[], Awaitable[None]] | None) -> None:
        async with self._lock:
            while True:
                try:
                    # Commands run in order: once this answers, the late one is done.
                    await self._monitor.execute("query-status")
                    break
                except QemuUnresponsive:
                    continue
                except (QmpDisconnected, QmpError):
                    return  # QEMU is gone; _watch_exit cleans up
            if then is not None:
                with contextlib.suppress(QmpError, QmpDisconnected, QemuUnresponsive):
                    await then()
            self._unresponsive = ""
            self.save()
        log.info("machine %s: QEMU answers again", self.name, extra={"MACHINE": self.name})
        self._notify("Drives", "Shares", "Ports", "FreeSparePorts")

    # -- hotplug ------------------------------------------------------------

    def _known_ids(self) -> set[str]:
        """Ids in use: ours (ports, drives, controllers) and qemu_extra's."""
        ours = (
            set(self.drives)
            | set(self.shares)
            | set(self.nics)
            | self.ports.devices()
            | {p.id for p in self.plan.ports}
        )
        ours |= self._stuck_ids
        return ours | {d.id for d in self.plan.implicit} | self.plan.taken

    async def _scsi_controller(self) -> tuple[str, str, bool]:
        """(controller id, its port, whether it was created now) for a SCSI drive."""
        for drive in self.drives.values():
            if drive.controller and drive.state is DriveState.ATTACHED:
                return drive.controller, drive.port, False
        for port, dev in self.ports.holders().items():
            # qemu_extra's own controllers are not ours to hand out.
            if CONTROLLER_ID.fullmatch(dev) and dev not in self._leaving and dev not in self.plan.taken:
                return dev, port, False
        # Never an id qemu_extra (or anything of ours) already uses.
        known = self._known_ids()
        n = next(i for i in itertools.count(self._next_controller) if f"scsi{i}" not in known)
        controller = f"scsi{n}"
        self._next_controller = n + 1
        port = self.ports.take(controller)
        try:
            await self._monitor.execute("device_add", cmdline.scsi_controller(controller, port))
        except QmpError as e:
            self.ports.release(controller)
            # The caller asked for nothing wrong: this one is ours (or QEMU's).
            raise QemuFailed(f"QEMU refused the SCSI controller {controller} on {port}: {e}") from e
        return controller, port, True

    def _check_new_id(self, requested_id: str, kind: str) -> None:
        """A device id a caller asked for (drives, shares: one namespace, QEMU's)."""
        if not requested_id:
            return
        if not DRIVE_ID.fullmatch(requested_id):
            raise InvalidArgument(
                f"{kind} id {requested_id!r} is invalid: "
                "use 1-26 letters, digits, '_', '.', '-', starting with a letter"
            )
        if RESERVED_ID.fullmatch(requested_id):
            raise InvalidArgument(f"{kind} id {requested_id!r} is reserved for vmspawnd's own devices; pick another id")
        if requested_id in self._known_ids():
            raise InvalidArgument(f"{kind} id {requested_id!r} is already used on {self.name}; pick another id")

    def validate_drive(self, drive: DriveSpec, requested_id: str, port: str = "") -> str:
        if port:
            self.ports.check_spare(port)
        self._check_new_id(requested_id, "drive")
        limit = SERIAL_MAX[drive.disk_type]
        if len(drive.serial) > limit:
            raise InvalidArgument(
                f"serial {drive.serial!r} is {len(drive.serial)} characters; {drive.disk_type} allows at most {limit}"
            )
        return requested_id

    async def add_drive(self, drive: DriveSpec, chain: OpenedChain, requested_id: str = "", spare: str = "") -> Drive:
        """Each layer of `chain` into its own fdset, blockdev-add + device_add
        on port `spare` (by default the lowest free spare); undone on failure.
        The fds stay the caller's."""
        async with self._request("AddDrive"):
            self.validate_drive(drive, requested_id, spare)
            dev = requested_id or self._new_drive_id()
            undo: list[tuple[str, dict[str, object]]] = []
            # The undo of the command in flight: one that times out may still be carried out.
            pending: list[tuple[str, dict[str, object]]] = []
            port = ""
            fdsets: dict[str, int] = {}
            controller = ""
            try:
                if drive.disk_type.is_scsi:
                    controller, port, created = await self._scsi_controller()
                    if created:
                        undo.append(("device_del", {"id": controller}))
                    bus = controller
                else:
                    port = bus = self.ports.take(dev, spare)
                # The fds only once there is a port: a request refused for want
                # of one hands QEMU nothing (a paused QEMU keeps removed fds).
                names = await self._pass_layers(dev, chain, fdsets, undo)
                pending = [("blockdev-del", {"node-name": cmdline.node_name(dev)})]
                strays = await self._add_blockdev(dev, chain.top, names)
                undo += pending
                pending = []
                if strays:
                    raise AccessDenied(
                        f"QEMU opened {', '.join(map(repr, strays))} by name for {drive.path}: its header changed "
                        "while vmspawnd read it; the drive was not attached"
                    )
                if FAULT == "after-blockdev-add":
                    os.kill(os.getpid(), signal.SIGKILL)
                await self._monitor.execute("device_add", cmdline.drive_device(dev, drive, bus))
            except QemuUnresponsive as e:
                late = Drive(
                    dev, str(drive.path), drive.disk_type, port, DriveState.REMOVING, tuple(fdsets.values()), controller
                )
                self._unanswered(
                    e, lambda: self._cancel_late_add(late.id, lambda: self._keep_drive(late), undo + pending)
                )
                raise
            except QmpError as e:
                await self._undo(undo, dev)
                raise InvalidArgument(f"QEMU refused drive {dev} ({drive.disk_type} {drive.path}): {e}") from e
            except QmpDisconnected as e:
                raise NotRunning(f"machine {self.name} stopped during AddDrive: {e}") from e
            except VmspawndError:
                # NoFreePort and the like: what QEMU was already given goes back.
                await self._undo(undo, dev)
                raise
            record = Drive(
                dev, str(drive.path), drive.disk_type, port, fdsets=tuple(fdsets.values()), controller=controller,
                format=drive.format, read_only=drive.read_only, serial=drive.serial,
            )  # fmt: skip
            self.drives[dev] = record
            if not requested_id:
                self._next_drive = int(dev.removeprefix("disk")) + 1
            self.save()
        log.info("machine %s: drive %s added on %s", self.name, dev, port, extra={"MACHINE": self.name, "DRIVE": dev})
        self._notify("Drives", "Ports", "FreeSparePorts")
        self._tell(lambda o: o.drive_added(self, record))
        return record

    def _take_fdset(self) -> int:
        """The next fdset id for a hotplug: none the command line's files hold."""
        fdset = next(i for i in itertools.count(self._next_fdset) if i not in self.plan.taken_fdsets)
        self._next_fdset = fdset + 1
        return fdset

    async def _pass_layers(
        self, dev: str, chain: OpenedChain, fdsets: dict[str, int], undo: list[tuple[str, dict[str, object]]]
    ) -> dict[str, str]:
        """Each layer of `chain` into an fdset of its own (`fdsets`: label ->
        fdset, filled as they go); returns label -> the name QEMU opens it by.
        The undo is listed before each add-fd: one that times out may still
        be carried out, and removing an fdset QEMU never got is harmless."""
        for layer in chain.top.walk():
            fdset = self._take_fdset()
            undo.append(("remove-fd", {"fdset-id": fdset}))
            await self._monitor.pass_fd(chain.fds[layer.label], fdset, imagechain.opaque(dev, layer))
            fdsets[layer.label] = fdset
        return {label: f"/dev/fdset/{i}" for label, i in fdsets.items()}

    # -- cdrom media ------------------------------------------------------------

    def _drive(self, dev: str) -> Drive:
        if (drive := self.drives.get(dev)) is None:
            raise NoSuchDrive(f"machine {self.name} has no drive {dev!r}; see its Drives property")
        return drive

    def media_drive(self, dev: str, method: str) -> Drive:
        """The cdrom `dev`, attached: the only kind whose medium changes under a running guest."""
        drive = self._drive(dev)
        if drive.disk_type is not DiskType.VIRTIO_SCSI_CDROM:
            raise InvalidArgument(
                f"{method}: drive {dev} is a {drive.disk_type} disk; only a cdrom (virtio-scsi-cdrom) has a "
                "medium to change (QEMU cannot swap a disk's image under its guest): remove it and add the new one"
            )
        if drive.state is DriveState.REMOVING:
            raise UnplugInProgress(f"drive {dev} is being removed; wait for DriveRemoved")
        return drive

    async def change_medium(self, dev: str, medium: DriveSpec | None, chain: OpenedChain | None) -> Drive:
        """ReplaceDrive (`medium` opened as `chain`) or EjectDrive (None) of a
        cdrom: tray opened (forced: a guest's lock does not stop it), the old
        medium out and its node and fdsets gone, the new one in under the
        drive's own node name, tray closed. The guest sees a media change.
        The fds stay the caller's."""
        method = "ReplaceDrive" if medium is not None else "EjectDrive"
        async with self._request(method):
            drive = self.media_drive(dev, method)
            node = cmdline.node_name(dev)
            undo: list[tuple[str, dict[str, object]]] = []
            fdsets: dict[str, int] = {}
            emptied = False
            try:
                names = await self._pass_layers(dev, chain, fdsets, undo) if chain is not None else {}
                await self._monitor.execute("blockdev-open-tray", {"id": dev, "force": True})
                if drive.path:
                    await self._monitor.execute("blockdev-remove-medium", {"id": dev})
                    await self._monitor.execute("blockdev-del", {"node-name": node})
                    emptied = True
                    for fdset in drive.fdsets:
                        await self._remove_fdset(fdset)
                if medium is not None and chain is not None:
                    # The node list seen last still names the old medium's node.
                    self._nodes = None
                    strays = await self._add_blockdev(dev, chain.top, names)
                    undo.append(("blockdev-del", {"node-name": node}))
                    if strays:
                        raise AccessDenied(
                            f"QEMU opened {', '.join(map(repr, strays))} by name for {medium.path}: its header "
                            "changed while vmspawnd read it; the medium was not inserted"
                        )
                    await self._monitor.execute("blockdev-insert-medium", {"id": dev, "node-name": node})
                await self._monitor.execute("blockdev-close-tray", {"id": dev})
            except QmpDisconnected as e:
                raise NotRunning(f"machine {self.name} stopped during {method}: {e}") from e
            except QemuUnresponsive as e:
                self._unanswered(e)
                raise
            except (QmpError, AccessDenied) as e:
                await self._undo(undo, dev)
                if emptied:
                    self.drives[dev] = replace(drive, path="", fdsets=())
                    self.save()
                    self._notify("Drives")
                gone = " The old medium is out: the drive is empty now." if emptied else ""
                if isinstance(e, AccessDenied):
                    raise AccessDenied(f"{e}.{gone}") from e
                raise QemuFailed(f"QEMU refused {method} of {dev}: {e}.{gone}") from e
            changed = replace(
                drive,
                path=str(medium.path) if medium is not None else "",
                fdsets=tuple(fdsets.values()),
                format=medium.format if medium is not None else drive.format,
            )
            self.drives[dev] = changed
            self.save()
        log.info("machine %s: drive %s now holds %s", self.name, dev, changed.path or "no medium")
        self._notify("Drives")
        return changed

    async def _add_blockdev(
        self, dev: str, top: imagechain.Layer, names: dict[str, str], node: str = "", size: int = 0
    ) -> list[str]:
        """blockdev-add of `top` on the fdsets `names` as node `node` (the
        drive's own by default; a raw one cut to `size` bytes if given);
        returns the files QEMU opened by name for it (see imagechain.opened_by_name).

        New nodes are judged against the last node list seen, which saves a
        round trip per add; a node another monitor added since then looks new
        too, so a stray seen that way is judged again against a fresh list.
        """
        args = cmdline.blockdev(dev, top, lambda layer: names[layer.label], node)
        if size:
            args["size"] = size
        fd_names = set(names.values())
        if self._nodes is not None:
            await self._monitor.execute("blockdev-add", args)
            if not await self._new_nodes_by_name(self._nodes, fd_names):
                return []
            await self._monitor.execute("blockdev-del", {"node-name": args["node-name"]})
        known = {n["node-name"] for n in await self._monitor.execute("query-named-block-nodes")}
        await self._monitor.execute("blockdev-add", args)
        return await self._new_nodes_by_name(known, fd_names)

    async def _new_nodes_by_name(self, known: set[str], fd_names: set[str]) -> list[str]:
        nodes = await self._monitor.execute("query-named-block-nodes")
        self._nodes = {n["node-name"] for n in nodes}
        return imagechain.opened_by_name(known, nodes, fd_names)

    def _keep_drive(self, late: Drive) -> None:
        self.drives[late.id] = late

    async def _cancel_late_add(
        self, dev: str, keep: Callable[[], None], undo: list[tuple[str, dict[str, object]]]
    ) -> None:
        """Undo an AddDrive or AddNetwork whose caller got QemuUnresponsive, now that QEMU answers."""
        peripheral = {c["name"] for c in await self._monitor.execute("qom-list", {"path": "/machine/peripheral"})}
        if dev in peripheral:
            # device_add was carried out late: `keep` lists it as removing and
            # it is unplugged like any device; the DEVICE_DELETED handler frees
            # what it holds and its port.
            log.warning("machine %s: unplugging %s, added after its request timed out", self.name, dev)
            keep()
            await self._monitor.execute("device_del", {"id": dev})
        else:
            log.warning("machine %s: undoing the request of %s that timed out", self.name, dev)
            await self._undo(undo, dev)
        self._stuck_ids.add(dev)

    # -- block jobs: SnapshotDrive, SwapDrive -----------------------------------

    def job_drive(self, dev: str, method: str) -> Drive:
        """The drive `dev` a block job may run on: attached, a disk, and no other job on it."""
        drive = self._drive(dev)
        if drive.disk_type is DiskType.VIRTIO_SCSI_CDROM:
            raise InvalidArgument(
                f"{method}: drive {dev} is a cdrom: its medium is a file of yours already; change it with ReplaceDrive"
            )
        if drive.state is DriveState.REMOVING:
            raise UnplugInProgress(f"drive {dev} is being removed; {method} refused")
        if dev in self._busy:
            raise JobInProgress(f"a {self._busy[dev]} of drive {dev} runs already; retry once it returned")
        return drive

    @contextlib.asynccontextmanager
    async def _job_claim(self, dev: str, method: str) -> AsyncIterator[Drive]:
        """The drive is this request's until it returns (JobInProgress for any
        other). Jobs are waited for outside the machine's lock: other requests
        go on meanwhile, and the event task (which takes the lock for some
        events) keeps delivering the job's events."""
        async with self._request(method):
            drive = self.job_drive(dev, method)
            self._busy[dev] = method
        try:
            yield drive
        finally:
            del self._busy[dev]

    async def _start_job(self, dev: str, method: str, command: str, args: dict[str, object]) -> BlockJob:
        """`command` starts the drive's job; its events are listened for before it is asked for."""
        job = self._jobs[blockjob.job_id(dev)] = BlockJob(blockjob.job_id(dev), method)
        try:
            await self._monitor.execute(command, args)
        except BaseException:
            del self._jobs[job.id]
            raise
        return job

    async def _job_end(self, job: BlockJob, deadline: float, wanted: str = blockjob.CONCLUDED) -> str:
        """The first status of `wanted` the job reaches; JobTimeout past
        `deadline` (the job cancelled), JobFailed with QEMU's words if it
        concluded with an error; a concluded job is dismissed."""
        try:
            async with asyncio.timeout_at(deadline):
                status = await job.reach({wanted, blockjob.CONCLUDED})
        except TimeoutError:
            await self._cancel_job(job)
            raise JobTimeout(
                f"{job.method} did not finish in time; the copy was cancelled and nothing of it is left. "
                "Give a longer timeout_usec (or a higher max_bandwidth)"
            ) from None
        if status == blockjob.GONE:
            raise NotRunning(f"machine {self.name} stopped during {job.method}")
        if status == blockjob.CONCLUDED:
            error = blockjob.job_error(await self._monitor.execute("query-jobs"), job.id)
            await self._dismiss(job)
            if error:
                raise JobFailed(f"QEMU's copy for {job.method} failed: {error}; nothing of it is left")
        return status

    async def _dismiss(self, job: BlockJob) -> None:
        self._jobs.pop(job.id, None)
        with contextlib.suppress(QmpError):
            await self._monitor.execute("job-dismiss", {"id": job.id})

    async def _cancel_job(self, job: BlockJob) -> None:
        """job-cancel, its end awaited (bounded) and dismissed: QEMU keeps nothing of it."""
        try:
            with contextlib.suppress(QmpError):  # it concluded meanwhile
                await self._monitor.execute("job-cancel", {"id": job.id})
            async with asyncio.timeout(TIMEOUT):
                await job.reach({blockjob.CONCLUDED})
            await self._dismiss(job)
        except (TimeoutError, QmpDisconnected, QemuUnresponsive) as e:
            self._jobs.pop(job.id, None)
            log.warning("machine %s: job %s did not end after its cancel: %s", self.name, job.id, e)

    async def _pass_fd_once(self, dev: str, fd: int, what: str) -> int:
        """`fd` into an fdset of its own; returns the fdset (removed by the caller)."""
        fdset = self._take_fdset()
        await self._monitor.pass_fd(fd, fdset, f"{dev}{blockjob.SNAPSHOT_SUFFIX}:{what}")
        return fdset

    async def snapshot_drive(self, dev: str, fd: int, fmt: ImageFormat, timeout: float, max_bandwidth: int) -> None:
        """SnapshotDrive: the drive as it is now copied into the caller's file
        `fd` (raw: cut to the drive's size; qcow2: formatted anew), the guest
        running on. Nothing of it is left afterwards, whatever the outcome:
        no job, no node, no fdset. The fd stays the caller's."""
        method = "SnapshotDrive"
        check_target_fd(fd, method)
        deadline = asyncio.get_running_loop().time() + timeout
        async with self._job_claim(dev, method) as drive:
            node = blockjob.snapshot_node(dev)
            fdset: int | None = None
            added = False
            try:
                async with self._request(method):
                    size = await self._node_size(drive)
                    await asyncio.to_thread(prepare_target, fd, fmt, size)
                    fdset = await self._pass_fd_once(dev, fd, os.readlink(f"/proc/self/fd/{fd}"))
                filename = f"/dev/fdset/{fdset}"
                if fmt is ImageFormat.QCOW2:
                    await self._run_job(
                        dev, method, "blockdev-create", blockjob.qcow2_create(dev, filename, size), deadline
                    )
                async with self._request(method):
                    await self._monitor.execute("blockdev-add", blockjob.snapshot_target(dev, filename, fmt, size))
                    added = True
                    job = await self._start_job(
                        dev, method, "blockdev-backup", blockjob.backup(dev, drive.block_node, max_bandwidth)
                    )
                await self._job_end(job, deadline)
            except QmpError as e:
                raise JobFailed(f"QEMU refused {method} of {dev}: {e}") from e
            except QmpDisconnected as e:
                raise NotRunning(f"machine {self.name} stopped during {method}: {e}") from e
            finally:
                await asyncio.shield(self._drop_target(node if added else "", (fdset,) if fdset is not None else ()))
        log.info("machine %s: drive %s copied (%s)", self.name, dev, fmt, extra={"MACHINE": self.name, "DRIVE": dev})

    async def _run_job(self, dev: str, method: str, command: str, args: dict[str, object], deadline: float) -> None:
        """A job (blockdev-create) started in a request of its own, then waited for outside it."""
        async with self._request(method):
            job = await self._start_job(dev, method, command, args)
        await self._job_end(job, deadline)

    async def _node_size(self, drive: Drive) -> int:
        size = blockjob.virtual_size(await self._monitor.execute("query-named-block-nodes"), drive.block_node)
        if size is None:
            raise QemuFailed(f"QEMU has no block node {drive.block_node} for drive {drive.id} of {self.name}")
        return size

    async def _drop_target(self, node: str, fdsets: Sequence[int]) -> None:
        """A job's target gone again: its node (if added) and its fdsets. QEMU
        gone meanwhile took them with it."""
        async with self._lock:
            with contextlib.suppress(QmpError, QmpDisconnected, QemuUnresponsive):
                if node:
                    await self._monitor.execute("blockdev-del", {"node-name": node})
            for fdset in fdsets:
                await self._remove_fdset(fdset)

    def check_swap(self, dev: str) -> Drive:
        """What SwapDrive refuses before a file is opened."""
        drive = self.job_drive(dev, "SwapDrive")
        refuse_read_only(drive)
        return drive

    async def swap_drive(
        self, dev: str, target: DriveSpec, chain: OpenedChain, timeout: float, max_bandwidth: int
    ) -> Drive:
        """SwapDrive: the drive's contents move to `target` (opened as `chain`,
        every layer by fd) under the running guest, which keeps its device:
        blockdev-mirror to a node of the other generation, job-complete
        once it is in sync; then the drive reads from the new node and file,
        and the old node and its fds are gone. A failure leaves the drive as
        it was and nothing of the new file in QEMU. The fds stay the caller's."""
        method = "SwapDrive"
        deadline = asyncio.get_running_loop().time() + timeout
        async with self._job_claim(dev, method) as drive:
            refuse_read_only(drive)
            new_node = blockjob.swapped_node(dev, drive.block_node)
            fdsets: dict[str, int] = {}
            added = done = False
            try:
                async with self._request(method):
                    # A mirror wants both ends the same size: a larger raw file is cut to the drive's.
                    size = await self._node_size(drive) if target.format is ImageFormat.RAW else 0
                    names = await self._pass_layers(dev, chain, fdsets, [])
                    strays = await self._add_blockdev(dev, chain.top, names, new_node, size)
                    added = True
                    if strays:
                        raise AccessDenied(
                            f"QEMU opened {', '.join(map(repr, strays))} by name for {target.path}: its header "
                            "changed while vmspawnd read it; the drive was not swapped"
                        )
                    mirror = blockjob.mirror(dev, drive.block_node, new_node, max_bandwidth)
                    job = await self._start_job(dev, method, "blockdev-mirror", mirror)
                if await self._job_end(job, deadline, blockjob.READY) != blockjob.READY:
                    raise JobFailed(f"QEMU's mirror for {method} of {dev} ended before it was in sync")
                await self._monitor.execute("job-complete", {"id": job.id})
                await self._job_end(job, deadline)
                done = True
            except QmpError as e:
                raise JobFailed(f"QEMU refused {method} of {dev}: {e}") from e
            except QmpDisconnected as e:
                raise NotRunning(f"machine {self.name} stopped during {method}: {e}") from e
            finally:
                if not done:
                    await asyncio.shield(self._drop_target(new_node if added else "", tuple(fdsets.values())))
            swapped = replace(
                drive, path=str(target.path), format=target.format, fdsets=tuple(fdsets.values()),
                node="" if new_node == cmdline.node_name(dev) else new_node,
            )  # fmt: skip
            self.drives[dev] = swapped
            self.save()
            await asyncio.shield(self._drop_old(drive))
        log.info("machine %s: drive %s moved to %s", self.name, dev, target.path, extra={"MACHINE": self.name})
        self._notify("Drives")
        return swapped

    async def _drop_old(self, old: Drive) -> None:
        """The node and fds the drive read from before its swap: a hotplugged
        drive's own fdsets, a boot drive's fdset of its file (unless another
        drive opened the same file)."""
        async with self._lock:
            # The next AddDrive must not take the new node's layers for strays.
            self._nodes = None
            fdsets = list(old.fdsets)
            try:
                await self._monitor.execute("blockdev-del", {"node-name": old.block_node})
                if not fdsets and all(d.path != old.path for d in self.drives.values()):
                    fdsets = blockjob.fdsets_of_file(
                        await self._monitor.execute("query-fdsets"), old.path, cmdline.BOOT_FDSETS + 1
                    )
            except (QmpError, QmpDisconnected, QemuUnresponsive) as e:
                log.warning("machine %s: the old node of drive %s stays: %s", self.name, old.id, e)
                return
            for fdset in fdsets:
                await self._remove_fdset(fdset)

    # -- network interfaces ----------------------------------------------------

    def validate_nic(self, requested_id: str, mac: str) -> None:
        """Refuse a bad id or a MAC another NIC of this machine has, before a tap is opened."""
        self._check_new_id(requested_id, "network interface")
        if mac and (other := next((n.id for n in self.nics.values() if n.mac == mac), "")):
            raise InvalidArgument(f"mac {mac} is already the address of {other} on {self.name}; give another")

    async def add_network(self, network: str, requested_id: str = "", mac: str = "", tap_fd: int | None = None) -> Nic:
        """netdev_add (user, or the tap `tap_fd` through getfd) + device_add
        of a virtio-net-pci on the lowest free spare port; undone on failure.
        `network` says what it is connected to (Nic.network); `tap_fd` stays the caller's."""
        async with self._request("AddNetwork"):
            self.validate_nic(requested_id, mac)
            dev = requested_id or self._new_nic_id()
            mac = mac or nic.default_mac(self.id, dev)
            # Taken first: a request refused for want of a port hands QEMU nothing.
            port = self.ports.take(dev)
            undo: list[tuple[str, dict[str, object]]] = []
            pending: list[tuple[str, dict[str, object]]] = []
            try:
                if tap_fd is not None:
                    fdname = f"{dev}-tap"
                    pending = [("closefd", {"fdname": fdname})]
                    await self._monitor.get_fd(tap_fd, fdname)
                    undo += pending
                    netdev = nic.netdev_tap(dev, fdname)
                else:
                    netdev = nic.netdev_user(dev)
                # netdev_add takes the named fd (or closes it when it fails): only the netdev is left to undo.
                pending = [("netdev_del", {"id": dev})]
                await self._monitor.execute("netdev_add", netdev)
                undo = pending
                await self._monitor.execute("device_add", nic.device(dev, mac, port))
            except QemuUnresponsive as e:
                late = Nic(dev, network, mac, port, DriveState.REMOVING)
                self._unanswered(e, lambda: self._cancel_late_add(dev, lambda: self._keep_nic(late), undo + pending))
                raise
            except QmpError as e:
                await self._undo(undo, dev)
                # Our own arguments on our own port: QEMU's refusal is not the caller's fault.
                raise QemuFailed(f"QEMU refused network interface {dev} ({network}) on {port}: {e}") from e
            except QmpDisconnected as e:
                raise NotRunning(f"machine {self.name} stopped during AddNetwork: {e}") from e
            card = Nic(dev, network, mac, port)
            self.nics[dev] = card
            self.save()
        log.info("machine %s: network interface %s (%s, %s) added on %s", self.name, dev, network, mac, port)
        self._notify("Networks", "Ports", "FreeSparePorts")
        self._tell(lambda o: o.network_added(self, card))
        return card

    def _keep_nic(self, late: Nic) -> None:
        self.nics[late.id] = late

    def _new_nic_id(self) -> str:
        """The next nicN, never one a removed NIC had while this daemon ran
        (as drive ids)."""
        known = self._known_ids()
        n = next(i for i in itertools.count(self._next_nic) if f"nic{i}" not in known)
        self._next_nic = n + 1
        return f"nic{n}"

    def _new_drive_id(self) -> str:
        """The next diskN: never one a removed drive had (a client holding a
        stale id must not hit a new drive), and a refused request uses none."""
        known = self._known_ids()
        return next(dev for i in itertools.count(self._next_drive) if (dev := drive_id(i)) not in known)

    async def _undo(self, undo: list[tuple[str, dict[str, object]]], dev: str) -> None:
        # The drive's own port first: its device was never added, nothing of QEMU's holds it.
        self.ports.release(dev)
        for command, args in reversed(undo):
            if command == "remove-fd":
                await self._remove_fdset(int(str(args["fdset-id"])))
                continue
            try:
                await self._monitor.execute(command, args)
            except (QmpError, QmpDisconnected) as e:
                # QEMU 7.2's nvme keeps its node "in use" after a failed
                # realize; nothing but QEMU itself can release it, so its
                # id stays taken.
                log.warning("machine %s: rollback %s %s failed: %s", self.name, command, args, e)
                if command == "blockdev-del":
                    self._stuck_ids.add(dev)
            if command == "device_del":
                # A controller created for this drive keeps its port until its own DEVICE_DELETED.
                self._leaving.add(str(args["id"]))

    async def _remove_fdset(self, fdset: int) -> None:
        """remove-fd. QEMU closes removed fds only while the VM runs: an
        fdset still listed afterwards is removed again on RESUME."""
        try:
            await self._monitor.execute("remove-fd", {"fdset-id": fdset})
            listed = any(f["fdset-id"] == fdset for f in await self._monitor.execute("query-fdsets"))
        except QmpError:
            listed = False  # QEMU has no such fdset (any more)
        except QemuUnresponsive:
            listed = True
        except QmpDisconnected:
            return
        if listed:
            self._unfreed_fdsets.add(fdset)
        else:
            self._unfreed_fdsets.discard(fdset)

    async def remove_drive(self, dev: str, timeout: float) -> None:
        """device_del, then wait for DEVICE_DELETED (freed later if it comes late)."""

        def check(_: Drive) -> None:
            if dev in {drive_id(i) for i in range(len(self.spec.boot_drives))}:
                raise InvalidArgument(f"drive {dev} was attached at boot on a builtin port and cannot be unplugged")
            if dev in self._busy:
                raise JobInProgress(f"a {self._busy[dev]} of drive {dev} runs; remove it once that returned")

        await self._unplug("RemoveDrive", "drive", self.drives, dev, timeout, check)

    async def remove_network(self, dev: str, timeout: float) -> None:
        """RemoveDrive's rules for a NIC: its netdev and port go with its DEVICE_DELETED."""
        await self._unplug("RemoveNetwork", "network", self.nics, dev, timeout, lambda _: None, NoSuchNetwork)

    async def _unplug(
        self,
        method: str,
        kind: str,
        table: dict[str, Any],
        dev: str,
        timeout: float,
        check: Callable[[Any], None],
        missing: type[VmspawndError] = NoSuchDrive,
    ) -> None:
        """device_del of the `kind` `table[dev]` (a Drive, a MachineShare, a
        Nic), then wait for its DEVICE_DELETED; past `timeout` UnplugTimeout,
        the entry stays `removing` and goes when the event comes later."""
        loop = asyncio.get_running_loop()
        prop = f"{kind.capitalize()}s"
        async with self._request(method):
            entry = table.get(dev)
            if entry is None:
                raise missing(f"machine {self.name} has no {kind} {dev!r}; see its {prop} property")
            if entry.state is DriveState.REMOVING:
                raise UnplugInProgress(f"{kind} {dev} is already being removed; wait for {kind.capitalize()}Removed")
            check(entry)
            # Listen before asking, so a quick event is not missed.
            done = self._waiters[dev] = loop.create_future()
            try:
                await self._device_del(dev, loop.time() + timeout)
            except QmpError as e:
                del self._waiters[dev]
                raise QemuFailed(f"QEMU refused to unplug {dev}: {e}") from e
            except QmpDisconnected as e:
                del self._waiters[dev]
                raise NotRunning(f"machine {self.name} stopped during {method}: {e}") from e
            except QemuUnresponsive as e:
                # device_del cannot be taken back: the device is on its way out
                # and goes when the guest lets go, as after UnplugTimeout.
                del self._waiters[dev]
                table[dev] = replace(entry, state=DriveState.REMOVING)
                self._unanswered(e)
                raise
            table[dev] = replace(entry, state=DriveState.REMOVING)
            self.save()
        self._notify(prop)
        try:
            await asyncio.wait({done}, timeout=timeout)
        finally:
            # A waiter nobody awaits any more is dropped, never failed later.
            if self._waiters.get(dev) is done:
                del self._waiters[dev]
        if not done.done():
            raise UnplugTimeout(
                f"the guest has not released {dev} after {timeout:g} s (no DEVICE_DELETED); it stays listed "
                "as 'removing' and its port is freed when the guest lets go. Is the guest OS running?"
            )
        done.result()

    async def _device_del(self, dev: str, deadline: float) -> None:
        """device_del, asked again while QEMU says the guest is busy, until `deadline`.

        No event says when the power indicator stops blinking, so this polls,
        bounded by the caller's timeout.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._monitor.execute("device_del", {"id": dev})
                return
            except QmpError as e:
                if GUEST_BUSY not in str(e) or loop.time() + BUSY_RETRY > deadline:
                    raise
            await asyncio.sleep(BUSY_RETRY)

    async def _dispatch_events(self) -> None:
        while True:
            name, data = await self._monitor.next_event()
            try:
                await self._on_event(name, data)
            except Exception:  # one bad event must not stop the ones later requests wait for
                log.exception("machine %s: handling QMP event %s failed", self.name, name, extra={"MACHINE": self.name})

    async def _on_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "DEVICE_DELETED" and "device" in data:
            await self._device_deleted(str(data["device"]))
        elif name in RUN_STATE_EVENTS:
            self._run_state_changed(RUN_STATE_EVENTS[name])
            if name == "STOP":
                # Whoever stopped it: QEMU itself does when the accelerator fails.
                await self._sync_run_state()
            if name == "RESUME" and self._unfreed_fdsets:
                async with self._lock:
                    for fdset in sorted(self._unfreed_fdsets):
                        await self._remove_fdset(fdset)
        elif name == "RESET":
            log.info("machine %s: reset (%s)", self.name, data.get("reason", "?"), extra={"MACHINE": self.name})
        elif name == "MIGRATION":
            self._migration_event(str(data.get("status", "")))
        elif name == "SHUTDOWN":
            self._shutdown_reason = str(data.get("reason", ""))
            self._shutdown.set()
        elif name == "JOB_STATUS_CHANGE" and (job := self._jobs.get(str(data.get("id")))) is not None:
            job.status(str(data.get("status", "")))

    async def _device_deleted(self, dev: str) -> None:
        if dev in self.shares:
            await self._share_deleted(dev)
            return
        async with self._lock:
            drive = self.drives.pop(dev, None)
            card = self.nics.pop(dev, None)
            if card is not None:
                await self._nic_gone(card)
            elif drive is not None:
                try:
                    # An ejected cdrom (no path) has no node.
                    if drive.path:
                        await self._monitor.execute("blockdev-del", {"node-name": drive.block_node})
                except (QmpError, QmpDisconnected) as e:
                    log.warning("machine %s: blockdev-del of %s failed: %s", self.name, dev, e)
                else:
                    for fdset in drive.fdsets:
                        await self._remove_fdset(fdset)
                if not drive.controller:
                    self.ports.release(dev)
                elif not any(d.controller == drive.controller for d in self.drives.values()):
                    # The controller goes with its last drive.
                    self._leaving.add(drive.controller)
                    with contextlib.suppress(QmpError, QmpDisconnected):
                        await self._monitor.execute("device_del", {"id": drive.controller})
            elif dev in self._leaving:
                # A SCSI controller's own unplug finished.
                self._leaving.discard(dev)
                self.ports.release(dev)
            waiter = self._waiters.pop(dev, None)
            self.save()
        if waiter and not waiter.done():
            waiter.set_result(None)
        if drive is not None:
            log.info("machine %s: drive %s removed", self.name, dev, extra={"MACHINE": self.name, "DRIVE": dev})
            self._tell(lambda o: o.drive_removed(self, dev))
        if card is not None:
            log.info("machine %s: network interface %s removed", self.name, dev, extra={"MACHINE": self.name})
            self._tell(lambda o: o.network_removed(self, dev))
            self._notify("Networks")
        self._notify("Drives", "Ports", "FreeSparePorts")

    async def _nic_gone(self, card: Nic) -> None:
        """The NIC's device is gone: its netdev (and with it the tap fd) and its port go too."""
        try:
            await self._monitor.execute("netdev_del", {"id": card.id})
        except (QmpError, QmpDisconnected) as e:
            log.warning("machine %s: netdev_del of %s failed: %s", self.name, card.id, e)
        self.ports.release(card.id)

    async def _query_accel(self) -> None:
        """Which accelerator QEMU ended up with: for "auto" it is QEMU's choice."""
        info = await self._monitor.execute("query-kvm")
        self.accel = "kvm" if info.get("enabled") else "tcg"

    # -- run state: pause, resume, reboot, power off ----------------------------

    async def _sync_run_state(self) -> None:
        """QEMU may run paused from the start (-S), have been paused while
        the daemon was down, or have stopped the guest itself: its own status is the truth."""
        try:
            status = await self._monitor.execute("query-status")
        except (QmpError, QmpDisconnected, QemuUnresponsive) as e:
            log.warning("machine %s: query-status failed: %s", self.name, e, extra={"MACHINE": self.name})
            return
        self._run_state_changed(MachineState.RUNNING if status.get("running") else MachineState.PAUSED)
        self._stopped_in(str(status.get("status", "")))

    def _stopped_in(self, runstate: str) -> None:
        """QEMU stops the guest in runstate internal-error when its accelerator
        cannot go on: KVM under "auto" is replaced by TCG (the manager starts
        the machine again), anything else stays paused and is said."""
        action = accel.on_stop(self.spec.accel, self.accel, runstate)
        if action is accel.OnStop.REPORT:
            log.error(
                "machine %s: %s failed: QEMU stopped the guest in runstate %s (its words are in %s); it stays "
                "paused%s: Reboot and Resume it to try again, or Terminate it",
                self.name, "KVM" if self.accel == "kvm" else "the accelerator", runstate, self.qemu_log,
                ", as accel=kvm asked for KVM only" if self.spec.accel is Accel.KVM else "",
                extra={"MACHINE": self.name},
            )  # fmt: skip
        elif action is accel.OnStop.FALL_BACK and not self.kvm_failed:
            self.kvm_failed = runstate
            if self.on_kvm_failed is not None:
                self.on_kvm_failed(self)

    def _run_state_changed(self, new: MachineState) -> None:
        """STOP/RESUME from QEMU (whoever paused it) or our own stop/cont:
        only running <-> paused, never out of starting, stopping or unmanaged."""
        if self.state.is_live and self.state is not new:
            self.state = new
            log.info("machine %s %s", self.name, new, extra={"MACHINE": self.name})
            self._notify("State")

    async def _run_command(self, command: str, method: str) -> Any:
        try:
            return await self._monitor.execute(command)
        except QmpError as e:
            raise QemuFailed(f"QEMU refused {command} for {method}: {e}") from e
        except QmpDisconnected as e:
            raise NotRunning(f"machine {self.name} stopped during {method}: {e}") from e

    async def pause(self) -> None:
        """Stop the vCPUs (QMP stop): the guest's clock stops too. Pausing a paused machine is a no-op."""
        async with self._request("Pause"):
            await self._run_command("stop", "Pause")
            self._run_state_changed(MachineState.PAUSED)

    async def resume(self) -> None:
        """Run the vCPUs again (QMP cont). Resuming a running machine is a no-op."""
        async with self._request("Resume"):
            await self._run_command("cont", "Resume")
            self._run_state_changed(MachineState.RUNNING)

    async def reboot(self) -> None:
        """Reset the guest (QMP system_reset), as the reset button does. The
        machine, its ports and every hotplugged device stay; a paused machine
        stays paused."""
        async with self._request("Reboot"):
            await self._run_command("system_reset", "Reboot")
        log.info("machine %s: reset requested", self.name, extra={"MACHINE": self.name})

    async def inject_nmi(self) -> None:
        """A non-maskable interrupt to every vCPU (QMP inject-nmi), as a
        host's NMI button: a guest set up for it writes a crash dump, others
        log it. A paused machine gets it when it runs again."""
        async with self._request("InjectNMI"):
            await self._run_command("inject-nmi", "InjectNMI")
        log.info("machine %s: NMI injected", self.name, extra={"MACHINE": self.name})

    async def drive_stats(self, dev: str) -> dict[str, int]:
        """The drive's I/O counters since it was plugged (QMP query-blockstats)."""
        async with self._request("DriveStats"):
            drive = self._drive(dev)
            reply = await self._run_command("query-blockstats", "DriveStats")
        entry = blockstats.entry_of(reply, dev, drive.block_node)
        if entry is None:
            raise QemuFailed(f"QEMU reports no block device for drive {dev} of {self.name} (query-blockstats)")
        return blockstats.counters(entry)

    async def set_user_password(self, user: str, password: str, crypted: bool) -> None:
        """Set `user`'s password in the guest through its agent (qemu-ga's
        guest-set-user-password; `crypted`: `password` is a crypt(3) hash).
        The password goes into no log and no error."""
        check_password_request(user, password)
        self._check_live()
        if not self.spec.guest_agent:
            raise AgentUnavailable(
                f"machine {self.name} was created without guest_agent: it has no agent port; "
                "create it with guest_agent=true (and qemu-ga in the guest)"
            )
        if self.state is MachineState.PAUSED:
            raise AgentUnavailable(f"machine {self.name} is paused: its guest agent cannot answer; Resume it first")
        arguments: dict[str, object] = {
            "username": user,
            "password": base64.b64encode(password.encode()).decode(),
            "crypted": crypted,
        }
        try:
            async with asyncio.timeout(qga.SYNC_TIMEOUT):
                await self._agent_lock.acquire()
        except TimeoutError:
            raise AgentUnavailable(f"machine {self.name}: an earlier guest agent call is still waiting") from None
        try:
            with self._sock_path(AGENT_SOCK) as path:
                await qga.call(path, "guest-set-user-password", arguments, f"machine {self.name}")
        finally:
            self._agent_lock.release()
        log.info("machine %s: password of guest user %r set", self.name, user, extra={"MACHINE": self.name})

    async def open_graphics(self) -> socket.socket:
        """A new client of the machine's display: one end of a socketpair is
        the caller's, QEMU's VNC or SPICE server takes the other (getfd +
        add_client, no authentication of its own: the caller's rights were
        checked). A failure leaves no fd in QEMU."""
        if self.spec.graphics is Graphics.NONE:
            raise NoGraphics(
                f"machine {self.name} was created without graphics: it has no display; "
                "create it with graphics=vnc (or graphics=spice)"
            )
        async with self._request("OpenGraphics"):
            ours, qemus = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            args: dict[str, object] = {"protocol": str(self.spec.graphics), "fdname": GRAPHICS_FD, "skipauth": True}
            try:
                await self._fd_command(qemus.fileno(), GRAPHICS_FD, "add_client", args, "OpenGraphics")
            except BaseException as e:
                ours.close()
                if isinstance(e, QemuUnresponsive):
                    # A late getfd leaves the fd in QEMU: closed once it answers.
                    self._unanswered(e, lambda: self._monitor.execute("closefd", {"fdname": GRAPHICS_FD}))
                raise
            finally:
                # QEMU holds its own copy now, or none.
                qemus.close()
        log.info("machine %s: %s client added", self.name, self.spec.graphics, extra={"MACHINE": self.name})
        return ours

    async def power_off(self, timeout: float) -> bool:
        """ACPI power button, pressed again every BUTTON_REPEAT s (a guest
        still booting does not listen yet); past `timeout` quit, then
        SIGTERM, then SIGKILL. A paused machine is resumed first, so its
        guest can react. Returns whether the stop had to be forced."""
        self._check_live()
        assert self.process is not None
        self._powering_off = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            if self.state is MachineState.PAUSED:
                await self._run_command("cont", "PowerOff")
            while True:
                try:
                    await self._monitor.execute("system_powerdown", timeout=min(timeout, TIMEOUT))
                except QmpDisconnected as e:
                    # Gone or on its way out: the guest may have shut down just now.
                    if not await self.process.wait(QUIT_TIMEOUT):
                        raise NotRunning(f"machine {self.name}: its monitor went away during PowerOff: {e}") from e
                left = deadline - loop.time()
                if await self.process.wait(max(0.0, min(BUTTON_REPEAT, left))):
                    await self._ended.wait()
                    return False
                if left <= BUTTON_REPEAT:
                    break
        except QemuUnresponsive as e:
            log.warning("machine %s: %s; stopping QEMU", self.name, e, extra={"MACHINE": self.name})
            await self.terminate(forget=False)
            return True
        except QmpError as e:
            raise QemuFailed(f"QEMU refused system_powerdown: {e}") from e
        log.info("machine %s ignored the ACPI power button for %g s; stopping QEMU", self.name, timeout)
        await self.terminate(forget=False)
        return True

    # -- suspend to disk and resume --------------------------------------------

    def _check_suspendable(self) -> None:
        """What a suspended machine's next start cannot give back as it was:
        QEMU's saved state only loads into the very same devices."""
        if not self.spec.keep:
            raise Unsupported(
                f"machine {self.name} was not created with keep: only a kept machine stays defined to be resumed; "
                "create it with keep=true to suspend it"
            )
        if removing := sorted(d.id for d in self.drives.values() if d.state is DriveState.REMOVING):
            raise UnplugInProgress(
                f"drives {', '.join(removing)} of {self.name} are being removed; suspend it once they are gone"
            )
        self._check_no_jobs("Suspend")
        builtin = keep.boot_ids(self.spec)
        # Hotplugged, but not plugged again by the next start.
        why = [f"hotplugged NIC {n}" for n in sorted(self.nics)]
        why += [f"hotplugged share {d}" for d in sorted(set(self.shares) - self._boot_shares)]
        why += [f"ejected drive {d.id}" for d in self.drives.values() if d.id not in builtin and not d.path]
        # Whose state QEMU 7.2 cannot save (it blocks migration).
        why += [f"nvme drive {d.id}" for d in self.drives.values() if d.disk_type is DiskType.NVME]
        why += ["virtiofs shares"] if self._boot_shares else []
        # The guest CID is chosen afresh at each start.
        why += ["vsock"] if self.spec.vsock else []
        if why:
            raise Unsupported(
                f"machine {self.name} cannot be suspended: its {', '.join(why)} would not come back as they are "
                "(hotplugged NICs and shares and ejected drives: remove them first; nvme drives, virtiofs shares "
                "and vsock: QEMU cannot save their state, or the next start cannot give it back)"
            )

    async def suspend(self) -> None:
        """Suspend(): QEMU writes the guest's memory and device state into
        state.SAVED (the daemon opens the file, QEMU gets its fd), flushing
        the disks as it completes; then QEMU quits and the machine is
        suspended: Start() resumes it from there. A failure leaves it running
        as it was, with no file."""
        async with self._request("Suspend"):
            self._check_suspendable()
            assert self.process is not None
            saved = self.dir / state.SAVED
            try:
                await self._save(saved)
                self.suspended = True
                # Before QEMU quits: a daemon killed now finds the machine suspended.
                with state.space_of(self.dir):
                    await self._writer.write_now()
            except BaseException:
                self.suspended = False
                saved.unlink(missing_ok=True)
                await self._resume_after_failed_save()
                raise
            log.info("machine %s: state saved to %s; stopping QEMU", self.name, saved, extra={"MACHINE": self.name})
            # Within the request: nothing may run the guest on past its saved state.
            await self.terminate(forget=False)

    async def _resume_after_failed_save(self) -> None:
        """QEMU runs the vCPUs again after a failed migration on its own, but
        not after a completed one whose record could not be written."""
        with contextlib.suppress(QmpError, QmpDisconnected, QemuUnresponsive):
            if (await self._monitor.execute("query-status")).get("status") == "postmigrate":
                await self._monitor.execute("cont")

    async def _save(self, saved: Path) -> None:
        """Migrate into the file `saved`, bounded; QemuFailed with QEMU's words if it fails."""
        assert self.process is not None
        fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            await self._guarded("Suspend", self._monitor.get_fd(fd, SAVED_FD))
        finally:
            os.close(fd)
        self._migration = asyncio.get_running_loop().create_future()
        try:
            try:
                await self._monitor.execute("migrate-set-capabilities", EVENTS_CAPABILITY)
                await self._monitor.execute("migrate", {"uri": f"fd:{SAVED_FD}"})
            except QmpError as e:
                # Refused before it took the fd (a device that blocks migration): the fd goes back.
                with contextlib.suppress(QmpError, QmpDisconnected):
                    await self._monitor.execute("closefd", {"fdname": SAVED_FD})
                raise QemuFailed(f"QEMU refused to save machine {self.name}: {e}") from e
            except QmpDisconnected as e:
                raise NotRunning(f"machine {self.name} stopped during Suspend: {e}") from e
            timeout = migration_timeout(self.spec.memory)
            status = await self._migration_end(self._migration, timeout)
        finally:
            self._migration = None
        if status == "completed":
            return
        if status == "timeout":
            with contextlib.suppress(QmpError, QmpDisconnected, QemuUnresponsive):
                await self._monitor.execute("migrate_cancel")
            raise QemuFailed(f"QEMU did not finish saving machine {self.name} within {timeout:g} s; it runs on")
        if status == "exited":
            raise NotRunning(f"machine {self.name} stopped during Suspend: {await self._qemu_errors()}")
        raise QemuFailed(f"QEMU could not save machine {self.name}: {await self._migration_error()}; it runs on")

    async def _migration_end(self, ended: Coroutine[Any, Any, str] | asyncio.Future[str], timeout: float) -> str:
        """How a migration ended (completed, failed, cancelled), "exited" if
        QEMU did first, "timeout" past `timeout`."""
        assert self.process is not None
        waiter = asyncio.ensure_future(ended)
        exited: asyncio.Future[Any] = self.process.exited
        try:
            await asyncio.wait({waiter, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            return waiter.result()
        return "exited" if self.process.exited.done() else "timeout"

    async def _migration_error(self) -> str:
        try:
            info = await self._monitor.execute("query-migrate")
        except (QmpError, QmpDisconnected, QemuUnresponsive) as e:
            return f"(query-migrate failed: {e})"
        return str(info.get("error-desc") or info.get("status") or "no reason given")

    async def _incoming_end(self) -> str:
        """The status that ends an incoming migration, read off the monitor
        before the event task runs (restore happens before it starts)."""
        while True:
            name, data = await self._monitor.next_event()
            if name == "MIGRATION" and (status := str(data.get("status", ""))) in MIGRATION_ENDS:
                return status

    async def _restore(self) -> None:
        """A suspended machine's QEMU (-incoming defer, -S) loads the saved
        state; its vCPUs wait for go_on(). QemuFailed if it cannot: the file stays."""
        saved = self.dir / state.SAVED
        try:
            fd = os.open(saved, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise QemuFailed(f"cannot open the saved state {saved} of machine {self.name}: {e.strerror}") from e
        try:
            await self._guarded("Start", self._monitor.get_fd(fd, SAVED_FD))
        finally:
            os.close(fd)
        try:
            await self._monitor.execute("migrate-set-capabilities", EVENTS_CAPABILITY)
            await self._monitor.execute("migrate-incoming", {"uri": f"fd:{SAVED_FD}"})
        except (QmpError, QmpDisconnected) as e:
            raise QemuFailed(f"QEMU refused to load the saved state of {self.name}: {e}") from e
        timeout = migration_timeout(self.spec.memory)
        status = await self._migration_end(self._incoming_end(), timeout)
        if status == "completed":
            log.info("machine %s: saved state loaded from %s", self.name, saved, extra={"MACHINE": self.name})
            return
        if status == "timeout":
            raise QemuFailed(f"QEMU did not load the saved state of {self.name} within {timeout:g} s")
        # QEMU exits when an incoming migration fails; its words are in qemu.log.
        assert self.process is not None
        await self.process.wait(QUIT_TIMEOUT)
        raise QemuFailed(f"QEMU could not load the saved state of {self.name}: {await self._qemu_errors()}")

    async def go_on(self) -> None:
        """The last step of a resume, once everything else of the start
        succeeded: run the vCPUs, then the saved state goes (the guest runs
        past it from now on)."""
        if not self.resuming:
            return
        try:
            await self._monitor.execute("cont")
        except (QmpError, QmpDisconnected) as e:
            raise QemuFailed(f"QEMU refused cont after loading the saved state of {self.name}: {e}") from e
        self.resuming = False
        self.suspended = False
        try:
            (self.dir / state.SAVED).unlink(missing_ok=True)
        except OSError as e:
            log.warning("machine %s: cannot remove its saved state: %s", self.name, e, extra={"MACHINE": self.name})
        self._run_state_changed(MachineState.RUNNING)
        self.save()

    # -- share hotplug --------------------------------------------------------

    def validate_share(self, tag: str, requested_id: str) -> None:
        """What AddShare can refuse before the directory is opened."""
        self._check_new_id(requested_id, "share")
        if taken := next((s for s in self.shares.values() if s.tag == tag), None):
            raise InvalidArgument(
                f"tag {tag!r} is already shared on {self.name} (share {taken.id}); "
                "the guest mounts by tag: pick another"
            )

    def _new_share_id(self) -> str:
        """The next shareN, never one a removed share had; a refused request uses none (as drive ids)."""
        known = self._known_ids()
        return next(dev for i in itertools.count(self._next_share) if (dev := f"share{i}") not in known)

    async def _check_shared_memory(self) -> None:
        """vhost-user needs guest memory QEMU can share (cmdline.shared_memory)."""
        if self._shared_memory is None:
            memdevs = await self._monitor.execute("query-memdev")
            self._shared_memory = any(m.get("share") for m in memdevs)
        if not self._shared_memory:
            raise InvalidArgument(
                f"machine {self.name} runs without shareable guest memory (created with hotplug_spares=0 or by an "
                "older vmspawnd), which virtiofs needs; create it again to hotplug shares"
            )

    def _virtiofsd_of(self, dev: str) -> Process | Service | None:
        return next((p for opened, p in self._virtiofsd if opened.share.device == dev), None)

    async def _watch_virtiofsd(self, dev: str, process: Process | Service) -> None:
        """A hotplugged share's virtiofsd ending while its device is still there
        leaves the guest's mount failing: say so (RemoveShare cleans up)."""
        await asyncio.wait({process.exited})
        hot = self.shares.get(dev)
        # Status 0: QEMU let go of its connection (the device went, or QEMU did).
        if hot is None or hot.state is not DriveState.ATTACHED or not self.state.is_live or process.returncode == 0:
            return
        log.warning(
            "machine %s: virtiofsd of share %s (tag %r) exited (status %s) while the guest has it; its log: %s; "
            "the guest's mount fails until RemoveShare %s and AddShare again",
            self.name, dev, hot.tag, process.returncode, self.dir / state.virtiofsd_log(dev), dev,
            extra={"MACHINE": self.name},
        )  # fmt: skip

    async def _drop_virtiofsd(self, dev: str) -> None:
        """A share's virtiofsd ends once QEMU let go of its connection; one that does not is stopped."""
        process = self._virtiofsd_of(dev)
        if process is None:
            return
        if not await process.wait(QUIT_TIMEOUT):
            await process.stop(QUIT_TIMEOUT)
        self._virtiofsd = [(o, p) for o, p in self._virtiofsd if p is not process]

    async def add_share(self, opened: share.OpenShare, requested_id: str = "") -> MachineShare:
        """virtiofsd for the opened directory, its connection as a chardev
        (getfd + chardev-add), vhost-user-fs-pci on the first free spare
        port; undone on failure. `opened.fd` stays the caller's."""
        async with self._request("AddShare"):
            self.validate_share(opened.share.tag, requested_id)
            await self._guarded("AddShare", self._check_shared_memory())
            dev = requested_id or self._new_share_id()
            opened = replace(opened, share=replace(opened.share, device=dev))
            chardev = SHARE_CHARDEV.format(dev)
            port = self.ports.take(dev)
            undo: list[tuple[str, dict[str, object]]] = []
            try:
                fs_fd = (await self._start_virtiofsd([opened]))[dev]
                try:
                    undo.append(("closefd", {"fdname": chardev}))
                    await self._monitor.get_fd(fs_fd, chardev)
                finally:
                    os.close(fs_fd)
                await self._monitor.execute("chardev-add", cmdline.fs_chardev(chardev))
                # chardev-add took the fd; removing the chardev closes it.
                undo[-1] = ("chardev-remove", {"id": chardev})
                await self._monitor.execute("device_add", cmdline.fs_device(dev, chardev, opened.share.tag, port))
            except QemuUnresponsive as e:
                self._unanswered(e, lambda: self._cancel_late_share(dev, undo))
                raise
            except QmpDisconnected as e:
                raise NotRunning(f"machine {self.name} stopped during AddShare: {e}") from e
            except (QmpError, OSError) as e:
                # The directory was checked: QEMU or virtiofsd failed (virtiofsd's own words say why).
                said = share.errors(share.log_path(self.dir, opened.share))
                await self._undo_share(dev, undo)
                raise QemuFailed(
                    f"share {dev} ({opened.share.source}) could not be attached: {e}; virtiofsd: {said}"
                ) from e
            except BaseException:
                await self._undo_share(dev, undo)
                raise
            process = self._virtiofsd_of(dev)
            assert process is not None
            added = MachineShare(
                dev, opened.share.tag, str(opened.share.source), port, pid=process.pid, start_time=process.start_time
            )
            self.shares[dev] = added
            if not requested_id:
                self._next_share = int(dev.removeprefix("share")) + 1
            self.save()
            self._spawn(self._watch_virtiofsd(dev, process), f"virtiofsd watch of {dev}")
        log.info("machine %s: share %s added on %s", self.name, dev, port, extra={"MACHINE": self.name})
        self._notify("Shares", "Ports", "FreeSparePorts")
        self._tell(lambda o: o.share_added(self, added))
        return added

    async def _guarded(self, method: str, call: Awaitable[None]) -> None:
        try:
            await call
        except QmpError as e:
            raise QemuFailed(f"QEMU refused a query for {method}: {e}") from e
        except QmpDisconnected as e:
            raise NotRunning(f"machine {self.name} stopped during {method}: {e}") from e

    async def _undo_share(self, dev: str, undo: list[tuple[str, dict[str, object]]]) -> None:
        """Back out of an AddShare: QEMU's chardev (or the passed fd), virtiofsd, the port."""
        for command, args in reversed(undo):
            try:
                await self._monitor.execute(command, args)
            except (QmpError, QmpDisconnected) as e:
                log.warning("machine %s: rollback %s %s failed: %s", self.name, command, args, e)
        await self._drop_virtiofsd(dev)
        (self.dir / state.virtiofsd_log(dev)).unlink(missing_ok=True)
        self.ports.release(dev)

    async def _cancel_late_share(self, dev: str, undo: list[tuple[str, dict[str, object]]]) -> None:
        """Undo an AddShare whose caller got QemuUnresponsive, now that QEMU answers."""
        peripheral = {c["name"] for c in await self._monitor.execute("qom-list", {"path": "/machine/peripheral"})}
        if dev in peripheral:
            # device_add was carried out late: unplug it, DEVICE_DELETED cleans up.
            log.warning("machine %s: unplugging share %s, added after its AddShare timed out", self.name, dev)
            self.shares[dev] = MachineShare(dev, "", "", self.ports.port_of(dev) or "", state=DriveState.REMOVING)
            await self._monitor.execute("device_del", {"id": dev})
        else:
            log.warning("machine %s: undoing the AddShare of %s that timed out", self.name, dev)
            await self._undo_share(dev, undo)

    async def remove_share(self, dev: str, timeout: float) -> None:
        """device_del, then wait for DEVICE_DELETED; virtiofsd and the chardev go with the device."""

        def check(_: MachineShare) -> None:
            if dev in self._boot_shares:
                raise InvalidArgument(f"share {dev} was attached at boot on a builtin port and cannot be unplugged")

        await self._unplug("RemoveShare", "share", self.shares, dev, timeout, check, NoSuchShare)

    async def _share_deleted(self, dev: str) -> None:
        async with self._lock:
            gone = self.shares.pop(dev)
            await self._undo_share(dev, [("chardev-remove", {"id": SHARE_CHARDEV.format(dev)})])
            waiter = self._waiters.pop(dev, None)
            self.save()
        if waiter and not waiter.done():
            waiter.set_result(None)
        log.info("machine %s: share %s (%s) removed", self.name, dev, gone.tag, extra={"MACHINE": self.name})
        self._tell(lambda o: o.share_removed(self, dev))
        self._notify("Shares", "Ports", "FreeSparePorts")

    # -- live migration ---------------------------------------------------------
    # The stream is a socket the caller connected and hands in (no network of
    # the daemon's or QEMU's own); disks are shared storage: the destination
    # opens the same paths, nothing of them is copied.

    def _check_not_migrating(self, what: str) -> None:
        if self._outgoing is not None:
            raise MigrationInProgress(
                f"machine {self.name} is migrating; {what} is refused until the migration ends (or CancelMigration)"
            )

    def _migration_event(self, status: str) -> None:
        """A MIGRATION event (Suspend's save, a live migration in or out): the
        Migration property, and the end whoever waits for one (self._migration)."""
        self.migration_status = status
        self._notify("Migration")
        end = self._migration
        if status in MIGRATION_ENDS and end is not None and not end.done():
            end.set_result(status)

    async def _hand_stream(self, fd: int, command: str, args: dict[str, object], method: str) -> None:
        """MIGRATION events on, the stream `fd` handed over (getfd), then `command` takes it."""
        setup = [("migrate-set-capabilities", EVENTS_CAPABILITY)]
        setup += [("migrate-set-parameters", {key: value}) for key, value in args.items()]
        await self._fd_command(fd, MIGRATION_FD, command, {"uri": f"fd:{MIGRATION_FD}"}, method, setup)

    async def _fd_command(
        self,
        fd: int,
        name: str,
        command: str,
        args: dict[str, object],
        method: str,
        setup: Sequence[tuple[str, dict[str, object]]] = (),
    ) -> None:
        """The `setup` commands, `fd` handed to QEMU under `name` (getfd),
        then `command` takes it; QEMU keeps no fd of a refused one."""
        try:
            for setup_command, setup_args in setup:
                await self._monitor.execute(setup_command, setup_args)
            await self._monitor.get_fd(fd, name)
            await self._monitor.execute(command, args)
        except QmpError as e:
            with contextlib.suppress(QmpError, QmpDisconnected, QemuUnresponsive):
                await self._monitor.execute("closefd", {"fdname": name})
            raise QemuFailed(f"QEMU refused {command} for {method}: {e}") from e
        except QmpDisconnected as e:
            raise NotRunning(f"machine {self.name} stopped during {method}: {e}") from e

    async def start_incoming(self, fd: int) -> asyncio.Future[str]:
        """Incoming(), first half: the stream `fd` (the caller's, who may
        close it once this returns) into the waiting QEMU (migrate-incoming).
        A failure removes the machine: nothing is left behind."""
        if self.state is not MachineState.INCOMING:
            raise NotRunning(f"machine {self.name} is {self.state}: only a machine created with 'incoming' takes one")
        if self._migration is not None:
            raise MigrationInProgress(f"machine {self.name} receives its migration already")
        end = self._migration = asyncio.get_running_loop().create_future()
        try:
            await self._hand_stream(fd, "migrate-incoming", {}, "Incoming")
        except BaseException:
            self._migration = None
            await asyncio.shield(self.terminate())
            raise
        return end

    async def finish_incoming(self, end: asyncio.Future[str], timeout: float) -> None:
        """Incoming(), second half: returns once the migration completed and
        the guest runs here (paused if the source had paused it). A failure,
        or no end within `timeout`, removes the machine."""
        try:
            status = await self._migration_end(asyncio.shield(end), timeout)
            if status != "completed":
                if status == "exited":
                    why = f"QEMU exited: {await self._qemu_errors()}"
                else:
                    why = f"no end within {timeout:g} s" if status == "timeout" else await self._migration_error()
                raise MigrationFailed(f"the incoming migration of {self.name} failed: {why}; the machine is removed")
        except BaseException:
            await asyncio.shield(self.terminate())
            raise
        finally:
            self._migration = None
        self.incoming = False
        self.state = MachineState.RUNNING
        await self._sync_run_state()
        self.save()
        log.info("machine %s migrated in, %s", self.name, self.state, extra={"MACHINE": self.name})
        self._notify("State")

    def _check_migratable(self) -> None:
        """What the destination could not rebuild: refused before anything is sent."""
        if self.shares:
            raise Unsupported(
                f"machine {self.name} has virtiofs shares ({', '.join(sorted(self.shares))}): QEMU cannot migrate "
                "vhost-user-fs devices; remove the hotplugged ones (RemoveShare) or create the machine without"
            )
        if self.nics:
            raise Unsupported(
                f"machine {self.name} has hotplugged network interfaces ({', '.join(sorted(self.nics))}), which the "
                "destination cannot be created with yet; remove them first (RemoveNetwork)"
            )
        if nvme := sorted(d.id for d in self.drives.values() if d.disk_type is DiskType.NVME):
            raise Unsupported(
                f"machine {self.name} has nvme drives ({', '.join(nvme)}), whose state QEMU cannot migrate; "
                "remove the hotplugged ones (RemoveDrive), or use virtio-blk or virtio-scsi"
            )
        if busy := sorted(d.id for d in self.drives.values() if d.state is DriveState.REMOVING):
            raise UnplugInProgress(f"drives {', '.join(busy)} of {self.name} are being removed; wait for DriveRemoved")
        self._check_no_jobs("Migrate")

    def _check_no_jobs(self, what: str) -> None:
        """The machine's state moves elsewhere: not while a drive's copy runs."""
        if self._busy:
            jobs = ", ".join(f"{m} of {d}" for d, m in sorted(self._busy.items()))
            raise JobInProgress(f"{what} of {self.name} is refused while {jobs} runs; retry once it returned")

    async def start_migration(self, fd: int, max_bandwidth: int) -> Outgoing:
        """Migrate(), first half: the machine's state into the stream `fd`
        (the caller's, who may close it once this returns; a destination
        created with `incoming` and fed by Incoming reads it)."""
        async with self._request("Migrate"):
            self._check_migratable()
            outgoing = self._outgoing = Outgoing()
            self._migration = outgoing.end
            try:
                params: dict[str, object] = {"max-bandwidth": max_bandwidth} if max_bandwidth else {}
                await self._hand_stream(fd, "migrate", params, "Migrate")
            except BaseException:
                self._outgoing = self._migration = None
                outgoing.finished.set()
                raise
        return outgoing

    async def finish_migration(self, outgoing: Outgoing, timeout: float) -> None:
        """Migrate(), second half. On completion this QEMU quits and the
        machine is gone (a kept one too: it lives at the destination now).
        On failure, a cancel, or no end within `timeout` (cancelled then) the
        guest runs on here."""
        try:
            status = await self._migration_end(asyncio.shield(outgoing.end), timeout)
            why = ""
            if status == "timeout":
                with contextlib.suppress(QmpError, QmpDisconnected, QemuUnresponsive):
                    await self._monitor.execute("migrate_cancel")
                status = await self._migration_end(asyncio.shield(outgoing.end), TIMEOUT)
                why = f"no end within {timeout:g} s (then cancelled: {status})"
            elif status == "exited":
                raise NotRunning(f"machine {self.name} stopped during Migrate: {await self._qemu_errors()}")
            elif status != "completed":
                why = "cancelled (CancelMigration)" if status == "cancelled" else await self._migration_error()
            if why:
                await self._resume_after_migration(outgoing)
                raise MigrationFailed(f"the migration of {self.name} failed: {why}; the guest runs on here")
        except BaseException:
            self._outgoing = self._migration = None
            outgoing.finished.set()
            raise
        # With no await since: no request slips in before terminate() refuses them.
        self._outgoing = self._migration = None
        log.info("machine %s migrated out; its QEMU quits", self.name, extra={"MACHINE": self.name})
        try:
            await self.terminate()
        finally:
            outgoing.finished.set()

    async def _resume_after_migration(self, outgoing: Outgoing) -> None:
        """QEMU resumes a guest a failed migration had stopped; one that
        ForceCompleteMigration paused is resumed here."""
        if not outgoing.paused:
            return
        try:
            await self._monitor.execute("cont")
        except (QmpError, QmpDisconnected, QemuUnresponsive) as e:
            log.warning("machine %s: cont after the failed migration: %s", self.name, e, extra={"MACHINE": self.name})
            return
        self._run_state_changed(MachineState.RUNNING)

    def _migrating(self, method: str) -> Outgoing:
        self._check_live()
        if self._outgoing is None:
            raise NotMigrating(f"machine {self.name} is not migrating; {method} needs a Migrate in progress")
        return self._outgoing

    async def cancel_migration(self) -> None:
        """CancelMigration(): migrate_cancel; returns once the guest runs here again."""
        outgoing = self._migrating("CancelMigration")
        await self._run_command("migrate_cancel", "CancelMigration")
        try:
            await asyncio.wait_for(outgoing.finished.wait(), TIMEOUT)
        except TimeoutError:
            raise QemuUnresponsive(
                f"the migration of {self.name} did not end within {TIMEOUT:g} s of its cancel"
            ) from None

    async def force_complete_migration(self) -> None:
        """ForceCompleteMigration(): the guest is paused so its memory stops
        changing and the migration converges (as libvirt does without
        post-copy); a migration that fails after all resumes it."""
        outgoing = self._migrating("ForceCompleteMigration")
        if self.state is MachineState.RUNNING and not outgoing.paused:
            outgoing.paused = True
            await self._run_command("stop", "ForceCompleteMigration")
            self._run_state_changed(MachineState.PAUSED)
