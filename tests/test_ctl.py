"""vmspawnctl's pure parts, no bus: parsing, a{sv} building, the PCIe tree, errors, completion."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from tests.devtypes import TYPES
from vmspawnd import ctl
from vmspawnd.bus.manager import plan_value
from vmspawnd.bus.options import ADD_DRIVE_OPTIONS, BLOCK_JOB_OPTIONS, DRIVE_OPTIONS, MACHINE_OPTIONS
from vmspawnd.errors import ALL_ERRORS
from vmspawnd.model import DriveSpec, MachineSpec, Network, NetworkMode
from vmspawnd.topology import plan_machine

ROOT = Path(__file__).resolve().parents[1]
COMPLETION = ROOT / "completion" / "vmspawnctl.bash"
MiB = 1 << 20
GiB = 1 << 30


# -- sizes, times, drives --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512M", 512 * MiB),
        ("2G", 2 * GiB),
        ("2g", 2 * GiB),
        ("1.5G", 3 * GiB // 2),
        ("2GiB", 2 * GiB),
        ("2GB", 2 * GiB),
        ("64K", 64 << 10),
        ("1T", 1 << 40),
        ("4096", 4096),
        ("4096B", 4096),
        (" 8M ", 8 * MiB),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert ctl.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1G", "0", "1.5", "2X", "1e3", "2 G B", "99999999999999999999E"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        ctl.parse_size(text)


def test_memory_without_unit_asks_for_one() -> None:
    with pytest.raises(ValueError, match=r"would be 512 bytes; give a unit, e\.g\. 512M"):
        ctl.parse_memory("512")
    assert ctl.parse_memory("536870912") == 512 * MiB
    assert ctl.parse_memory("512M") == 512 * MiB


@pytest.mark.parametrize(
    ("text", "usec"),
    [("10", 10_000_000), ("2.5s", 2_500_000), ("500ms", 500_000), ("1min", 60_000_000), ("1h", 3_600_000_000),
     ("0.3", 300_000), ("250us", 250)],
)  # fmt: skip
def test_parse_timespan(text: str, usec: int) -> None:
    assert ctl.parse_timespan_usec(text) == usec


@pytest.mark.parametrize("text", ["", "s", "-1", "10 parsecs", "1d"])
def test_parse_timespan_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid time"):
        ctl.parse_timespan_usec(text)


@pytest.mark.parametrize(
    ("text", "drive"),
    [
        ("/d.raw", {"path": "/d.raw"}),
        ("/d.raw:nvme", {"path": "/d.raw", "disk_type": "nvme"}),
        ("/d.raw:nvme:data0", {"path": "/d.raw", "disk_type": "nvme", "serial": "data0"}),
        ("/d.raw::data0", {"path": "/d.raw", "serial": "data0"}),
        ("/d.raw:virtio-scsi-cdrom", {"path": "/d.raw", "disk_type": "virtio-scsi-cdrom"}),
        ("/d.raw:nvme:a:b", {"path": "/d.raw", "disk_type": "nvme", "serial": "a:b"}),
        ("/odd:name.raw::", {"path": "/odd:name.raw"}),
        ("/odd:name.raw:virtio-blk", {"path": "/odd:name.raw", "disk_type": "virtio-blk"}),
    ],
)
def test_parse_drive(text: str, drive: dict[str, str]) -> None:
    assert ctl.parse_drive(text) == drive


def test_parse_drive_relative_path_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ctl.parse_drive("d.raw:nvme") == {"path": str(tmp_path / "d.raw"), "disk_type": "nvme"}


def test_parse_drive_refuses_unknown_type() -> None:
    with pytest.raises(ValueError, match=r"unknown disk type 'floppy'.*use one of virtio-blk"):
        ctl.parse_drive("/d.raw:floppy")
    with pytest.raises(ValueError, match="names no file"):
        ctl.parse_drive(":nvme")


# -- the command line and a{sv} ---------------------------------------------------


def test_dash_values_are_glued_to_their_option() -> None:
    argv = ["create", "m", "--qemu-extra", "-device", "--qemu-extra", "nvme", "--cmdline", "-x", "--", "--qemu-extra"]
    assert ctl.glue_dash_values(argv) == [
        "create", "m", "--qemu-extra=-device", "--qemu-extra=nvme", "--cmdline=-x", "--", "--qemu-extra",
    ]  # fmt: skip


def test_create_options_become_the_documented_a_sv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ctl.parse_args(
        ["create", "vm", "--kernel", "vmlinuz", "--initrd", "/i", "--cmdline", "console=ttyS0", "--image", "/r.raw",
         "--image-format", "qcow2", "--drive", "/a:nvme:s1", "--drive", "/b", "--disk-type", "virtio-scsi",
         "--network", "user", "--vsock", "--memory", "2G", "--cpus", "4", "--spares", "12", "--accel", "tcg",
         "--firmware", "uefi", "--graphics", "vnc", "--qemu-extra", "-device", "--qemu-extra", "nvme,serial=a",
         "--qemu-extra-string", "-device 'nvme,serial=b c' -smbios type=0", "--qemu-extra=-nodefaults", "--keep"]
    )  # fmt: skip
    opts = ctl.machine_options(args)
    # Every key and signature as the daemon's own schema has them.
    assert set(opts) <= set(MACHINE_OPTIONS)
    assert {k: v.signature for k, v in opts.items()} == {k: MACHINE_OPTIONS[k] for k in opts}
    for d in opts["drives"].value:
        assert {k: v.signature for k, v in d.items()} == {k: DRIVE_OPTIONS[k] for k in d}
    values = {k: v.value for k, v in opts.items() if k != "drives"}
    assert values == {
        "kernel": str(tmp_path / "vmlinuz"), "initrd": "/i", "cmdline": "console=ttyS0", "image": "/r.raw",
        "image_format": "qcow2", "disk_type": "virtio-scsi", "network": "user", "vsock": True, "memory": 2 * GiB,
        "cpus": 4, "hotplug_spares": 12, "accel": "tcg", "firmware": "uefi", "graphics": "vnc", "keep": True,
        # In command-line order, --qemu-extra and --qemu-extra-string mixed.
        "qemu_extra": ["-device", "nvme,serial=a", "-device", "nvme,serial=b c", "-smbios", "type=0", "-nodefaults"],
    }  # fmt: skip
    assert [{k: v.value for k, v in d.items()} for d in opts["drives"].value] == [
        {"path": "/a", "disk_type": "nvme", "serial": "s1"},
        {"path": "/b"},
    ]


def test_only_given_options_are_sent() -> None:
    assert ctl.machine_options(ctl.parse_args(["create", "vm", "--image", "/r"])) == {"image": Variant("s", "/r")}
    assert ctl.machine_options(ctl.parse_args(["plan"])) == {}
    assert ctl.parse_args(["plan"]).name == "plan"


def test_add_drive_options_match_the_daemon_schema() -> None:
    argv = ["add-drive", "vm", "/d", "--disk-type", "nvme", "--serial", "s", "--read-only"]
    args = ctl.parse_args([*argv, "--format", "qcow2", "--id", "x", "--port", "sw5p29"])
    opts = ctl.add_drive_options(args)
    assert {k: v.signature for k, v in opts.items()} == ADD_DRIVE_OPTIONS
    assert ctl.add_drive_options(ctl.parse_args(["add-drive", "vm", "/d"])) == {}


@pytest.mark.parametrize("verb", ["snapshot-drive", "swap-drive"])
def test_copy_options_match_the_daemon_schema(verb: str) -> None:
    args = ctl.parse_args([verb, "vm", "disk1", "/t", "--format", "qcow2", "--timeout", "2min"])
    opts = ctl.copy_options(args)
    assert {k: v.signature for k, v in opts.items()} == {k: BLOCK_JOB_OPTIONS[k] for k in ("format", "timeout_usec")}
    assert opts["timeout_usec"].value == 120_000_000
    assert ctl.copy_options(ctl.parse_args([verb, "vm", "disk1", "/t"])) == {}


def test_add_share_args_make_the_directory_absolute() -> None:
    directory, opts = ctl.add_share_args(ctl.parse_args(["add-share", "vm", "rel/dir", "--tag", "t", "--id", "s"]))
    assert directory == os.path.join(os.getcwd(), "rel/dir")
    assert opts == {"tag": Variant("s", "t"), "id": Variant("s", "s")}
    assert ctl.add_share_args(ctl.parse_args(["add-share", "vm", "/d", "--tag", "t"]))[1] == {"tag": Variant("s", "t")}


def test_global_flags_before_or_after_the_verb() -> None:
    a = ctl.parse_args(["--json", "--user", "status", "vm"])
    b = ctl.parse_args(["status", "vm", "--json", "--user"])
    c = ctl.parse_args(["status", "vm"])
    assert (a.json, a.user, b.json, b.user, c.json, c.user) == (True, True, True, True, False, False)
    d = ctl.parse_args(["--no-legend", "list", "--no-pager"])
    assert (d.legend, d.no_pager) == (False, True)
    assert ctl.parse_args(["--user", "list", "--system"]).user is False
    # No verb: list, as machinectl does.
    assert ctl.parse_args(["--json"]).verb == "list"


@pytest.mark.parametrize(
    "argv",
    [["create"], ["create", "vm", "--memory", "lots"], ["create", "vm", "--cpus", "-1"], ["remove-drive", "vm"],
     ["remove-drive", "vm", "d", "--timeout", "soon"], ["frobnicate"], ["create", "vm", "--drive", "/d:floppy"],
     ["create", "vm", "--qemu-extra-string", "'unbalanced"]],
)  # fmt: skip
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        ctl.parse_args(argv)
    assert e.value.code == 2
    assert int(ctl.Exit.INVALID) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("verb", [None, *ctl.VERBS])
def test_every_verb_has_a_man_style_help(verb: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        ctl.parse_args([verb, "--help"] if verb else ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:\n  vmspawnctl " in out
    assert "exit status:" in out
    if verb:
        assert f"vmspawnctl {verb}: {ctl.VERB_HELP[verb].summary}." in out
        for example in ctl.VERB_HELP[verb].examples:
            assert example in out
    else:
        for code in ("0  success", "2  invalid argument", "3  not found", "4  access denied", "5  busy", "6  vmspawnd"):
            assert code in out


# -- errors -----------------------------------------------------------------------------

EXPECTED_EXIT = {
    "InvalidArgument": 2, "TooManyPorts": 2, "PcieSlotsExhausted": 2,
    "NoSuchMachine": 3, "NoSuchDrive": 3, "NoSuchNetwork": 3, "NoSuchShare": 3,
    "AccessDenied": 4, "QuotaExceeded": 4,
    "NoFreePort": 5, "UnplugInProgress": 5, "MachineExists": 5,
    "QemuFailed": 1, "UnplugTimeout": 1, "NotRunning": 1, "AlreadyRunning": 5,
    "QemuUnresponsive": 1, "NoSpace": 1, "OpenTimeout": 1, "ConsoleBusy": 5, "Unsupported": 2,
    "MigrationFailed": 1, "MigrationInProgress": 5, "NotMigrating": 5,
    "AgentUnavailable": 1, "AgentFailed": 1, "NoGraphics": 1,
    "JobInProgress": 5, "JobTimeout": 1, "JobFailed": 1,
}  # fmt: skip


def test_every_daemon_error_has_an_exit_status_and_a_hint() -> None:
    assert set(ctl.ERRORS) == {e.error_name() for e in ALL_ERRORS} == set(EXPECTED_EXIT)
    ctx = ctl.Context("add-drive", "vm")
    for name, code in EXPECTED_EXIT.items():
        err = ctl.map_error(ctl.ERROR_PREFIX + name, f"{name} happened", ctx)
        assert (err.code, err.message) == (code, f"{name} happened")
        assert err.hint


@pytest.mark.parametrize(
    ("name", "verb", "code", "hint"),
    [
        ("org.vmspawnd1.Error.NoFreePort", "add-drive", 5, "vmspawnctl create vm --spares N"),
        ("org.vmspawnd1.Error.TooManyPorts", "create", 2, "fewer --spares"),
        ("org.vmspawnd1.Error.PcieSlotsExhausted", "create", 2, "vmspawnctl plan"),
        ("org.vmspawnd1.Error.NoSuchMachine", "status", 3, "'vmspawnctl list'"),
        ("org.vmspawnd1.Error.NoSuchDrive", "remove-drive", 3, "'vmspawnctl status vm'"),
        ("org.vmspawnd1.Error.AccessDenied", "add-drive", 4, "org.vmspawnd1.manage-machine"),
        ("org.vmspawnd1.Error.AccessDenied", "create", 4, "org.vmspawnd1.create-machine"),
        ("org.vmspawnd1.Error.QemuFailed", "create", 1, "log"),
        ("org.vmspawnd1.Error.MachineExists", "create", 5, "vmspawnctl terminate vm"),
        ("org.vmspawnd1.Error.InvalidArgument", "create", 2, "'vmspawnctl create --help'"),
        ("org.freedesktop.DBus.Error.AccessDenied", "create", 4, "root"),
        ("org.freedesktop.DBus.Error.ServiceUnknown", "list", 6, "systemctl start vmspawnd"),
        ("org.freedesktop.DBus.Error.NameHasNoOwner", "list", 6, "systemctl start vmspawnd"),
        ("org.freedesktop.DBus.Error.UnknownObject", "status", 3, "vmspawnctl list"),
        ("org.freedesktop.DBus.Error.Failed", "status", 1, "journalctl -u vmspawnd"),
        ("com.example.Whatever", "status", 1, "journalctl -u vmspawnd"),
    ],
)
def test_error_mapping(name: str, verb: str, code: int, hint: str) -> None:
    err = ctl.map_error(name, "it went wrong", ctl.Context(verb, "vm"))
    assert err.code == code
    assert hint in err.hint


def test_user_bus_hint_says_how_to_start_a_user_daemon() -> None:
    err = ctl.map_error("org.freedesktop.DBus.Error.ServiceUnknown", "x", ctl.Context("list", "", user=True))
    assert "vmspawnd --user" in err.hint


def test_format_error_is_one_message_line_and_one_hint_line() -> None:
    err = ctl.map_error(ctl.ERROR_PREFIX + "QemuFailed", "QEMU exited:\n  qemu: bad\n", ctl.Context("create", "vm"))
    text = ctl.format_error(err)
    assert text.splitlines() == ["vmspawnctl: QEMU exited: qemu: bad", "hint: " + err.hint]
    assert text.endswith("\n")


@pytest.mark.parametrize(
    ("errno_", "code"), [(2, ctl.Exit.NOT_FOUND), (13, ctl.Exit.DENIED), (1, ctl.Exit.DENIED), (21, ctl.Exit.INVALID),
                         (5, ctl.Exit.FAILED)],
)  # fmt: skip
def test_local_file_errors(errno_: int, code: int) -> None:
    err = ctl.file_error(OSError(errno_, os.strerror(errno_)), "drive", "/d")
    assert err.code == code
    assert err.message.startswith(("cannot open drive '/d'", "cannot use drive '/d'"))
    assert err.hint


# -- rendering ---------------------------------------------------------------------------


def packed_spec(spares: int = 10) -> MachineSpec:
    """The issue's machine: image + 2 drives + network = 4 builtin, + spares, 20 extra nvme."""
    extra: list[str] = []
    for i in range(20):
        extra += ["-device", f"nvme,serial=x{i}"]
    return MachineSpec(
        name="packed",
        image=DriveSpec(Path("/root.raw")),
        drives=(DriveSpec(Path("/nvme.raw")), DriveSpec(Path("/blk.raw"))),
        network=Network(NetworkMode.USER),
        hotplug_spares=spares,
        qemu_extra=tuple(extra),
    )


def plan_entries(spec: MachineSpec) -> list[dict[str, Any]]:
    """What PlanMachine sends, as the CLI sees it after unwrapping."""
    return [ctl.unwrap(e) for e in plan_value(plan_machine(spec, TYPES))]


PACKED_TREE = """\
pcie.0
├─ 0x10: 8 root ports, multifunction
│  ├─ 0x10.0 → rp0 (builtin) → disk0
│  ├─ 0x10.1 → rp1 (builtin) → disk1
│  ├─ 0x10.2 → rp2 (builtin) → disk2
│  ├─ 0x10.3 → rp3 (builtin) → net0
│  ├─ 0x10.4 → rp4 (spare) → (free)
│  ├─ 0x10.5 → rp5 (spare) → (free)
│  ├─ 0x10.6 → rp6 (spare) → (free)
│  └─ 0x10.7 → rp7 (spare) → (free)
└─ 0x11: 6 root ports, multifunction
   ├─ 0x11.0 → rp8 (spare) → (free)
   ├─ 0x11.1 → rp9 (spare) → (free)
   ├─ 0x11.2 → rp10 (spare) → (free)
   ├─ 0x11.3 → rp11 (spare) → (free)
   ├─ 0x11.4 → rp12 (spare) → (free)
   └─ 0x11.5 → rp13 (spare) → (free)"""


def test_plan_tree_of_the_packed_machine() -> None:
    plan = ctl.plan_json("packed", plan_entries(packed_spec()))
    lines = ctl.render_plan(plan)
    assert lines[0] == "Plan for packed: root ports 14 in 2 slots: 4 builtin, 10 spare"
    assert "\n".join(lines[1:18]) == PACKED_TREE
    assert lines[18:] == [
        "",
        "PCI buses: 14 of 192 used; at most 176 hotplug spares",
        "pcie.0 slots: 25 of 30 used, 5 available",
        "SLOTS  WHAT",
        "    2  14 PCIe root ports, 8 per slot",
        "    3  implicit devices (virtio-rng-pci, virtio-balloon-pci, virtio-serial-pci)",
        "   20  qemu_extra -device nvme without bus=",
    ]
    assert plan["pcie_slots"] | {"consumers": []} == {"used": 25, "budget": 30, "available": 5, "consumers": []}
    no_legend = ctl.render_plan(plan, legend=False)
    assert not any(line.startswith(("Plan for", "pcie.0 slots", "SLOTS")) for line in no_legend)
    assert "\n".join(no_legend[:17]) == PACKED_TREE


def test_plan_json_keeps_every_port_field() -> None:
    entries = plan_entries(packed_spec())
    plan = ctl.plan_json("packed", entries)
    ports = [e for e in entries if e["kind"] in ctl.PORT_KINDS]
    assert plan["ports"] == ports
    assert [p["multifunction"] for p in plan["ports"]] == [True] + [False] * 7 + [True] + [False] * 5
    assert json.loads(json.dumps(plan)) == plan


def test_status_tree_equals_the_plan_tree_and_shows_drives() -> None:
    entries = plan_entries(packed_spec())
    ports = [
        {k: e[k] for k in ("id", "addr", "chassis", "role", "device")} for e in entries if e["kind"] in ctl.PORT_KINDS
    ]  # fmt: skip
    props = {
        "Name": "packed", "Id": "ab" * 16, "State": "running", "Leader": 4242, "Ports": ports,
        "Drives": [{"id": f"disk{i}", "path": f"/d{i}", "disk_type": "virtio-blk", "port": f"rp{i}",
                    "state": "attached"} for i in range(3)],
        "FreeSparePorts": 10, "PcieSlots": [25, 30], "ConsoleLog": "/run/vmspawnd/machines/packed/console.log",
    }  # fmt: skip
    lines = ctl.render_status(props)
    assert lines[:9] == [
        "packed",
        "           Id: abababababababababababababababab",
        "        State: running",
        "       Leader: 4242",
        "  Console log: /run/vmspawnd/machines/packed/console.log",
        "   PCIe slots: 25 of 30 used, 5 available",
        "   Root ports: 14 in 2 slots: 4 builtin, 10 spare (10 free)",
        "       Drives: disk0 virtio-blk /d0 on rp0 (attached)",
        "               disk1 virtio-blk /d1 on rp1 (attached)",
    ]
    tree_at = lines.index("pcie.0")
    assert "\n".join(lines[tree_at:]) == PACKED_TREE
    assert ctl.status_json(props) == props
    assert list(ctl.status_json(props)) == list(ctl.STATUS_KEYS)


def test_tree_shows_removing_drives_and_scsi_drives_under_their_controller() -> None:
    ports = [
        {"id": "rp0", "addr": "0x10.0", "chassis": 1, "role": "builtin", "device": "disk0"},
        {"id": "rp1", "addr": "0x10.1", "chassis": 2, "role": "spare", "device": "scsi0"},
        {"id": "rp2", "addr": "0x10.2", "chassis": 3, "role": "spare", "device": "disk3"},
    ]
    drives = [
        {"id": "disk0", "path": "/a", "disk_type": "nvme", "port": "rp0", "state": "attached"},
        {"id": "disk1", "path": "/b", "disk_type": "virtio-scsi", "port": "rp1", "state": "attached"},
        {"id": "disk2", "path": "/c", "disk_type": "virtio-scsi-cdrom", "port": "rp1", "state": "removing"},
        {"id": "disk3", "path": "/d", "disk_type": "virtio-blk", "port": "rp2", "state": "removing"},
    ]
    assert ctl.pcie_tree(ports, drives, ctl.ASCII) == [
        "pcie.0",
        "`- 0x10: 3 root ports, multifunction",
        "   |- 0x10.0 -> rp0 (builtin) -> disk0",
        "   |- 0x10.1 -> rp1 (spare) -> scsi0",
        "   |  |- disk1 (virtio-scsi)",
        "   |  `- disk2 (virtio-scsi-cdrom, removing)",
        "   `- 0x10.2 -> rp2 (spare) -> disk3 (removing)",
    ]


def test_glyphs_follow_the_output_encoding() -> None:
    class Stream:
        def __init__(self, encoding: str | None) -> None:
            self.encoding = encoding

    assert ctl.glyphs_for(Stream("UTF-8")) is ctl.UNICODE
    assert ctl.glyphs_for(Stream("ascii")) is ctl.ASCII
    assert ctl.glyphs_for(Stream(None)) is ctl.ASCII


def test_table_with_and_without_legend() -> None:
    rows = [("a", "running", "1"), ("longer-name", "stopping", "-")]
    assert ctl.render_table(("MACHINE", "STATE", "LEADER"), rows, legend=True) == [
        "MACHINE      STATE     LEADER",
        "a            running   1",
        "longer-name  stopping  -",
    ]
    assert ctl.render_table(("MACHINE", "STATE", "LEADER"), rows, legend=False)[0] == "a            running   1"


def test_pager_only_on_a_terminal_and_never_with_no_pager() -> None:
    assert ctl.pager_command({"PAGER": "less"}, isatty=False, no_pager=False) is None
    assert ctl.pager_command({"PAGER": "less"}, isatty=True, no_pager=True) is None
    assert ctl.pager_command({"PAGER": "most -s"}, isatty=True, no_pager=False) == ["most", "-s"]
    assert ctl.pager_command({"PAGER": "cat"}, isatty=True, no_pager=False) is None
    assert ctl.pager_command({"SYSTEMD_PAGER": "", "PAGER": "less"}, isatty=True, no_pager=False) is None
    assert ctl.pager_command({"VMSPAWNCTL_PAGER": "pg", "PAGER": "less"}, isatty=True, no_pager=False) == ["pg"]


def test_bus_address() -> None:
    env = {"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/s", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/u"}
    assert ctl.bus_address(False, env) == "unix:path=/s"
    assert ctl.bus_address(True, env) == "unix:path=/u"
    assert ctl.bus_address(False, {}) == ctl.DEFAULT_SYSTEM_BUS
    assert ctl.bus_address(True, {"XDG_RUNTIME_DIR": "/run/user/7"}) == "unix:path=/run/user/7/bus"


def test_unwrap_nested_variants() -> None:
    value = Variant("aa{sv}", [{"a": Variant("u", 1), "b": Variant("(uu)", [2, 3])}])
    assert ctl.unwrap(value) == [{"a": 1, "b": [2, 3]}]


# -- bash completion (real bash, a stub vmspawnctl on PATH) -----------------------------------

STUB = r"""#!/bin/sh
# Records its arguments; answers list and status like vmspawnctl does.
echo "$*" >> "$STUB_LOG"
case "$1" in
  list) printf 'alpha  running  10  1  3/4  5/30\nbeta   running  11  0  4/4  5/30\n' ;;
  status) cat <<'EOF'
{"Name": "alpha", "Drives": [{"id": "disk0", "state": "attached"}, {"id": "hot1", "state": "attached"},
 {"id": "gone", "state": "removing"}], "Shares": [{"id": "share0", "state": "attached"},
 {"id": "left", "state": "removing"}], "Networks": [{"id": "nic1", "state": "attached"}]}
EOF
  ;;
esac
"""


def complete(words: list[str], env: dict[str, str] | None = None) -> list[str]:
    """Source the script, set COMP_WORDS/COMP_CWORD, call the function, return COMPREPLY."""
    script = (
        f'source "{COMPLETION}"\n'
        'COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}\n'
        "_vmspawnctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script, "bash", *words],
        capture_output=True, text=True, check=True, env=env or os.environ.copy(), timeout=30,
    )  # fmt: skip
    return [line for line in result.stdout.splitlines() if line]


@pytest.fixture
def stub_env(tmp_path: Path) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "vmspawnctl"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return os.environ | {"PATH": f"{bindir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "log")}


def test_completion_registers_for_vmspawnctl() -> None:
    out = subprocess.run(
        ["bash", "--norc", "-c", f'source "{COMPLETION}"; complete -p vmspawnctl'],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "complete -F _vmspawnctl vmspawnctl"


def test_completion_of_verbs_and_options() -> None:
    assert complete(["vmspawnctl", ""]) == list(ctl.VERBS)
    assert complete(["vmspawnctl", "re"]) == [
        "remove-drive", "remove-share", "replace-drive", "remove-nic", "resume", "reboot",
    ]  # fmt: skip
    assert complete(["vmspawnctl", "add-share", "x", "/d", "--t"]) == ["--tag"]
    assert complete(["vmspawnctl", "remove-share", "x", "s", "--t"]) == ["--timeout"]
    assert complete(["vmspawnctl", "pa"]) == ["pause"]
    assert complete(["vmspawnctl", "su"]) == ["suspend"]
    assert complete(["vmspawnctl", "sta"]) == ["status", "start"]
    assert complete(["vmspawnctl", "create", "x", "--kee"]) == ["--keep"]
    assert complete(["vmspawnctl", "plan", "x", "--kee"]) == []
    assert complete(["vmspawnctl", "--user", "st"]) == ["status", "start"]
    assert complete(["vmspawnctl", "console", "x", "--no-"]) == [
        "--no-pager", "--no-legend", "--no-ask-password", "--no-follow",
    ]  # fmt: skip
    assert complete(["vmspawnctl", "console", "x", "--re"]) == ["--read-only"]
    assert complete(["vmspawnctl", "create", "x", "--q"]) == ["--qemu-extra", "--qemu-extra-string"]
    assert complete(["vmspawnctl", "add-drive", "x", "/d", "--re"]) == ["--read-only"]
    assert complete(["vmspawnctl", "remove-drive", "x", "d", "--t"]) == ["--timeout"]
    assert complete(["vmspawnctl", "remove-nic", "x", "n", "--t"]) == ["--timeout"]
    assert complete(["vmspawnctl", "add-nic", "x", "--m"]) == ["--mac"]
    assert complete(["vmspawnctl", "add-nic", "x", "--network", "t"]) == ["tap:"]
    assert complete(["vmspawnctl", "replace-drive", "x", "d", "/m", "--format", "r"]) == ["raw"]
    assert {"--format", "--timeout"} <= set(complete(["vmspawnctl", "snapshot-drive", "x", "d", "/t", "--"]))
    assert complete(["vmspawnctl", "swap-drive", "x", "d", "/t", "--format", "q"]) == ["qcow2"]
    assert complete(["vmspawnctl", "sn"]) == ["snapshot-drive"]
    assert complete(["vmspawnctl", "create", "x", "--disk-type", ""]) == list(ctl.DISK_TYPES)
    assert complete(["vmspawnctl", "plan", "--accel", "t"]) == ["tcg"]
    assert complete(["vmspawnctl", "plan", "--firmware", ""]) == ["bios", "uefi"]
    assert complete(["vmspawnctl", "create", "x", "--graphics", ""]) == ["none", "vnc", "spice"]
    assert complete(["vmspawnctl", "add-drive", "x", "/d", "--format", "q"]) == ["qcow2"]
    assert complete(["vmspawnctl", "create", "x", "--memory", ""]) == []


def test_every_option_of_every_verb_is_completed() -> None:
    parser = ctl.build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    for verb, p in sub.choices.items():  # type: ignore[union-attr]
        options = {o for a in p._actions for o in a.option_strings if o.startswith("--")}
        offered = set(complete(["vmspawnctl", verb, "x", "--"]))
        assert options <= offered, (verb, options - offered)


def test_completion_of_paths(tmp_path: Path) -> None:
    (tmp_path / "disk one.raw").write_bytes(b"")
    (tmp_path / "disk2.raw").write_bytes(b"")
    prefix = str(tmp_path / "disk")
    assert sorted(complete(["vmspawnctl", "create", "x", "--image", prefix])) == [
        str(tmp_path / "disk one.raw"), str(tmp_path / "disk2.raw"),
    ]  # fmt: skip
    assert len(complete(["vmspawnctl", "add-drive", "alpha", prefix])) == 2


def test_completion_of_machine_names_and_drive_ids(stub_env: dict[str, str]) -> None:
    assert complete(["vmspawnctl", "status", ""], stub_env) == ["alpha", "beta"]
    assert complete(["vmspawnctl", "terminate", "b"], stub_env) == ["beta"]
    assert complete(["vmspawnctl", "start", "a"], stub_env) == ["alpha"]
    assert complete(["vmspawnctl", "add-drive", "a"], stub_env) == ["alpha"]
    assert complete(["vmspawnctl", "remove-drive", ""], stub_env) == ["alpha", "beta"]
    # Attached drives only: a drive being removed cannot be removed again.
    assert complete(["vmspawnctl", "remove-drive", "alpha", ""], stub_env) == ["disk0", "hot1"]
    assert complete(["vmspawnctl", "--user", "remove-drive", "alpha", "--timeout", "5", "h"], stub_env) == ["hot1"]
    assert complete(["vmspawnctl", "remove-drive", "alpha", "hot1", ""], stub_env) == []
    assert complete(["vmspawnctl", "remove-share", "alpha", ""], stub_env) == ["share0"]
    assert complete(["vmspawnctl", "add-share", "b"], stub_env) == ["beta"]
    assert complete(["vmspawnctl", "eject-drive", "alpha", "h"], stub_env) == ["hot1"]
    assert complete(["vmspawnctl", "replace-drive", "alpha", "h"], stub_env) == ["hot1"]
    assert complete(["vmspawnctl", "snapshot-drive", "alpha", "h"], stub_env) == ["hot1"]
    assert complete(["vmspawnctl", "swap-drive", "alpha", "h"], stub_env) == ["hot1"]
    assert complete(["vmspawnctl", "remove-nic", "alpha", ""], stub_env) == ["nic1"]
    assert complete(["vmspawnctl", "nmi", "a"], stub_env) == ["alpha"]
    assert complete(["vmspawnctl", "nmi", "alpha", ""], stub_env) == []
    assert complete(["vmspawnctl", "drive-stats", "alpha", ""], stub_env) == ["disk0", "hot1"]
    calls = Path(stub_env["STUB_LOG"]).read_text().splitlines()
    assert "list --no-legend --no-pager" in calls
    assert "status alpha --json --no-pager" in calls
    # The bus the user picked is the bus asked.
    assert "status alpha --json --no-pager --user" in calls


def test_completion_without_a_daemon_offers_nothing(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vmspawnctl").write_text("#!/bin/sh\necho 'vmspawnctl: not running' >&2\nexit 6\n")
    (bindir / "vmspawnctl").chmod(0o755)
    env = os.environ | {"PATH": f"{bindir}:{os.environ['PATH']}"}
    assert complete(["vmspawnctl", "status", ""], env) == []
    assert complete(["vmspawnctl", "remove-drive", "vm", ""], env) == []


def test_plan_tree_shows_the_switch_levels() -> None:
    spec = MachineSpec("wide", image=DriveSpec(Path("/i")), hotplug_spares=130)
    plan = ctl.plan_json("wide", plan_entries(spec))
    lines = ctl.render_plan(plan)
    assert lines[0] == "Plan for wide: root ports 6 in 1 slot: 1 builtin, 130 spare (130 behind 5 switches)"
    assert lines[1:8] == [
        "pcie.0",
        "└─ 0x10: 6 root ports, multifunction",
        "   ├─ 0x10.0 → rp0 (builtin) → disk0",
        "   ├─ 0x10.1 → rp1 (switch) → sw0",
        "   │  └─ 0x0.0 → sw0 (switch-upstream) → 26 downstream ports",
        "   │     ├─ 0x0.0 → sw0p0 (downstream-port, spare) → (free)",
        "   │     ├─ 0x1.0 → sw0p1 (downstream-port, spare) → (free)",
    ]
    assert "PCI buses: 141 of 192 used; at most 179 hotplug spares" in lines
    assert {p["kind"] for p in plan["ports"]} == {"root-port", "switch-upstream", "downstream-port"}
    assert plan["buses"] == {"used": 141, "budget": 192, "max_spares": 179}
