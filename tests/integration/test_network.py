"""NIC hotplug onto the same spare ports as drives, seen by a real guest under TCG (issue 15)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Variant

from vmspawnd import nic, tap

from .harness import Client, busctl, guest_options, shared_dir, wait_console
from .test_ctl import ctl, expect_error, ok
from .test_hotplug import VM, boot, console_len, disk, spare_owners, vm, wait_for  # noqa: F401

E = "org.vmspawnd1.Error."
MACHINE_IFACE = "org.vmspawnd1.Machine"


def busctl_add_nic(vm: VM, *options: str) -> tuple[str, str]:  # noqa: F811
    out = busctl("call", "org.vmspawnd1", vm.path, MACHINE_IFACE, "AddNetwork", "a{sv}",
                 str(len(options) // 3), *options).stdout  # fmt: skip
    m = re.fullmatch(r'ss "(\S+)" "(\S+)"\n', out)
    assert m, out
    return m.group(1), m.group(2)


async def add_nic(client: Client, vm: VM, **options: str) -> tuple[str, str]:  # noqa: F811
    nic_id, port = await client.call(
        "AddNetwork", "a{sv}", [{k: Variant("s", v) for k, v in options.items()}], path=vm.path, interface=MACHINE_IFACE
    )
    return str(nic_id), str(port)


async def networks(client: Client, vm: VM) -> dict[str, dict[str, Any]]:  # noqa: F811
    return {n["id"]: n for n in await client.prop(vm.path, "Networks")}


async def test_busctl_nic_is_seen_by_the_guest_with_its_mac_and_goes_after_remove(
    client: Client,
    vm: VM,  # noqa: F811
) -> None:
    before = await client.prop(vm.path, "FreeSparePorts")
    mark = console_len(vm)
    nic_id, port = busctl_add_nic(vm, "mac", "s", "02:00:00:aa:bb:01", "id", "s", "uplink")
    assert (nic_id, port) == ("uplink", "rp0")
    added = await wait_console(vm.console, r"VMSPAWN-NET-ADD (\S+) mac=02:00:00:aa:bb:01", start=mark)
    assert (await networks(client, vm))["uplink"] == {
        "id": "uplink", "network": "user", "mac": "02:00:00:aa:bb:01", "port": "rp0", "state": "attached",
    }  # fmt: skip
    ports = {p["id"]: p for p in await client.prop(vm.path, "Ports")}
    assert ports["rp0"]["device"] == "uplink" and ports["rp0"]["kind"] == "root-port"
    assert await client.prop(vm.path, "FreeSparePorts") == before - 1
    assert "uplink" in vm.probe.netdevs()

    mark = console_len(vm)
    busctl("call", "org.vmspawnd1", vm.path, MACHINE_IFACE, "RemoveNetwork", "s", "uplink")
    await wait_console(vm.console, rf"VMSPAWN-NET-REMOVE {added.group(1)} mac=02:00:00:aa:bb:01", start=mark)
    assert "uplink" not in await networks(client, vm)
    assert await client.prop(vm.path, "FreeSparePorts") == before
    assert (await spare_owners(client, vm))["rp0"] == ""
    # The netdev went with the device.
    assert "uplink" not in vm.probe.netdevs()


async def test_the_default_mac_is_stable_and_locally_administered(client: Client, vm: VM) -> None:  # noqa: F811
    machine_id = await client.prop(vm.path, "Id")
    mark = console_len(vm)
    nic_id, _ = await add_nic(client, vm)
    mac = (await networks(client, vm))[nic_id]["mac"]
    assert mac == nic.default_mac(machine_id, nic_id)
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01
    await wait_console(vm.console, rf"VMSPAWN-NET-ADD \S+ mac={mac}", start=mark)


@pytest.mark.no_guest
async def test_no_free_port_counts_drives_and_nics_together(
    client: Client,
    vm: VM,  # noqa: F811
    tmp_path: Path,
) -> None:
    await client.add_drive(vm.path, disk(tmp_path, "d1"), serial="d1")
    await add_nic(client, vm)
    await client.add_drive(vm.path, disk(tmp_path, "d2"), serial="d2")
    await add_nic(client, vm)
    assert await client.prop(vm.path, "FreeSparePorts") == 0
    netdevs = vm.probe.netdevs()
    with pytest.raises(DBusError) as e:
        await add_nic(client, vm)
    assert e.value.type == E + "NoFreePort"
    assert "nic" in str(e.value) and "disk" in str(e.value)
    with pytest.raises(DBusError) as e:
        await client.add_drive(vm.path, disk(tmp_path, "d3"))
    assert e.value.type == E + "NoFreePort"
    # The refused NIC left nothing behind.
    assert vm.probe.netdevs() == netdevs
    assert len(await networks(client, vm)) == 2


async def test_no_free_port_counts_shares_too(client: Client, vm: VM, tmp_path: Path) -> None:  # noqa: F811
    with shared_dir("vmspawnd-nicshare-", 0o755) as directory:
        share_id, _ = await client.add_share(vm.path, str(directory), tag="full")
        await add_nic(client, vm)
        await client.add_drive(vm.path, disk(tmp_path, "d1"), serial="d1")
        await add_nic(client, vm)
        assert await client.prop(vm.path, "FreeSparePorts") == 0
        for refused in (
            add_nic(client, vm),
            client.add_share(vm.path, str(directory), tag="more"),
            client.add_drive(vm.path, disk(tmp_path, "d2")),
        ):
            with pytest.raises(DBusError) as e:
                await refused
            assert e.value.type == E + "NoFreePort" and share_id in str(e.value), e.value
        # Removing the share makes room for a NIC.
        await client.remove_share(vm.path, share_id)
        await add_nic(client, vm)


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"mac": "01:00:5e:00:00:01"}, "InvalidArgument", "multicast"),
        ({"mac": "ff:ff:ff:ff:ff:ff"}, "InvalidArgument", "broadcast"),
        ({"mac": "00:00:00:00:00:00"}, "InvalidArgument", "all zeros"),
        ({"mac": "02:00:00:00:00"}, "InvalidArgument", "six hex octets"),
        ({"network": "none"}, "InvalidArgument", "adds nothing"),
        ({"network": "bridge"}, "InvalidArgument", "unknown network"),
        ({"network": "tap:"}, "InvalidArgument", "tap:NAME"),
        ({"id": "net0"}, "InvalidArgument", "reserved"),
        ({"id": "rp0"}, "InvalidArgument", "reserved"),
        ({"id": "9lives"}, "InvalidArgument", "invalid"),
    ],
)
@pytest.mark.no_guest
async def test_bad_add_network_is_refused_and_leaves_nothing(
    client: Client,
    vm: VM,  # noqa: F811
    options: dict[str, str],
    error: str,
    words: str,
) -> None:
    netdevs = vm.probe.netdevs()
    free = await client.prop(vm.path, "FreeSparePorts")
    with pytest.raises(DBusError) as e:
        await add_nic(client, vm, **options)
    assert e.value.type == E + error
    assert words in str(e.value)
    assert vm.probe.netdevs() == netdevs
    assert await client.prop(vm.path, "FreeSparePorts") == free
    assert await networks(client, vm) == {}


@pytest.mark.no_guest
async def test_a_duplicate_id_or_mac_is_refused(client: Client, vm: VM, tmp_path: Path) -> None:  # noqa: F811
    drive_id, _ = await client.add_drive(vm.path, disk(tmp_path, "d"))
    nic_id, _ = await add_nic(client, vm, mac="02:00:00:00:00:07")
    for options, words in (({"id": drive_id}, "already used"), ({"mac": "02:00:00:00:00:07"}, nic_id)):
        with pytest.raises(DBusError) as e:
            await add_nic(client, vm, **options)
        assert e.value.type == E + "InvalidArgument" and words in str(e.value)
    assert list(await networks(client, vm)) == [nic_id]


@pytest.mark.no_guest
async def test_remove_network_errors(client: Client, vm: VM) -> None:  # noqa: F811
    for nic_id in ("nope", "net0"):
        with pytest.raises(DBusError) as e:
            await client.call("RemoveNetwork", "s", [nic_id], path=vm.path, interface=MACHINE_IFACE)
        assert e.value.type == E + "NoSuchNetwork"


@pytest.mark.no_guest
async def test_add_network_fd_refuses_a_file_that_is_no_tap(client: Client, vm: VM, tmp_path: Path) -> None:  # noqa: F811
    path = disk(tmp_path, "not-a-tap")
    with open(path, "rb") as f, pytest.raises(DBusError) as e:
        await client.call(
            "AddNetworkFd", "ha{sv}", [0, {}], path=vm.path, interface=MACHINE_IFACE, unix_fds=[f.fileno()]
        )
    assert e.value.type == E + "InvalidArgument" and "TUNGETIFF" in str(e.value)
    assert await networks(client, vm) == {}


async def test_vmspawnctl_add_nic_and_remove_nic(client: Client, vm: VM) -> None:  # noqa: F811
    mark = console_len(vm)
    added = json.loads(ok("add-nic", vm.name, "--mac", "02:00:00:00:00:c1", "--id", "ctlnic", "--json"))
    assert added == {"machine": vm.name, "id": "ctlnic", "port": "rp0", "mac": "02:00:00:00:00:c1"}
    seen = await wait_console(vm.console, r"VMSPAWN-NET-ADD (\S+) mac=02:00:00:00:00:c1", start=mark)
    assert "ctlnic" in ok("status", vm.name, "--json")
    mark = console_len(vm)
    assert ok("remove-nic", vm.name, "ctlnic") == ""
    await wait_console(vm.console, rf"VMSPAWN-NET-REMOVE {seen.group(1)}", start=mark)
    expect_error(ctl("remove-nic", vm.name, "ctlnic"), 3, "no network 'ctlnic'", "network interfaces")
    expect_error(ctl("add-nic", vm.name, "--mac", "ff:ff:ff:ff:ff:ff"), 2, "broadcast", "")


async def remove_nic(client: Client, path: str, nic_id: str, timeout_usec: int) -> None:
    opts = {"timeout_usec": Variant("t", timeout_usec)}
    await client.call("RemoveNetworkEx", "sa{sv}", [nic_id, opts], path=path, interface=MACHINE_IFACE)


async def test_remove_network_without_a_guest_times_out_and_stays_removing(client: Client, guest: Any) -> None:
    """-S keeps the CPUs stopped: no guest lets go, no DEVICE_DELETED."""
    path = await client.create("nicstopped", **guest_options(guest, hotplug_spares=2, qemu_extra=["-S"]))
    nic_id, _ = (await client.call("AddNetwork", "a{sv}", [{}], path=path, interface=MACHINE_IFACE))[:2]
    with pytest.raises(DBusError) as e:
        await remove_nic(client, path, nic_id, 300_000)
    assert e.value.type == E + "UnplugTimeout" and "removing" in e.value.text
    assert {n["id"]: n["state"] for n in await client.prop(path, "Networks")} == {nic_id: "removing"}
    assert await client.prop(path, "FreeSparePorts") == 1
    with pytest.raises(DBusError) as e:
        await client.call("RemoveNetwork", "s", [nic_id], path=path, interface=MACHINE_IFACE)
    assert e.value.type == E + "UnplugInProgress"


async def test_a_late_device_deleted_frees_the_nic_its_netdev_and_port(client: Client, vm: VM) -> None:  # noqa: F811
    """The guest needs ~100 ms to let go; a 1 ms timeout expires first."""
    mark = console_len(vm)
    nic_id, _ = await add_nic(client, vm)
    await wait_console(vm.console, r"VMSPAWN-NET-ADD ", start=mark)
    with pytest.raises(DBusError) as e:
        await remove_nic(client, vm.path, nic_id, 1000)
    assert e.value.type == E + "UnplugTimeout"
    await wait_for(lambda: client.prop(vm.path, "FreeSparePorts"), 4)
    assert await client.prop(vm.path, "Networks") == []
    assert nic_id not in vm.probe.netdevs()


TAPS = [f"vmsn{os.getpid() % 10000}{suffix}" for suffix in ("a", "b")]


@pytest.fixture
def taps() -> Iterator[list[str]]:
    """Two persistent taps root made (deleted again once QEMU let go of them)."""
    for name in TAPS:
        subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    try:
        yield TAPS
    finally:
        for name in TAPS:
            subprocess.run(["ip", "tuntap", "del", "dev", name, "mode", "tap"], capture_output=True)


async def test_a_tap_by_name_and_a_tap_by_fd_reach_the_guest(client: Client, vm: VM, taps: list[str]) -> None:  # noqa: F811
    mark = console_len(vm)
    by_name, _ = await add_nic(client, vm, network=f"tap:{taps[0]}", mac="02:00:00:00:0a:01")
    fd = tap.open_tap(0, taps[1], ())
    try:
        by_fd, _ = await client.call(
            "AddNetworkFd", "ha{sv}", [0, {"mac": Variant("s", "02:00:00:00:0a:02")}],
            path=vm.path, interface=MACHINE_IFACE, unix_fds=[fd],
        )  # fmt: skip
    finally:
        os.close(fd)
    for mac in ("02:00:00:00:0a:01", "02:00:00:00:0a:02"):
        await wait_console(vm.console, rf"VMSPAWN-NET-ADD \S+ mac={mac}", start=mark)
    nets = await networks(client, vm)
    assert nets[by_name]["network"] == f"tap:{taps[0]}" and nets[by_fd]["network"] == f"fd:{taps[1]}"
    # QEMU holds each tap (tun's fdinfo names it), the daemon none.
    leader = await client.prop(vm.path, "Leader")
    held = [f.read_text() for f in Path(f"/proc/{leader}/fdinfo").iterdir()]
    assert all(any(f"iff:\t{name}\n" in info for info in held) for name in taps)
    for nic_id in (by_name, by_fd):
        await client.call("RemoveNetwork", "s", [nic_id], path=vm.path, interface=MACHINE_IFACE)
    assert await networks(client, vm) == {}
