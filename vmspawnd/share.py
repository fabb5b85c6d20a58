"""virtiofs shares: open, check, virtiofsd's argv, spawn.

Each shared directory is opened with its creator's rights and its owner is
checked on that handle; virtiofsd gets the handle (`/proc/self/fd/N/`),
never the path, so what was checked is what is exported. virtiofsd runs
in a user namespace whose only uid is the share's owner: the guest's root
is that owner on the host, files it creates are the owner's, and device
nodes cannot be made (mknod of a device needs CAP_MKNOD in the host's
namespace). A share root owns is squashed to nobody, as NFS's root_squash.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from dbus_fast import Variant

from . import cmdline, state
from .errors import AccessDenied, InvalidArgument
from .model import MachineSpec
from .opener import open_dir_as
from .process import Process, open_log
from .units import SANDBOX, Service, Systemd

# The Rust virtiofsd (Debian 13's `virtiofsd` package), then QEMU's own C one (7.2).
VIRTIOFSD_RUST = Path("/usr/libexec/virtiofsd")
VIRTIOFSD_C = Path("/usr/lib/qemu/virtiofsd")
# Root's shares: the guest's root is nobody on the host (NFS's root_squash).
SQUASHED = (65534, 65534)
TAG = re.compile(r"[A-Za-z0-9_.:-]{1,36}")
# Device nodes and file capabilities have no business on a share: virtiofsd
# drops what it would keep for them (inside its namespace they mean nothing
# on the host anyway).
DROPPED_CAPS = "-mknod:-setfcap"
# virtiofsd's two fds are its stdin (the share's directory) and stdout (its
# listening socket): systemd 252 can hand a transient service no other fds
# (no OpenFile=, ExtraFileDescriptors=); a socketpair and SCM_RIGHTS to a
# trampoline would be one more program in between. A direct start does the same.
SOURCE_FD = 0
LISTEN_FD = 1


@dataclass(frozen=True)
class Virtiofsd:
    path: str
    rust: bool


def find_virtiofsd() -> Virtiofsd | None:
    for path, rust in ((VIRTIOFSD_RUST, True), (VIRTIOFSD_C, False)):
        if path.exists():
            return Virtiofsd(str(path), rust)
    return None


def need_virtiofsd() -> Virtiofsd:
    binary = find_virtiofsd()
    if binary is None:
        raise InvalidArgument(
            f"virtiofs needs {VIRTIOFSD_RUST} (package virtiofsd) or {VIRTIOFSD_C} (package qemu-system-common)"
        )
    return binary


def check_share(share: cmdline.Share, read_only: bool = False) -> None:
    """One share, boot-time or hotplugged, before anything is opened."""
    try:
        is_dir = share.source.is_absolute() and stat.S_ISDIR(share.source.stat().st_mode)
    except OSError:
        is_dir = False
    if not is_dir:
        raise InvalidArgument(f"shared directory {str(share.source)[:200]!r} is not an existing directory")
    if not TAG.fullmatch(share.tag):
        raise InvalidArgument(f"virtiofs tag {share.tag[:40]!r}: use 1-36 characters from A-Z a-z 0-9 _ . : -")
    if read_only:
        # virtiofsd 7.2 has no read-only mode, and a share the guest could write
        # though its user asked otherwise is worse than none.
        raise InvalidArgument("read-only virtiofs mounts are not supported by virtiofsd 7.2; drop read_only")


def check(spec: MachineSpec) -> None:
    """What can be told before opening anything (PlanMachine too)."""
    shares = cmdline.shares(spec)
    if shares:
        need_virtiofsd()
    read_only = [False] * (len(shares) - len(spec.mounts)) + [m.read_only for m in spec.mounts]
    for share, ro in zip(shares, read_only, strict=True):
        check_share(share, ro)
    tags = [s.tag for s in shares]
    if len(set(tags)) != len(tags):
        raise InvalidArgument(f"virtiofs tags must be unique (got {', '.join(tags)}); 'root' is the directory's")


@dataclass(frozen=True)
class OpenShare:
    share: cmdline.Share
    fd: int
    # The host uid and gid the guest's root is in this share.
    uid: int
    gid: int


def guest_root(owner_uid: int, owner_gid: int, primary_gid: int | None) -> tuple[int, int]:
    """Who the guest's root is on the host: the share's owner (with their own
    group, else the directory's), nobody for a share of root's."""
    if owner_uid == 0:
        return SQUASHED
    return owner_uid, owner_gid if primary_gid is None else primary_gid


async def open_share(creator_uid: int, share: cmdline.Share) -> OpenShare:
    """The share opened as its creator; a non-root creator must own it."""
    fd = await open_dir_as(creator_uid, str(share.source))
    st = os.fstat(fd)
    if creator_uid != 0 and st.st_uid != creator_uid:
        os.close(fd)
        raise AccessDenied(
            f"uid {creator_uid} may not share {str(share.source)!r}: it belongs to uid {st.st_uid}; "
            "share a directory you own"
        )
    try:
        primary: int | None = pwd.getpwuid(st.st_uid).pw_gid
    except KeyError:
        primary = None
    uid, gid = guest_root(st.st_uid, st.st_gid, primary)
    return OpenShare(share, fd, uid, gid)


async def open_all(creator_uid: int, spec: MachineSpec) -> list[OpenShare]:
    opened: list[OpenShare] = []
    try:
        for share in cmdline.shares(spec):
            opened.append(await open_share(creator_uid, share))
    except BaseException:
        close(opened)
        raise
    return opened


def close(opened: list[OpenShare]) -> None:
    for share in opened:
        os.close(share.fd)


def virtiofsd_argv(binary: Virtiofsd, share: OpenShare) -> list[str]:
    """virtiofsd as the guest-root identity, root of a user namespace of its own.

    setpriv drops to that uid (no capabilities left, no new privileges),
    unshare makes it root of a new user namespace, where virtiofsd has what
    its chroot sandbox needs and nothing outside. The share's directory is
    its stdin, its listening socket its stdout (see SOURCE_FD); the trailing
    slash makes virtiofsd's lstat() follow the /proc magic link to the open
    directory.
    """
    source = f"/proc/self/fd/{SOURCE_FD}/"
    confine = [
        "setpriv",
        f"--reuid={share.uid}",
        f"--regid={share.gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
        "unshare",
        "--user",
        "--map-root-user",
        "--",
    ]  # fmt: skip
    if binary.rust:
        return [
            *confine,
            binary.path,
            f"--fd={LISTEN_FD}",
            f"--shared-dir={source}",
            "--sandbox=chroot",
            "--cache=auto",
            f"--modcaps={DROPPED_CAPS}",
        ]  # fmt: skip
    return [
        *confine,
        binary.path,
        f"--fd={LISTEN_FD}",
        "-o", f"source={source}",
        # chroot works in containers too; QEMU's connection ending ends it.
        "-o", "sandbox=chroot",
        "-o", "cache=auto",
        "-o", f"modcaps={DROPPED_CAPS}",
    ]  # fmt: skip


def unit_name(machine: str, device: str) -> str:
    return f"vmspawnd-virtiofsd-{machine}-{device}.service"


# virtiofsd's transient service (where systemd is PID 1), besides the
# common sandbox (units.SANDBOX: it reaches the share only through its
# stdin). setpriv needs CAP_SETUID/CAP_SETGID to become the share's owner,
# nothing else: in the user namespace unshare makes, virtiofsd gets a full
# set of its own (a new user namespace starts with a full bounding set) that
# reaches no host file but the owner's.
CAP_SETGID, CAP_SETUID = 6, 7
CLONE_NEWUSER = 0x10000000
SERVICE_HARDENING: tuple[tuple[str, Variant], ...] = (
    *SANDBOX,
    ("CapabilityBoundingSet", Variant("t", 1 << CAP_SETUID | 1 << CAP_SETGID)),
    # unshare's user namespace, no other kind.
    ("RestrictNamespaces", Variant("t", CLONE_NEWUSER)),
    ("ProtectClock", Variant("b", True)),
    ("ProtectHostname", Variant("b", True)),
    # SIGTERM, then SIGKILL this much later.
    ("TimeoutStopUSec", Variant("t", 5_000_000)),
)


def log_path(directory: Path, share: cmdline.Share) -> Path:
    return directory / state.virtiofsd_log(share.device)


async def start(
    binary: Virtiofsd, share: OpenShare, log: Path, systemd: Systemd | None, machine: str
) -> tuple[Process | Service, int]:
    """Start virtiofsd; returns it and QEMU's end of its connection.

    Where systemd is PID 1 it is a transient service: outside the daemon's
    own sandbox, which then needs neither user namespaces nor chroot(2).
    Elsewhere the daemon spawns it. Either way virtiofsd gets a listening
    socket (auto-bound, abstract: no file, no path-length limit) with QEMU's
    connection already queued, and writes to `log`.
    """
    argv = virtiofsd_argv(binary, share)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("")  # autobind: an abstract address of the kernel's choosing
        listener.listen(1)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(listener.getsockname())
            process: Process | Service
            out = open_log(log)
            try:
                if systemd is None:
                    process = Process.spawn(argv, out, pass_fds=(), stdin=share.fd, stdout=listener.fileno())
                else:
                    process = await systemd.start_service(
                        unit_name(machine, share.share.device),
                        f"virtiofsd of vmspawnd machine {machine}, share {share.share.tag}",
                        [shutil.which(argv[0]) or argv[0], *argv[1:]],
                        share.fd, listener.fileno(), out, SERVICE_HARDENING,
                    )  # fmt: skip
            finally:
                os.close(out)
        except BaseException:
            conn.close()
            raise
        return process, conn.detach()


def errors(log: Path) -> str:
    """virtiofsd's (or setpriv's, unshare's) last words."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "(no output)"
    return "; ".join(lines[-3:]) or "(no output)"
