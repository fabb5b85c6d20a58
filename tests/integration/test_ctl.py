"""vmspawnctl end to end: the real CLI process, the real daemon on the private bus, QEMU under TCG.

Machines cost CPU under TCG, so they are few and shared: `booted` (the tiny
guest, booted once for the hotplug, console and poweroff checks), `packed`
(the 20-nvme machine, terminated as soon as its layout is checked) and
`ctl-tiny` (no OS at all: its hotplug ports never answer, which is what the
unplug errors need).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..test_ctl import PACKED_TREE, complete
from .harness import ROOT, Client, Daemon, guest_options, qemu_pids, wait_console

BIN = Path(sys.executable).parent
CTL = [str(BIN / "vmspawnctl")] if (BIN / "vmspawnctl").exists() else [sys.executable, "-m", "vmspawnd.ctl"]
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
NOBODY_UID = 65534


def ctl_env() -> dict[str, str]:
    """This tree's vmspawnd (not the one the venv has installed), on the test bus."""
    return os.environ | {"PYTHONPATH": str(ROOT)}


MiB = 1 << 20
BOOTED = "ctl-vm"
READY = r"VMSPAWN-GUEST-READY"


def ctl(*args: str, env: dict[str, str] | None = None, nobody: bool = False) -> subprocess.CompletedProcess[str]:
    """Run vmspawnctl as a user would (as `nobody` through setpriv if asked)."""
    base = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    argv = [*NOBODY, *CTL, *args] if nobody else [*CTL, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=base, timeout=180, cwd="/")


def ok(*args: str, **kw: Any) -> str:
    result = ctl(*args, **kw)
    assert result.returncode == 0, f"vmspawnctl {' '.join(args[:2])} exited {result.returncode}: {result.stderr}"
    assert result.stderr == "", result.stderr
    return result.stdout


def expect_error(result: subprocess.CompletedProcess[str], code: int, message: str, hint: str) -> None:
    """The exit status, then exactly `vmspawnctl: <message>` and `hint: <hint>` on stderr."""
    lines = result.stderr.splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("vmspawnctl: ") and message in lines[0], lines[0]
    assert lines[1].startswith("hint: ") and hint in lines[1], lines[1]
    assert result.stdout == ""


def guest_args(guest: Any) -> list[str]:
    o = guest_options(guest)
    return [
        "--kernel", str(o["kernel"]), "--initrd", str(o["initrd"]), "--cmdline", o["cmdline"],
        "--accel", o["accel"], "--memory", f"{o['memory'] // MiB}M",
    ]  # fmt: skip


def tree_of(text: str) -> list[str]:
    """The pcie.0 tree in status or plan output: from 'pcie.0' to the blank line."""
    lines = text.splitlines()
    start = lines.index("pcie.0")
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return lines[start:end]


def machine_properties() -> set[str]:
    xml = ET.parse(ROOT / "dbus" / "org.vmspawnd1.Machine.xml")
    return {p.get("name", "") for p in xml.iter("property")}


@pytest.fixture(scope="module")
def files(workdir: Path) -> Iterator[dict[str, Path]]:
    """Disk files in a world-traversable directory, so `nobody` reaches its own."""
    directory = workdir / "ctl"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    out = {}
    sizes = {"root": 4, "vmroot": 4, "nvme": 4, "blk": 4, "hot": 4, "zero": 1, "nobody": 1, "rootonly": 1}
    for name, size in sizes.items():
        out[name] = directory / f"{name}.raw"
        out[name].write_bytes(b"\0" * (size * MiB))
    os.chown(out["nobody"], NOBODY_UID, NOBODY_UID)
    out["nobody"].chmod(0o600)
    out["rootonly"].chmod(0o600)
    out["link"] = directory / "hot-link"
    out["link"].symlink_to(out["hot"])
    yield out
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind(daemon: Daemon) -> Iterator[None]:
    yield
    # Every machine of this file was terminated or powered off by the CLI.
    for name in (BOOTED, "packed", "ctl-tiny"):
        ctl("terminate", name)
    assert json.loads(ok("list", "--json")) == []
    assert qemu_pids(str(daemon.runtime_dir)) == []


@pytest.fixture(scope="module")
def booted(daemon: Daemon, guest: Any, files: dict[str, Path]) -> str:
    """The tiny guest, created through the CLI; it boots while the other tests run."""
    out = ok("create", BOOTED, *guest_args(guest), "--image", str(files["vmroot"]), "--spares", "3")
    assert out == f"Created machine {BOOTED} (/org/vmspawnd1/machine/ctl_2dvm); its console: vmspawnctl console {BOOTED}\n"  # fmt: skip
    return BOOTED


# -- the packed machine: status, plan, list, JSON --------------------------------------------


async def test_packed_machine_status_plan_list_and_json(
    daemon: Daemon, guest: Any, files: dict[str, Path], booted: str, system_bus: str
) -> None:
    # 20 nvme devices: half as single --qemu-extra words, half in one --qemu-extra-string.
    extra: list[str] = []
    for i in range(10):
        extra += ["--qemu-extra", "-device", "--qemu-extra", f"nvme,serial=x{i}"]
    extra += ["--qemu-extra-string", " ".join(f"-device nvme,serial=x{i}" for i in range(10, 20))]
    opts = [
        *guest_args(guest), "--image", str(files["root"]), "--drive", f"{files['nvme']}:nvme:bootnvme",
        "--drive", str(files["blk"]), "--network", "user", "--spares", "10", *extra,
    ]  # fmt: skip

    plan = ok("plan", "packed", *opts)
    assert plan.splitlines()[0] == "Plan for packed: root ports 14 in 2 slots: 4 builtin, 10 spare"
    assert "\n".join(tree_of(plan)) == PACKED_TREE
    assert plan.splitlines()[-5:] == [
        "pcie.0 slots: 25 of 30 used, 5 available",
        "SLOTS  WHAT",
        "    2  14 PCIe root ports, 8 per slot",
        "    3  implicit devices (virtio-rng-pci, virtio-balloon-pci, virtio-serial-pci)",
        "   20  qemu_extra -device nvme without bus=",
    ]
    plan_doc = json.loads(ok("plan", "packed", *opts, "--json"))

    ok("create", "packed", *opts)
    try:
        # Every extra argument reached QEMU, in order.
        argv = (daemon.runtime_dir / "machines" / "packed" / "argv").read_text().splitlines()
        assert [a for a in argv if a.startswith("nvme,serial=x")] == [f"nvme,serial=x{i}" for i in range(20)]

        status = ok("status", "packed")
        lines = status.splitlines()
        assert lines[0] == "packed"
        assert "   PCIe slots: 25 of 30 used, 5 available" in lines
        assert "   Root ports: 14 in 2 slots: 4 builtin, 10 spare (10 free)" in lines
        assert f"       Drives: disk0 virtio-blk {files['root']} on rp0 (attached)" in lines
        assert f"               disk1 nvme {files['nvme']} on rp1 (attached)" in lines
        # The same packed tree as the plan's: slot -> slot.function -> root port -> device.
        assert tree_of(status) == tree_of(plan)

        # --json round-trips every property of org.vmspawnd1.Machine.
        doc = json.loads(ok("status", "packed", "--json"))
        client = await Client.connect()
        try:
            path = "/org/vmspawnd1/machine/packed"
            props = {name: await client.prop(path, name) for name in machine_properties()}
        finally:
            client.close()
        assert set(doc) == machine_properties() == set(props)
        # A struct such as PcieSlots (uu) is a JSON array; everything else maps one to one.
        assert doc == json.loads(json.dumps(props))
        assert doc["PcieSlots"] == list(props["PcieSlots"])
        assert doc["PcieSlots"] == [25, 30] and len(doc["Ports"]) == 14
        assert doc["Leader"] in qemu_pids(str(daemon.runtime_dir))
        # The plan's port tree is the running machine's, every key of every level.
        assert plan_doc["ports"] == doc["Ports"]
        assert plan_doc["pcie_slots"]["used"] == 25 and plan_doc["pcie_slots"]["available"] == 5

        # list: table, --no-legend, --json, and the session bus through --user.
        table = ok("list").splitlines()
        assert table[0].split() == ["MACHINE", "STATE", "LEADER", "DRIVES", "FREE-PORTS", "PCIE-SLOTS"]
        assert table[-1] == "2 machines listed."
        rows = [line.split() for line in ok("list", "--no-legend").splitlines()]
        assert [r[0] for r in rows] == [BOOTED, "packed"]
        assert rows[1] == ["packed", "running", str(doc["Leader"]), "3", "10/10", "25/30"]
        listed = {m["name"]: m for m in json.loads(ok("list", "--json"))}
        assert listed["packed"] == {
            "name": "packed", "state": "running", "path": path, "leader": doc["Leader"],
            "drives": ["disk0", "disk1", "disk2"], "spare_ports": 10, "free_spare_ports": 10,
            "pcie_slots_used": 25, "pcie_slots_budget": 30,
        }  # fmt: skip
        user = ok("--user", "list", "--no-legend", env={"DBUS_SESSION_BUS_ADDRESS": system_bus})
        assert [line.split()[0] for line in user.splitlines()] == [BOOTED, "packed"]

        expect_error(ctl("create", "packed", *opts), 5, "a machine named 'packed' exists already", "terminate packed")
    finally:
        ok("terminate", "packed")
    expect_error(ctl("status", "packed"), 3, "no machine named 'packed'", "'vmspawnctl list'")


# -- errors: one exit status per class, one message line, one hint line ----------------------


def nvme_string(n: int) -> str:
    return " ".join(f"-device nvme,serial=s{i}" for i in range(n))


ERROR_CASES: dict[str, tuple[Any, int, str, str]] = {
    "InvalidArgument": (
        lambda g, f: ["create", "a b", *guest_args(g)], 2, "invalid machine name 'a b'", "'vmspawnctl create --help'"
    ),
    "InvalidArgument-path": (
        lambda g, f: ["plan", "--kernel", "/nonexistent/vmlinuz"], 2, "'/nonexistent/vmlinuz' does not exist", "--help"
    ),
    "TooManyPorts": (
        lambda g, f: ["plan", "--kernel", str(g.kernel), "--image", str(f["root"]), "--spares", "180"],
        2, "Too many PCIe ports requested (181, max 180 on this machine", "fewer --spares",
    ),
    "PcieSlotsExhausted": (
        lambda g, f: ["plan", "--kernel", str(g.kernel), "--qemu-extra-string", nvme_string(27)],
        2, "27 for qemu_extra -device nvme without bus=", "'vmspawnctl plan'",
    ),
    "NoSuchMachine": (lambda g, f: ["poweroff", "nosuch"], 3, "no machine named 'nosuch'", "'vmspawnctl list'"),
    "QemuFailed": (
        lambda g, f: ["create", "qf", *guest_args(g), "--qemu-extra-string", "-device nvme,serial=x,bus=no-such-bus"],
        1, "Bus 'no-such-bus' not found", "journalctl -u vmspawnd",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_exit_status_message_and_hint(case: str, daemon: Daemon, guest: Any, files: dict[str, Path]) -> None:
    argv, code, message, hint = ERROR_CASES[case]
    expect_error(ctl(*argv(guest, files)), code, message, hint)


def test_usage_errors_exit_2(daemon: Daemon) -> None:
    result = ctl("create", "vm", "--memory", "lots")
    assert result.returncode == 2
    assert "argument --memory: invalid size 'lots'" in result.stderr


def test_daemon_not_running_or_no_bus(tmp_path: Path) -> None:
    import testbus  # type: ignore[import-not-found]  # tools/, put on sys.path by conftest

    proc, address = testbus.start(tmp_path / "bus")
    try:
        expect_error(
            ctl("list", env={"DBUS_SYSTEM_BUS_ADDRESS": address}), 6,
            "org.vmspawnd1 was not provided by any .service files", "start it with 'systemctl start vmspawnd'",
        )  # fmt: skip
        expect_error(
            ctl("--user", "status", "vm", env={"DBUS_SESSION_BUS_ADDRESS": address}), 6,
            "org.vmspawnd1", "start it with 'vmspawnd --user'",
        )  # fmt: skip
    finally:
        proc.terminate()
        proc.wait()
    gone = f"unix:path={tmp_path}/no-such-socket"
    expect_error(
        ctl("status", "vm", env={"DBUS_SYSTEM_BUS_ADDRESS": gone}), 6,
        f"cannot connect to the system bus at {gone}: No such file or directory", "is dbus running",
    )  # fmt: skip


# -- hotplug errors and the unprivileged caller, on a machine with no OS ------------------------


def strace_of(argv: list[str]) -> str | None:
    """The open and sendmsg system calls of a command, if strace is installed."""
    if shutil.which("strace") is None:
        return None
    out = Path(f"/tmp/vmspawnctl-strace-{os.getpid()}")
    try:
        subprocess.run(
            ["strace", "-f", "-qq", "-s", "512", "-e", "trace=openat,sendmsg", "-o", str(out), *argv],
            capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=120, cwd="/",
        )  # fmt: skip
        return out.read_text()
    finally:
        out.unlink(missing_ok=True)


async def test_hotplug_errors_and_an_unprivileged_caller(daemon: Daemon, files: dict[str, Path]) -> None:
    # SeaBIOS finds nothing to boot: no guest OS ever answers a hot-unplug.
    ok("create", "ctl-tiny", "--image", str(files["zero"]), "--spares", "1", "--accel", "tcg", "--memory", "64M")
    try:
        added = json.loads(ok("add-drive", "ctl-tiny", str(files["hot"]), "--json"))
        assert added == {"machine": "ctl-tiny", "id": "disk1", "port": "rp1"}
        expect_error(
            ctl("add-drive", "ctl-tiny", str(files["blk"])), 5,
            "all 1 spare ports of ctl-tiny are taken (rp1=disk1)", "vmspawnctl create ctl-tiny --spares N",
        )  # fmt: skip
        expect_error(
            ctl("remove-drive", "ctl-tiny", "disk1", "--timeout", "300ms"), 1,
            "the guest has not released disk1 after 0.3 s", "longer --timeout",
        )  # fmt: skip
        assert "   └─ 0x10.1 → rp1 (spare) → disk1 (removing)" in ok("status", "ctl-tiny").splitlines()
        expect_error(
            ctl("remove-drive", "ctl-tiny", "disk1"), 5, "drive disk1 is already being removed", "status ctl-tiny"
        )
        expect_error(ctl("remove-drive", "ctl-tiny", "nosuch"), 3, "no drive 'nosuch'", "'vmspawnctl status ctl-tiny'")
        expect_error(
            ctl("add-drive", "ctl-tiny", "/nonexistent.raw"), 3,
            "cannot open drive '/nonexistent.raw': No such file or directory", "check the path",
        )  # fmt: skip

        # nobody: reading is public...
        assert ok("list", "--no-legend", nobody=True).split()[0] == "ctl-tiny"
        assert json.loads(ok("status", "ctl-tiny", "--json", nobody=True))["Name"] == "ctl-tiny"
        # ... a file nobody may not open is refused by the CLI itself, before any call: the CLI
        # opens the file with the caller's own rights (a path handed to the root daemon would
        # have been checked for authorization first, and refused with the daemon's AccessDenied).
        expect_error(
            ctl("add-drive", "ctl-tiny", str(files["rootonly"]), nobody=True), 4,
            f"cannot open drive '{files['rootonly']}': Permission denied", "opens it with your own rights",
        )  # fmt: skip
        # ... nobody's own file is opened and passed as an fd; the daemon then refuses to let
        # nobody manage root's machine (only root and the creator may, polkit is not on this bus).
        nobody_add = ["add-drive", "ctl-tiny", str(files["nobody"]), "--serial", "nob"]
        expect_error(
            ctl(*nobody_add, nobody=True), 4,
            f"uid {NOBODY_UID} may not manage this machine", "polkit action org.vmspawnd1.manage-machine",
        )  # fmt: skip
        trace = strace_of([*NOBODY, *CTL, *nobody_add])
        if trace is not None:
            # The caller opened its file read-write and sent the fd (SCM_RIGHTS) with AddDriveFd.
            assert re.search(rf'openat\(AT_FDCWD, "{re.escape(str(files["nobody"]))}", O_RDWR\S*\) = \d+', trace)
            assert re.search(r"sendmsg\(.*AddDriveFd.*SCM_RIGHTS", trace), trace[-3000:]
        expect_error(ctl("terminate", "ctl-tiny", nobody=True), 4, "may not manage this machine", "run it as root")
        assert ctl("status", "ctl-tiny").returncode == 0

        # console follows until the machine is removed, then exits 0 on its own.
        follow = subprocess.Popen(
            [*CTL, "console", "ctl-tiny", "--read-only"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ctl_env()
        )  # fmt: skip
        time.sleep(1)
        assert follow.poll() is None
        ok("terminate", "ctl-tiny")
        assert follow.wait(20) == 0
        assert follow.stderr is not None and follow.stderr.read() == b""
    finally:
        ctl("terminate", "ctl-tiny")


def test_add_share_and_remove_share(daemon: Daemon, files: dict[str, Path], tmp_path: Path) -> None:
    """add-share/remove-share through the one client module, --json and the status lines; no
    guest OS answers the unplug (SeaBIOS idles), so remove-share times out with its hint."""
    directory = tmp_path / "shared"
    directory.mkdir()
    ok("create", "ctl-share", "--image", str(files["zero"]), "--spares", "1", "--accel", "tcg", "--memory", "64M")
    try:
        added = json.loads(ok("add-share", "ctl-share", str(directory), "--tag", "data", "--json"))
        assert added == {"machine": "ctl-share", "id": "share0", "port": "rp1", "tag": "data"}
        shares = json.loads(ok("status", "ctl-share", "--json"))["Shares"]
        assert shares == [{"id": "share0", "tag": "data", "directory": str(directory), "port": "rp1",
                           "read_only": False, "state": "attached"}]  # fmt: skip
        assert f"Shares: share0 tag data {directory} on rp1 (attached)" in ok("status", "ctl-share")
        expect_error(
            ctl("add-share", "ctl-share", str(directory), "--tag", "more"), 5,
            "all 1 spare ports of ctl-share are taken (rp1=share0)", "vmspawnctl create ctl-share --spares N",
        )  # fmt: skip
        expect_error(
            ctl("remove-share", "ctl-share", "share0", "--timeout", "300ms"), 1,
            "the guest has not released share0 after 0.3 s", "longer --timeout",
        )  # fmt: skip
        assert "(removing)" in ok("status", "ctl-share")
    finally:
        ctl("terminate", "ctl-share")


# -- the booted guest: hotplug, console, completion, poweroff ----------------------------------


def wait_console_clients(name: str, count: int, timeout: float = 30) -> None:
    """Until `count` consoles are attached (ConsoleClients): output from then on reaches them."""
    deadline = time.monotonic() + timeout
    while json.loads(ok("status", name, "--json"))["ConsoleClients"][0] != count:
        assert time.monotonic() < deadline, f"{name} never had {count} console clients"
        time.sleep(0.05)


def wait_file(path: Path, pattern: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, path.read_text(errors="replace")):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never matched {pattern!r}: {path.read_text(errors='replace')[-1000:]}")


async def test_booted_guest_hotplug_console_completion_poweroff(
    daemon: Daemon, booted: str, files: dict[str, Path], tmp_path: Path
) -> None:
    console = json.loads(ok("status", booted, "--json"))["ConsoleLog"]
    await wait_console(console, READY, timeout=150)
    assert READY in ok("console", booted, "--no-follow")

    # Added through a symlink: the daemon got an fd, so it records the file the fd is open on.
    added = json.loads(ok("add-drive", booted, str(files["link"]), "--serial", "ctlhot", "--json"))
    assert added == {"machine": booted, "id": "disk1", "port": "rp1"}
    drives = {d["id"]: d for d in json.loads(ok("status", booted, "--json"))["Drives"]}
    assert drives["disk1"] == {
        "id": "disk1", "path": str(files["hot"]), "disk_type": "virtio-blk", "port": "rp1", "state": "attached"
    }  # fmt: skip
    await wait_console(console, r"VMSPAWN-BLOCK-ADD \S+ serial=ctlhot")
    assert "   ├─ 0x10.1 → rp1 (spare) → disk1" in ok("status", booted).splitlines()

    # Completion against the real daemon: machine names, then the machine's drive ids.
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    assert complete(["vmspawnctl", "status", "ctl-"], env) == [booted]
    assert complete(["vmspawnctl", "remove-drive", booted, ""], env) == ["disk0", "disk1"]
    assert complete(["vmspawnctl", "remove-drive", booted, "disk1", ""], env) == []

    # console follows (from now on) until Ctrl-C, which ends it cleanly.
    out = tmp_path / "console.out"
    with open(out, "wb") as f:
        follow = subprocess.Popen([*CTL, "console", booted, "--read-only"], stdout=f, env=ctl_env())
        wait_console_clients(booted, 1)
        ok("remove-drive", booted, "disk1", "--timeout", "60s")
        wait_file(out, r"VMSPAWN-BLOCK-REMOVE")
        follow.send_signal(signal.SIGINT)
        assert follow.wait(10) == 0
    await wait_console(console, r"VMSPAWN-BLOCK-REMOVE")
    assert [d["id"] for d in json.loads(ok("status", booted, "--json"))["Drives"]] == ["disk0"]

    # poweroff: the guest sees the ACPI button; a following console sees it too, and ends.
    out2 = tmp_path / "console2.out"
    with open(out2, "wb") as f:
        follow = subprocess.Popen([*CTL, "console", booted, "--read-only"], stdout=f, env=ctl_env())
        wait_console_clients(booted, 1)
        ok("poweroff", booted, "--timeout", "60s")
        assert follow.wait(20) == 0
    assert "VMSPAWN-POWEROFF" in out2.read_text(errors="replace")
    assert booted not in [m["name"] for m in json.loads(ok("list", "--json"))]


def test_a_kept_machine_is_listed_stopped_and_started_again(daemon: Daemon, files: dict[str, Path]) -> None:
    ok(
        "create",
        "ctl-kept",
        "--keep",
        "--image",
        str(files["zero"]),
        "--spares",
        "1",
        "--accel",
        "tcg",
        "--memory",
        "64M",
    )
    try:
        # SeaBIOS ignores the power button: forced, and still there.
        assert json.loads(ok("poweroff", "ctl-kept", "--timeout", "1s", "--json")) == {
            "machine": "ctl-kept", "forced": True,
        }  # fmt: skip
        (row,) = [m for m in json.loads(ok("list", "--json")) if m["name"] == "ctl-kept"]
        assert (row["state"], row["leader"]) == ("stopped", 0)
        assert json.loads(ok("start", "ctl-kept", "--json")) == {"machine": "ctl-kept", "state": "running"}
        expect_error(ctl("start", "ctl-kept"), 5, "running already", "vmspawnctl poweroff ctl-kept")
    finally:
        ok("terminate", "ctl-kept")
    assert "ctl-kept" not in [m["name"] for m in json.loads(ok("list", "--json"))]
