"""What the daemon does when QEMU stops a machine on its own (accel.on_stop),
pure: only KVM failing under an "auto" machine starts it again with TCG."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.accel import INTERNAL_ERROR, OnStop, falls_back_at_start, on_stop
from vmspawnd.model import Accel

# QEMU's RunState values (qapi/run-state.json) and anything else it may add.
RUNSTATES = st.sampled_from(
    ["debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch", "finish-migrate",
     "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog", "guest-panicked", "colo"]
) | st.text()  # fmt: skip
RUNNING_ACCEL = st.sampled_from(["kvm", "tcg", ""])


def test_kvm_failing_under_auto_falls_back() -> None:
    assert on_stop(Accel.AUTO, "kvm", INTERNAL_ERROR) is OnStop.FALL_BACK


def test_kvm_asked_for_is_not_replaced_but_reported() -> None:
    assert on_stop(Accel.KVM, "kvm", INTERNAL_ERROR) is OnStop.REPORT


def test_tcg_failing_is_reported_never_replaced() -> None:
    for asked in Accel:
        assert on_stop(asked, "tcg", INTERNAL_ERROR) is OnStop.REPORT


@given(st.sampled_from(list(Accel)), RUNNING_ACCEL, RUNSTATES.filter(lambda s: s != INTERNAL_ERROR))
def test_any_other_stop_is_left_alone(asked: Accel, running: str, runstate: str) -> None:
    # A Pause, a guest panic, an I/O error stop: the machine stays paused as QEMU left it.
    assert on_stop(asked, running, runstate) is OnStop.NOTHING


@given(st.sampled_from(list(Accel)), RUNNING_ACCEL, RUNSTATES)
def test_only_auto_under_kvm_ever_falls_back(asked: Accel, running: str, runstate: str) -> None:
    falls_back = on_stop(asked, running, runstate) is OnStop.FALL_BACK
    assert falls_back == (asked is Accel.AUTO and running == "kvm" and runstate == INTERNAL_ERROR)


@given(st.sampled_from(list(Accel)), RUNNING_ACCEL)
def test_an_internal_error_is_never_passed_over(asked: Accel, running: str) -> None:
    assert on_stop(asked, running, INTERNAL_ERROR) is not OnStop.NOTHING


def test_a_start_falls_back_on_qemus_kvm_words_only_for_auto() -> None:
    msr = "QEMU exited during start-up: qemu-system-x86_64: error: failed to set MSR 0x10a to 0x0"
    assert falls_back_at_start(Accel.AUTO, msr)
    assert falls_back_at_start(Accel.AUTO, "qemu-system-x86_64: Could not access KVM kernel module")
    assert not falls_back_at_start(Accel.KVM, msr)
    assert not falls_back_at_start(Accel.AUTO, "qemu-system-x86_64: -drive: Could not open image")
