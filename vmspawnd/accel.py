"""accel=auto where KVM fails: pure, no I/O.

A host may have /dev/kvm that QEMU opens and still cannot use: a nested
KVM aborts QEMU at the first vCPU reset, or lets the guest run until an
instruction it cannot emulate, when QEMU stops the VM in runstate
internal-error. "auto" means KVM where it works, so either way the machine
starts (again) with TCG; "kvm" asked for explicitly is never replaced.
"""

from __future__ import annotations

import enum
import re

from .model import Accel

# QEMU's words when KVM is there but unusable at start (its own errors name
# KVM; a failed MSR write aborts in kvm.c).
KVM_FAILED = re.compile(r"kvm|MSR", re.IGNORECASE)
# The RunState QEMU stops a VM in when KVM (or TCG) cannot go on with the guest.
INTERNAL_ERROR = "internal-error"


class OnStop(enum.Enum):
    # Paused as anyone may pause it (Pause, a guest panic, an I/O error).
    NOTHING = "nothing"
    # KVM failed under an "auto" machine: start it again with TCG.
    FALL_BACK = "fall back"
    # The accelerator failed and nothing replaces it: it stays paused, said loudly.
    REPORT = "report"


def falls_back_at_start(asked: Accel, qemu_error: str) -> bool:
    """A start that failed with `qemu_error` is tried again with TCG."""
    return asked is Accel.AUTO and KVM_FAILED.search(qemu_error) is not None


def on_stop(asked: Accel, running: str, runstate: str) -> OnStop:
    """QEMU stopped a machine that asked for `asked` and runs with `running`
    ("kvm", "tcg", "" while unknown); query-status says `runstate`."""
    if runstate != INTERNAL_ERROR:
        return OnStop.NOTHING
    return OnStop.FALL_BACK if asked is Accel.AUTO and running == "kvm" else OnStop.REPORT
