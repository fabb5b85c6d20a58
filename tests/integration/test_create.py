"""CreateMachine end to end: busctl, real QEMU, the tiny guest."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .harness import Client, Daemon, busctl, guest_options, qemu_pids, wait_console
from .qmp_probe import Probe

NVME_EXTRA = 20


def busctl_dict(opts: dict[str, tuple[str, Any]]) -> list[str]:
    """busctl's spelling of an a{sv} built from (signature, value) pairs."""
    args = [str(len(opts))]
    for key, (sig, value) in opts.items():
        args += [key, sig]
        if sig == "as":
            args += [str(len(value)), *value]
        elif sig == "aa{sv}":
            args.append(str(len(value)))
            for d in value:
                args += busctl_dict(d)
        elif sig == "b":
            args.append("true" if value else "false")
        else:
            args.append(str(value))
    return args


def busctl_create(name: str, opts: dict[str, tuple[str, Any]]) -> subprocess.CompletedProcess[str]:
    # "--": qemu_extra's "-device" words are arguments, not busctl options.
    return busctl("call", "--", "org.vmspawnd1", "/org/vmspawnd1", "org.vmspawnd1.Manager", "CreateMachine",
                  "sa{sv}", name, *busctl_dict(opts), check=False)  # fmt: skip


def nvme_extra(n: int) -> list[str]:
    args = []
    for i in range(n):
        args += ["-device", f"nvme,serial=extra{i}"]
    return args


@pytest.fixture
def disks(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("root", "nvme", "blk", "scsi", "cd"):
        out[name] = tmp_path / f"{name}.raw"
        out[name].write_bytes(b"\0" * (4 << 20))
    return out


async def test_busctl_creates_a_packed_20_nvme_machine_the_guest_sees(
    client: Client, daemon: Daemon, guest: Any, disks: dict[str, Path], tmp_path: Path
) -> None:
    monitor = tmp_path / "test-qmp.sock"
    extra = [*nvme_extra(NVME_EXTRA), *Probe.extra(monitor)]
    # 4 builtin ports (image, 2 drives, network) + 10 spares = 14 ports in 2 slots.
    opts = {
        "kernel": ("s", guest.kernel),
        "initrd": ("s", guest.initrd),
        "cmdline": ("s", guest.cmdline),
        "accel": ("s", "tcg"),
        "image": ("s", disks["root"]),
        "drives": (
            "aa{sv}",
            [
                {"path": ("s", disks["nvme"]), "disk_type": ("s", "nvme"), "serial": ("s", "bootnvme")},
                {"path": ("s", disks["blk"])},
            ],
        ),
        "network": ("s", "user"),
        "hotplug_spares": ("u", 10),
        "qemu_extra": ("as", extra),
    }
    result = busctl_create("packed", opts)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'o "/org/vmspawnd1/machine/packed"'
    path = "/org/vmspawnd1/machine/packed"

    ports = await client.prop(path, "Ports")
    assert len(ports) == 14
    assert list(await client.prop(path, "PcieSlots")) == [2 + 3 + NVME_EXTRA, 30]
    assert await client.prop(path, "State") == "running"
    leader = await client.prop(path, "Leader")
    assert leader in qemu_pids(str(daemon.runtime_dir))

    # QEMU's own view of the root ports, through qom-get.
    cmds: list[tuple[str, dict[str, Any]]] = []
    for p in ports:
        cmds.append(("qom-get", {"path": f"/machine/peripheral/{p['id']}", "property": "addr"}))
        cmds.append(("qom-get", {"path": f"/machine/peripheral/{p['id']}", "property": "multifunction"}))
    replies = Probe(monitor).run(*cmds)
    for i, p in enumerate(ports):
        slot, function = (int(x, 16) for x in p["addr"].split("."))
        assert replies[2 * i] == slot << 3 | function, p
        assert replies[2 * i + 1] is (function == 0), p
        assert p["chassis"] == i + 1

    console = await client.prop(path, "ConsoleLog")
    # 21 nvme controllers to probe under TCG: generous for a loaded host.
    await wait_console(console, r"VMSPAWN-GUEST-READY", timeout=180)
    count = await wait_console(console, r"VMSPAWN-NVME-COUNT (\d+)")
    assert int(count.group(1)) == NVME_EXTRA + 1  # and the boot nvme drive


async def test_boot_drives_of_every_disk_type_sit_on_their_ports(
    client: Client, guest: Any, disks: dict[str, Path]
) -> None:
    drives = [
        {"path": str(disks["nvme"]), "disk_type": "nvme", "serial": "bootnvme"},
        {"path": str(disks["blk"]), "disk_type": "virtio-blk", "serial": "bootblk"},
        {"path": str(disks["scsi"]), "disk_type": "virtio-scsi", "serial": "bootscsi"},
        {"path": str(disks["cd"]), "disk_type": "virtio-scsi-cdrom", "read_only": True},
    ]
    path = await client.create(
        "disks", **guest_options(guest, image=str(disks["root"]), drives=drives, hotplug_spares=2, network="user")
    )
    ports = {p["id"]: p for p in await client.prop(path, "Ports")}
    assert [(p["role"], p["device"]) for p in ports.values()] == [
        ("builtin", "disk0"), ("builtin", "disk1"), ("builtin", "disk2"), ("builtin", "scsi0"),
        ("builtin", "net0"), ("spare", ""), ("spare", ""),
    ]  # fmt: skip
    drive_ports = {d["id"]: d["port"] for d in await client.prop(path, "Drives")}
    assert drive_ports == {"disk0": "rp0", "disk1": "rp1", "disk2": "rp2", "disk3": "rp3", "disk4": "rp3"}
    assert await client.prop(path, "FreeSparePorts") == 2
    console = await client.prop(path, "ConsoleLog")
    await wait_console(console, r"VMSPAWN-GUEST-READY", timeout=60)
    text = Path(console).read_text()
    assert re.search(r"VMSPAWN-BLOCK nvme\d+n1 serial=bootnvme", text)
    assert re.search(r"VMSPAWN-BLOCK vd[a-z] serial=bootblk", text)
    assert re.search(r"VMSPAWN-BLOCK sd[a-z] serial=bootscsi", text)
    assert re.search(r"VMSPAWN-BLOCK sr0", text)
    # virtio-net (1af4:1041) behind its root port.
    assert re.search(r"VMSPAWN-PCI \S+ 1af4:1041", text)


async def test_image_boot_starts_with_the_image_first_in_boot_order(
    client: Client, daemon: Daemon, disks: dict[str, Path]
) -> None:
    path = await client.create("imgboot", image=str(disks["root"]), accel="tcg", firmware="bios")
    assert await client.prop(path, "State") == "running"
    argv = (daemon.runtime_dir / "machines" / "imgboot" / "argv").read_text().splitlines()
    assert any('"bootindex":1' in a and '"bus":"rp0"' in a for a in argv)


def named(argv: list[str], guest: Any) -> list[str]:
    """QEMU got its files as fds the daemon opened: name them by their paths again."""
    paths = {}
    out = []
    args = iter(argv)
    for arg in args:
        if arg == "-add-fd":
            fdset = dict(kv.split("=", 1) for kv in next(args).split(","))
            paths[fdset["set"]] = fdset["opaque"]
            continue
        if arg in ("-kernel", "-initrd"):
            out += [arg, str(guest.kernel if arg == "-kernel" else guest.initrd)]
            next(args)
            continue
        out.append(re.sub(r"/dev/fdset/(\d+)", lambda m: paths[m.group(1)], arg))
    return out


def standalone(argv: list[str], directory: Path) -> list[str]:
    """The daemon's argv, runnable without the daemon: own monitor socket and console."""
    directory.mkdir()
    out = []
    for arg in argv:
        if arg.startswith("socket,id=qmp,"):
            arg = f"socket,id=qmp,path={directory}/qmp.sock,server=on,wait=off"
        elif arg.startswith("socket,id=console,"):
            arg = f"file,id=console,path={directory}/console.log"
        out.append(arg)
    return out


async def test_unpacked_layout_of_the_same_machine_fails_in_qemu(
    client: Client, daemon: Daemon, guest: Any, disks: dict[str, Path], tmp_path: Path
) -> None:
    """One root port per device number, as vmspawn did before packing: QEMU runs out of slots."""
    await client.create(
        "unpacked",
        **guest_options(
            guest,
            image=str(disks["root"]),
            drives=[{"path": str(disks["nvme"]), "disk_type": "nvme"}, {"path": str(disks["blk"])}],
            network="user",
            qemu_extra=nvme_extra(NVME_EXTRA),
        ),
    )
    argv = named((daemon.runtime_dir / "machines" / "unpacked" / "argv").read_text().splitlines(), guest)
    await client.call("TerminateMachine", "s", ["unpacked"])
    unpacked = []
    for arg in argv:
        # The implicit devices' own addresses go too: before packing, QEMU placed them.
        if arg.startswith("pcie-root-port,") or ",id=implicit" in arg:
            arg = ",".join(kv for kv in arg.split(",") if not kv.startswith(("addr=", "multifunction=")))
        unpacked.append(arg)
    unpacked = standalone(unpacked, tmp_path / "u")
    result = subprocess.run([*unpacked, "-S"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "PCI: no slot/function available for nvme, all in use or reserved" in result.stderr
    # And the packed argv, run the same way, does start.
    packed = standalone(argv, tmp_path / "p")
    proc = subprocess.Popen([*packed, "-S"], stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(3)
    finally:
        proc.kill()
        proc.wait()


async def test_terminate_machine_removes_object_and_runtime_dir(client: Client, daemon: Daemon, guest: Any) -> None:
    removed: list[list[str]] = []

    def on_signal(msg: Any) -> None:
        if msg.member == "MachineRemoved":
            removed.append(list(msg.body))

    await client.subscribe("org.vmspawnd1.Manager")
    client.bus.add_message_handler(on_signal)
    for how in ("TerminateMachine", "Terminate"):
        path = await client.create(f"term-{how}", **guest_options(guest))
        pid = await client.prop(path, "Leader")
        directory = daemon.runtime_dir / "machines" / f"term-{how}"
        assert directory.is_dir()
        if how == "TerminateMachine":
            await client.call("TerminateMachine", "s", [f"term-{how}"])
        else:
            await client.call("Terminate", path=path, interface="org.vmspawnd1.Machine")
        # Nothing but the logs stays, for whoever wants to read how it ended.
        assert sorted(p.name for p in directory.iterdir()) == ["console.log", "qemu.log"]
        assert pid not in qemu_pids(str(daemon.runtime_dir))
        assert f"term-{how}" not in await client.names()
        assert "org.vmspawnd1.Machine" not in busctl("introspect", "org.vmspawnd1", path, check=False).stdout
    assert [r[0] for r in removed] == ["term-TerminateMachine", "term-Terminate"]


async def test_virtiofs_directory_and_mounts_are_seen_by_the_guest(
    client: Client, daemon: Daemon, guest: Any, tmp_path: Path
) -> None:
    root, data = tmp_path / "root", tmp_path / "data"
    root.mkdir()
    data.mkdir()
    (root / "etc-marker").write_text("r")
    (data / "payload").write_text("d")
    options = guest_options(guest, directory=str(root), mounts=[{"source": str(data), "tag": "data"}])
    options["cmdline"] += " tinyguest.mount=root tinyguest.mount=data"
    path = await client.create("shares", **options)
    ports = {p["device"]: p for p in await client.prop(path, "Ports")}
    assert ports["rootfs"]["role"] == ports["fs0"]["role"] == "builtin"
    console = await client.prop(path, "ConsoleLog")
    await wait_console(console, "VMSPAWN-GUEST-READY", timeout=60)
    text = Path(console).read_text()
    assert "VMSPAWN-MOUNT root files=etc-marker" in text
    assert "VMSPAWN-MOUNT data files=payload" in text
    helpers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and b"virtiofsd" in read_cmdline(p)]
    assert len(helpers) >= 2
    await client.call("TerminateMachine", "s", ["shares"])
    # virtiofsd goes with QEMU.
    assert not [p for p in helpers if p.exists() and b"virtiofsd" in read_cmdline(p)]


def read_cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
