"""A kept machine's next boot: pure, no I/O.

When a kept machine stops, the drives it had hotplugged become boot-time
drives of its next start, each on the spare port (and SCSI controller) it
had, with its id, serial and options: the guest finds them where it saw
them last, and they still unplug like any hotplugged drive.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from .model import Drive, DriveState, MachineSpec, PluggedDrive
from .topology import drive_id


def boot_ids(spec: MachineSpec) -> frozenset[str]:
    """The ids of the drives the spec itself boots with on builtin ports."""
    return frozenset(drive_id(i) for i in range(len(spec.boot_drives)))


def fold(spec: MachineSpec, drives: Iterable[Drive]) -> MachineSpec:
    """`spec` with every drive on a spare port (`drives`: what the machine
    had when it stopped) planned onto that port at the next boot. A drive
    being removed is left out: its unplug was asked for, and so is an
    ejected cdrom: it has no file to open at the next boot."""
    builtin = boot_ids(spec)
    plugged = tuple(
        PluggedDrive(d.id, d.drive_spec(), d.port, d.controller)
        for d in drives
        if d.id not in builtin and d.state is DriveState.ATTACHED and d.path
    )
    return replace(spec, plugged=plugged)


def plugged_drive(p: PluggedDrive) -> Drive:
    """The Drive record of a drive planned onto its spare port at boot (its
    fdsets come with the start that passes its files)."""
    d = p.drive
    return Drive(
        p.id, str(d.path), d.disk_type, p.port, controller=p.controller, format=d.format, read_only=d.read_only,
        serial=d.serial,
    )  # fmt: skip
