"""The pure parts of the transient units (vmspawnd/units.py): names, properties, exit codes."""

from __future__ import annotations

import re
import signal

from dbus_fast import Variant
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.units import CLD_EXITED, exit_code, object_path, service_properties


def test_object_path_escapes_as_systemd_does() -> None:
    # systemd's own: `busctl call org.freedesktop.systemd1 ... GetUnit s vmspawnd-virtiofsd-vm.1-fs0.service`
    assert object_path("vmspawnd-virtiofsd-vm.1-fs0.service") == (
        "/org/freedesktop/systemd1/unit/vmspawnd_2dvirtiofsd_2dvm_2e1_2dfs0_2eservice"
    )
    assert object_path("") == "/org/freedesktop/systemd1/unit/_"


@given(st.text(min_size=1, max_size=80))
def test_object_path_is_a_valid_bus_path_and_one_to_one(unit: str) -> None:
    path = object_path(unit)
    assert re.fullmatch(r"(/[A-Za-z0-9_]+)+", path)
    assert object_path(unit + "x") != path


@given(st.integers(0, 255))
def test_exit_code_is_the_status_or_minus_the_signal(status: int) -> None:
    assert exit_code(CLD_EXITED, status) == status
    assert exit_code(2, signal.SIGKILL) == -signal.SIGKILL  # CLD_KILLED
    assert exit_code(3, signal.SIGSEGV) == -signal.SIGSEGV  # CLD_DUMPED


def test_service_properties_pass_only_the_given_fds_by_index() -> None:
    props, fds = service_properties("d", ["/usr/bin/tee", "-a", "/dev/stderr"], 7, None, 9, [("X", Variant("b", True))])
    named = {name: value for name, value in props}
    assert fds == [7, 9]
    assert named["StandardInputFileDescriptor"] == Variant("h", 0)
    assert named["StandardErrorFileDescriptor"] == Variant("h", 1)
    assert "StandardOutputFileDescriptor" not in named  # systemd's default: the journal
    assert named["ExecStart"] == Variant("a(sasb)", [["/usr/bin/tee", ["/usr/bin/tee", "-a", "/dev/stderr"], False]])
    assert named["Type"] == Variant("s", "exec")
    assert named["CollectMode"] == Variant("s", "inactive-or-failed")
    assert named["X"] == Variant("b", True)
