"""Real parts for the integration tests: a private bus, the daemon, a client.

Nothing here is mocked: dbus-daemon runs with the project's policy file,
vmspawnd runs as a process, QEMU boots the tiny guest under TCG.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from vmspawnd.bus import BUS_NAME, MACHINE_IFACE, MANAGER_IFACE, MANAGER_PATH
from vmspawnd.bus.options import (
    ADD_DRIVE_OPTIONS,
    ADD_SHARE_OPTIONS,
    DRIVE_OPTIONS,
    MACHINE_OPTIONS,
    MOUNT_OPTIONS,
    PLUGGED_OPTIONS,
)
from vmspawnd.state import is_log

ROOT = Path(__file__).resolve().parents[2]
VMSPAWND = [sys.executable, "-m", "vmspawnd"]


def variants(options: dict[str, Any], schema: dict[str, str]) -> dict[str, Variant]:
    """Python values -> a{sv} with the signatures the daemon documents."""
    out = {}
    for key, value in options.items():
        if isinstance(value, Variant):
            out[key] = value
        elif key == "drives":
            out[key] = Variant("aa{sv}", [variants(d, DRIVE_OPTIONS) for d in value])
        elif key == "mounts":
            out[key] = Variant("aa{sv}", [variants(m, MOUNT_OPTIONS) for m in value])
        elif key == "plugged":
            out[key] = Variant("aa{sv}", [variants(p, PLUGGED_OPTIONS) for p in value])
        else:
            out[key] = Variant(schema[key], value)
    return out


def guest_options(guest: Any, **extra: Any) -> dict[str, Any]:
    return {
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "cmdline": guest.cmdline,
        "accel": "tcg",
        "memory": 256 * 1024 * 1024,
    } | extra


@contextlib.contextmanager
def shared_dir(prefix: str, mode: int) -> Iterator[Path]:
    """A directory under /tmp other users reach (pytest's tmp_path sits under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(mode)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def blank_image(directory: Path, name: str) -> str:
    """SeaBIOS finds nothing to boot on it and idles: cheaper than a kernel under TCG."""
    path = directory / name
    path.write_bytes(b"\0" * (1 << 20))
    return str(path)


def image_options(image: str, **extra: Any) -> dict[str, Any]:
    return {"image": image, "firmware": "bios", "accel": "tcg", "memory": 64 << 20, "hotplug_spares": 2} | extra


def qemu_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def qemu_uid(pid: int) -> int:
    return int(qemu_status(pid)["Uid"].split()[0])


class Client:
    """A thin dbus-fast client that reports errors as DBusError."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    @classmethod
    async def connect(cls, address: str | None = None) -> Client:
        """On the system bus, or on the private bus at `address`."""
        bus = (
            MessageBus(bus_address=address, negotiate_unix_fd=True)
            if address
            else MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        )
        return cls(await bus.connect())

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
        unix_fds: Sequence[int] = (),
        destination: str = BUS_NAME,
    ) -> list[Any]:
        reply = await self.bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
                unix_fds=list(unix_fds),
            )
        )
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            raise DBusError(reply.error_name or "", reply.body[0] if reply.body else "")
        return list(reply.body)

    async def create(self, name: str, **options: Any) -> str:
        (path,) = await self.call("CreateMachine", "sa{sv}", [name, variants(options, MACHINE_OPTIONS)])
        return str(path)

    async def prop(self, path: str, name: str, interface: str = MACHINE_IFACE) -> Any:
        (value,) = await self.call(
            "Get", "ss", [interface, name], path=path, interface="org.freedesktop.DBus.Properties"
        )
        return unwrap(value.value)

    async def add_drive(self, path: str, file: str, **options: Any) -> tuple[str, str]:
        drive_id, port = await self.call(
            "AddDrive", "sa{sv}", [file, variants(options, ADD_DRIVE_OPTIONS)], path=path, interface=MACHINE_IFACE
        )
        return drive_id, port

    async def remove_drive(self, path: str, drive_id: str, timeout_usec: int | None = None) -> None:
        await self._unplug("RemoveDrive", path, drive_id, timeout_usec)

    async def _unplug(self, method: str, path: str, dev: str, timeout_usec: int | None) -> None:
        """`method` (RemoveDrive, RemoveShare), or its Ex with a timeout."""
        if timeout_usec is None:
            await self.call(method, "s", [dev], path=path, interface=MACHINE_IFACE)
        else:
            opts = {"timeout_usec": Variant("t", timeout_usec)}
            await self.call(f"{method}Ex", "sa{sv}", [dev, opts], path=path, interface=MACHINE_IFACE)

    async def add_share(self, path: str, directory: str, **options: Any) -> tuple[str, str]:
        share_id, port = await self.call(
            "AddShare", "sa{sv}", [directory, variants(options, ADD_SHARE_OPTIONS)], path=path, interface=MACHINE_IFACE
        )
        return share_id, port

    async def remove_share(self, path: str, share_id: str, timeout_usec: int | None = None) -> None:
        await self._unplug("RemoveShare", path, share_id, timeout_usec)

    async def subscribe(self, interface: str) -> None:
        await self.call(
            "AddMatch", "s", [f"type='signal',interface='{interface}'"],
            path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", destination="org.freedesktop.DBus",
        )  # fmt: skip

    async def names(self) -> list[str]:
        (machines,) = await self.call("ListMachines")
        return [m[0] for m in machines]

    async def terminate_all(self) -> None:
        for name in await self.names():
            try:
                await self.call("TerminateMachine", "s", [name])
            except DBusError as e:
                if not e.type.endswith("NoSuchMachine"):
                    raise

    def close(self) -> None:
        self.bus.disconnect()


async def record_states(client: Client, path: str) -> list[str]:
    """Every State the machine at `path` signals from now on (PropertiesChanged), in order."""
    states: list[str] = []

    def on_signal(msg: Message) -> None:
        if msg.member == "PropertiesChanged" and msg.path == path and "State" in msg.body[1]:
            states.append(msg.body[1]["State"].value)

    await client.subscribe("org.freedesktop.DBus.Properties")
    client.bus.add_message_handler(on_signal)
    return states


def unwrap(value: Any) -> Any:
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


@dataclass
class Site:
    """A bus and a daemon of a test's own (tests that restart or kill the daemon)."""

    address: str
    daemon: Daemon
    dir: Path

    async def client(self) -> Client:
        return await Client.connect(self.address)


class Daemon:
    """vmspawnd as a real process; start() returns once it sent READY=1."""

    def __init__(self, runtime_dir: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.runtime_dir = runtime_dir
        self.log = log
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, timeout: float = 20, env: dict[str, str] | None = None) -> None:
        notify_path = self.runtime_dir.parent / f"notify-{os.getpid()}-{time.monotonic_ns()}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(timeout)
        env = os.environ | self.env | (env or {}) | {"NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*VMSPAWND, "--runtime-dir", str(self.runtime_dir), *args], stdout=log, stderr=log, env=env
            )
        try:
            while b"READY=1" not in (msg := notify.recv(4096)):
                pass
            self.notifications = [msg]
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"vmspawnd did not become ready; see {self.log}") from None
        finally:
            notify.close()
            notify_path.unlink()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(20)
        self.proc = None
        return code


def not_just_logs(machines: Path) -> list[Path]:
    """Machine dirs holding more than the logs a stopped or failed machine keeps."""
    dirs = list(machines.iterdir()) if machines.exists() else []
    return [p for p in dirs if not all(is_log(f.name) for f in p.iterdir())]


def qemu_pids(marker: str) -> list[int]:
    """QEMU processes whose command line mentions `marker` (a runtime dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and marker.encode() in b" ".join(argv):
            pids.append(int(entry.name))
    return pids


def running(pid: int) -> bool:
    """Alive: not gone, not a zombie (an orphan of a killed daemon waits for PID 1 to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def virtiofsd_pids(parent: int) -> list[int]:
    """The virtiofsd processes `parent` (a daemon) started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if stat.split("(")[1].startswith("virtiofsd)") and int(stat.rpartition(")")[2].split()[1]) == parent:
                    pids.append(int(entry.name))
    return pids


async def wait_console(path: Path | str, pattern: str, timeout: float = 30, start: int = 0) -> re.Match[str]:
    """Wait until the guest's serial console log matches `pattern`.

    The console is a file QEMU appends to; nothing signals a new line, so
    this polls it with a deadline.
    """
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern, re.MULTILINE)
    text = ""
    while time.monotonic() < deadline:
        try:
            text = Path(path).read_text(errors="replace")[start:]
        except FileNotFoundError:
            text = ""
        if m := regex.search(text):
            return m
        await asyncio.sleep(0.05)
    raise AssertionError(f"console {path} never matched {pattern!r} in {timeout} s; it ends with:\n{text[-2000:]}")


def busctl(*args: str, check: bool = True, as_user: str = "") -> subprocess.CompletedProcess[str]:
    """busctl on the private system bus, as root or as another real user."""
    prefix = ["runuser", "-u", as_user, "--"] if as_user else []
    return subprocess.run(
        [*prefix, "busctl", "--system", *args], capture_output=True, text=True, check=check, timeout=120
    )


# What asyncio logs when a task or future fails with nobody looking: a lost
# error, and after it a daemon that may be stuck (finding 10).
LOST_ERRORS = (
    "Future exception was never retrieved",
    "Task exception was never retrieved",
    "Task was destroyed but it is pending",
    "Traceback (most recent call last)",
)


def lost_errors(log: Path) -> list[str]:
    """Each place in a daemon log where an error went unhandled, with the lines after it."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return ["\n".join(lines[i : i + 12]) for i, line in enumerate(lines) if any(m in line for m in LOST_ERRORS)]
