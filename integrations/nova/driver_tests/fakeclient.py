"""An in-memory vmspawnd with client.Client's methods, for Nova's conformance suite.

It keeps the daemon's documented rules (DESIGN §2) that the driver relies on:
names are unique, a kept machine stays stopped after PowerOff and Start
boots it with its drives, Suspend of a kept machine leaves it suspended
and Start resumes it, drives take spare ports, errors carry the daemon's
names. A live migration goes over the real socket the driver hands in: the
source's fake writes the guest's run state into it and its machine is gone,
the destination's reads it to the stream's end (none: the migration failed
and the machine is removed, as the daemon removes it). Tests of the driver
against the real daemon live in tests/integration.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nova.virt.vmspawnd.client import VmspawndError

# What each kind of stream says first, and how it answers what it is sent.
RFB_GREETING = b"RFB 003.008\n"
# A SpiceLinkReply header: magic, version 2.2, and a reply of 4 bytes (error 0, SPICE_LINK_ERR_OK).
SPICE_REPLY = b"REDQ" + struct.pack("<IIII", 2, 2, 4, 0)
SERIAL_GREETING = b"fake guest console\r\n/ # "


def spice_answer(data: bytes) -> bytes:
    return SPICE_REPLY if data.startswith(b"REDQ") else b""


STREAMS: dict[str, tuple[bytes, Callable[[bytes], bytes]]] = {
    "vnc": (RFB_GREETING, lambda data: b""),
    "spice": (b"", spice_answer),
    # The guest's shell echoes what it is typed.
    "serial": (SERIAL_GREETING, lambda data: data),
}


@dataclass
class FakeMachine:
    options: dict[str, Any]
    state: str = "running"
    drives: dict[str, str] = field(default_factory=dict)
    # The spare port of each hotplugged drive.
    ports: dict[str, str] = field(default_factory=dict)
    console: str = ""
    # What the guest agent set, by user.
    passwords: dict[str, str] = field(default_factory=dict)
    # NMIs injected (InjectNMI).
    nmis: int = 0
    # Boot drives SwapDrive moved, by id: their new files.
    moved: dict[str, str] = field(default_factory=dict)


class FakeClient:
    def __init__(self, address: str = "SYSTEM", timeout: float = 0) -> None:
        self.address = address
        self.machines: dict[str, FakeMachine] = {}
        self._dir = tempfile.mkdtemp(prefix="fake-vmspawnd-")
        # The far ends of the streams handed out, each served by its thread.
        self._streams: list[tuple[threading.Thread, socket.socket]] = []

    def _get(self, name: str) -> FakeMachine:
        if name not in self.machines:
            raise VmspawndError("NoSuchMachine", f"no machine {name!r}")
        return self.machines[name]

    def list_machines(self) -> list[tuple[str, str]]:
        return [(name, m.state) for name, m in self.machines.items()]

    def manager_property(self, name: str) -> Any:
        return {"Version": "0.1.0", "Machines": len(self.machines)}[name]

    def create(self, name: str, options: dict[str, Any], timeout: float | None = None) -> None:
        if name in self.machines:
            raise VmspawndError("MachineExists", f"a machine named {name!r} exists")
        if "kernel" not in options and "image" not in options:
            raise VmspawndError("InvalidArgument", "no boot source")
        console = os.path.join(self._dir, f"{name}.log")
        with open(console, "w") as f:
            f.write("fake guest booted\n")
        m = FakeMachine(dict(options), console=console)
        if options.get("incoming"):
            m.state = "incoming"
        for plugged in options.get("plugged", []):
            m.drives[plugged["id"]] = plugged["path"]
            m.ports[plugged["id"]] = plugged["port"]
        self.machines[name] = m

    def terminate(self, name: str) -> None:
        self._get(name)
        del self.machines[name]

    @staticmethod
    def _boot_drives(options: dict[str, Any]) -> dict[str, str]:
        """The drives a machine boots with, by the daemon's ids: the image disk0, then `drives`."""
        paths = ([options["image"]] if "image" in options else []) + [d["path"] for d in options.get("drives", [])]
        return {f"disk{i}": path for i, path in enumerate(paths)}

    def properties(self, name: str) -> dict[str, Any]:
        m = self._get(name)
        spares = m.options.get("hotplug_spares", 0)
        drives = self._boot_drives(m.options) | m.moved | m.drives
        return {
            "Name": name,
            "State": m.state,
            "Leader": 0 if m.state in ("stopped", "suspended") else 4242,
            "Drives": [{"id": i, "path": p, "disk_type": "virtio-blk", "port": m.ports.get(i, ""),
                        "state": "attached"} for i, p in drives.items()],
            "Ports": [{"id": f"spare{i}", "role": "spare"} for i in range(spares)],
            "FreeSparePorts": spares - len(m.drives),
            "ConsoleLog": m.console,
            "Graphics": m.options.get("graphics", "none"),
        }  # fmt: skip

    def _running(self, name: str) -> FakeMachine:
        m = self._get(name)
        if m.state not in ("running", "paused"):
            raise VmspawndError("NotRunning", f"machine {name!r} is {m.state}")
        return m

    def start(self, name: str, timeout: float | None = None) -> None:
        m = self._get(name)
        if m.state not in ("stopped", "suspended"):
            raise VmspawndError("AlreadyRunning", f"machine {name!r} is {m.state}, not stopped")
        m.state = "running"

    def suspend(self, name: str, timeout: float | None = None) -> None:
        m = self._running(name)
        if not m.options.get("keep"):
            raise VmspawndError("Unsupported", f"machine {name!r} was not created with keep")
        m.state = "suspended"

    def power_off(self, name: str, timeout: float) -> None:
        m = self._running(name)
        if m.options.get("keep"):
            m.state = "stopped"
        else:
            del self.machines[name]

    def reboot(self, name: str) -> None:
        self._running(name)

    def set_user_password(self, name: str, user: str, password: str) -> None:
        m = self._running(name)
        if not m.options.get("guest_agent"):
            raise VmspawndError("AgentUnavailable", f"machine {name!r} was created without guest_agent")
        if m.state == "paused":
            raise VmspawndError("AgentUnavailable", f"machine {name!r} is paused")
        m.passwords[user] = password

    def pause(self, name: str) -> None:
        self._running(name).state = "paused"

    def resume(self, name: str) -> None:
        self._running(name).state = "running"

    def inject_nmi(self, name: str) -> None:
        self._running(name).nmis += 1

    def drive_stats(self, name: str, drive_id: str) -> dict[str, int]:
        m = self._running(name)
        if drive_id not in m.drives:
            raise VmspawndError("NoSuchDrive", f"machine {name} has no drive {drive_id!r}")
        # QEMU counts from the plug; nothing reads an in-memory drive.
        return dict.fromkeys(("rd_req", "rd_bytes", "wr_req", "wr_bytes", "flush", "errors"), 0)

    def add_drive(self, name: str, path: str, options: dict[str, Any]) -> tuple[str, str]:
        m = self._get(name)
        drive_id = options.get("id") or f"drive{len(m.drives)}"
        if drive_id in m.drives:
            raise VmspawndError("InvalidArgument", f"drive id {drive_id!r} is taken")
        spares = m.options.get("hotplug_spares", 0)
        free = [f"spare{i}" for i in range(spares) if f"spare{i}" not in m.ports.values()]
        if not free:
            raise VmspawndError("NoFreePort", "all spare ports are taken")
        m.drives[drive_id] = path
        m.ports[drive_id] = free[0]
        return drive_id, free[0]

    def remove_drive(self, name: str, drive_id: str, timeout: float) -> None:
        m = self._get(name)
        if drive_id not in m.drives:
            raise VmspawndError("NoSuchDrive", f"no drive {drive_id!r}")
        del m.drives[drive_id]
        del m.ports[drive_id]

    def migrate(self, name: str, stream: socket.socket, max_bandwidth: int, timeout: float) -> None:
        m = self._running(name)
        with stream:
            stream.settimeout(timeout)
            try:
                stream.sendall(m.state.encode())
            except OSError as e:
                raise VmspawndError(
                    "MigrationFailed", f"the migration of {name} failed: {e}; the guest runs on here"
                ) from e
        del self.machines[name]

    def incoming(self, name: str, stream: socket.socket, timeout: float) -> None:
        m = self._get(name)
        if m.state != "incoming":
            raise VmspawndError(
                "NotRunning", f"machine {name!r} is {m.state}: only one created with 'incoming' takes one"
            )
        with stream:
            stream.settimeout(timeout)
            received = b"".join(iter(lambda: stream.recv(4096), b""))
        if received.decode() not in ("running", "paused"):
            del self.machines[name]
            raise VmspawndError("MigrationFailed", f"the incoming migration of {name} failed; the machine is removed")
        m.state = received.decode()

    def _migrating(self, name: str, method: str) -> None:
        # Migrate returns only once the migration ended: none is ever seen in progress.
        self._running(name)
        raise VmspawndError("NotMigrating", f"machine {name} is not migrating; {method} needs a Migrate in progress")

    def cancel_migration(self, name: str) -> None:
        self._migrating(name, "CancelMigration")

    def force_complete_migration(self, name: str) -> None:
        self._migrating(name, "ForceCompleteMigration")

    def open_graphics(self, name: str) -> socket.socket:
        m = self._running(name)
        graphics = m.options.get("graphics", "none")
        if graphics == "none":
            raise VmspawndError("NoGraphics", f"machine {name!r} was created without graphics")
        return self._stream(graphics)

    def open_console(self, name: str) -> socket.socket:
        self._running(name)
        return self._stream("serial")

    def _stream(self, kind: str) -> socket.socket:
        """One end of a socketpair; a thread answers on the other as the daemon's stream would."""
        ours, theirs = socket.socketpair()
        greeting, answer = STREAMS[kind]

        def serve() -> None:
            try:
                theirs.sendall(greeting)
                while data := theirs.recv(65536):
                    theirs.sendall(answer(data))
            except OSError:
                pass  # the other end went away: so does this one
            finally:
                theirs.close()

        thread = threading.Thread(target=serve, name=f"fake {kind} stream", daemon=True)
        self._streams.append((thread, theirs))
        thread.start()
        return ours

    def _copy_source(self, name: str, drive_id: str, fmt: str) -> tuple[FakeMachine, str]:
        """The drive a copy (SnapshotDrive, SwapDrive) runs on, refused as the daemon refuses."""
        m = self._running(name)
        drives = self._boot_drives(m.options) | m.moved | m.drives
        if drive_id not in drives:
            raise VmspawndError("NoSuchDrive", f"machine {name} has no drive {drive_id!r}; see its Drives property")
        if fmt not in ("raw", "qcow2"):
            raise VmspawndError("InvalidArgument", f"unknown format {fmt!r}; use one of: raw, qcow2")
        return m, drives[drive_id]

    def snapshot_drive(self, name: str, drive_id: str, fd: int, fmt: str, timeout: float) -> None:
        """The drive's bytes into `fd` (a fake drive's file as it is, whatever `fmt`)."""
        _, path = self._copy_source(name, drive_id, fmt)
        if os.fstat(fd).st_mode & 0o170000 != 0o100000:
            raise VmspawndError("InvalidArgument", "SnapshotDrive writes into a regular file or a block device")
        os.ftruncate(fd, 0)
        if os.path.exists(path):
            with open(path, "rb") as source:
                os.pwrite(fd, source.read(), 0)

    def swap_drive(self, name: str, drive_id: str, path: str, fmt: str, timeout: float) -> None:
        m, _ = self._copy_source(name, drive_id, fmt)
        if not path.startswith("/"):
            raise VmspawndError("InvalidArgument", f"path {path!r} must be an absolute path")
        if not os.path.exists(path):
            raise VmspawndError("InvalidArgument", f"cannot open drive {path!r}: it does not exist")
        if drive_id in m.drives:
            m.drives[drive_id] = path
        else:
            m.moved[drive_id] = path

    def close(self) -> None:
        """End the streams still served and wait for their threads."""
        streams, self._streams = self._streams, []
        for thread, sock in streams:
            if thread.is_alive():
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            thread.join(10)
