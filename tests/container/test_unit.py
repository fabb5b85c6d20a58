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

from tests.integration.harness import Client, guest_options, wait_console

from .conftest import tinyguest, tool

UNIT = "vmspawnd.service"
DROPINS = "/run/systemd/system/vmspawnd.service.d"
DRIVES = "/var/lib/vmspawnd-test"


def show(box: tool.Container, unit: str, *props: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    """Poll systemd's view of the world (nothing signals a restart to an outside client)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.1)


def restarted(box: tool.Container, before: dict[str, str]) -> Callable[[], bool]:
    def check() -> bool:
        now = show(box, UNIT, "MainPID", "ActiveState", "NRestarts")
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])

    return check


def console(box: tool.Container, path: str) -> Path:
    return Path(f"/proc/{box.leader}/root{path}")


async def boot(box: tool.Container, client: Client, guest: tinyguest.Guest, name: str, **extra: object) -> str:
    path = await client.create(name, **guest_options(guest, **({"memory": 128 << 20} | extra)))
    await wait_console(console(box, await client.prop(path, "ConsoleLog")), r"VMSPAWN-GUEST-READY", timeout=60)
    return path


def drive_file(box: tool.Container, name: str) -> str:
    target = box.path(f"{DRIVES}/{name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"\0" * (1 << 20))
    return f"{DRIVES}/{name}"


@pytest.fixture
def dropin(container: tool.Container) -> Iterator[Callable[[str, str], None]]:
    """Runtime drop-ins for vmspawnd.service, removed (and the daemon restarted plain) after the test."""
    written: list[Path] = []

    def write(name: str, text: str) -> None:
        # /run is the container's own tmpfs: write through the leader's root.
        path = Path(f"/proc/{container.leader}/root{DROPINS}/{name}.conf")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"[Service]\n{text}\n")
        written.append(path)
        container.run(["systemctl", "daemon-reload"])
        container.run(["systemctl", "restart", UNIT])

    yield write
    for path in written:
        path.unlink()
    container.run(["systemctl", "daemon-reload"])
    container.run(["systemctl", "restart", UNIT])


def test_installed_unit_verifies_clean(container: tool.Container) -> None:
    result = container.run(["systemd-analyze", "verify", "--man=no", UNIT], check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


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


def show_machine(box: tool.Container, name: str) -> dict[str, str]:
    out = box.run(["machinectl", "show", name]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


async def test_journal_has_the_machines_lines(
    container: tool.Container, client: Client, guest: tinyguest.Guest
) -> None:
    await boot(container, client, guest, "jvm")
    await client.call("TerminateMachine", "s", ["jvm"])
    lines = container.run(["journalctl", "--no-pager", "-o", "cat", "MACHINE=jvm"]).stdout.splitlines()
    assert lines and all("jvm" in line for line in lines), lines
    other = container.run(["journalctl", "--no-pager", "-o", "cat", "MACHINE=nosuchvm"]).stdout
    assert other.strip() in ("", "-- No entries --")


async def keeps_machines_across(container: tool.Container, client: Client, guest: tinyguest.Guest,
                                restart: Callable[[], None]) -> None:  # fmt: skip
    """Two running machines, one with a hotplugged drive, survive `restart` whole."""
    one = await boot(container, client, guest, "rvm1")
    two = await boot(container, client, guest, "rvm2")
    drive_id, port = await client.add_drive(two, drive_file(container, "hot.raw"), serial="hot1")
    log = console(container, await client.prop(two, "ConsoleLog"))
    await wait_console(log, r"VMSPAWN-BLOCK-ADD \S+ serial=hot1")
    leaders = [await client.prop(p, "Leader") for p in (one, two)]
    restart()
    # The client's connection is to the bus, which stays: the new daemon answers on it.
    assert sorted(await client.names()) == ["rvm1", "rvm2"]
    for path, leader in zip((one, two), leaders, strict=True):
        assert await client.prop(path, "State") == "running"
        assert await client.prop(path, "Leader") == leader
    drives = await client.prop(two, "Drives")
    assert [(d["id"], d["port"]) for d in drives if d["id"] == drive_id] == [(drive_id, port)]
    # The guest is unaffected and the new daemon drives it: the drive unplugs for real.
    assert "VMSPAWN-BLOCK-REMOVE" not in log.read_text()
    await client.remove_drive(two, drive_id)
    await wait_console(log, r"VMSPAWN-BLOCK-REMOVE")
    assert show(container, UNIT, "StatusText")["StatusText"] == "2 machines running"


async def test_restart_keeps_running_machines(
    container: tool.Container, client: Client, guest: tinyguest.Guest
) -> None:
    before = show(container, UNIT, "MainPID")

    def restart() -> None:
        container.run(["systemctl", "restart", UNIT])
        assert restarted(container, before)()

    await keeps_machines_across(container, client, guest, restart)


async def test_killed_daemon_is_restarted_and_keeps_machines(
    container: tool.Container, client: Client, guest: tinyguest.Guest
) -> None:
    before = show(container, UNIT, "MainPID", "NRestarts")

    def crash() -> None:
        container.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", UNIT])
        wait_until("Restart=on-failure after SIGKILL", restarted(container, before))
        assert int(show(container, UNIT, "NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1

    await keeps_machines_across(container, client, guest, crash)


async def test_watchdog_restarts_a_daemon_that_stops_answering(
    container: tool.Container, client: Client, guest: tinyguest.Guest, dropin: Callable[[str, str], None]
) -> None:
    dropin("watchdog", "WatchdogSec=3s\nTimeoutAbortSec=5s")
    before = show(container, UNIT, "MainPID", "NRestarts")

    def hang() -> None:
        container.run(["kill", "-STOP", before["MainPID"]])
        wait_until("the watchdog's restart", restarted(container, before), timeout=40)
        assert show(container, UNIT, "Result")["Result"] in ("success", "watchdog")

    await keeps_machines_across(container, client, guest, hang)
    logged = container.run(["journalctl", "--no-pager", "-u", UNIT, "-o", "cat"]).stdout
    assert "Watchdog timeout" in logged


async def test_stop_with_stop_machines_on_exit_powers_them_off(
    container: tool.Container, client: Client, guest: tinyguest.Guest, dropin: Callable[[str, str], None]
) -> None:
    dropin("stop-machines", "ExecStart=\nExecStart=/usr/bin/vmspawnd --stop-machines-on-exit --stop-timeout 20")
    for name in ("svm1", "svm2"):
        await boot(container, client, guest, name)
    container.run(["systemctl", "stop", UNIT], timeout=90)
    assert container.run(["pgrep", "-c", "qemu-system"], check=False).stdout.strip() == "0"
    assert container.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout.strip() == ""
    logged = container.run(["journalctl", "--no-pager", "-o", "cat", "MACHINE=svm1"]).stdout
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
    logged = container.run(["journalctl", "--no-pager", "-o", "cat", "MACHINE=pvm"]).stdout
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
    logged = container.run(["journalctl", "--no-pager", "-o", "cat", "MACHINE=tvm"]).stdout
    assert "exited unexpectedly" not in logged, logged
