"""The set of machines: create, look up, terminate."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from . import cmdline, state
from .errors import AccessDenied, InvalidArgument, MachineExists, NoSuchMachine, VmspawndError
from .machine import Machine
from .model import DiskType, MachineSpec
from .opener import open_as
from .process import start_time
from .qmp import QmpDisconnected, QmpError
from .topology import Plan, plan_machine

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_name(name: str) -> None:
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"invalid machine name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - (not '.' or '..')"
        )


def check_file(what: str, path: Path) -> None:
    """The daemon's own view: exists and is a regular file (or block device)."""
    if not path.is_absolute():
        raise InvalidArgument(f"{what} {str(path)!r} must be an absolute path")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InvalidArgument(f"{what} {str(path)!r} does not exist") from None
    except OSError as e:
        raise InvalidArgument(f"{what} {str(path)[:200]!r}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise InvalidArgument(f"{what} {str(path)!r} is a directory; give a file")


TAG = re.compile(r"[A-Za-z0-9_.:-]{1,36}")


def check_shares(spec: MachineSpec) -> None:
    shares = cmdline.shares(spec)
    if shares and not Path(cmdline.VIRTIOFSD).exists():
        raise InvalidArgument(f"virtiofs needs {cmdline.VIRTIOFSD}: apt-get install qemu-system-common")
    for share in shares:
        try:
            is_dir = share.source.is_absolute() and stat.S_ISDIR(share.source.stat().st_mode)
        except OSError:
            is_dir = False
        if not is_dir:
            raise InvalidArgument(f"shared directory {str(share.source)[:200]!r} is not an existing directory")
        if not TAG.fullmatch(share.tag):
            raise InvalidArgument(f"virtiofs tag {share.tag!r}: use 1-36 characters from A-Z a-z 0-9 _ . : -")
    tags = [s.tag for s in shares]
    if len(set(tags)) != len(tags):
        raise InvalidArgument(f"virtiofs tags must be unique (got {', '.join(tags)}); 'root' is the directory's")
    if any(m.read_only for m in spec.mounts):
        raise InvalidArgument("read-only virtiofs mounts are not supported by virtiofsd 7.2; drop read_only")


def check_shares_owner(spec: MachineSpec, owner_uid: int) -> None:
    """virtiofsd runs as root: a user may only share directories they own."""
    for share in cmdline.shares(spec):
        if owner_uid != 0 and (uid := share.source.stat().st_uid) != owner_uid:
            raise AccessDenied(
                f"uid {owner_uid} may not share {str(share.source)!r}: it belongs to uid "
                f"{uid}; share a directory you own"
            )


def check_spec(spec: MachineSpec) -> None:
    check_name(spec.name)
    if spec.kernel is None and spec.image is None:
        raise InvalidArgument("no boot source: give 'kernel' (direct kernel boot) or 'image' (a disk image)")
    if spec.initrd is not None and spec.kernel is None:
        raise InvalidArgument("'initrd' needs 'kernel'")
    for what, path in (("kernel", spec.kernel), ("initrd", spec.initrd)):
        if path is not None:
            check_file(what, path)
    for drive in spec.boot_drives:
        check_file("drive", drive.path)
    check_shares(spec)
    if spec.vsock and not Path("/dev/vhost-vsock").exists():
        raise InvalidArgument("vsock needs /dev/vhost-vsock on the host: run 'modprobe vhost_vsock' or drop 'vsock'")


def boot_files(spec: MachineSpec) -> list[tuple[str, Path, bool]]:
    """(what, path, read-only) for every file QEMU needs at start."""
    files = [("kernel", p, True) for p in (spec.kernel,) if p] + [("initrd", p, True) for p in (spec.initrd,) if p]
    for i, drive in enumerate(spec.boot_drives):
        what = "image" if spec.image is not None and i == 0 else "drive"
        files.append((what, drive.path, drive.read_only or drive.disk_type is DiskType.VIRTIO_SCSI_CDROM))
    return files


def same_process(pid: int, recorded_start: int) -> bool:
    """The pid still names the process we started (never a reused pid)."""
    try:
        return start_time(pid) == recorded_start
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return False


def clear_dead(directory: Path, why: str) -> None:
    if state.clear_all_but_log(directory):
        log.warning("cleaned up machine %s: %s; its log stays at %s", directory.name, why, directory / state.LOG)


class Manager:
    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self.machines: dict[str, Machine] = {}
        # Names being created: a second CreateMachine of the same name is refused at once.
        self._reserved: set[str] = set()
        self.on_new: Callable[[Machine], None] = lambda m: None
        self.on_removed: Callable[[Machine], None] = lambda m: None

    @property
    def machines_dir(self) -> Path:
        return self.runtime_dir / "machines"

    def plan(self, spec: MachineSpec) -> Plan:
        check_spec(spec)
        return plan_machine(spec)

    def get(self, name: str) -> Machine:
        machine = self.machines.get(name)
        if machine is None:
            raise NoSuchMachine(f"no machine named {name!r}; ListMachines shows the ones there are")
        return machine

    async def create(self, spec: MachineSpec, owner_uid: int) -> Machine:
        check_name(spec.name)
        if spec.name in self.machines or spec.name in self._reserved:
            raise MachineExists(f"a machine named {spec.name!r} exists already; pick another name or terminate it")
        plan = self.plan(spec)
        directory = self.machines_dir / spec.name
        # A dead machine's leftovers (its kept qemu.log) make way for the new one.
        shutil.rmtree(directory, ignore_errors=True)
        check_shares_owner(spec, owner_uid)
        if spec.qemu_extra and owner_uid != 0:
            raise AccessDenied(
                "qemu_extra hands options to QEMU, which runs as root: only root may use it; drop qemu_extra"
            )
        machine = Machine(spec, plan, uuid.uuid4().hex, directory, owner_uid)
        machine.on_ended = self._ended
        self._reserved.add(spec.name)
        opened: dict[str, int] = {}
        try:
            for what, path, read_only in boot_files(spec):
                if str(path) not in opened:
                    opened[str(path)] = await open_as(owner_uid, str(path), read_only, what)
            await machine.start(3 + secrets.randbelow(2**31), opened)
        except BaseException:
            await asyncio.shield(machine.discard())
            raise
        finally:
            self._reserved.discard(spec.name)
            for fd in opened.values():
                os.close(fd)
        self.machines[spec.name] = machine
        self.on_new(machine)
        return machine

    def _ended(self, machine: Machine) -> None:
        if self.machines.get(machine.name) is machine:
            del self.machines[machine.name]
            self.on_removed(machine)

    async def terminate(self, name: str) -> None:
        await self.get(name).terminate()

    async def recover(self) -> None:
        """Daemon start: take back every machine whose QEMU still runs, clear the rest."""
        if not self.machines_dir.is_dir():
            return
        for directory in sorted(self.machines_dir.iterdir()):
            try:
                record = state.read(directory)
            except FileNotFoundError:
                # A dead machine's kept log, or a start cut short by a crash.
                clear_dead(directory, "it has no state.json")
                continue
            except (ValueError, KeyError, TypeError, OSError) as e:
                clear_dead(directory, f"its state.json is unreadable ({e})")
                continue
            if not same_process(record.pid, record.start_time):
                clear_dead(directory, f"its QEMU (pid {record.pid}) is gone")
                continue
            machine = Machine(record.spec, plan_machine(record.spec), record.id, directory, record.owner_uid)
            machine.on_ended = self._ended
            try:
                await machine.attach(record)
            except (VmspawndError, QmpError, QmpDisconnected, OSError) as e:
                log.error(
                    "machine %s: cannot re-attach to QEMU pid %d, leaving it alone: %s", record.spec.name,
                    record.pid, e, extra={"MACHINE": record.spec.name},
                )  # fmt: skip
                await machine.close()
                continue
            self.machines[machine.name] = machine

    async def power_off_all(self, timeout: float) -> None:
        """--stop-machines-on-exit: ACPI power-off, escalating past `timeout`."""
        results = await asyncio.gather(
            *(m.power_off(timeout) for m in list(self.machines.values())), return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception):
                log.warning("power-off on exit: %s", result)

    async def close(self) -> None:
        """Daemon shutdown: let go of every machine, leaving QEMU running."""
        await asyncio.gather(*(m.close() for m in self.machines.values()))
        self.machines.clear()


def default_runtime_dir(user: bool) -> Path:
    env = os.environ.get("RUNTIME_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    if user:
        return Path(os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")) / "vmspawnd"
    return Path("/run/vmspawnd")
