"""vmspawnd's public D-Bus API as blocking calls (jeepney), for nova-compute.

Nova runs under eventlet, which makes the socket module cooperative: a
blocking jeepney call then yields to other green threads while it waits.
A connection serves one call at a time (jeepney reads replies off the
socket itself), so calls take a connection from a small pool; every call
has a deadline. Nothing here imports Nova.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jeepney import DBusAddress, FileDescriptor, HeaderFields, Message, MessageType, new_method_call
from jeepney.io.blocking import DBusConnection, open_dbus_connection

BUS_NAME = "org.vmspawnd1"
MANAGER_PATH = "/org/vmspawnd1"
MANAGER_IFACE = "org.vmspawnd1.Manager"
MACHINE_IFACE = "org.vmspawnd1.Machine"
ERROR_PREFIX = "org.vmspawnd1.Error."

# The D-Bus types of CreateMachine's options (DESIGN §2) that the driver uses.
MACHINE_OPTIONS = {
    "kernel": "s",
    "initrd": "s",
    "cmdline": "s",
    "image": "s",
    "image_format": "s",
    "network": "s",
    "memory": "t",
    "cpus": "u",
    "hotplug_spares": "u",
    "accel": "s",
    "keep": "b",
    "drives": "aa{sv}",
    "guest_agent": "b",
    "graphics": "s",
    "incoming": "b",
    "plugged": "aa{sv}",
}
# One entry of CreateMachine's `drives`.
DRIVE_OPTIONS = {"path": "s", "format": "s", "disk_type": "s", "read_only": "b", "serial": "s"}
# One entry of `plugged`: a drive the source had hotplugged, with its id and spare port.
PLUGGED_OPTIONS = DRIVE_OPTIONS | {"id": "s", "port": "s"}
# The schema of each entry of an aa{sv} option.
ENTRY_OPTIONS = {"drives": DRIVE_OPTIONS, "plugged": PLUGGED_OPTIONS}
ADD_DRIVE_OPTIONS = {"disk_type": "s", "format": "s", "read_only": "b", "serial": "s", "id": "s"}
# SnapshotDrive's and SwapDrive's options.
COPY_OPTIONS = {"format": "s", "timeout_usec": "t"}

DEFAULT_TIMEOUT = 60.0
# Replies to a call that waits on the guest (PowerOff, RemoveDrive) may take
# this much longer than the guest's own timeout.
MARGIN = 30.0
IDLE_CONNECTIONS = 4
# What the bus library answers for a path with no object behind it.
NO_OBJECT = ("org.freedesktop.DBus.Error.UnknownMethod", "org.freedesktop.DBus.Error.UnknownObject")


class VmspawndError(Exception):
    """A D-Bus error reply; `name` is the short name, e.g. NoSuchMachine."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class Unreachable(VmspawndError):
    """The bus or the daemon could not be reached or did not answer in time."""

    def __init__(self, message: str) -> None:
        super().__init__("Unreachable", message)


def object_path(name: str) -> str:
    """The daemon's path for a machine (systemd's bus label escaping)."""
    label = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in name) or "_"
    return f"{MANAGER_PATH}/machine/{label}"


def variants(options: dict[str, Any], schema: dict[str, str]) -> dict[str, tuple[str, Any]]:
    return {key: (schema[key], wrapped(key, schema[key], value)) for key, value in options.items()}


def wrapped(key: str, signature: str, value: Any) -> Any:
    """A value for jeepney: each entry of an aa{sv} (drives, plugged) as variants too."""
    if signature == "aa{sv}":
        return [variants(entry, ENTRY_OPTIONS[key]) for entry in value]
    return value


def usec(seconds: float) -> int:
    return round(seconds * 1_000_000)


def plain(variant: tuple[str, Any]) -> Any:
    """A property's (signature, value) -> the value; a{sv} entries unwrapped too."""
    signature, value = variant
    if signature == "a{sv}":
        return {k: v[1] for k, v in value.items()}
    if signature == "aa{sv}":
        return [{k: v[1] for k, v in entry.items()} for entry in value]
    return value


class Client:
    """One host's vmspawnd. `address` is a D-Bus address, or "SYSTEM"."""

    def __init__(self, address: str = "SYSTEM", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._idle: list[DBusConnection] = []
        self._lock = threading.Lock()

    # -- the Manager ------------------------------------------------------

    def list_machines(self) -> list[tuple[str, str]]:
        """(name, state) of every machine."""
        (machines,) = self._call(MANAGER_PATH, MANAGER_IFACE, "ListMachines")
        return [(name, state) for name, state, _path in machines]

    def create(self, name: str, options: dict[str, Any], timeout: float | None = None) -> None:
        self._call(
            MANAGER_PATH,
            MANAGER_IFACE,
            "CreateMachine",
            "sa{sv}",
            (name, variants(options, MACHINE_OPTIONS)),
            timeout,
        )

    def manager_property(self, name: str) -> Any:
        (value,) = self._call(MANAGER_PATH, "org.freedesktop.DBus.Properties", "Get", "ss", (MANAGER_IFACE, name))
        return plain(value)

    def terminate(self, name: str) -> None:
        """The machine is gone for good, kept or not."""
        self._call(MANAGER_PATH, MANAGER_IFACE, "TerminateMachine", "s", (name,))

    # -- one Machine ------------------------------------------------------

    def properties(self, name: str) -> dict[str, Any]:
        (values,) = self._call(object_path(name), "org.freedesktop.DBus.Properties", "GetAll", "s", (MACHINE_IFACE,))
        return {key: plain(value) for key, value in values.items()}

    def start(self, name: str, timeout: float | None = None) -> None:
        self._machine(name, "Start", timeout=timeout)

    def power_off(self, name: str, timeout: float) -> None:
        self._machine(name, "PowerOff", "t", (usec(timeout),), timeout + MARGIN)

    def reboot(self, name: str) -> None:
        self._machine(name, "Reboot")

    def set_user_password(self, name: str, user: str, password: str) -> None:
        """Through the guest agent (a machine created with guest_agent)."""
        self._machine(name, "SetUserPassword", "ssb", (user, password, False))

    def open_graphics(self, name: str) -> socket.socket:
        """A new client's stream to the machine's display: RFB or SPICE, as it was created."""
        return self._stream(name, "OpenGraphics", "a{sv}", ({},))

    def open_console(self, name: str) -> socket.socket:
        """A read-write stream to the machine's serial console (one writer at a time, else ConsoleBusy)."""
        return self._stream(name, "OpenConsole")

    def pause(self, name: str) -> None:
        self._machine(name, "Pause")

    def suspend(self, name: str, timeout: float | None = None) -> None:
        """The machine's state saved to disk, its QEMU gone; start() resumes it."""
        self._machine(name, "Suspend", timeout=timeout)

    def resume(self, name: str) -> None:
        self._machine(name, "Resume")

    def inject_nmi(self, name: str) -> None:
        self._machine(name, "InjectNMI")

    def drive_stats(self, name: str, drive_id: str) -> dict[str, int]:
        """rd_req, rd_bytes, wr_req, wr_bytes, flush, errors of one drive."""
        (stats,) = self._machine(name, "DriveStats", "s", (drive_id,))
        return {key: int(value) for key, value in stats.items()}

    def add_drive(self, name: str, path: str, options: dict[str, Any]) -> tuple[str, str]:
        drive_id, port = self._machine(name, "AddDrive", "sa{sv}", (path, variants(options, ADD_DRIVE_OPTIONS)))
        return drive_id, port

    def remove_drive(self, name: str, drive_id: str, timeout: float) -> None:
        options = {"timeout_usec": ("t", usec(timeout))}
        self._machine(name, "RemoveDriveEx", "sa{sv}", (drive_id, options), timeout + MARGIN)

    def snapshot_drive(self, name: str, drive_id: str, fd: int, fmt: str, timeout: float) -> None:
        """The drive as it is now copied into the open file `fd` (read-write), in `fmt` (raw or qcow2)."""
        options = variants({"format": fmt, "timeout_usec": round(timeout * 1_000_000)}, COPY_OPTIONS)
        self._machine(name, "SnapshotDrive", "sha{sv}", (drive_id, fd, options), timeout + MARGIN)

    def swap_drive(self, name: str, drive_id: str, path: str, fmt: str, timeout: float) -> None:
        """The drive's contents moved to `path` under the running guest, which keeps its disk."""
        options = variants({"format": fmt, "timeout_usec": round(timeout * 1_000_000)}, COPY_OPTIONS)
        self._machine(name, "SwapDrive", "ssa{sv}", (drive_id, path, options), timeout + MARGIN)

    # -- live migration (the stream is the caller's: a connected socket) --

    def migrate(self, name: str, stream: socket.socket, max_bandwidth: int, timeout: float) -> None:
        """The machine into `stream` (max_bandwidth bytes/s, 0 for QEMU's own);
        returns once it completed and the machine is gone here. `stream` is
        closed once the daemon has it."""
        options = {"timeout_usec": ("t", usec(timeout))} | (
            {"max_bandwidth": ("t", max_bandwidth)} if max_bandwidth else {}
        )
        with stream:
            self._machine(name, "Migrate", "ha{sv}", (stream.fileno(), options), timeout + MARGIN, stream)

    def incoming(self, name: str, stream: socket.socket, timeout: float) -> None:
        """The stream into a machine created with `incoming`; returns once it
        runs here. `stream` is closed once the daemon has it."""
        options = {"timeout_usec": ("t", usec(timeout))}
        with stream:
            self._machine(name, "Incoming", "ha{sv}", (stream.fileno(), options), timeout + MARGIN, stream)

    def cancel_migration(self, name: str) -> None:
        self._machine(name, "CancelMigration")

    def force_complete_migration(self, name: str) -> None:
        self._machine(name, "ForceCompleteMigration")

    # -- plumbing ---------------------------------------------------------

    def _machine(
        self,
        name: str,
        member: str,
        signature: str = "",
        body: tuple[Any, ...] = (),
        timeout: float | None = None,
        handed: socket.socket | None = None,
    ) -> tuple[Any, ...]:
        return self._call(object_path(name), MACHINE_IFACE, member, signature, body, timeout, handed)

    def _stream(self, name: str, member: str, signature: str = "", body: tuple[Any, ...] = ()) -> socket.socket:
        """A method's answer that is an fd: a stream of ours."""
        fd: FileDescriptor
        (fd,) = self._machine(name, member, signature, body)
        return socket.socket(fileno=fd.to_raw_fd())

    def _call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: tuple[Any, ...] = (),
        timeout: float | None = None,
        handed: socket.socket | None = None,
    ) -> tuple[Any, ...]:
        message = new_method_call(DBusAddress(path, BUS_NAME, interface), member, signature or None, body)
        with self._connection() as conn:
            if handed is None:
                reply = conn.send_and_get_reply(message, timeout=timeout or self.timeout)
            else:
                reply = self._hand_over(conn, message, handed, timeout or self.timeout)
        if reply.header.message_type is MessageType.error:
            error = reply.header.fields.get(4, "")  # HeaderFields.error_name
            text = reply.body[0] if reply.body else ""
            if error.startswith(ERROR_PREFIX):
                raise VmspawndError(error[len(ERROR_PREFIX) :], text)
            if error in NO_OBJECT and path != MANAGER_PATH:
                # No object at the path: the machine is not (or no longer) there.
                raise VmspawndError("NoSuchMachine", text)
            raise VmspawndError(error, text)
        return tuple(reply.body)

    @staticmethod
    def _hand_over(conn: DBusConnection, message: Message, stream: socket.socket, timeout: float) -> Message:
        """send_and_get_reply, with our copy of `stream` closed as soon as it
        is sent: QEMU then holds this host's only end, so its close (a cancel,
        a failure) ends the stream for the other side too."""
        deadline = time.monotonic() + timeout
        serial = next(conn.outgoing_serial)
        try:
            conn.send(message, serial=serial)
        finally:
            stream.close()
        while True:
            reply = conn.receive(timeout=max(0.0, deadline - time.monotonic()))
            if reply.header.fields.get(HeaderFields.reply_serial) == serial:
                return reply

    @contextmanager
    def _connection(self) -> Iterator[DBusConnection]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            try:
                # With fd passing: OpenGraphics and OpenConsole answer with one, SnapshotDrive, Migrate and
                # Incoming take one.
                conn = open_dbus_connection(self.address, enable_fds=True, auth_timeout=self.timeout)
            except OSError as e:
                raise Unreachable(f"cannot connect to the bus at {self.address}: {e}") from e
        try:
            yield conn
        except TimeoutError as e:
            # A late reply would be read by the next call: drop the connection.
            conn.close()
            raise Unreachable(f"vmspawnd on {self.address} did not answer in time") from e
        except (OSError, ConnectionError) as e:
            conn.close()
            raise Unreachable(f"lost the bus at {self.address}: {e}") from e
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
