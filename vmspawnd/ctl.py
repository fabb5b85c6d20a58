"""vmspawnctl: a machinectl-style command line for vmspawnd.

It speaks only the public D-Bus API (org.vmspawnd1, DESIGN.md section 2) and
holds no daemon logic: values are translated to a{sv} dicts, replies to text
or JSON, and org.vmspawnd1.Error.* replies to an exit status plus a hint.
The pure parts (size and time parsing, option building, the PCIe tree, the
error table) are plain functions, tested without a bus.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import termios
import textwrap
import time
import tty
from collections.abc import Awaitable, Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any

from dbus_fast import BusType, DBusError, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusFastError

from . import __version__
from .console import ESCAPE_HELP, EscapeDetector

PROG = "vmspawnctl"
BUS_NAME = "org.vmspawnd1"
MANAGER_PATH = "/org/vmspawnd1"
MANAGER_IFACE = "org.vmspawnd1.Manager"
MACHINE_IFACE = "org.vmspawnd1.Machine"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
ERROR_PREFIX = "org.vmspawnd1.Error."
DBUS_ERROR_PREFIX = "org.freedesktop.DBus.Error."
DEFAULT_SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"

# The values the daemon documents; offered in --help and by the completion,
# but the daemon stays the judge (it names the valid ones when it refuses).
DISK_TYPES = ("virtio-blk", "virtio-scsi", "virtio-scsi-cdrom", "nvme")
IMAGE_FORMATS = ("raw", "qcow2")
NETWORKS = ("none", "user", "tap:NAME")
ACCELS = ("kvm", "tcg", "auto")
FIRMWARES = ("bios", "uefi")
GRAPHICS = ("none", "vnc", "spice")

# Options whose value may start with '-': argparse would take "-device" for
# an option, so `--qemu-extra -device` is rewritten to `--qemu-extra=-device`.
DASH_VALUE_OPTIONS = ("--qemu-extra", "--qemu-extra-string", "--cmdline")

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


class Exit(enum.IntEnum):
    """vmspawnctl's exit status; the table in --help and docs/vmspawnctl.md."""

    OK = 0
    FAILED = 1
    INVALID = 2
    NOT_FOUND = 3
    DENIED = 4
    BUSY = 5
    UNAVAILABLE = 6
    INTERRUPTED = 130


EXIT_STATUS_HELP = """\
exit status:
  0  success
  1  failed: QemuFailed, UnplugTimeout, NotRunning, any other error
  2  invalid argument or usage: InvalidArgument, TooManyPorts,
     PcieSlotsExhausted, Unsupported, a bad command line
  3  not found: NoSuchMachine, NoSuchDrive, NoSuchNetwork, NoSuchShare, a
     file that does not exist
  4  access denied: AccessDenied (the daemon's or the bus policy's),
     a file you may not open
  5  busy or no room: NoFreePort, UnplugInProgress, MachineExists
  6  vmspawnd not reachable: the daemon is not running, or no bus
On an error, stderr has one line 'vmspawnctl: <message>' and one 'hint: <what to do>'."""


# -- errors ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Context:
    """What the hints may refer to."""

    verb: str = ""
    name: str = ""
    user: bool = False


class CtlError(Exception):
    """An error to report: one message line, one hint line, an exit status."""

    def __init__(self, message: str, code: Exit, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


def _start_hint(ctx: Context) -> str:
    if ctx.user:
        return "vmspawnd is not running on your session bus: start it with 'vmspawnd --user'"
    return "vmspawnd is not running: start it with 'systemctl start vmspawnd' (or run 'vmspawnd' as root)"


def _denied_hint(ctx: Context) -> str:
    action = "org.vmspawnd1.create-machine" if ctx.verb == "create" else "org.vmspawnd1.manage-machine"
    return (
        f"run it as root (sudo {PROG} {ctx.verb} ...), or ask the administrator to grant you the polkit action {action}"
    )


_Hint = Callable[[Context], str]

# Error name (after org.vmspawnd1.Error.) -> exit status and hint.
ERRORS: dict[str, tuple[Exit, _Hint]] = {
    "InvalidArgument": (Exit.INVALID, lambda c: f"see '{PROG} {c.verb} --help'" if c.verb else f"see '{PROG} --help'"),
    "TooManyPorts": (
        Exit.INVALID,
        lambda c: (
            "ask for fewer --spares, or fewer --drive/--image/--network/--vsock devices "
            "(at most 120 root ports; SCSI drives share one port)"
        ),
    ),
    "PcieSlotsExhausted": (
        Exit.INVALID,
        lambda c: (
            "pass fewer --qemu-extra devices, give them a bus=, or lower --spares; "
            f"'{PROG} plan' shows the slot budget before anything starts"
        ),
    ),
    "NoSuchMachine": (Exit.NOT_FOUND, lambda c: f"'{PROG} list' shows the machines there are"),
    "NoSuchDrive": (Exit.NOT_FOUND, lambda c: f"'{PROG} status {c.name or 'NAME'}' lists the machine's drives"),
    "NoSuchNetwork": (
        Exit.NOT_FOUND,
        lambda c: f"'{PROG} status {c.name or 'NAME'}' lists the machine's network interfaces",
    ),
    "NoSuchShare": (Exit.NOT_FOUND, lambda c: f"'{PROG} status {c.name or 'NAME'}' lists the machine's shares"),
    "AccessDenied": (Exit.DENIED, _denied_hint),
    "NoFreePort": (
        Exit.BUSY,
        lambda c: (
            f"remove a drive first ('{PROG} remove-drive {c.name or 'NAME'} ID'), or create the machine "
            f"with more hotplug ports: '{PROG} create {c.name or 'NAME'} --spares N ...'"
        ),
    ),
    "UnplugInProgress": (
        Exit.BUSY,
        lambda c: f"wait until the guest releases the drive; '{PROG} status {c.name or 'NAME'}' shows it as removing",
    ),
    "MachineExists": (
        Exit.BUSY,
        lambda c: f"pick another name, or stop the old machine first: '{PROG} terminate {c.name or 'NAME'}'",
    ),
    "QemuFailed": (
        Exit.FAILED,
        lambda c: (
            "the message quotes QEMU's own error; look at the daemon's log ('journalctl -u vmspawnd') and "
            f"at /run/vmspawnd/machines/{c.name or 'NAME'}/qemu.log"
        ),
    ),
    "UnplugTimeout": (
        Exit.FAILED,
        lambda c: (
            "it stays listed as removing until the guest lets go; check that the guest OS is up "
            f"('{PROG} console {c.name or 'NAME'}') or retry with a longer --timeout"
        ),
    ),
    "NotRunning": (
        Exit.FAILED,
        lambda c: (
            f"'{PROG} status {c.name or 'NAME'}' shows its state; a stopped machine created with --keep "
            f"starts again with '{PROG} start {c.name or 'NAME'}', any other has to be created again"
        ),
    ),
    "AlreadyRunning": (
        Exit.BUSY,
        lambda c: f"it runs already; '{PROG} poweroff {c.name or 'NAME'}' stops it, then start it again",
    ),
    "Unsupported": (
        Exit.INVALID,
        lambda c: f"the message says what has to change; '{PROG} status {c.name or 'NAME'}' shows the machine",
    ),
    "QuotaExceeded": (
        Exit.DENIED,
        lambda c: "stop one of your machines or ask for less; the caps are in /etc/vmspawnd/vmspawnd.conf",
    ),
    "QemuUnresponsive": (
        Exit.FAILED,
        lambda c: f"QEMU did not answer its monitor; '{PROG} terminate {c.name or 'NAME'}' stops it for good",
    ),
    "ConsoleBusy": (
        Exit.BUSY,
        lambda c: (
            f"follow it read-only ('{PROG} console {c.name or 'NAME'} --read-only') or wait until the other "
            "console is closed"
        ),
    ),
    "NoSpace": (
        Exit.FAILED,
        lambda c: "free space on the file system the message names (the daemon's runtime directory), then retry",
    ),
    "OpenTimeout": (
        Exit.FAILED,
        lambda c: "the file system holding the file did not answer (a hung network mount?); check it, then retry",
    ),
    "MigrationFailed": (
        Exit.FAILED,
        lambda c: (
            f"the guest runs on where it was ('{PROG} status {c.name or 'NAME'}'); the message says why, "
            f"the destination's qemu.log may say more"
        ),
    ),
    "MigrationInProgress": (
        Exit.BUSY,
        lambda c: "the machine is migrating: wait for the migration to end, or cancel it (CancelMigration)",
    ),
    "NotMigrating": (Exit.BUSY, lambda c: "no migration of this machine is running; nothing to cancel or complete"),
    "AgentUnavailable": (
        Exit.FAILED,
        lambda c: (
            f"create the machine with --guest-agent and run qemu-ga in the guest (package qemu-guest-agent); "
            f"'{PROG} console {c.name or 'NAME'}' shows whether the guest is up"
        ),
    ),
    "AgentFailed": (
        Exit.FAILED,
        lambda c: (
            "the message quotes the guest agent; check that the user exists in the guest and qemu-ga may run chpasswd"
        ),
    ),
    "NoGraphics": (
        Exit.FAILED,
        lambda c: (
            f"the machine has no display: create it with '{PROG} create ... --graphics vnc' (or spice); "
            f"'{PROG} console {c.name or 'NAME'}' is its serial console"
        ),
    ),
    "JobInProgress": (
        Exit.BUSY,
        lambda c: "a snapshot or swap of that drive runs already; retry once it returned",
    ),
    "JobTimeout": (
        Exit.FAILED,
        lambda c: "the copy was cancelled and left nothing behind; retry with a longer --timeout (or more bandwidth)",
    ),
    "JobFailed": (
        Exit.FAILED,
        lambda c: (
            "the message quotes QEMU; check the target file (its size, free space, that it is writable) and "
            f"/run/vmspawnd/machines/{c.name or 'NAME'}/qemu.log"
        ),
    ),
}

# Errors from the bus itself, not from vmspawnd.
BUS_ERRORS: dict[str, tuple[Exit, _Hint]] = {
    "ServiceUnknown": (Exit.UNAVAILABLE, _start_hint),
    "NameHasNoOwner": (Exit.UNAVAILABLE, _start_hint),
    "Spawn.ChildExited": (Exit.UNAVAILABLE, _start_hint),
    "Spawn.Failed": (Exit.UNAVAILABLE, _start_hint),
    "AccessDenied": (
        Exit.DENIED,
        lambda c: (
            "the D-Bus policy refused the call: run it as root, or check the installed "
            "policy /usr/share/dbus-1/system.d/org.vmspawnd1.conf"
        ),
    ),
    "InteractiveAuthorizationRequired": (
        Exit.DENIED,
        lambda c: "polkit wants to ask for a password: run it from a terminal with a polkit agent, or as root",
    ),
    "UnknownObject": (
        Exit.NOT_FOUND,
        lambda c: f"the machine went away meanwhile; '{PROG} list' shows the machines there are",
    ),
    "NoReply": (Exit.FAILED, lambda c: "vmspawnd did not answer; look at its log ('journalctl -u vmspawnd')"),
    "Timeout": (Exit.FAILED, lambda c: "vmspawnd did not answer; look at its log ('journalctl -u vmspawnd')"),
}


def _default_hint(ctx: Context) -> str:
    return "look at the daemon's log ('journalctl -u vmspawnd') for details"


def map_error(error_name: str, text: str, ctx: Context) -> CtlError:
    """A D-Bus error reply -> what vmspawnctl reports and exits with."""
    table: dict[str, tuple[Exit, _Hint]] = {}
    short = error_name
    if error_name.startswith(ERROR_PREFIX):
        table, short = ERRORS, error_name.removeprefix(ERROR_PREFIX)
    elif error_name.startswith(DBUS_ERROR_PREFIX):
        table, short = BUS_ERRORS, error_name.removeprefix(DBUS_ERROR_PREFIX)
    code, hint = table.get(short, (Exit.FAILED, _default_hint))
    message = " ".join(text.split()) or error_name
    return CtlError(message, code, hint(ctx))


def format_error(error: CtlError) -> str:
    """Exactly two lines: the message and the hint."""
    message = " ".join(error.message.split())
    lines = [f"{PROG}: {message}"]
    if error.hint:
        lines.append(f"hint: {' '.join(error.hint.split())}")
    return "\n".join(lines) + "\n"


DRIVE_DENIED_HINT = (
    "you need read and write access to the file (or read access and --read-only); "
    "vmspawnctl opens it with your own rights and passes the open file to vmspawnd"
)


def file_error(
    e: OSError, what: str, path: str, denied_hint: str = DRIVE_DENIED_HINT, missing_hint: str = "check the path"
) -> CtlError:
    """A local open() that failed, in the same exit-status scheme."""
    reason = e.strerror or str(e)
    if e.errno == errno.ENOENT:
        return CtlError(f"cannot open {what} {path!r}: {reason}", Exit.NOT_FOUND, missing_hint)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CtlError(f"cannot open {what} {path!r}: {reason}", Exit.DENIED, denied_hint)
    if e.errno == errno.EISDIR:
        return CtlError(f"cannot use {what} {path!r}: it is a directory", Exit.INVALID, "give a file or block device")
    return CtlError(f"cannot open {what} {path!r}: {reason}", Exit.FAILED, "check the path and its permissions")


# -- parsing values ---------------------------------------------------------------

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(i?B)?\s*", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '4096' -> bytes; suffixes are powers of 1024 as in systemd."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid size {text!r}: give a number with an optional K, M, G or T suffix, e.g. 512M or 2G")
    number, unit = m.group(1), m.group(2).upper()
    exact = Fraction(number) * _SIZE_FACTORS[unit]
    if exact.denominator != 1 and not unit:
        raise ValueError(f"invalid size {text!r}: bytes come whole; use a unit for fractions, e.g. 1.5G")
    value = int(exact)
    if value <= 0 or value > UINT64_MAX:
        raise ValueError(f"invalid size {text!r}: out of range")
    return value


def parse_memory(text: str) -> int:
    value = parse_size(text)
    if value < 1 << 20 and not re.search(r"[A-Za-z]", text):
        raise ValueError(f"memory {text!r} would be {value} bytes; give a unit, e.g. {text.strip()}M")
    return value


_TIMESPAN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(us|usec|ms|msec|s|sec|m|min|h|hr)?\s*", re.IGNORECASE)
_TIMESPAN_USEC = {
    "us": 1, "usec": 1, "ms": 1000, "msec": 1000, "": 1_000_000, "s": 1_000_000, "sec": 1_000_000,
    "m": 60_000_000, "min": 60_000_000, "h": 3_600_000_000, "hr": 3_600_000_000,
}  # fmt: skip


def parse_timespan_usec(text: str) -> int:
    """'10', '2.5s', '500ms', '1min' -> microseconds (a plain number is seconds)."""
    m = _TIMESPAN.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid time {text!r}: give seconds, or a number with ms, s, min or h, e.g. 30s")
    value = round(float(m.group(1)) * _TIMESPAN_USEC[(m.group(2) or "").lower()])
    if value > UINT64_MAX:
        raise ValueError(f"invalid time {text!r}: out of range")
    return value


def parse_uint32(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"invalid number {text!r}") from None
    if not 0 <= value <= UINT32_MAX:
        raise ValueError(f"{text} is out of range")
    return value


def parse_drive(text: str) -> dict[str, str]:
    """PATH[:DISK_TYPE[:SERIAL]] -> {'path', 'disk_type'?, 'serial'?}.

    The path ends at the first ':' followed by a known disk type or by an
    empty field (the default type): '/a:b.img::' is the file '/a:b.img'.
    """
    parts = text.split(":")
    for i in range(1, len(parts)):
        if parts[i] in DISK_TYPES or parts[i] == "":
            drive = {"path": ":".join(parts[:i])}
            if parts[i]:
                drive["disk_type"] = parts[i]
            serial = ":".join(parts[i + 1 :])
            if serial:
                drive["serial"] = serial
            break
    else:
        if len(parts) > 1:
            raise ValueError(
                f"unknown disk type {parts[1]!r} in {text!r}: use one of {', '.join(DISK_TYPES)} "
                "(a path containing ':' is written PATH:: or PATH:TYPE)"
            )
        drive = {"path": text}
    if not drive["path"]:
        raise ValueError(f"{text!r} names no file")
    drive["path"] = os.path.abspath(drive["path"])
    return drive


def _argtype(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """argparse reports ArgumentTypeError messages as they are."""

    def convert(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def glue_dash_values(argv: Sequence[str]) -> list[str]:
    """`--qemu-extra -device` -> `--qemu-extra=-device`, so argparse takes it as the value."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out += argv[i:]
            break
        if arg in DASH_VALUE_OPTIONS and i + 1 < len(argv):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


# -- a{sv} building -------------------------------------------------------------------


def machine_options(args: argparse.Namespace) -> dict[str, Variant]:
    """create/plan's command line -> CreateMachine's a{sv} (only what was given)."""
    opts: dict[str, Variant] = {}
    for key in ("kernel", "initrd", "image"):
        if getattr(args, key) is not None:
            opts[key] = Variant("s", os.path.abspath(getattr(args, key)))
    for key in ("cmdline", "image_format", "disk_type", "network", "accel", "firmware", "graphics"):
        if getattr(args, key) is not None:
            opts[key] = Variant("s", getattr(args, key))
    if args.drives:
        opts["drives"] = Variant("aa{sv}", [{k: Variant("s", v) for k, v in d.items()} for d in args.drives])
    if args.vsock:
        opts["vsock"] = Variant("b", True)
    if args.memory is not None:
        opts["memory"] = Variant("t", args.memory)
    if args.cpus is not None:
        opts["cpus"] = Variant("u", args.cpus)
    if args.spares is not None:
        opts["hotplug_spares"] = Variant("u", args.spares)
    if args.qemu_extra:
        opts["qemu_extra"] = Variant("as", list(args.qemu_extra))
    if getattr(args, "keep", False):
        opts["keep"] = Variant("b", True)
    return opts


def add_drive_options(args: argparse.Namespace) -> dict[str, Variant]:
    opts: dict[str, Variant] = {}
    for key in ("disk_type", "format", "serial", "id", "port"):
        if getattr(args, key) is not None:
            opts[key] = Variant("s", getattr(args, key))
    if args.read_only:
        opts["read_only"] = Variant("b", True)
    return opts


def add_share_args(args: argparse.Namespace) -> tuple[str, dict[str, Variant]]:
    """AddShare's directory (made absolute) and options."""
    opts = {"tag": Variant("s", args.tag)} | ({"id": Variant("s", args.id)} if args.id is not None else {})
    return os.path.abspath(args.directory), opts


def unwrap(value: Any) -> Any:
    """Variants and nested containers -> plain JSON-able Python values."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {str(k): unwrap(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [unwrap(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


# -- rendering --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Glyphs:
    branch: str
    last: str
    pipe: str
    space: str
    arrow: str


UNICODE = Glyphs("├─ ", "└─ ", "│  ", "   ", "→")
ASCII = Glyphs("|- ", "`- ", "|  ", "   ", "->")


def glyphs_for(stream: Any) -> Glyphs:
    encoding = (getattr(stream, "encoding", None) or "ascii").lower().replace("_", "-")
    return UNICODE if encoding in ("utf-8", "utf8") else ASCII


def split_addr(addr: str) -> tuple[int, int]:
    """'0x10.3' -> (0x10, 3)."""
    slot, _, function = addr.partition(".")
    return int(slot, 16), int(function or "0")


def _tree(node_lines: list[tuple[str, list[Any]]], g: Glyphs, prefix: str = "") -> list[str]:
    """Nested (label, children) pairs -> lines with tree glyphs."""
    out = []
    for i, (label, children) in enumerate(node_lines):
        last = i == len(node_lines) - 1
        out.append(prefix + (g.last if last else g.branch) + label)
        out += _tree(children, g, prefix + (g.space if last else g.pipe))
    return out


PORT_KINDS = ("root-port", "switch-upstream", "downstream-port", "port")


def pcie_tree(ports: Sequence[dict[str, Any]], drives: Sequence[dict[str, Any]] = (), g: Glyphs = UNICODE) -> list[str]:
    """The root ports on pcie.0, grouped by slot: slot.function -> port (role) -> device,
    and behind a root port that carries a switch, its upstream port and downstream ports.

    `ports` are Ports / PlanMachine port entries; `drives` (status only) add
    a drive's state when it is not plainly attached, and hang SCSI drives
    under their controller.
    """
    by_id = {d["id"]: d for d in drives}
    # A SCSI drive names its controller's port; the controller is that port's device.
    on_controller: dict[str, list[dict[str, Any]]] = {}
    for p in ports:
        for d in drives:
            if d["port"] == p["id"] and d["id"] != p.get("device") and p.get("device") not in by_id:
                on_controller.setdefault(p["id"], []).append(d)

    behind: dict[str, list[dict[str, Any]]] = {}
    for p in ports:
        if p.get("parent"):
            behind.setdefault(p["parent"], []).append(p)

    def port_node(p: dict[str, Any]) -> tuple[str, list[Any]]:
        below = behind.get(p["id"], [])
        if p.get("kind") == "switch-upstream":
            device = f"{len(below)} downstream ports"
        elif p.get("role") == "switch":
            device = ", ".join(c["id"] for c in below) or "(switch)"
        else:
            device = p.get("device") or "(free)"
        drive = by_id.get(p.get("device", ""))
        if drive is not None and drive.get("state", "attached") != "attached":
            device += f" ({drive['state']})"
        children: list[tuple[str, list[Any]]] = []
        for d in on_controller.get(p["id"], []):
            state = d.get("state", "attached")
            extra = f", {state}" if state != "attached" else ""
            children.append((f"{d['id']} ({d.get('disk_type', '?')}{extra})", []))
        children += [port_node(c) for c in below]
        kind = p.get("kind", "root-port")
        what = {"root-port": p.get("role", "?"), "switch-upstream": kind}.get(kind, f"{kind}, {p.get('role', '?')}")
        return f"{p['addr']} {g.arrow} {p['id']} ({what}) {g.arrow} {device}", children

    slots: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for p in ports:
        if p.get("parent"):
            continue
        slot, function = split_addr(p["addr"])
        slots.setdefault(slot, []).append((function, p))
    nodes: list[tuple[str, list[Any]]] = []
    for slot in sorted(slots):
        members = sorted(slots[slot], key=lambda fp: fp[0])
        multifunction = any(p.get("multifunction", f == 0) for f, p in members)
        count = len(members)
        label = f"0x{slot:x}: {count} root port{'s' if count != 1 else ''}" + (
            ", multifunction" if multifunction else ""
        )
        nodes.append((label, [port_node(p) for _function, p in members]))
    return ["pcie.0", *_tree(nodes, g)]


def slots_line(used: int, budget: int) -> str:
    return f"{used} of {budget} used, {max(budget - used, 0)} available"


def port_summary(ports: Sequence[dict[str, Any]], free: int | None = None) -> str:
    builtin = sum(1 for p in ports if p.get("role") == "builtin")
    spare = sum(1 for p in ports if p.get("role") == "spare")
    roots = [p for p in ports if not p.get("parent")]
    slots = len({split_addr(p["addr"])[0] for p in roots})
    switches = sum(1 for p in ports if p.get("kind") == "switch-upstream")
    text = f"{len(roots)} in {slots} slot{'s' if slots != 1 else ''}: {builtin} builtin, {spare} spare"
    if switches:
        text += f" ({spare - sum(1 for p in roots if p.get('role') == 'spare')} behind {switches} switches)"
    return text + (f" ({free} free)" if free is not None else "")


STATUS_KEYS = ("Name", "Id", "State", "Leader", "Ports", "Drives", "FreeSparePorts", "PcieSlots", "ConsoleLog")


def status_json(props: dict[str, Any]) -> dict[str, Any]:
    """Every Machine property, under its D-Bus name, in a fixed order (unknown ones last)."""
    out = {k: props[k] for k in STATUS_KEYS if k in props}
    out |= {k: v for k, v in sorted(props.items()) if k not in out}
    return out


def render_status(props: dict[str, Any], g: Glyphs = UNICODE) -> list[str]:
    used, budget = props.get("PcieSlots", [0, 0])
    ports = props.get("Ports", [])
    drives = props.get("Drives", [])
    fields = [
        ("Id", props.get("Id", "")),
        ("State", props.get("State", "")),
        ("Leader", str(props.get("Leader", 0) or "-")),
        ("Console log", props.get("ConsoleLog", "")),
        ("PCIe slots", slots_line(used, budget)),
        ("Root ports", port_summary(ports, props.get("FreeSparePorts"))),
    ]
    drive_lines = [
        f"{d['id']} {d.get('disk_type', '?')} {d.get('path', '?')} on {d.get('port', '?')} ({d.get('state', '?')})"
        for d in drives
    ] or ["-"]
    share_lines = [
        f"{s['id']} tag {s.get('tag', '?')} {s.get('directory') or '?'} on {s.get('port', '?')} ({s.get('state', '?')})"
        for s in props.get("Shares", [])
    ]
    width = max(len(k) for k, _ in fields)
    lines = [str(props.get("Name", ""))]
    lines += [f"  {k:>{width}}: {v}" for k, v in fields]
    # One entry a line, the first beside its title.
    for title, entries in (("Drives", drive_lines), ("Shares", share_lines)):
        lines += [f"  {title if i == 0 else '':>{width}}{':' if i == 0 else ' '} {e}" for i, e in enumerate(entries)]
    lines.append("")
    lines += pcie_tree(ports, drives, g)
    return lines


def plan_json(name: str, entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    keys = ("id", "addr", "chassis", "multifunction", "role", "device", "kind", "parent", "buses")
    ports = [{k: e.get(k) for k in keys if k in e} for e in entries if e.get("kind") in PORT_KINDS]
    buses = next(({k: v for k, v in e.items() if k != "kind"} for e in entries if e.get("kind") == "buses"), None)
    consumers = [{"what": e.get("what"), "slots": e.get("slots")} for e in entries if e.get("kind") == "pcie-slots"]
    budgets = [e["budget"] for e in entries if e.get("kind") == "pcie-slots" and "budget" in e]
    used = sum(int(c["slots"] or 0) for c in consumers)
    budget = budgets[0] if budgets else 0
    return {
        "name": name,
        "ports": ports,
        "pcie_slots": {"used": used, "budget": budget, "available": max(budget - used, 0), "consumers": consumers},
    } | ({"buses": buses} if buses else {})


def render_plan(plan: dict[str, Any], g: Glyphs = UNICODE, legend: bool = True) -> list[str]:
    ports = plan["ports"]
    slots = plan["pcie_slots"]
    lines = []
    if legend:
        lines.append(f"Plan for {plan['name']}: root ports {port_summary(ports)}")
    lines += pcie_tree(ports, (), g)
    lines.append("")
    if legend:
        if "buses" in plan:
            b = plan["buses"]
            lines.append(f"PCI buses: {b['used']} of {b['budget']} used; at most {b['max_spares']} hotplug spares")
        lines.append(f"pcie.0 slots: {slots_line(slots['used'], slots['budget'])}")
        lines.append(f"{'SLOTS':>5}  WHAT")
    lines += [f"{c['slots']:>5}  {c['what']}" for c in slots["consumers"]]
    return lines


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], legend: bool) -> list[str]:
    all_rows = ([list(header)] if legend else []) + [list(r) for r in rows]
    if not all_rows:
        return []
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(widths[i]) if i < len(header) - 1 else cell for i, cell in enumerate(r)).rstrip()
        for r in all_rows
    ]


# -- output ---------------------------------------------------------------------------------


def pager_command(environ: dict[str, str] | os._Environ[str], isatty: bool, no_pager: bool) -> list[str] | None:
    """The pager to pipe query output through, or None (as systemd: only on a terminal)."""
    if no_pager or not isatty:
        return None
    for var in ("VMSPAWNCTL_PAGER", "SYSTEMD_PAGER", "PAGER"):
        if var in environ:
            words = shlex.split(environ[var])
            if not words or words == ["cat"]:
                return None
            return words
    return ["less"] if shutil.which("less") else None


def emit(text: str, args: argparse.Namespace) -> None:
    pager = pager_command(os.environ, sys.stdout.isatty(), args.no_pager or args.json)
    if pager is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    env = os.environ | {"LESS": os.environ.get("LESS", "FRSXMK")}
    try:
        proc = subprocess.Popen(pager, stdin=subprocess.PIPE, env=env, text=True)
    except OSError:
        sys.stdout.write(text)
        return
    with contextlib.suppress(BrokenPipeError):
        assert proc.stdin is not None
        proc.stdin.write(text)
        proc.stdin.close()
    proc.wait()


def emit_json(value: Any, args: argparse.Namespace) -> None:
    emit(json.dumps(value, indent=2) + "\n", args)


# -- the bus ----------------------------------------------------------------------------


def bus_address(user: bool, environ: dict[str, str] | os._Environ[str]) -> str:
    if user:
        if environ.get("DBUS_SESSION_BUS_ADDRESS"):
            return environ["DBUS_SESSION_BUS_ADDRESS"]
        runtime = environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        return f"unix:path={runtime}/bus"
    return environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS


class Client:
    """Method calls on org.vmspawnd1; an error reply is raised as DBusError."""

    def __init__(self, bus: MessageBus, interactive: bool) -> None:
        self.bus = bus
        self.interactive = interactive

    @classmethod
    async def connect(cls, user: bool, interactive: bool, ctx: Context) -> Client:
        address = bus_address(user, os.environ)
        which = "session" if user else "system"
        try:
            bus = await MessageBus(
                bus_address=address, bus_type=BusType.SESSION if user else BusType.SYSTEM, negotiate_unix_fd=True
            ).connect()
        except (OSError, EOFError, DBusFastError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            hint = (
                "is a D-Bus session bus running (DBUS_SESSION_BUS_ADDRESS)? " + _start_hint(ctx)
                if user
                else "is dbus running ('systemctl status dbus')? Then " + _start_hint(ctx)
            )
            raise CtlError(f"cannot connect to the {which} bus at {address}: {reason}", Exit.UNAVAILABLE, hint) from e
        return cls(bus, interactive)

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
        destination: str = BUS_NAME,
        unix_fds: Sequence[int] = (),
        manage: bool = False,
    ) -> list[Any]:
        flags = MessageFlag.NONE
        if manage and self.interactive:
            flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
        reply = await self.bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
                unix_fds=list(unix_fds),
                flags=flags,
            )
        )
        if reply is None:
            raise DBusError(DBUS_ERROR_PREFIX + "NoReply", f"no reply to {member}")
        if reply.message_type is MessageType.ERROR:
            text = str(reply.body[0]) if reply.body else ""
            raise DBusError(reply.error_name or DBUS_ERROR_PREFIX + "Failed", text)
        return list(reply.body)

    async def call_fd(self, member: str, signature: str, body: Sequence[Any], path: str) -> int:
        """A Machine method that returns one fd (h): the fd, now ours."""
        reply = await self.bus.call(
            Message(
                destination=BUS_NAME, path=path, interface=MACHINE_IFACE, member=member, signature=signature,
                body=list(body), flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if self.interactive else
                MessageFlag.NONE,
            )
        )  # fmt: skip
        if reply is None:
            raise DBusError(DBUS_ERROR_PREFIX + "NoReply", f"no reply to {member}")
        if reply.message_type is MessageType.ERROR:
            for fd in reply.unix_fds:
                os.close(fd)
            raise DBusError(reply.error_name or DBUS_ERROR_PREFIX + "Failed", str(reply.body[0]) if reply.body else "")
        if len(reply.unix_fds) != 1:
            raise DBusError(DBUS_ERROR_PREFIX + "Failed", f"{member} returned {len(reply.unix_fds)} fds, not one")
        return int(reply.unix_fds[0])

    async def machine_path(self, name: str) -> str:
        (path,) = await self.call("GetMachine", "s", [name])
        return str(path)

    async def properties(self, path: str) -> dict[str, Any]:
        (props,) = await self.call("GetAll", "s", [MACHINE_IFACE], path=path, interface=PROPERTIES_IFACE)
        return {str(k): unwrap(v) for k, v in props.items()}

    async def prop(self, path: str, name: str) -> Any:
        (value,) = await self.call("Get", "ss", [MACHINE_IFACE, name], path=path, interface=PROPERTIES_IFACE)
        return unwrap(value)

    def close(self) -> None:
        self.bus.disconnect()


# -- verbs ------------------------------------------------------------------------------------


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    (machines,) = await client.call("ListMachines")
    rows: list[dict[str, Any]] = []
    for name, state, path in machines:
        try:
            props = await client.properties(str(path))
        except DBusError as e:
            if e.type.endswith(("UnknownObject", "UnknownInterface", "UnknownMethod")):
                continue  # removed between the two calls
            raise
        used, budget = props.get("PcieSlots", [0, 0])
        spare = sum(1 for p in props.get("Ports", []) if p.get("role") == "spare")
        rows.append(
            {
                "name": str(name),
                "state": str(props.get("State", state)),
                "path": str(path),
                "leader": int(props.get("Leader", 0)),
                "drives": [d["id"] for d in props.get("Drives", [])],
                "spare_ports": spare,
                "free_spare_ports": int(props.get("FreeSparePorts", 0)),
                "pcie_slots_used": int(used),
                "pcie_slots_budget": int(budget),
            }
        )
    rows.sort(key=lambda r: r["name"])
    if args.json:
        emit_json(rows, args)
        return Exit.OK
    if not rows:
        if args.legend:
            emit("No machines.\n", args)
        return Exit.OK
    table = render_table(
        ("MACHINE", "STATE", "LEADER", "DRIVES", "FREE-PORTS", "PCIE-SLOTS"),
        [
            (
                r["name"],
                r["state"],
                str(r["leader"] or "-"),
                str(len(r["drives"])),
                f"{r['free_spare_ports']}/{r['spare_ports']}",
                f"{r['pcie_slots_used']}/{r['pcie_slots_budget']}",
            )
            for r in rows
        ],
        args.legend,
    )
    if args.legend:
        table += ["", f"{len(rows)} machine{'s' if len(rows) != 1 else ''} listed."]
    emit("\n".join(table) + "\n", args)
    return Exit.OK


async def cmd_status(client: Client, args: argparse.Namespace) -> int:
    props = await client.properties(await client.machine_path(args.name))
    if args.json:
        emit_json(status_json(props), args)
    else:
        emit("\n".join(render_status(props, glyphs_for(sys.stdout))) + "\n", args)
    return Exit.OK


async def cmd_plan(client: Client, args: argparse.Namespace) -> int:
    (entries,) = await client.call("PlanMachine", "sa{sv}", [args.name, machine_options(args)])
    plan = plan_json(args.name, [unwrap(e) for e in entries])
    if args.json:
        emit_json(plan, args)
    else:
        emit("\n".join(render_plan(plan, glyphs_for(sys.stdout), args.legend)) + "\n", args)
    return Exit.OK


async def cmd_create(client: Client, args: argparse.Namespace) -> int:
    (path,) = await client.call("CreateMachine", "sa{sv}", [args.name, machine_options(args)], manage=True)
    if args.json:
        emit_json({"name": args.name, "path": str(path)}, args)
    else:
        print(f"Created machine {args.name} ({path}); its console: {PROG} console {args.name}")
    return Exit.OK


async def cmd_add_drive(client: Client, args: argparse.Namespace) -> int:
    path = await client.machine_path(args.name)
    flags = (os.O_RDONLY if args.read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(args.path, flags)
    except OSError as e:
        raise file_error(e, "drive", args.path) from e
    try:
        drive_id, port = await client.call(
            "AddDriveFd",
            "ha{sv}",
            [0, add_drive_options(args)],
            path=path,
            interface=MACHINE_IFACE,
            unix_fds=[fd],
            manage=True,
        )
    finally:
        os.close(fd)
    if args.json:
        emit_json({"machine": args.name, "id": drive_id, "port": port}, args)
    else:
        print(f"Added drive {drive_id} to {args.name} on port {port}.")
    return Exit.OK


async def cmd_remove_drive(client: Client, args: argparse.Namespace) -> int:
    """remove-drive and remove-share: RemoveDriveEx, RemoveShareEx."""
    path = await client.machine_path(args.name)
    opts = {} if args.timeout is None else {"timeout_usec": Variant("t", args.timeout)}
    method = "RemoveShareEx" if args.verb == "remove-share" else "RemoveDriveEx"
    await client.call(method, "sa{sv}", [args.id, opts], path=path, interface=MACHINE_IFACE, manage=True)
    return Exit.OK


async def cmd_add_share(client: Client, args: argparse.Namespace) -> int:
    path = await client.machine_path(args.name)
    directory, opts = add_share_args(args)
    share_id, port = await client.call(
        "AddShare", "sa{sv}", [directory, opts], path=path, interface=MACHINE_IFACE, manage=True
    )  # fmt: skip
    if args.json:
        emit_json({"machine": args.name, "id": share_id, "port": port, "tag": args.tag}, args)
    else:
        print(f"Added share {share_id} ({directory}, tag {args.tag}) to {args.name} on port {port}.")
    return Exit.OK


async def cmd_add_nic(client: Client, args: argparse.Namespace) -> int:
    path = await client.machine_path(args.name)
    opts = {key: Variant("s", getattr(args, key)) for key in ("network", "mac", "id") if getattr(args, key) is not None}
    nic_id, port = await client.call("AddNetwork", "a{sv}", [opts], path=path, interface=MACHINE_IFACE, manage=True)
    mac = next((n["mac"] for n in unwrap(await client.prop(path, "Networks")) if n["id"] == nic_id), "")
    if args.json:
        emit_json({"machine": args.name, "id": nic_id, "port": port, "mac": mac}, args)
    else:
        print(f"Added network interface {nic_id} ({mac}) to {args.name} on port {port}.")
    return Exit.OK


async def cmd_remove_nic(client: Client, args: argparse.Namespace) -> int:
    path = await client.machine_path(args.name)
    opts = {} if args.timeout is None else {"timeout_usec": Variant("t", args.timeout)}
    await client.call(
        "RemoveNetworkEx", "sa{sv}", [args.id, opts], path=path, interface=MACHINE_IFACE, manage=True
    )  # fmt: skip
    return Exit.OK


def absolute(path: str) -> str:
    """The daemon opens a path it is given as is: a relative one counts from here."""
    return os.path.abspath(path)


async def cmd_replace_drive(client: Client, args: argparse.Namespace) -> int:
    """ReplaceDrive (a new medium, opened by the daemon with your rights) or EjectDrive."""
    path = await client.machine_path(args.name)
    if args.verb == "eject-drive":
        await client.call("EjectDrive", "s", [args.id], path=path, interface=MACHINE_IFACE, manage=True)
    else:
        opts = {} if args.format is None else {"format": Variant("s", args.format)}
        medium = absolute(args.path)
        await client.call(
            "ReplaceDrive", "ssa{sv}", [args.id, medium, opts], path=path, interface=MACHINE_IFACE, manage=True
        )  # fmt: skip
    if args.json:
        drive: dict[str, Any] = next((d for d in unwrap(await client.prop(path, "Drives")) if d["id"] == args.id), {})
        emit_json({"machine": args.name, "id": args.id, "path": drive.get("path", "")}, args)
    return Exit.OK


async def cmd_poweroff(client: Client, args: argparse.Namespace) -> int:
    path = await client.machine_path(args.name)
    (forced,) = await client.call(
        "PowerOffEx", "t", [args.timeout or 0], path=path, interface=MACHINE_IFACE, manage=True
    )  # fmt: skip
    if args.json:
        emit_json({"machine": args.name, "forced": bool(forced)}, args)
    elif forced:
        print(f"{args.name} did not shut down in time; QEMU was stopped.")
    return Exit.OK


async def cmd_terminate(client: Client, args: argparse.Namespace) -> int:
    await client.call("TerminateMachine", "s", [args.name], manage=True)
    return Exit.OK


RUN_STATE_METHODS = {"pause": "Pause", "resume": "Resume", "reboot": "Reboot", "start": "Start", "suspend": "Suspend"}


async def cmd_run_state(client: Client, args: argparse.Namespace) -> int:
    """pause, resume, reboot, start, suspend: one method each, no arguments."""
    path = await client.machine_path(args.name)
    await client.call(RUN_STATE_METHODS[args.verb], path=path, interface=MACHINE_IFACE, manage=True)
    if args.json:
        emit_json({"machine": args.name, "state": str(await client.prop(path, "State"))}, args)
    return Exit.OK


async def cmd_nmi(client: Client, args: argparse.Namespace) -> int:
    path = await client.machine_path(args.name)
    await client.call("InjectNMI", path=path, interface=MACHINE_IFACE, manage=True)
    return Exit.OK


# DriveStats' counters, in the order (and under the headers) vmspawnctl shows them.
DRIVE_STATS = {
    "rd_req": "READS", "rd_bytes": "READ-BYTES", "wr_req": "WRITES", "wr_bytes": "WRITTEN-BYTES",
    "flush": "FLUSHES", "errors": "ERRORS",
}  # fmt: skip


async def cmd_drive_stats(client: Client, args: argparse.Namespace) -> int:
    path = await client.machine_path(args.name)
    (stats,) = await client.call("DriveStats", "s", [args.id], path=path, interface=MACHINE_IFACE, manage=True)
    if args.json:
        emit_json({"machine": args.name, "id": args.id} | {k: int(stats.get(k, 0)) for k in DRIVE_STATS}, args)
    else:
        table = render_table(list(DRIVE_STATS.values()), [[str(stats.get(k, 0)) for k in DRIVE_STATS]], args.legend)
        emit("\n".join(table) + "\n", args)
    return Exit.OK


def copy_options(args: argparse.Namespace) -> dict[str, Variant]:
    """snapshot-drive's and swap-drive's --format and --timeout."""
    opts = {} if args.format is None else {"format": Variant("s", args.format)}
    return opts | ({} if args.timeout is None else {"timeout_usec": Variant("t", args.timeout)})


async def cmd_snapshot_drive(client: Client, args: argparse.Namespace) -> int:
    """SnapshotDrive into a file you open (made if missing): it holds what you may write, never more."""
    path = await client.machine_path(args.name)
    try:
        fd = os.open(args.target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY, 0o600)
    except OSError as e:
        raise file_error(e, "snapshot target", args.target) from e
    try:
        await client.call(
            "SnapshotDrive", "sha{sv}", [args.id, 0, copy_options(args)], path=path, interface=MACHINE_IFACE,
            unix_fds=[fd], manage=True,
        )  # fmt: skip
    finally:
        os.close(fd)
    if args.json:
        emit_json({"machine": args.name, "id": args.id, "target": absolute(args.target)}, args)
    return Exit.OK


async def cmd_swap_drive(client: Client, args: argparse.Namespace) -> int:
    """SwapDrive to PATH, which the daemon opens (every layer) with your rights."""
    path = await client.machine_path(args.name)
    target = absolute(args.path)
    await client.call(
        "SwapDrive", "ssa{sv}", [args.id, target, copy_options(args)], path=path, interface=MACHINE_IFACE, manage=True
    )  # fmt: skip
    if args.json:
        emit_json({"machine": args.name, "id": args.id, "path": target}, args)
    return Exit.OK


async def cmd_console(client: Client, args: argparse.Namespace) -> int:
    """Attach to the serial console (OpenConsole); --no-follow prints the log instead."""
    path = await client.machine_path(args.name)
    if args.no_follow:
        return print_console_log(str(await client.prop(path, "ConsoleLog")))
    options = {"read_only": Variant("b", True)} if args.read_only else {}
    fd = await client.call_fd("OpenConsoleEx", "a{sv}", [options], path)
    with socket.socket(fileno=fd) as sock:
        return await console_session(sock, args.name, args.read_only)


def print_console_log(log: str) -> int:
    try:
        f = open(log, "rb")  # noqa: SIM115 -- read whole, once
    except OSError as e:
        raise file_error(
            e,
            "console log",
            log,
            denied_hint="only the machine's owner and root may read its console log: run this as one of them",
            missing_hint=f"the machine may just have stopped; '{PROG} list' shows the machines there are",
        ) from e
    with f:
        while chunk := f.read(1 << 16):
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()
    return Exit.OK


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The terminal in raw mode (every key goes to the guest, Ctrl-C too), restored on the way out."""
    saved = termios.tcgetattr(fd)
    # TCSANOW: keys typed ahead stay queued for the guest.
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


async def console_session(sock: socket.socket, name: str, read_only: bool) -> int:
    """Copy the console to stdout and, unless read-only, stdin to the console.

    On a terminal: raw mode, Ctrl-] three times within a second leaves.
    Read-only, or without a terminal: Ctrl-C (SIGINT) or SIGTERM leaves. It
    also ends when vmspawnd closes the console (the machine stopped)."""
    loop = asyncio.get_running_loop()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = not read_only and os.isatty(stdin)
    done: asyncio.Future[str] = loop.create_future()
    detector = EscapeDetector()

    def finish(why: str) -> None:
        if not done.done():
            done.set_result(why)

    def from_guest() -> None:
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            finish("closed")
            return
        write_all(stdout, data)

    def from_user() -> None:
        data = os.read(stdin, 4096)
        if not data:
            # stdin ended (a pipe): what it held was sent; keep following.
            loop.remove_reader(stdin)
            return
        data, leave = detector.feed(data, time.monotonic()) if interactive else (data, False)
        if data:
            sock.sendall(data)
        if leave:
            finish("left")

    with contextlib.ExitStack() as stack:
        loop.add_reader(sock.fileno(), from_guest)
        stack.callback(loop.remove_reader, sock.fileno())
        if not read_only:
            loop.add_reader(stdin, from_user)
            stack.callback(loop.remove_reader, stdin)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, finish, "signal")
            stack.callback(loop.remove_signal_handler, sig)
        if interactive:
            # Raw before the banner: whoever reads it and types goes to the guest.
            stack.enter_context(raw_terminal(stdin))
        if os.isatty(stdin):
            how = ESCAPE_HELP if interactive else "Read-only; Ctrl-C leaves."
            sys.stderr.write(f"Connected to the console of {name}. {how}\r\n")
            sys.stderr.flush()
        why = await done
    if os.isatty(stdin):
        said = {"left": "Left", "signal": "Left", "closed": "vmspawnd closed"}[why]
        sys.stderr.write(f"\n{said} the console of {name}.\n")
    return Exit.OK


VERBS: dict[str, Callable[[Client, argparse.Namespace], Awaitable[int]]] = {
    "list": cmd_list,
    "status": cmd_status,
    "plan": cmd_plan,
    "create": cmd_create,
    "add-drive": cmd_add_drive,
    "remove-drive": cmd_remove_drive,
    "add-share": cmd_add_share,
    "remove-share": cmd_remove_drive,
    "replace-drive": cmd_replace_drive,
    "eject-drive": cmd_replace_drive,
    "add-nic": cmd_add_nic,
    "remove-nic": cmd_remove_nic,
    "poweroff": cmd_poweroff,
    "terminate": cmd_terminate,
    "console": cmd_console,
    "nmi": cmd_nmi,
    "drive-stats": cmd_drive_stats,
    "snapshot-drive": cmd_snapshot_drive,
    "swap-drive": cmd_swap_drive,
    "pause": cmd_run_state,
    "resume": cmd_run_state,
    "reboot": cmd_run_state,
    "start": cmd_run_state,
    "suspend": cmd_run_state,
}


# -- the command line ---------------------------------------------------------------------------

DESCRIPTION = """\
Control QEMU virtual machines run by vmspawnd, over its D-Bus API
(org.vmspawnd1). Machines get a packed PCIe layout: root ports sit eight to a
pcie.0 slot, so many drives and hotplug ports fit; 'plan' and 'status' show it.

Every verb has its own help: vmspawnctl VERB --help."""

MAIN_EPILOG = f"""\
examples:
  vmspawnctl list
  vmspawnctl create web --image /var/lib/vms/web.raw --network user --spares 4 --memory 2G
  vmspawnctl plan --image /var/lib/vms/web.raw --spares 16
  vmspawnctl status web
  vmspawnctl add-drive web /var/lib/vms/data.qcow2 --format qcow2 --serial data
  vmspawnctl remove-drive web disk1
  vmspawnctl replace-drive web disk1 /srv/iso/debian.iso
  vmspawnctl add-nic web --network tap:tap0
  vmspawnctl remove-nic web nic1
  vmspawnctl console web
  vmspawnctl pause web
  vmspawnctl suspend web
  vmspawnctl reboot web
  vmspawnctl drive-stats web disk0
  vmspawnctl snapshot-drive web disk0 /srv/backup/web.raw
  vmspawnctl swap-drive web disk1 /srv/fast/data.raw
  vmspawnctl poweroff web

{EXIT_STATUS_HELP}"""

SHORT_EXIT = (
    "exit status: 0 ok, 1 failed, 2 invalid argument, 3 not found, 4 access denied, 5 busy/no room, "
    "6 vmspawnd not reachable (details: vmspawnctl --help)"
)


@dataclasses.dataclass(frozen=True)
class VerbHelp:
    summary: str
    description: str
    examples: tuple[str, ...]


VERB_HELP: dict[str, VerbHelp] = {
    "list": VerbHelp(
        "list the machines",
        "List the machines vmspawnd runs: name, state, QEMU's pid, the number of drives, "
        "the free hotplug ports and the pcie.0 slots used. --no-legend leaves out the header "
        "and the footer (for scripts: the first column is the name).",
        ("vmspawnctl list", "vmspawnctl list --no-legend", "vmspawnctl list --json"),
    ),
    "status": VerbHelp(
        "show a machine's state and its PCIe layout",
        "Show a machine: its id, state, QEMU's pid (the leader), the console log, the pcie.0 slot budget "
        "(used/available), its drives, and its root ports as a tree: pcie.0 slot -> slot.function -> "
        "root port (builtin or spare) -> the device on it. --json prints every D-Bus property of "
        "org.vmspawnd1.Machine under its own name.",
        ("vmspawnctl status web", "vmspawnctl status web --json"),
    ),
    "plan": VerbHelp(
        "show the PCIe layout a create would get, without starting anything",
        "Dry run of create (PlanMachine): the root ports, packed eight per pcie.0 slot from 0x10, and "
        "what takes the pcie.0 slot budget. It takes the create options; the machine NAME is optional. "
        "Refusals are the same as create's (TooManyPorts, PcieSlotsExhausted).",
        (
            "vmspawnctl plan --image /var/lib/vms/web.raw --network user --spares 10",
            "vmspawnctl plan --kernel vmlinuz --qemu-extra-string '-device nvme,serial=a -device nvme,serial=b'",
            "vmspawnctl plan web --image web.raw --json",
        ),
    ),
    "create": VerbHelp(
        "create and start a machine",
        "Create a machine and start it; returns once QEMU runs with its boot-time devices. A boot source "
        "is needed: --kernel (direct kernel boot, with --initrd/--cmdline) or --image. Relative paths are "
        "made absolute. Values that start with '-' may follow --qemu-extra directly "
        "(--qemu-extra -device --qemu-extra nvme,serial=a), or give them all in one shell-quoted string "
        "with --qemu-extra-string. Sizes take K, M, G, T suffixes (powers of 1024).",
        (
            "vmspawnctl create web --image /var/lib/vms/web.raw --network user --memory 2G --cpus 2",
            "vmspawnctl create k --kernel vmlinuz --initrd initrd.img --cmdline 'console=ttyS0' --accel tcg",
            "vmspawnctl create db --image db.qcow2 --image-format qcow2 --drive /dev/vg/data:nvme:data0 --spares 4",
            "vmspawnctl create x --image x.raw --qemu-extra-string '-device nvme,serial=n0 -device nvme,serial=n1'",
        ),
    ),
    "add-drive": VerbHelp(
        "hotplug a drive onto a free spare port",
        "Open PATH yourself (read-write, or read-only with --read-only) and hand the open file to vmspawnd "
        "(AddDriveFd), which plugs it into the lowest free spare port (or --port). So the drive is whatever you can "
        "open: vmspawnd never opens a path for you with more rights than you have. Prints the drive id and "
        "its port.",
        (
            "vmspawnctl add-drive web /var/lib/vms/data.raw",
            "vmspawnctl add-drive web data.qcow2 --format qcow2 --disk-type nvme --serial data0 --id data",
            "vmspawnctl add-drive web cd.iso --disk-type virtio-scsi-cdrom --read-only",
        ),
    ),
    "remove-drive": VerbHelp(
        "hot-unplug a drive",
        "Unplug a drive that was hotplugged (RemoveDriveEx); returns once the guest released it. Past "
        "--timeout (default: the daemon's, 10 s) it fails with UnplugTimeout, the drive stays listed as "
        "removing and its port is freed when the guest lets go.",
        ("vmspawnctl remove-drive web disk1", "vmspawnctl remove-drive web data --timeout 30s"),
    ),
    "add-share": VerbHelp(
        "hotplug a directory as a virtiofs share",
        "Share DIRECTORY with the running machine (AddShare): vmspawnd opens it with your rights (you must "
        "own it unless you are root), starts a virtiofsd for it and plugs a vhost-user-fs device into the "
        "lowest free spare root port. The guest mounts it by its tag: mount -t virtiofs TAG /mnt. "
        "Read-only shares are not supported (virtiofsd 7.2). Prints the share id and its port.",
        ("vmspawnctl add-share web /srv/data --tag data", "vmspawnctl add-share web ./build --tag build --id b"),
    ),
    "remove-share": VerbHelp(
        "hot-unplug a share",
        "Unplug a hotplugged share (RemoveShareEx); returns once the guest released it, then its virtiofsd "
        "stops. Past --timeout (default: the daemon's, 10 s) it fails with UnplugTimeout, the share stays "
        "listed as removing and goes when the guest lets go.",
        ("vmspawnctl remove-share web share0", "vmspawnctl remove-share web b --timeout 30s"),
    ),
    "replace-drive": VerbHelp(
        "put a new medium into a cdrom drive",
        "Replace the medium of a virtio-scsi-cdrom drive (ReplaceDrive): vmspawnd opens PATH with your rights, "
        "ejects the old medium (even if the guest locked the tray) and inserts the new one; the guest sees a "
        "media change. Disks cannot change their image under a running guest: remove and add them instead.",
        (
            "vmspawnctl replace-drive web disk1 /srv/iso/debian.iso",
            "vmspawnctl replace-drive web cd0 x.qcow2 --format qcow2",
        ),
    ),
    "eject-drive": VerbHelp(
        "eject a cdrom drive's medium",
        "Take the medium out of a virtio-scsi-cdrom drive (EjectDrive); the drive stays, empty, and takes a "
        "new medium with replace-drive.",
        ("vmspawnctl eject-drive web disk1",),
    ),
    "add-nic": VerbHelp(
        "hotplug a network interface onto a free spare port",
        "Plug a virtio-net interface into the lowest free spare port (AddNetwork): --network user (the default) "
        "or tap:NAME, a tap you own (or one vmspawnd.conf's [taps] grants you). --mac defaults to a stable, "
        "locally administered address derived from the machine and the interface id. Prints the id, MAC and port.",
        ("vmspawnctl add-nic web", "vmspawnctl add-nic web --network tap:tap0 --mac 02:00:00:00:00:01 --id uplink"),
    ),
    "remove-nic": VerbHelp(
        "hot-unplug a network interface",
        "Unplug a hotplugged network interface (RemoveNetworkEx); returns once the guest released it. Past "
        "--timeout (default: the daemon's, 10 s) it fails with UnplugTimeout, the interface stays listed as "
        "removing and its port is freed when the guest lets go.",
        ("vmspawnctl remove-nic web nic1", "vmspawnctl remove-nic web uplink --timeout 30s"),
    ),
    "poweroff": VerbHelp(
        "power a machine off through ACPI",
        "Press the ACPI power button (again every 2 s: a guest still booting does not listen yet); if the "
        "guest has not shut down within --timeout (default 30 s), stop QEMU and say so (--json: forced). "
        "Returns once the machine is gone.",
        ("vmspawnctl poweroff web", "vmspawnctl poweroff web --timeout 2min"),
    ),
    "terminate": VerbHelp(
        "stop a machine at once",
        "Stop QEMU now (quit, then SIGTERM, then SIGKILL), without asking the guest. A machine created "
        "with --keep goes for good, running or stopped (its runtime directory too).",
        ("vmspawnctl terminate web",),
    ),
    "console": VerbHelp(
        "attach to a machine's serial console",
        "Attach to the machine's serial console (OpenConsole), like 'machinectl login' or 'virsh console': "
        "on a terminal, keys go to the guest as typed (raw mode, Ctrl-C included) and Ctrl-] pressed three "
        "times within a second leaves. Without a terminal, standard input is sent as it comes. One client "
        "at a time may type; --read-only only follows the output (any number of them), and Ctrl-C leaves. "
        "It ends on its own when the machine stops. --no-follow prints the console log (the ConsoleLog "
        "property, which records everything, also while nobody is attached) and exits.",
        (
            "vmspawnctl console web",
            "vmspawnctl console web --read-only",
            "vmspawnctl console web --no-follow | grep -i error",
        ),
    ),
    "nmi": VerbHelp(
        "send a machine a non-maskable interrupt",
        "Inject an NMI into every virtual CPU (InjectNMI), as a server's NMI button does: a guest set up for "
        "it (Linux with kdump and kernel.unknown_nmi_panic=1) writes a crash dump, others log it and go on.",
        ("vmspawnctl nmi web",),
    ),
    "drive-stats": VerbHelp(
        "show a drive's I/O counters",
        "Print a drive's counters since it was plugged (DriveStats, from QEMU): read and write requests "
        "and bytes, flushes, and the requests that failed (I/O errors). Boot drives and hotplugged drives "
        "alike; the ids are in 'vmspawnctl status NAME'.",
        ("vmspawnctl drive-stats web disk0", "vmspawnctl drive-stats web data --json"),
    ),
    "snapshot-drive": VerbHelp(
        "copy a running machine's drive into a file",
        "Open TARGET yourself (read-write, made if missing) and have the drive copied into it as it is now "
        "(SnapshotDrive); the guest runs on. --format raw (the default: the file becomes the drive's size) or "
        "qcow2 (the file is formatted anew). Returns once the copy is complete; past --timeout (default: the "
        "daemon's, 30 min) the copy is cancelled (JobTimeout).",
        (
            "vmspawnctl snapshot-drive web disk0 /srv/backup/web.raw",
            "vmspawnctl snapshot-drive web data data.qcow2 --format qcow2 --timeout 2h",
        ),
    ),
    "swap-drive": VerbHelp(
        "move a running machine's drive to another file",
        "Move the drive's contents to PATH while the guest keeps using its disk (SwapDrive, a block mirror): "
        "vmspawnd opens PATH, every layer of it, with your rights; from then on the drive is PATH (across "
        "a daemon restart and the next start of a kept machine) and the old file is free. PATH must be at "
        "least the drive's size. --format raw (default) or qcow2, --timeout as snapshot-drive.",
        (
            "vmspawnctl swap-drive web data /srv/fast/data.raw",
            "vmspawnctl swap-drive web disk1 new.qcow2 --format qcow2",
        ),
    ),
    "pause": VerbHelp(
        "pause a machine",
        "Stop the machine's virtual CPUs (Pause): the guest, its clock included, stands still until resume. "
        "QEMU and the devices stay. A paused machine takes no hotplug.",
        ("vmspawnctl pause web",),
    ),
    "resume": VerbHelp(
        "resume a paused machine",
        "Let a paused machine run again (Resume).",
        ("vmspawnctl resume web",),
    ),
    "reboot": VerbHelp(
        "reset a machine",
        "Reset the guest, as the reset button does (Reboot): the guest boots again, the machine, its ports "
        "and the drives hotplugged into it stay. The guest is not asked to shut down first.",
        ("vmspawnctl reboot web",),
    ),
    "start": VerbHelp(
        "start a stopped machine again",
        "Boot a machine created with --keep again once it stopped (Start): same name, id, ports and drives; "
        "the drives hotplugged into it before it stopped are there at boot, on the ports they had. Its files "
        "are opened again with its creator's rights. A running machine gives AlreadyRunning. 'terminate' "
        "removes a kept machine for good.",
        ("vmspawnctl start web", "vmspawnctl start web --json"),
    ),
    "suspend": VerbHelp(
        "save a kept machine to disk and stop it",
        "Save the guest's memory and device state to a file in the machine's runtime directory and stop its "
        "QEMU (Suspend); the machine is then suspended. 'start' resumes it where it was (no new boot) and "
        "removes the file; 'terminate' removes both. Only a machine created with --keep can be suspended, "
        "and not one with hotplugged NICs or shares, virtiofs shares or vsock.",
        ("vmspawnctl suspend web", "vmspawnctl start web"),
    ),
}


class _ExtendSplit(argparse.Action):
    """--qemu-extra-string: shlex-split into the same list as --qemu-extra, in order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        try:
            words = shlex.split(str(values))
        except ValueError as e:
            parser.error(f"argument --qemu-extra-string: {e}")
        items = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, items + words)


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The same flags before and after the verb; after it, only what was given overrides."""
    kw: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    g = parser.add_argument_group("global options")
    g.add_argument("--json", action="store_true", help="print one JSON document (list, status, plan, ...)", **kw)
    g.add_argument("--user", action="store_true", help="talk to vmspawnd on the session bus", **kw)
    g.add_argument("--system", dest="user", action="store_false", help="talk to the system bus (default)", **kw)
    g.add_argument("--no-pager", action="store_true", help="do not pipe output into a pager", **kw)
    g.add_argument("--no-legend", dest="legend", action="store_false", help="omit table headers and footers", **kw)
    g.add_argument(
        "--no-ask-password", action="store_true", help="do not let polkit ask for a password", **kw
    )  # fmt: skip


def _machine_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("machine options")
    g.add_argument("--kernel", metavar="PATH", help="kernel for direct kernel boot")
    g.add_argument("--initrd", metavar="PATH", help="initrd (needs --kernel)")
    g.add_argument("--cmdline", metavar="STRING", help="kernel command line")
    g.add_argument("--image", metavar="PATH", help="root disk image (boots first)")
    g.add_argument("--image-format", metavar="FORMAT", help=f"root image format: {', '.join(IMAGE_FORMATS)}")
    g.add_argument(
        "--drive",
        dest="drives",
        action="append",
        type=_argtype(parse_drive, "drive"),
        metavar="PATH[:TYPE[:SERIAL]]",
        help="an extra boot-time drive (repeatable); TYPE as --disk-type",
    )
    g.add_argument("--disk-type", metavar="TYPE", help=f"default disk type: {', '.join(DISK_TYPES)}")
    g.add_argument("--network", metavar="MODE", help=f"network: {', '.join(NETWORKS)} (default none)")
    g.add_argument("--vsock", action="store_true", help="add a vhost-vsock device")
    g.add_argument("--memory", type=_argtype(parse_memory, "size"), metavar="SIZE", help="memory, e.g. 512M or 2G")
    g.add_argument("--cpus", type=_argtype(parse_uint32, "number"), metavar="N", help="number of CPUs")
    g.add_argument(
        "--spares", type=_argtype(parse_uint32, "number"), metavar="N", help="hotplug root ports (default 10)"
    )  # fmt: skip
    g.add_argument("--accel", metavar="ACCEL", help=f"accelerator: {', '.join(ACCELS)} (default auto)")
    g.add_argument("--firmware", metavar="FW", help=f"firmware: {', '.join(FIRMWARES)} (default bios)")
    g.add_argument(
        "--graphics", metavar="KIND", help=f"a display for OpenGraphics: {', '.join(GRAPHICS)} (default none)"
    )
    g.add_argument(
        "--qemu-extra", dest="qemu_extra", action="append", metavar="ARG", help="one extra QEMU argument (repeatable)"
    )
    g.add_argument(
        "--qemu-extra-string",
        dest="qemu_extra",
        action=_ExtendSplit,
        metavar="STRING",
        help="extra QEMU arguments in one string, split like a shell does",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")

    def verb(name: str) -> argparse.ArgumentParser:
        h = VERB_HELP[name]
        examples = "\n".join(f"  {e}" for e in h.examples)
        p = sub.add_parser(
            name,
            help=h.summary,
            description=f"{PROG} {name}: {h.summary}.\n\n" + _wrap(h.description),
            epilog=f"examples:\n{examples}\n\n{_wrap(SHORT_EXIT)}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _global_options(p, suppress=True)
        return p

    verb("list")
    verb("status").add_argument("name", metavar="NAME", help="the machine")
    p = verb("plan")
    p.add_argument("name", metavar="NAME", nargs="?", default="plan", help="a machine name (default: plan)")
    _machine_options(p)
    p = verb("create")
    p.add_argument("name", metavar="NAME", help="the new machine's name (A-Z a-z 0-9 . _ -, up to 64)")
    _machine_options(p)
    p.add_argument(
        "--keep", action="store_true", help="keep the machine when it stops; 'start' boots it again"
    )  # fmt: skip
    p = verb("add-drive")
    p.add_argument("name", metavar="NAME", help="the machine")
    p.add_argument("path", metavar="PATH", help="a disk image or block device you can open")
    p.add_argument("--disk-type", metavar="TYPE", help=f"{', '.join(DISK_TYPES)} (default virtio-blk)")
    p.add_argument("--serial", metavar="SERIAL", help="serial number the guest sees")
    p.add_argument("--read-only", action="store_true", help="open the file read-only and attach it read-only")
    p.add_argument("--format", metavar="FORMAT", help=f"{', '.join(IMAGE_FORMATS)} (default raw)")
    p.add_argument("--id", metavar="ID", help="the drive id (default: diskN)")
    p.add_argument("--port", metavar="PORT", help="this free spare port (see status; default: the lowest free one)")
    p = verb("remove-drive")
    p.add_argument("name", metavar="NAME", help="the machine")
    p.add_argument("id", metavar="ID", help="the drive id (see status)")
    p.add_argument(
        "--timeout", type=_argtype(parse_timespan_usec, "time"), metavar="TIME", help="how long to wait, e.g. 30s"
    )  # fmt: skip
    p = verb("replace-drive")
    p.add_argument("name", metavar="NAME", help="the machine")
    p.add_argument("id", metavar="ID", help="the cdrom drive's id (see status)")
    p.add_argument("path", metavar="PATH", help="the new medium, a file you can open")
    p.add_argument("--format", metavar="FORMAT", help=f"{', '.join(IMAGE_FORMATS)} (default raw)")
    p = verb("eject-drive")
    p.add_argument("name", metavar="NAME", help="the machine")
    p.add_argument("id", metavar="ID", help="the cdrom drive's id (see status)")
    p = verb("add-nic")
    p.add_argument("name", metavar="NAME", help="the machine")
    p.add_argument("--network", metavar="NET", help="user (default) or tap:NAME")
    p.add_argument("--mac", metavar="MAC", help="the interface's MAC (default: derived, stable)")
    p.add_argument("--id", metavar="ID", help="the interface id (default: nicN)")
    p = verb("remove-nic")
    p.add_argument("name", metavar="NAME", help="the machine")
    p.add_argument("id", metavar="ID", help="the interface id (see status)")
    p.add_argument(
        "--timeout", type=_argtype(parse_timespan_usec, "time"), metavar="TIME", help="how long to wait, e.g. 30s"
    )  # fmt: skip
    p = verb("add-share")
    p.add_argument("name", metavar="NAME", help="the machine")
    p.add_argument("directory", metavar="DIRECTORY", help="a directory you own")
    p.add_argument("--tag", metavar="TAG", required=True, help="the name the guest mounts it by")
    p.add_argument("--id", metavar="ID", help="the share id (default: shareN)")
    p = verb("remove-share")
    p.add_argument("name", metavar="NAME", help="the machine")
    p.add_argument("id", metavar="ID", help="the share id (see status)")
    p.add_argument(
        "--timeout", type=_argtype(parse_timespan_usec, "time"), metavar="TIME", help="how long to wait, e.g. 30s"
    )  # fmt: skip
    p = verb("poweroff")
    p.add_argument("name", metavar="NAME", help="the machine")
    p.add_argument(
        "--timeout", type=_argtype(parse_timespan_usec, "time"), metavar="TIME", help="grace time (default 30s)"
    )  # fmt: skip
    verb("terminate").add_argument("name", metavar="NAME", help="the machine")
    p = verb("console")
    p.add_argument("name", metavar="NAME", help="the machine")
    p.add_argument("--read-only", action="store_true", help="only follow the output, send nothing")
    p.add_argument("--no-follow", action="store_true", help="print the console log and exit")
    verb("nmi").add_argument("name", metavar="NAME", help="the machine")
    p = verb("drive-stats")
    p.add_argument("name", metavar="NAME", help="the machine")
    p.add_argument("id", metavar="ID", help="the drive id (see status)")
    for name, file, file_help in (
        ("snapshot-drive", "target", "the file to copy into (yours to write; made if missing)"),
        ("swap-drive", "path", "the drive's new file, one you can open read-write"),
    ):
        p = verb(name)
        p.add_argument("name", metavar="NAME", help="the machine")
        p.add_argument("id", metavar="ID", help="the drive id (see status)")
        p.add_argument(file, metavar=file.upper(), help=file_help)
        p.add_argument("--format", metavar="FORMAT", help=f"{', '.join(IMAGE_FORMATS)} (default raw)")
        p.add_argument(
            "--timeout", type=_argtype(parse_timespan_usec, "time"), metavar="TIME", help="how long the copy may take"
        )  # fmt: skip
    for name in RUN_STATE_METHODS:
        verb(name).add_argument("name", metavar="NAME", help="the machine")
    return parser


def _wrap(text: str, width: int = 78) -> str:
    return "\n\n".join(textwrap.fill(par, width, break_on_hyphens=False) for par in text.split("\n\n"))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(glue_dash_values(argv))
    if args.verb is None:
        args = parser.parse_args(["list", *glue_dash_values(argv)])
    return args


# -- main ---------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    ctx = Context(args.verb, getattr(args, "name", "") or "", args.user)
    interactive = not args.no_ask_password and sys.stdin.isatty()
    client = await Client.connect(args.user, interactive, ctx)
    try:
        return await VERBS[args.verb](client, args)
    except DBusError as e:
        raise map_error(e.type, e.text, ctx) from e
    finally:
        client.close()


def _fail(error: CtlError) -> int:
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    sys.stderr.write(format_error(error))
    return int(error.code)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(run(args))
    except CtlError as e:
        return _fail(e)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except BrokenPipeError:
        # `vmspawnctl console NAME | head`: the reader is gone; so is our job.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
