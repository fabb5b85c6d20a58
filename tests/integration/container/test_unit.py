"""vmspawnd.service under a real systemd: PID 1, dbus, journald, machined in a container.

Everything is the installed thing: the unit from `make install`, /usr/bin/vmspawnd,
the bus activation file, the policy. Commands run inside the container with
nsenter; the test's own D-Bus client talks to the container's system bus
through the leader's root. QEMU boots the tiny guest under TCG.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Client

from .conftest import tinyguest, tool
from .support import UNIT, boot, console, journal, show, show_machine, wait_until


def test_installed_unit_verifies_clean(container: tool.Container) -> None:
    result = container.run(["systemd-analyze", "verify", "--man=no", UNIT], check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_running_unit_exposure_stays_low(container: tool.Container) -> None:
    """The loaded unit, as systemd itself sees it (not an offline parse), is as hardened as documented."""
    container.run(["systemctl", "start", UNIT])
    result = container.run(["systemd-analyze", "security", "--no-pager", UNIT])
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout[-2000:]
    # docs/system-service.md: 3.0 (3.6 while virtiofsd's user namespace and chroot were the unit's;
    # virtiofsd is a transient service of its own now).
    assert float(match.group(1)) <= 3.1, result.stdout


def test_bus_activation_starts_the_unit(container: tool.Container) -> None:
    container.run(["systemctl", "stop", UNIT])
    assert show(container, UNIT, "ActiveState")["ActiveState"] == "inactive"
    get = ["Get", "ss", "org.vmspawnd1.Manager", "Version"]
    result = container.run(
        ["busctl", "call", "org.vmspawnd1", "/org/vmspawnd1", "org.freedesktop.DBus.Properties", *get]
    )
    assert result.stdout.startswith('v s "')
    assert show(container, UNIT, "ActiveState")["ActiveState"] == "active"


def test_start_reports_ready_and_status(container: tool.Container) -> None:
    container.run(["systemctl", "stop", UNIT])
    # Type=notify: `systemctl start` returns once the daemon sent READY=1.
    container.run(["systemctl", "start", UNIT])
    state = show(container, UNIT, "Type", "ActiveState", "SubState", "StatusText", "MainPID", "ExecMainStatus")
    assert state["Type"] == "notify"
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert state["StatusText"] == "0 machines running"
    assert container.run(["readlink", f"/proc/{state['MainPID']}/exe"]).stdout.strip().startswith("/usr/bin/python3")


async def test_machine_shows_in_machinectl_with_its_leader(
    container: tool.Container, client: Client, guest: tinyguest.Guest
) -> None:
    path = await boot(container, client, guest, "mdvm")
    leader = await client.prop(path, "Leader")
    listed = container.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout
    assert [line.split()[:2] for line in listed.splitlines()] == [["mdvm", "vm"]]
    shown = show_machine(container, "mdvm")
    assert (shown["Class"], shown["Leader"], shown["Service"]) == ("vm", str(leader), "vmspawnd")
    await client.call("TerminateMachine", "s", ["mdvm"])
    assert container.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout.strip() == ""


async def test_journal_has_the_machines_lines(
    container: tool.Container, client: Client, guest: tinyguest.Guest
) -> None:
    await boot(container, client, guest, "jvm")
    await client.call("TerminateMachine", "s", ["jvm"])
    lines = journal(container, "MACHINE=jvm").splitlines()
    assert lines and all("jvm" in line for line in lines), lines
    other = journal(container, "MACHINE=nosuchvm")
    assert other.strip() in ("", "-- No entries --")


async def test_qemus_stderr_is_in_the_journal_and_qemu_log_across_a_restart(
    container: tool.Container, client: Client, guest: tinyguest.Guest
) -> None:
    """`-d cpu_reset` makes QEMU write each vCPU reset to its stderr: at start, and again at a
    Reboot after the daemon restarted (what copies stderr is not the daemon: qemulog.py)."""
    path = await boot(container, client, guest, "qlvm", qemu_extra=["-d", "cpu_reset"])
    qemu_log = console(container, str(Path(await client.prop(path, "ConsoleLog")).with_name("qemu.log")))

    def resets() -> int:
        logged = journal(container, "MACHINE=qlvm", "SYSLOG_IDENTIFIER=qemu-system-x86_64")
        return logged.count("CPU Reset")

    wait_until("QEMU's reset lines in the journal", lambda: resets() > 0)
    before = resets()
    container.run(["systemctl", "restart", UNIT])
    await client.call("Reboot", "", [], path=path, interface="org.vmspawnd1.Machine")
    wait_until("the reset after the restart in the journal", lambda: resets() > before)
    wait_until("the same lines in qemu.log", lambda: qemu_log.read_text().count("CPU Reset") >= resets())
    assert show(container, "vmspawnd-qemulog-qlvm.service", "ActiveState")["ActiveState"] == "active"
    await client.call("TerminateMachine", "s", ["qlvm"])
    wait_until(
        "the copy's end with QEMU's",
        lambda: show(container, "vmspawnd-qemulog-qlvm.service", "LoadState")["LoadState"] == "not-found",
    )


async def test_stop_with_stop_machines_on_exit_powers_them_off(
    container: tool.Container, client: Client, guest: tinyguest.Guest, dropin: Callable[[str, str], None]
) -> None:
    dropin("stop-machines", "ExecStart=\nExecStart=/usr/bin/vmspawnd --stop-machines-on-exit --stop-timeout 20")
    for name in ("svm1", "svm2"):
        await boot(container, client, guest, name)
    container.run(["systemctl", "stop", UNIT], timeout=90)
    assert container.run(["pgrep", "-c", "qemu-system"], check=False).stdout.strip() == "0"
    assert container.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout.strip() == ""
    logged = journal(container, "MACHINE=svm1")
    assert "exited unexpectedly" not in logged
    container.run(["systemctl", "start", UNIT])


async def test_poweroff_after_a_restart_is_a_clean_stop(
    container: tool.Container, client: Client, guest: tinyguest.Guest
) -> None:
    path = await boot(container, client, guest, "pvm")
    container.run(["systemctl", "restart", UNIT])
    await client.subscribe("org.freedesktop.DBus.Properties")
    states: list[str] = []

    def on_message(message: object) -> None:
        body = getattr(message, "body", None)
        if getattr(message, "path", "") == path and body and body[0] == "org.vmspawnd1.Machine" and "State" in body[1]:
            states.append(body[1]["State"].value)

    client.bus.add_message_handler(on_message)  # type: ignore[arg-type]
    await client.call("PowerOff", "t", [20_000_000], path=path, interface="org.vmspawnd1.Machine")
    assert await client.names() == []
    assert "failed" not in states, states
    logged = journal(container, "MACHINE=pvm")
    assert "exited unexpectedly" not in logged, logged


# vmspawnd/cgroup.py (a transient vmspawnd-<name>.scope per machine) is another change's;
# until it is in, machines sit in vmspawnd.service's own cgroup and these fail.
SCOPES = pytest.mark.xfail(
    importlib.util.find_spec("vmspawnd.cgroup") is None, reason="no per-machine scope yet (vmspawnd/cgroup.py)",
    strict=False,
)  # fmt: skip
LIMITS = "[limits]\nmemory_overhead_mib = 96\ntasks_base = 40\ntasks_per_cpu = 6\n"


@pytest.fixture
def limits_config(container: tool.Container) -> Iterator[None]:
    config = container.path("/etc/vmspawnd/vmspawnd.conf")
    config.parent.mkdir(exist_ok=True)
    config.write_text(LIMITS)
    container.run(["systemctl", "restart", UNIT])
    yield
    config.unlink()
    container.run(["systemctl", "restart", UNIT])


def scope_of(box: tool.Container, pid: int) -> str:
    """The .scope unit a process inside the container is in ("" if none)."""
    cgroups = box.run(["cat", f"/proc/{pid}/cgroup"]).stdout
    found = re.search(r"/([^/\s]+\.scope)$", cgroups, re.MULTILINE)
    return found.group(1) if found else ""


@SCOPES
async def test_each_machine_runs_in_its_own_scope_with_its_limits(
    container: tool.Container, client: Client, guest: tinyguest.Guest, limits_config: None
) -> None:
    sizes = {"sca": (128 << 20, 1), "scb": (160 << 20, 2)}
    paths = {name: await boot(container, client, guest, name, memory=m, cpus=c) for name, (m, c) in sizes.items()}
    for name, (memory, cpus) in sizes.items():
        leader = await client.prop(paths[name], "Leader")
        assert scope_of(container, leader) == f"vmspawnd-{name}.scope"
        scope = show(container, f"vmspawnd-{name}.scope", "ActiveState", "MemoryMax", "TasksMax")
        assert scope == {
            "ActiveState": "active", "MemoryMax": str(memory + (96 << 20)), "TasksMax": str(40 + 6 * cpus),
        }  # fmt: skip
        assert show_machine(container, name)["Unit"] == f"vmspawnd-{name}.scope"
    await client.call("TerminateMachine", "s", ["sca"])
    assert show(container, "vmspawnd-sca.scope", "ActiveState")["ActiveState"] in ("inactive", "")
    assert show(container, "vmspawnd-scb.scope", "ActiveState")["ActiveState"] == "active"


@SCOPES
async def test_machinectl_terminate_ends_only_that_machine(
    container: tool.Container, client: Client, guest: tinyguest.Guest
) -> None:
    """machined stops the unit a machine was registered in: its scope, never vmspawnd.service."""
    await boot(container, client, guest, "tvm")
    before = show(container, UNIT, "MainPID")
    container.run(["machinectl", "terminate", "tvm"])
    wait_until("the machine's end", lambda: "tvm" not in container.run(["machinectl", "list", "--no-legend"]).stdout)
    assert show(container, UNIT, "MainPID", "ActiveState") == {"MainPID": before["MainPID"], "ActiveState": "active"}
    deadline = time.monotonic() + 30
    while "tvm" in await client.names():
        assert time.monotonic() < deadline, "vmspawnd still lists the machine machined terminated"
        await asyncio.sleep(0.1)
    logged = journal(container, "MACHINE=tvm")
    assert "exited unexpectedly" not in logged, logged
