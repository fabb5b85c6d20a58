"""Every bad CreateMachine gets a typed error and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Variant

from .harness import Client, Daemon, guest_options, qemu_pids

E = "org.vmspawnd1.Error."


async def expect_error(client: Client, daemon: Daemon, name: str, opts: dict[str, Any], error: str, text: str) -> str:
    with pytest.raises(DBusError) as e:
        await client.create(name, **opts)
    assert e.value.type == E + error, e.value.text
    assert text in e.value.text
    assert await client.names() == []
    assert qemu_pids(str(daemon.runtime_dir)) == []
    machines = daemon.runtime_dir / "machines"
    assert not machines.exists() or [p for p in machines.iterdir() if p.name == name] == []
    return str(e.value.text)


@pytest.mark.parametrize(
    ("name", "error", "text"),
    [
        ("", "InvalidArgument", "invalid machine name"),
        ("/", "InvalidArgument", "invalid machine name"),
        ("..", "InvalidArgument", "invalid machine name"),
        (".", "InvalidArgument", "invalid machine name"),
        ("x" * 65, "InvalidArgument", "1-64 characters"),
        ("a b", "InvalidArgument", "A-Z a-z 0-9"),
        ("ü", "InvalidArgument", "A-Z a-z 0-9"),
    ],
)
async def test_bad_names(client: Client, daemon: Daemon, guest: Any, name: str, error: str, text: str) -> None:
    await expect_error(client, daemon, name, guest_options(guest), error, text)


async def test_unknown_option_key(client: Client, daemon: Daemon, guest: Any) -> None:
    opts = guest_options(guest, colour=Variant("s", "blue"))
    msg = await expect_error(client, daemon, "m", opts, "InvalidArgument", "unknown CreateMachine option 'colour'")
    assert "known options:" in msg


async def test_wrong_variant_type(client: Client, daemon: Daemon, guest: Any) -> None:
    opts = guest_options(guest, memory=Variant("s", "512M"))
    await expect_error(client, daemon, "m", opts, "InvalidArgument", "'memory' must have type 't', got 's'")


async def test_no_boot_source(client: Client, daemon: Daemon) -> None:
    await expect_error(client, daemon, "m", {"accel": "tcg"}, "InvalidArgument", "no boot source")


async def test_missing_path(client: Client, daemon: Daemon, guest: Any) -> None:
    opts = guest_options(guest, image="/nonexistent/disk.raw")
    await expect_error(client, daemon, "m", opts, "InvalidArgument", "'/nonexistent/disk.raw' does not exist")


async def test_directory_as_path(client: Client, daemon: Daemon, guest: Any, tmp_path: Path) -> None:
    opts = guest_options(guest, drives=[{"path": str(tmp_path)}])
    await expect_error(client, daemon, "m", opts, "InvalidArgument", "is a directory")


async def test_unknown_disk_type(client: Client, daemon: Daemon, guest: Any, tmp_path: Path) -> None:
    (tmp_path / "d").write_bytes(b"\0" * 4096)
    opts = guest_options(guest, image=str(tmp_path / "d"), disk_type="floppy")
    msg = await expect_error(client, daemon, "m", opts, "InvalidArgument", "unknown disk_type 'floppy'")
    assert "virtio-blk" in msg and "nvme" in msg


async def test_duplicate_name(client: Client, daemon: Daemon, guest: Any) -> None:
    await client.create("twice", **guest_options(guest))
    with pytest.raises(DBusError) as e:
        await client.create("twice", **guest_options(guest))
    assert e.value.type == E + "MachineExists"
    assert len(qemu_pids(str(daemon.runtime_dir))) == 1


async def test_181_ports_refused_before_qemu(client: Client, daemon: Daemon, guest: Any, tmp_path: Path) -> None:
    (tmp_path / "d").write_bytes(b"\0" * 4096)
    opts = guest_options(guest, image=str(tmp_path / "d"), hotplug_spares=180)
    msg = await expect_error(
        client, daemon, "m", opts, "TooManyPorts", "Too many PCIe ports requested (181, max 180 on this machine"
    )
    assert "hotplug_spares" in msg
    assert not (daemon.runtime_dir / "machines" / "m").exists()


async def test_slot_budget_overflow(client: Client, daemon: Daemon, guest: Any) -> None:
    extra = []
    for i in range(27):
        extra += ["-device", f"nvme,serial=s{i}"]
    opts = guest_options(guest, qemu_extra=extra)
    msg = await expect_error(client, daemon, "m", opts, "PcieSlotsExhausted", "27 for qemu_extra -device nvme")
    assert "1 for 10 PCIe ports (at the fewest)" in msg and "3 for implicit devices" in msg


async def test_qemu_exiting_at_start_reports_its_stderr(client: Client, daemon: Daemon, guest: Any) -> None:
    opts = guest_options(guest, qemu_extra=["-device", "nvme,serial=x,bus=no-such-bus"])
    msg = await expect_error(client, daemon, "m", opts, "QemuFailed", "exited during start-up")
    assert "qemu-system-x86_64: -device nvme,serial=x,bus=no-such-bus: Bus 'no-such-bus' not found" in msg


async def test_a_device_type_qemu_does_not_have_is_refused_before_qemu(
    client: Client, daemon: Daemon, guest: Any
) -> None:
    opts = guest_options(guest, qemu_extra=["-device", "no-such-device,bus=rp0"])
    msg = await expect_error(client, daemon, "m", opts, "InvalidArgument", "QEMU has no device type 'no-such-device'")
    assert "-device help" in msg


async def test_vsock_without_vhost_vsock_says_what_to_do(client: Client, daemon: Daemon, guest: Any) -> None:
    if Path("/dev/vhost-vsock").exists():
        pytest.skip("this host has vhost-vsock: the vsock test in test_create covers it")
    await expect_error(client, daemon, "m", guest_options(guest, vsock=True), "InvalidArgument", "modprobe vhost_vsock")


@pytest.mark.parametrize(
    ("share", "text"),
    [
        ({"directory": "/nonexistent"}, "is not an existing directory"),
        ({"mounts": [{"source": "/etc/hostname", "tag": "x"}]}, "is not an existing directory"),
        ({"mounts": [{"source": "/tmp", "tag": "has space"}]}, "virtiofs tag 'has space'"),
        ({"directory": "/tmp", "mounts": [{"source": "/tmp", "tag": "root"}]}, "tags must be unique"),
        ({"mounts": [{"source": "/tmp", "tag": "ro", "read_only": True}]}, "read-only virtiofs mounts"),
        ({"mounts": [{"source": "/tmp"}]}, "needs 'source' and 'tag'"),
    ],
)
async def test_bad_virtiofs_shares(
    client: Client, daemon: Daemon, guest: Any, share: dict[str, Any], text: str
) -> None:
    await expect_error(client, daemon, "m", guest_options(guest, **share), "InvalidArgument", text)
