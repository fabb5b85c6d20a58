"""QEMU's stderr: qemu.log, and the journal too where systemd is PID 1.

QEMU outlives the daemon, so whatever copies its stderr must too: a pipe the
daemon read would die with it. So, as libvirt's virtlogd does for its QEMUs,
a small process of its own holds the pipe: a transient service per machine,
`vmspawnd-qemulog-<name>.service`, running `tee -a /dev/stderr` with the
pipe as stdin, qemu.log as stderr and the journal as stdout. systemd tags
its journal lines `MACHINE=<name>` (LogExtraFields=, as the daemon's own lines
for the machine are) and `SYSLOG_IDENTIFIER=qemu-system-x86_64`, so
`journalctl MACHINE=vm1` shows QEMU's words with the daemon's and
`journalctl -t qemu-system-x86_64` every QEMU's. It ends when QEMU's end of
the pipe closes, that is when QEMU has gone. Without systemd QEMU writes
qemu.log itself, as before.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dbus_fast import Variant

from . import cmdline
from .process import open_log
from .units import SANDBOX, Service, Systemd

TEE = "tee"
# tee reads a pipe and writes a file it was handed and the journal: no
# capability, no namespace, besides the common sandbox.
HARDENING: tuple[tuple[str, Variant], ...] = (
    *SANDBOX,
    ("CapabilityBoundingSet", Variant("t", 0)),
    ("RestrictNamespaces", Variant("t", 0)),
)


def unit_name(machine: str) -> str:
    return f"vmspawnd-qemulog-{machine}.service"


def tee_properties(machine: str) -> tuple[tuple[str, Variant], ...]:
    return (
        ("SyslogIdentifier", Variant("s", cmdline.QEMU)),
        ("LogExtraFields", Variant("aay", [f"MACHINE={machine}".encode()])),
        *HARDENING,
    )


@dataclass
class QemuLog:
    """QEMU's stdout and stderr (`fd`, the caller's to close once QEMU has it)
    and the service copying them, if any."""

    fd: int
    service: Service | None

    async def finished(self, timeout: float) -> None:
        """Once QEMU has gone: every line it wrote is in qemu.log."""
        if self.service is not None:
            await self.service.wait(timeout)


async def open_qemu_log(systemd: Systemd | None, machine: str, log: Path) -> QemuLog:
    """Where QEMU's stdout and stderr go (see the module docstring)."""
    if systemd is None:
        return QemuLog(open_log(log), None)
    read, write = os.pipe2(os.O_CLOEXEC)
    out = open_log(log)
    try:
        service = await systemd.start_service(
            unit_name(machine), f"QEMU's stderr of vmspawnd machine {machine}, to qemu.log and the journal",
            [shutil.which(TEE) or f"/usr/bin/{TEE}", "-a", "/dev/stderr"], read, None, out, tee_properties(machine),
        )  # fmt: skip
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
        os.close(out)
    return QemuLog(write, service)
