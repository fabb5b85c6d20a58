"""host_power_action against a real systemd-logind.

The host is a container with systemd as PID 1 (tools/container.py, as the
unit's tests use), and the driver's logind bus is the container's system
bus: a reboot must make its systemd reboot (nspawn exits 133), a shutdown
power it off (exit 0), and logind's refusal (a caller polkit does not allow)
must reach Nova as an error, the host still up.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jeepney
import pytest

from nova import exception
from nova.virt import fake
from nova.virt.vmspawnd import VmspawndDriver, hostpower

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "tools"))
import container as tool  # noqa: E402

# nspawn's exit status when the container's systemd reboots (man systemd-nspawn).
REBOOTED = 133


@pytest.fixture
def host() -> Iterator[tool.Container]:
    if reason := tool.unavailable():
        pytest.skip(f"no systemd-nspawn container here: {reason}")
    with tool.booted() as box:
        yield box


def refused_as_nobody(host: tool.Container) -> subprocess.CompletedProcess[str]:
    """A reboot asked by an account polkit gives no power action. It runs in
    the container (a uid other than root cannot reach its bus from the host):
    hostpower and jeepney, both pure Python, copied in."""
    probe = host.path("/srv/hostpower-probe")
    shutil.copytree(Path(jeepney.__file__).parent, probe / "jeepney")
    shutil.copy(hostpower.__file__, probe / "hostpower.py")
    script = (
        "import sys; sys.path.insert(0, '/srv/hostpower-probe'); import hostpower\n"
        "try: hostpower.power_action('SYSTEM', 'reboot', 30)\n"
        "except hostpower.HostPowerError as e: print(e.name); sys.exit(3)\n"
    )
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "python3", "-c", script]
    return host.run(argv, check=False)


def test_logind_refuses_nobody_then_the_driver_reboots_the_host(nova_conf: Any, host: tool.Container) -> None:
    refused = refused_as_nobody(host)
    assert refused.returncode == 3, refused.stderr
    assert refused.stdout.strip() == "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
    assert host.run(["systemctl", "is-system-running"], check=False).stdout.strip() == "running"
    nova_conf.set_override("login1_bus_address", host.bus_address, group="vmspawnd")
    assert VmspawndDriver(fake.FakeVirtAPI()).host_power_action("reboot") == "reboot"
    assert host.proc is not None
    assert host.proc.wait(60) == REBOOTED


def test_a_shutdown_powers_the_host_off(nova_conf: Any, host: tool.Container) -> None:
    nova_conf.set_override("login1_bus_address", host.bus_address, group="vmspawnd")
    assert VmspawndDriver(fake.FakeVirtAPI()).host_power_action("shutdown") == "shutdown"
    assert host.proc is not None
    assert host.proc.wait(60) == 0


def test_startup_is_not_something_a_running_host_does(nova_conf: Any) -> None:
    with pytest.raises(NotImplementedError, match="BMC"):
        VmspawndDriver(fake.FakeVirtAPI()).host_power_action("startup")


def test_an_unreachable_logind_is_a_nova_error(nova_conf: Any) -> None:
    nova_conf.set_override("login1_bus_address", "unix:path=/nonexistent/bus", group="vmspawnd")
    with pytest.raises(exception.NovaException, match="cannot reboot host"):
        VmspawndDriver(fake.FakeVirtAPI()).host_power_action("reboot")
