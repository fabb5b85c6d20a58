"""A kept machine's next boot: pure, no I/O.

When a kept machine stops, the drives it had hotplugged become boot-time
drives of its next start, each on the spare port (and SCSI controller) it
had, with its id, serial and options: the guest finds them where it saw
them last, and they still unplug like any hotplugged drive.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

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
    drives = list(drives)
    plugged = tuple(
        PluggedDrive(d.id, d.drive_spec(), d.port, d.controller)
        for d in drives
        if d.id not in builtin and d.state is DriveState.ATTACHED and d.path
    )
    # A boot drive SwapDrive moved boots from its new file (an ejected cdrom keeps the spec's medium).
    moved = {d.id: d for d in drives if d.id in builtin and d.path}
    boot = tuple(
        replace(b, path=Path(moved[dev].path), format=moved[dev].format) if (dev := drive_id(i)) in moved else b
        for i, b in enumerate(spec.boot_drives)
    )
    image, extra = (boot[0], boot[1:]) if spec.image is not None else (None, boot)
    return replace(spec, image=image, drives=extra, plugged=plugged)


def plugged_drive(p: PluggedDrive) -> Drive:
    """The Drive record of a drive planned onto its spare port at boot (its
    fdsets come with the start that passes its files)."""
    d = p.drive
    return Drive(
        p.id, str(d.path), d.disk_type, p.port, controller=p.controller, format=d.format, read_only=d.read_only,
        serial=d.serial,
    )  # fmt: skip
