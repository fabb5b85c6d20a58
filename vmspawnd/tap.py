"""Tap devices: the daemon attaches to them and hands QEMU the fd.

QEMU opening /dev/net/tun by name, as root, would attach any tap at all.
The daemon does the TUNSETIFF itself, as QEMU would (IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR), after checking the creator may use the device: root may
use (and create) any; anyone else a tap that exists and that they own
(its tun owner, or its tun group among theirs, as the kernel itself
allows) or that vmspawnd.conf's [taps] grants them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import AccessDenied, InvalidArgument

TUN = "/dev/net/tun"
SYS_NET = Path("/sys/class/net")
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_PERSIST = 0x0800
IFF_VNET_HDR = 0x4000
# sysfs shows an unset tun owner or group as -1.
UNSET = -1


@dataclass(frozen=True)
class TunInfo:
    """A tun/tap device as sysfs shows it."""

    flags: int
    owner: int = UNSET
    group: int = UNSET

    @property
    def is_tap(self) -> bool:
        return bool(self.flags & IFF_TAP)


def may_use(uid: int, groups: frozenset[int], name: str, info: TunInfo, granted: tuple[str, ...]) -> bool:
    """The kernel's own rule for attaching to a tap without CAP_NET_ADMIN, plus the config's grants."""
    return (
        uid == 0
        or name in granted
        or (info.owner != UNSET and info.owner == uid)
        or (info.group != UNSET and info.group in groups)
    )


def refusal(uid: int, name: str, info: TunInfo) -> str:
    owner = f"owned by uid {info.owner}" if info.owner != UNSET else "owned by no user (root only)"
    group = f", group {info.group}" if info.group != UNSET else ""
    return (
        f"uid {uid} may not use tap device {name!r}: it is {owner}{group}; use a tap you own "
        f"(ip tuntap add dev NAME mode tap user {uid}) or have root grant it in vmspawnd.conf's [taps]"
    )


def read_info(name: str) -> TunInfo | None:
    """None if there is no such interface; flags 0 if it is not a tun/tap device."""
    device = SYS_NET / name
    if not device.exists():
        return None
    try:
        flags = int((device / "tun_flags").read_text(), 16)
    except FileNotFoundError:
        return TunInfo(0)
    return TunInfo(flags, int((device / "owner").read_text()), int((device / "group").read_text()))


def groups_of(uid: int) -> frozenset[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset(os.getgrouplist(user.pw_name, user.pw_gid))


def check(uid: int, name: str, granted: tuple[str, ...]) -> None:
    """May `uid` attach to tap `name`? Root may, and may create it."""
    if uid == 0:
        return
    info = read_info(name)
    if info is None:
        raise InvalidArgument(
            f"tap device {name!r} does not exist; create it first: ip tuntap add dev {name} mode tap user {uid}"
        )
    if not info.is_tap:
        raise InvalidArgument(f"network device {name!r} is not a tap device; give a tap (ip tuntap add ... mode tap)")
    if not may_use(uid, groups_of(uid), name, info, granted):
        raise AccessDenied(refusal(uid, name, info))


def ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def attached(fd: int) -> tuple[str, int]:
    """(interface name, flags) of the tun/tap device `fd` is attached to (TUNGETIFF)."""
    name, flags = struct.unpack("16sH22x", fcntl.ioctl(fd, TUNGETIFF, ifreq("", 0)))
    return name.rstrip(b"\0").decode(errors="replace"), flags


def passed_tap(fd: int) -> str:
    """The name of the tap a caller opened and passed, or InvalidArgument if
    `fd` is no tap: the kernel let the caller attach, so no rule is asked again."""
    try:
        name, flags = attached(fd)
    except OSError as e:
        raise InvalidArgument(
            f"the fd passed is not attached to a tap device (TUNGETIFF: {e.strerror}); "
            f"open {TUN} and TUNSETIFF a tap (IFF_TAP) first"
        ) from None
    if not flags & IFF_TAP:
        raise InvalidArgument(f"the fd passed is attached to {name!r}, a tun device; pass a tap (IFF_TAP)")
    return name


def open_tap(uid: int, name: str, granted: tuple[str, ...]) -> int:
    """An fd attached to tap `name` for `uid`'s machine, or why not."""
    check(uid, name, granted)
    fd = -1
    try:
        fd = os.open(TUN, os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, TUNSETIFF, ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        flags = attached(fd)[1]
        if uid != 0 and not flags & IFF_PERSIST:
            # Gone between the check and the attach, and made anew by this fd: not the user's tap.
            raise InvalidArgument(f"tap device {name!r} does not exist (it went away); create it first")
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        if e.errno in (errno.EPERM, errno.EACCES):
            raise AccessDenied(f"cannot attach to tap device {name!r}: {e.strerror}") from e
        hint = {
            errno.EBUSY: "it is in use by another program; give a free one",
            errno.EINVAL: "is it a tun or multi-queue device? give a single-queue tap",
        }.get(e.errno or 0, f"is {TUN} there (modprobe tun)?")
        raise InvalidArgument(f"cannot attach to tap device {name!r}: {e.strerror}; {hint}") from e
    except BaseException:
        os.close(fd)
        raise
    return fd
