"""The set of machines: create, look up, terminate."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import logging
import os
import pwd
import re
import secrets
import shutil
import stat
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import accel, cmdline, imagechain, keep, pcitypes, quota, sealed, share, state, tap
from .cgroup import Cgroups, limits
from .chainopen import OpenedChain, open_chain
from .config import Config
from .errors import AccessDenied, InvalidArgument, MachineExists, NoSpace, NoSuchMachine, QemuFailed, VmspawndError
from .identity import Exhausted, Identity, Pool
from .machine import Machine
from .model import Accel, DeviceTypes, MachineSpec, MachineState, NetworkMode
from .opener import open_as
from .process import Process, option, qemu_processes, start_time, uids_in_use
from .qmp import QmpDisconnected, QmpError
from .topology import Plan, drive_id, plan_machine
from .units import Systemd

log = logging.getLogger(__name__)

# Each machine's re-attach at start is bounded by this (they run all at
# once): READY comes within about this long whatever the QEMUs do.
ATTACH_TIMEOUT = 1.5
# An unmanaged machine is retried after these many seconds, then every last one.
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0)

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_name(name: str) -> None:
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"invalid machine name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - (not '.' or '..')"
        )


def check_spec(spec: MachineSpec) -> None:
    check_name(spec.name)
    if spec.kernel is None and spec.image is None:
        raise InvalidArgument("no boot source: give 'kernel' (direct kernel boot) or 'image' (a disk image)")
    if spec.initrd is not None and spec.kernel is None:
        raise InvalidArgument("'initrd' needs 'kernel'")
    # Boot files are not looked at here: only opening them with the caller's
    # rights tells whether the caller may use them (opener.open_as).
    share.check(spec)
    if spec.vsock and not Path("/dev/vhost-vsock").exists():
        raise InvalidArgument("vsock needs /dev/vhost-vsock on the host: run 'modprobe vhost_vsock' or drop 'vsock'")


def kernel_files(spec: MachineSpec) -> list[tuple[str, Path]]:
    """(what, path) for the kernel and initrd, which QEMU opens by name."""
    return [(what, p) for what, p in (("kernel", spec.kernel), ("initrd", spec.initrd)) if p is not None]


async def open_boot_files(spec: MachineSpec, uid: int, opened: dict[str, int]) -> dict[str, imagechain.Layer]:
    """Open every boot drive, each layer of each image chain too, into
    `opened` (path -> fd); returns each drive's chain by its device id.
    Kernel and initrd are not among them (open_for_qemu).

    A file used twice is opened once, with the most rights any use needs
    (QEMU reopens an fd's file for its own use: never with more than ours)."""
    writable: set[str] = set()

    def add(name: str, fd: int, read_only: bool) -> None:
        path = str(Path(name))
        if path not in opened:
            opened[path] = fd
        elif read_only or path in writable:
            os.close(fd)
        else:
            os.close(opened.pop(path))
            opened[path] = fd
        if not read_only:
            writable.add(path)

    chains: dict[str, imagechain.Layer] = {}
    for i, drive in enumerate(spec.boot_drives):
        what = "image" if spec.image is not None and i == 0 else "drive"
        chain = await open_chain(uid, str(drive.path), drive.format, cmdline.read_only(drive), what)
        for layer in chain.top.walk():
            add(layer.path, chain.fds[layer.label], layer.read_only)
        chains[drive_id(i)] = chain.top
    return chains


async def open_plugged(spec: MachineSpec, uid: int, opened: dict[str, OpenedChain]) -> None:
    """Open a kept machine's hotplugged drives (spec.plugged) into `opened`
    (device id -> chain), each on its own as AddDrive opened it, as `uid`."""
    for p in spec.plugged:
        opened[p.id] = await open_chain(uid, str(p.drive.path), p.drive.format, cmdline.read_only(p.drive), "drive")


def same_process(pid: int, recorded_start: int) -> bool:
    """The pid still names the process we started (never a reused pid)."""
    try:
        return start_time(pid) == recorded_start
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return False


def clear_dead(directory: Path, why: str) -> None:
    if state.clear_all_but_log(directory):
        log.warning("cleaned up machine %s: %s; its log stays at %s", directory.name, why, directory / state.LOG)


def recorded_uuid(directory: Path) -> uuid.UUID | None:
    """The machine's uuid from the argv it was started with (when state.json cannot tell)."""
    try:
        value = option((directory / "argv").read_text().splitlines(), "-uuid")
        return uuid.UUID(value) if value else None
    except (OSError, ValueError):
        return None


def is_machine(argv: list[str], machine_id: uuid.UUID | None, directory: Path) -> bool:
    """This QEMU argv is the machine's: its -uuid, or (uuid unknown) its console log
    path: the opaque of the console's fdset, or the path of a QEMU started before
    the console was an fdset."""
    if machine_id is None:
        return any(f"{key}={directory}/console.log" in arg for arg in argv for key in ("opaque", "path"))
    try:
        return uuid.UUID(option(argv, "-uuid") or "") == machine_id
    except ValueError:
        return False


def usage(spec: MachineSpec) -> quota.Usage:
    return quota.Usage(spec.memory, spec.cpus, spec.hotplug_spares)


def host_has_id(n: int) -> bool:
    """The host has a passwd entry with uid `n` or a group with gid `n`."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(n)
        except KeyError:
            continue
        return True
    return False


async def open_for_qemu(uid: int, what: str, path: Path, limit: int) -> int:
    """An fd QEMU can reopen as /proc/self/fd/N (-kernel/-initrd open by name).

    The file as `uid` may read it: itself where its mode lets anyone read
    it (the reopen checks the inode only, and page cache is shared between
    machines), else a sealed memfd copy.
    """
    fd = await open_as(uid, str(path), True, what)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IROTH:
            return os.dup(fd)
        return await asyncio.to_thread(sealed.copy, fd, what, limit)
    except sealed.TooLarge as e:
        raise InvalidArgument(
            f"{what} {str(path)!r} is {e.size} bytes, more than the machine's memory ({limit}); give more memory"
        ) from None
    except OSError as e:
        raise NoSpace(f"cannot load {what} {str(path)!r} into memory: {e.strerror}") from e
    finally:
        os.close(fd)


class Manager:
    def __init__(
        self, runtime_dir: Path, config: Config | None = None, cgroups: Cgroups | None = None,
        systemd: Systemd | None = None,
    ) -> None:  # fmt: skip
        self.runtime_dir = runtime_dir
        self.config = config or Config()
        self.cgroups = cgroups
        # systemd as PID 1, for the transient services machines start.
        self.systemd = systemd
        # QEMU identities; an unprivileged daemon cannot give any.
        self.identities = Pool(self.config.identity_base, self.config.identity_count) if os.geteuid() == 0 else None
        self.machines: dict[str, Machine] = {}
        # Names being created or recovered: a CreateMachine of one is refused at once.
        self._reserved: set[str] = set()
        # Machines being created, by name: they count against their owner's quota.
        self._creating: dict[str, tuple[int, quota.Usage]] = {}
        # QEMU pids being taken back right now: never two machines with one leader.
        self._claiming: set[int] = set()
        # Retries of unmanaged machines.
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_new: Callable[[Machine], None] = lambda m: None
        self.on_removed: Callable[[Machine], None] = lambda m: None
        # A kept machine stopped (it stays listed), or its next run replaced it.
        self.on_stopped: Callable[[Machine], None] = lambda m: None
        self.on_replaced: Callable[[Machine, Machine], None] = lambda old, new: None
        # The machine KVM failed under first ("" while none has): from then on
        # an "auto" machine starts with TCG directly, for the daemon's life.
        self.kvm_failed_by = ""

    @property
    def machines_dir(self) -> Path:
        return self.runtime_dir / "machines"

    async def plan(self, spec: MachineSpec, uid: int) -> Plan:
        """PlanMachine: the plan, with each boot file (each layer of an image) opened as `uid` and closed."""
        plan = await self._plan(spec)
        opened: dict[str, int] = {}
        kernels: list[int] = []
        try:
            # Kernel and initrd too: CreateMachine opens them in open_for_qemu, a plan only checks them.
            for what, file in kernel_files(spec):
                kernels.append(await open_as(uid, str(file), True, what))
            await open_boot_files(spec, uid, opened)
        finally:
            for fd in [*kernels, *opened.values()]:
                os.close(fd)
        return plan

    async def _plan(self, spec: MachineSpec) -> Plan:
        check_spec(spec)
        return plan_machine(spec, await pcitypes.device_types(cmdline.QEMU))

    def _held(self, uid: int, exclude: str = "") -> list[quota.Usage]:
        """What `uid`'s machines take, listed (a stopped one its share, see
        quota.held) or being created or started, but machine `exclude`."""
        listed = [
            quota.held(usage(m.spec), not m.state.at_rest)
            for m in self.machines.values()
            if m.owner_uid == uid and m.name != exclude and m.name not in self._creating
        ]
        return listed + [u for owner, u in self._creating.values() if owner == uid]

    def status(self) -> str:
        """systemd's STATUS= line: the machines that run, and the kept ones at rest."""
        stopped = sum(m.state.at_rest for m in self.machines.values())
        text = f"{len(self.machines) - stopped} machines running"
        return f"{text}, {stopped} stopped" if stopped else text

    def get(self, name: str) -> Machine:
        machine = self.machines.get(name)
        if machine is None:
            raise NoSuchMachine(f"no machine named {name!r}; ListMachines shows the ones there are")
        return machine

    async def create(self, spec: MachineSpec, owner_uid: int, incoming: bool = False) -> Machine:
        """CreateMachine; `incoming`: QEMU waits for a migration stream (Machine.start_incoming)."""
        check_name(spec.name)
        if spec.name in self.machines or spec.name in self._reserved:
            raise MachineExists(f"a machine named {spec.name!r} exists already; pick another name or terminate it")
        if spec.qemu_extra and owner_uid != 0:
            raise AccessDenied(
                "qemu_extra hands raw options to QEMU, past every check of the daemon: "
                "only root may use it; drop qemu_extra"
            )
        quota.check(self.config.quota_for(owner_uid), owner_uid, self._held(owner_uid), usage(spec))
        # Taken with no await since the check: two creations cannot both pass for the last slot.
        self._reserved.add(spec.name)
        self._creating[spec.name] = (owner_uid, usage(spec))
        try:
            return await self._with_fallback(spec, lambda s: self._create(s, owner_uid, incoming))
        finally:
            self._reserved.discard(spec.name)
            del self._creating[spec.name]

    async def start(self, name: str) -> Machine:
        """Start(): boot a kept, stopped machine again: same name, id, ports and
        drives (the hotplugged ones at boot on their spare ports), every file
        opened again as its creator, its owner's quota checked as at create.
        The next run replaces the stopped one under its name, on its object;
        a suspended one's resumes from its saved state (Machine.suspend)."""
        old = self.get(name)
        old.check_startable()
        owner = old.owner_uid
        quota.check(self.config.quota_for(owner), owner, self._held(owner, exclude=name), usage(old.spec))
        # Taken with no await since the checks, as in create.
        self._creating[name] = (owner, usage(old.spec))
        old.starting()
        try:
            new = await self._with_fallback(old.spec, lambda spec: self._restart(old, spec))
        except BaseException as e:
            old.start_failed(str(e) or type(e).__name__)
            await asyncio.shield(old.save_stopped())
            raise
        finally:
            del self._creating[name]
        # Swapped with no await between: the name never leaves the bus.
        self.machines[name] = new
        self.on_replaced(old, new)
        return new

    async def _restart(self, old: Machine, spec: MachineSpec) -> Machine:
        new = old.successor(spec, await self._plan(spec), self._allocate_identity())
        await self._launch(new, keep_dir=True)
        return new

    async def _with_fallback(self, spec: MachineSpec, run: Callable[[MachineSpec], Awaitable[Machine]]) -> Machine:
        """ "auto" means KVM where QEMU can use it: a host may have /dev/kvm
        and still fail (accel.py), and then the machine starts again with
        TCG; once KVM failed, "auto" starts with TCG directly."""
        if spec.accel is Accel.AUTO and self.kvm_failed_by:
            log.info(
                "machine %s: accel=auto starts with TCG: KVM failed under machine %s earlier",
                spec.name, self.kvm_failed_by, extra={"MACHINE": spec.name},
            )  # fmt: skip
            return await run(replace(spec, accel=Accel.TCG))
        try:
            return await run(spec)
        except QemuFailed as e:
            if not accel.falls_back_at_start(spec.accel, str(e)):
                raise
            self._kvm_unusable(spec.name, str(e))
        return await run(replace(spec, accel=Accel.TCG))

    def _kvm_unusable(self, name: str, why: str) -> None:
        log.warning(
            "machine %s: KVM is present but QEMU cannot use it (%s); starting it with TCG instead, "
            "and every later accel=auto machine too",
            name, why, extra={"MACHINE": name},
        )  # fmt: skip
        self.kvm_failed_by = self.kvm_failed_by or name

    def _kvm_failed(self, machine: Machine) -> None:
        """KVM failed under a running "auto" machine (Machine._stopped_in).
        One still being started is left to its start (_launch fails it)."""
        if self.machines.get(machine.name) is machine:
            self._own(self._fall_back(machine))

    async def _fall_back(self, old: Machine) -> None:
        """Start a machine KVM failed under again with TCG, as Start() starts
        a kept one (same name, object, ports and drives; kept or not); the
        guest boots afresh. A failure leaves it as a failed Start() does, and
        one not kept goes."""
        name, owner = old.name, old.owner_uid
        why = f"QEMU stopped the guest in runstate {old.kvm_failed}; its words are in {old.qemu_log}"
        self._kvm_unusable(name, why)
        # It holds its quota all along: nobody takes it meanwhile.
        self._creating[name] = (owner, usage(old.spec))
        try:
            await old.stop_for_relaunch()
            if self.machines.get(name) is not old:
                return  # terminated meanwhile
            new = await self._restart(old, replace(old.spec, accel=Accel.TCG))
        except Exception as e:  # the machine's failure: it is told, the daemon goes on
            log.error(
                "machine %s: starting it again with TCG failed: %s", name, e, extra={"MACHINE": name},
                exc_info=not isinstance(e, VmspawndError),
            )  # fmt: skip
            await self._fall_back_failed(old, str(e) or type(e).__name__)
            return
        except BaseException:
            await asyncio.shield(self._fall_back_failed(old, "vmspawnd stopped meanwhile"))
            raise
        finally:
            del self._creating[name]
        # Swapped with no await between, as in start.
        self.machines[name] = new
        self.on_replaced(old, new)

    async def _fall_back_failed(self, old: Machine, why: str) -> None:
        if old.state is not MachineState.STARTING:
            return  # its QEMU was not stopped (or it was terminated): it stays as it is
        old.start_failed(why)
        if old.spec.keep:
            await old.save_stopped()
        elif self.machines.get(old.name) is old:
            state.clear_all_but_log(old.dir)
            del self.machines[old.name]
            self.on_removed(old)

    async def _create(self, spec: MachineSpec, owner_uid: int, incoming: bool) -> Machine:
        plan = await self._plan(spec)
        directory = self.machines_dir / spec.name
        # A dead machine's leftovers (its kept logs) make way for the new
        # one; anything else may belong to a live QEMU and is never deleted.
        with contextlib.suppress(FileNotFoundError):
            if any(not state.is_log(p.name) for p in directory.iterdir()):
                raise MachineExists(
                    f"{directory} holds a machine this vmspawnd does not manage; pick another name, "
                    "or remove the directory once its QEMU is gone"
                )
        shutil.rmtree(directory, ignore_errors=True)
        machine = Machine(spec, plan, uuid.uuid4().hex, directory, owner_uid, self._allocate_identity(), self.systemd)
        machine.incoming = incoming
        await self._launch(machine, keep_dir=False)
        self.machines[spec.name] = machine
        self.on_new(machine)
        return machine

    async def _launch(self, machine: Machine, keep_dir: bool) -> None:
        """Open everything as the owner, start QEMU, confine it; a failure
        undoes it all (`keep_dir`: a kept machine's directory stays, with its logs)."""
        spec, owner_uid = machine.spec, machine.owner_uid
        machine.on_ended = self._ended
        machine.on_kvm_failed = self._kvm_failed
        opened: dict[str, int] = {}
        plugged: dict[str, OpenedChain] = {}
        shares: list[share.OpenShare] = []
        tap_fd = None
        loaded: dict[str, int] = {}
        try:
            chains = await open_boot_files(spec, owner_uid, opened)
            await open_plugged(spec, owner_uid, plugged)
            shares = await share.open_all(owner_uid, spec)
            if spec.network.mode is NetworkMode.TAP:
                granted = self.config.taps_by_uid.get(owner_uid, ())
                tap_fd = tap.open_tap(owner_uid, spec.network.tap, granted)
            for what, file in kernel_files(spec):
                loaded[what] = await open_for_qemu(owner_uid, what, file, spec.memory)
            with state.space_of(machine.dir):
                self.runtime_dir.mkdir(parents=True, exist_ok=True)
                state.make_dir(self.machines_dir, exist_ok=True)
                await machine.start(
                    3 + secrets.randbelow(2**31), opened, shares, tap_fd, chains, loaded.get("kernel"),
                    loaded.get("initrd"), plugged, lambda: self._confine(machine),
                )  # fmt: skip
            # A suspended machine's guest runs on only once all else succeeded.
            await machine.go_on()
            if machine.kvm_failed:
                # Before the machine is listed: its start fails, and _with_fallback tries TCG.
                raise QemuFailed(f"KVM failed: QEMU stopped the guest in runstate {machine.kvm_failed}")
        except BaseException:
            await asyncio.shield(machine.discard(keep_dir))
            self._release_identity(machine)
            if self.cgroups:
                self.cgroups.remove(spec.name)
            raise
        finally:
            fds = [*opened.values(), *(s.fd for s in shares), *loaded.values()]
            for fd in fds + ([tap_fd] if tap_fd is not None else []):
                os.close(fd)
            for chain in plugged.values():
                chain.close()

    async def _confine(self, machine: Machine) -> None:
        """QEMU into the machine's own cgroup, with its limits."""
        if self.cgroups is None:
            return
        lim = limits(machine.spec.memory, machine.spec.cpus, self.config)
        try:
            await self.cgroups.place(machine.name, machine.leader, lim)
        except OSError as e:
            raise QemuFailed(f"cannot put QEMU of machine {machine.name} into its own cgroup: {e}") from e

    def _allocate_identity(self) -> Identity | None:
        if self.identities is None:
            return None
        # Besides passwd and group entries: a live process with the id (a
        # QEMU whose state.json was lost) keeps it taken.
        running = uids_in_use(self.identities.range)
        try:
            return self.identities.allocate(lambda n: n in running or host_has_id(n))
        except Exhausted as e:
            raise NoSpace(f"{e}; raise [identity] uid_count in the configuration, or stop a machine") from e

    def _release_identity(self, machine: Machine) -> None:
        # Only once its QEMU is gone: a live process keeps its uid.
        if self.identities is not None and machine.identity is not None:
            self.identities.release(machine.identity)
        # A kept machine's next run gets one of its own.
        machine.identity = None

    def _ended(self, machine: Machine) -> None:
        self._release_identity(machine)
        if self.machines.get(machine.name) is machine:
            if self.cgroups:
                self.cgroups.remove(machine.name)
            if machine.defined:
                self.on_stopped(machine)
                return
            del self.machines[machine.name]
            self.on_removed(machine)

    async def terminate(self, name: str) -> None:
        await self.get(name).terminate()

    async def recover(self) -> None:
        """Daemon start: take back every machine whose QEMU still runs, all at
        once and each bounded; list the ones that cannot be (unmanaged, retried);
        clear only the directories whose QEMU is certainly gone."""
        try:
            directories = [d for d in sorted(self.machines_dir.iterdir()) if d.is_dir()]
        except FileNotFoundError:
            return
        state.make_dir(self.machines_dir, exist_ok=True)
        self._reserved |= {d.name for d in directories}
        qemus = await asyncio.to_thread(qemu_processes)
        await asyncio.gather(*(self._recover_guarded(d, qemus) for d in directories))

    async def _recover_guarded(self, directory: Path, qemus: dict[int, list[str]]) -> None:
        try:
            machine = await self._recover(directory, qemus)
        except Exception as e:  # one machine's unforeseen fault must not cost the others
            log.exception("machine %s: re-attach failed", directory.name, extra={"MACHINE": directory.name})
            machine = self._placeholder(directory, f"re-attach failed: {e!r}", None, None)
        try:
            if machine is not None:
                self._install(machine)
        finally:
            self._reserved.discard(directory.name)

    def _placeholder(self, directory: Path, reason: str, machine_id: uuid.UUID | None, pid: int | None) -> Machine:
        """An unmanaged machine known only by its directory (and maybe its QEMU)."""
        spec = MachineSpec(directory.name)
        # No qemu_extra: the plan needs no device types.
        plan = plan_machine(spec, DeviceTypes(frozenset(), frozenset(), frozenset()))
        machine = Machine(spec, plan, (machine_id or uuid.UUID(int=0)).hex, directory, 0)
        machine.on_ended = self._ended
        machine.unmanaged(reason, Process.attach(pid) if pid is not None else None)
        return machine

    async def _recover(
        self, directory: Path, qemus: dict[int, list[str]], exclude: Machine | None = None
    ) -> Machine | None:
        """The machine in `directory`, managed or unmanaged; None when its QEMU is gone."""
        record: state.MachineRecord | None = None
        try:
            record = state.read(directory)
            problem = ""
            if record.spec.name != directory.name:
                problem, record = f"its state.json is for machine {record.spec.name!r}", None
        except FileNotFoundError:
            problem = "it has no state.json"
        except (state.StateError, OSError) as e:
            problem = f"its state.json is unreadable ({e})"
        machine_id = uuid.UUID(record.id) if record is not None and _is_uuid(record.id) else recorded_uuid(directory)
        claimed = {m.leader for m in self.machines.values() if m is not exclude} | self._claiming
        candidates = [pid for pid, argv in qemus.items() if is_machine(argv, machine_id, directory)]
        free = [pid for pid in candidates if pid not in claimed]
        if not candidates:
            if record is not None and record.spec.keep:
                return await self._stopped(directory, record, machine_id)
            # No QEMU carries this machine's uuid (or, unknown, its paths): nothing alive to lose.
            clear_dead(directory, problem or f"its QEMU (pid {record.pid if record else '?'}) is gone")
            return None
        if len(free) != 1:
            why = f"QEMU pids {', '.join(map(str, candidates))} carry its uuid"
            return self._placeholder(directory, f"{problem or why}; {why}", machine_id, None)
        pid = free[0]
        if record is None:
            return self._placeholder(directory, f"{problem}; its QEMU pid {pid} still runs", machine_id, pid)
        if record.pid != pid or not same_process(pid, record.start_time):
            log.warning(
                "machine %s: state.json names pid %d, but its QEMU (uuid %s) is pid %d; taking that one",
                directory.name, record.pid, machine_id, pid, extra={"MACHINE": directory.name},
            )  # fmt: skip
            record = replace(record, pid=pid, start_time=start_time(pid))
        try:
            plan = plan_machine(record.spec, await pcitypes.device_types(cmdline.QEMU))
        except VmspawndError as e:
            return self._placeholder(directory, f"its recorded spec is refused now ({e})", machine_id, pid)
        identity = Identity(record.qemu_uid, record.qemu_gid) if record.qemu_uid else None
        if identity is not None and self.identities is not None:
            # Taken while that QEMU lives, managed or not.
            self.identities.claim(identity)
        machine = Machine(record.spec, plan, record.id, directory, record.owner_uid, identity, self.systemd)
        machine.on_ended = self._ended
        machine.on_kvm_failed = self._kvm_failed
        self._claiming.add(pid)
        try:
            await machine.attach(record, ATTACH_TIMEOUT)
        except (VmspawndError, QmpError, QmpDisconnected, OSError) as e:
            machine.unmanaged(str(e), None)
        finally:
            self._claiming.discard(pid)
        if machine.state is not MachineState.UNMANAGED and self.cgroups and not self.cgroups.holds(machine.name, pid):
            try:
                await self._confine(machine)
            except QemuFailed as e:
                log.error("%s; it runs on without its limits", e, extra={"MACHINE": machine.name})
        return machine

    async def _stopped(self, directory: Path, record: state.MachineRecord, machine_id: uuid.UUID | None) -> Machine:
        """A kept machine with no QEMU: stopped, as its record says, or (its
        QEMU gone while the daemon was down) from now on."""
        spec = record.spec if record.stopped else keep.fold(record.spec, record.drives)
        try:
            plan = plan_machine(spec, await pcitypes.device_types(cmdline.QEMU))
        except VmspawndError as e:
            return self._placeholder(directory, f"its recorded spec is refused now ({e})", machine_id, None)
        machine = Machine(spec, plan, record.id, directory, record.owner_uid, systemd=self.systemd)
        machine.on_ended = self._ended
        machine.loaded_stopped(record)
        if not record.stopped:
            log.warning(
                "machine %s: its QEMU (pid %d) ended while vmspawnd was down; kept, it is stopped now",
                directory.name, record.pid, extra={"MACHINE": directory.name},
            )  # fmt: skip
            state.clear_all_but_log(directory, keep_saved=machine.suspended)
            await machine.save_stopped()
        return machine

    def _install(self, machine: Machine) -> None:
        self.machines[machine.name] = machine
        self.on_new(machine)
        if machine.kvm_failed:
            # KVM failed under it while it was being taken back.
            self._kvm_failed(machine)
        if machine.state is MachineState.UNMANAGED:
            log.warning(
                "machine %s is unmanaged, its directory kept, retried in the background: %s",
                machine.name, machine.reason, extra={"MACHINE": machine.name},
            )  # fmt: skip
            self._own(self._retry(machine))

    def _own(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry(self, machine: Machine) -> None:
        """Try an unmanaged machine again until it is adopted or its QEMU is gone."""
        for attempt in itertools.count():
            await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
            if self.machines.get(machine.name) is not machine:
                return  # its QEMU exited: _watch_exit cleaned up
            qemus = await asyncio.to_thread(qemu_processes)
            try:
                again = await self._recover(machine.dir, qemus, exclude=machine)
            except Exception:  # keep retrying; the machine stays listed meanwhile
                log.exception("machine %s: retry failed", machine.name, extra={"MACHINE": machine.name})
                continue
            if self.machines.get(machine.name) is not machine:
                if again is not None:
                    await again.release()
                return
            if again is not None and again.state is MachineState.UNMANAGED:
                await again.release()
                if again.reason != machine.reason:
                    machine.reason = again.reason
                    if machine.observer:
                        machine.observer.changed(machine, {"StateReason"})
                continue
            # Swapped with no await between: the name is never missing from the bus.
            del self.machines[machine.name]
            self.on_removed(machine)
            if again is not None:
                log.info("machine %s adopted after %d retries", machine.name, attempt + 1)
                self._install(again)
            await machine.release()
            return

    async def power_off_all(self, timeout: float) -> None:
        """--stop-machines-on-exit: ACPI power-off, escalating past `timeout`."""
        results = await asyncio.gather(
            *(m.power_off(timeout) for m in list(self.machines.values()) if m.state.is_live),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, Exception):
                log.warning("power-off on exit: %s", result)

    async def close(self) -> None:
        """Daemon shutdown: let go of every machine, leaving QEMU running."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(m.close() for m in self.machines.values()))
        self.machines.clear()


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def default_runtime_dir(user: bool) -> Path:
    env = os.environ.get("RUNTIME_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    if user:
        return Path(os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")) / "vmspawnd"
    return Path("/run/vmspawnd")
