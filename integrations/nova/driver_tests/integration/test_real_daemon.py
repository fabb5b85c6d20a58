"""The driver against a real vmspawnd on a private bus, the tiny guest under TCG.

One instance's life as Nova drives it: spawn, a volume attached (the guest
sees it, its block stats count the guest's reads), an NMI (the guest logs
it), power off and on (the volume is still there), reboot, the console
output, suspend and resume (the same guest goes on, the volume still
there), the volume detached, destroy; nothing is left behind.
"""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
from nova.compute import power_state, provider_tree
from oslo_serialization import jsonutils
from tests.integration.harness import Daemon, not_just_logs, qemu_pids, wait_console
from tests.integration.test_agent import root_hash, sha512_crypt
from tests.integration.test_console import read_until

from driver_tests.integration.instances import BOOT, MiB, console, console_log, console_size, new_instance
from nova import context as nova_context
from nova import exception, objects
from nova.virt import fake
from nova.virt.vmspawnd import VmspawndDriver, mapping
from nova.virt.vmspawnd.driver import RESCUED_DISK_SERIAL


@pytest.fixture
def driver(guest_conf: Any, daemon: Daemon) -> Any:
    d = VmspawndDriver(fake.FakeVirtAPI())
    d.init_host("test-host")
    yield d
    # The leak check: none of this daemon's QEMUs, machine dirs or instances left.
    d.cleanup_host("test-host")
    assert qemu_pids(str(daemon.runtime_dir)) == []
    assert not_just_logs(daemon.runtime_dir / "machines") == []


def test_unknown_instance_is_not_found(driver: VmspawndDriver) -> None:
    with pytest.raises(exception.InstanceNotFound):
        driver.get_info(new_instance())


def volume_stats_and_nmi(
    driver: VmspawndDriver, instance: Any, info: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """block_stats of the volume at /dev/vdb counts the guest's reads of it
    (its partition scan), and trigger_crash_dump's NMI reaches the guest."""
    # No Nova database here: its lookup gives the mapping the compute manager records at attach.
    bdm = objects.BlockDeviceMapping(
        volume_id=info["serial"], device_name="/dev/vdb", source_type="volume", destination_type="volume",
        connection_info=jsonutils.dumps(info),
    )  # fmt: skip
    monkeypatch.setattr(
        objects.BlockDeviceMappingList,
        "get_by_instance_uuid",
        lambda ctxt, uuid: objects.BlockDeviceMappingList(objects=[bdm]),
    )
    rd_req, rd_bytes, wr_req, wr_bytes, errors = driver.block_stats(instance, "vdb")
    # The guest read it when it found it, and wrote nothing.
    assert rd_req > 0 and rd_bytes >= 512 and (wr_req, wr_bytes, errors) == (0, 0, 0)
    assert driver.block_stats(instance, info["serial"])[:2] >= (rd_req, rd_bytes)
    assert driver.block_stats(instance, "vdz") is None
    mark = console_size(driver, instance)
    driver.trigger_crash_dump(instance)
    console(driver, instance, "NMI received for unknown reason", start=mark)


def test_an_instance_life(
    driver: VmspawndDriver, workdir: Path, monkeypatch: pytest.MonkeyPatch, daemon: Daemon
) -> None:
    ctxt = nova_context.get_admin_context()
    instance = new_instance()
    # The image asks for the guest agent (as Nova keeps it: in the system metadata).
    instance.system_metadata = {"image_hw_qemu_guest_agent": "yes"}
    image = objects.ImageMeta.from_dict({"properties": {"hw_qemu_guest_agent": True}})
    driver.spawn(ctxt, instance, image, [], None, {}, network_info=[])
    try:
        assert instance.name in driver.list_instances()
        assert instance.uuid in driver.list_instance_uuids()
        console(driver, instance, "VMSPAWN-GUEST-READY")
        assert driver.get_info(instance).state == power_state.RUNNING

        # set_admin_password: qemu-ga in the guest rewrites root's /etc/shadow entry.
        console(driver, instance, r"VMSPAWN-AGENT vport\d+p\d+")
        name = mapping.machine_name(instance.name, instance.uuid)
        assert asyncio.run(root_hash(daemon, name)) == "*"
        driver.set_admin_password(instance, "p4ssw0rd")
        hashed = asyncio.run(root_hash(daemon, name))
        assert sha512_crypt("p4ssw0rd", hashed.split("$")[2]) == hashed

        # A local volume on a spare port: the guest sees it, by its serial.
        volume_id = str(uuid.uuid4())
        volume = workdir / f"volume-{volume_id}"
        volume.write_bytes(b"\0" * MiB)
        info = {"driver_volume_type": "local", "serial": volume_id, "data": {"device_path": str(volume)}}
        mark = console_size(driver, instance)
        driver.attach_volume(ctxt, info, instance, "/dev/vdb")
        serial = re.escape(mapping.serial(volume_id))
        console(driver, instance, rf"VMSPAWN-BLOCK-ADD \w+ serial={serial}", start=mark)
        volume_stats_and_nmi(driver, instance, info, monkeypatch)

        # Off and on: the volume comes back with the machine.
        driver.power_off(instance, timeout=30)
        assert driver.get_info(instance).state == power_state.SHUTDOWN
        # Stopped: no NMI (as libvirt: InstanceNotRunning), no stats (None).
        with pytest.raises(exception.InstanceNotRunning):
            driver.trigger_crash_dump(instance)
        assert driver.block_stats(instance, "vdb") is None
        mark = console_size(driver, instance)
        bdi = {"block_device_mapping": [{"connection_info": info, "mount_device": "/dev/vdb"}]}
        driver.power_on(ctxt, instance, [], bdi)
        console(driver, instance, rf"VMSPAWN-BLOCK(-ADD)? \w+ serial={serial}", start=mark)
        console(driver, instance, "VMSPAWN-GUEST-READY", start=mark)
        assert driver.get_info(instance).state == power_state.RUNNING

        # A reboot boots the guest again, volume and all.
        mark = console_size(driver, instance)
        driver.reboot(ctxt, instance, [], "SOFT", bdi)
        console(driver, instance, rf"VMSPAWN-BLOCK \w+ serial={serial}", start=mark)
        console(driver, instance, "VMSPAWN-GUEST-READY", start=mark)
        assert "VMSPAWN-GUEST-READY" in driver.get_console_output(ctxt, instance)

        # Pause and unpause.
        driver.pause(instance)
        assert driver.get_info(instance).state == power_state.PAUSED
        driver.unpause(instance)
        assert driver.get_info(instance).state == power_state.RUNNING

        # Suspend to disk and resume: the same guest goes on (no new boot), the volume still its own.
        mark = console_size(driver, instance)
        driver.suspend(ctxt, instance)
        assert driver.get_info(instance).state == power_state.SUSPENDED
        driver.resume(ctxt, instance, [], bdi)
        assert driver.get_info(instance).state == power_state.RUNNING
        # Resuming one that runs changes nothing.
        driver.resume(ctxt, instance, [], bdi)
        assert driver.get_info(instance).state == power_state.RUNNING
        after = console_log(driver, instance).read_text(errors="replace")[mark:]
        assert "VMSPAWN-GUEST-READY" not in after and "VMSPAWN-PCI" not in after, after[-2000:]

        mark = console_size(driver, instance)
        driver.detach_volume(ctxt, info, instance, "/dev/vdb")
        console(driver, instance, r"VMSPAWN-BLOCK-REMOVE \w+", start=mark)
        drives = driver.client.properties(mapping.machine_name(instance.name, instance.uuid))["Drives"]
        assert [d for d in drives if d["path"] == str(volume)] == []
    finally:
        driver.destroy(ctxt, instance, [])
    assert instance.name not in driver.list_instances()
    with pytest.raises(exception.InstanceNotFound):
        driver.get_info(instance)


def test_volumes_changed_while_off_change_at_power_on(driver: VmspawndDriver, workdir: Path) -> None:
    ctxt = nova_context.get_admin_context()
    instance = new_instance()
    driver.spawn(ctxt, instance, objects.ImageMeta.from_dict({}), [], None, {}, network_info=[])
    try:
        console(driver, instance, "VMSPAWN-GUEST-READY")
        volume_id = str(uuid.uuid4())
        volume = workdir / f"volume-{volume_id}"
        volume.write_bytes(b"\0" * MiB)
        info = {"driver_volume_type": "local", "serial": volume_id, "data": {"device_path": str(volume)}}
        serial = re.escape(mapping.serial(volume_id))

        # Nova's timeout 0: off at once, no clean shutdown.
        driver.power_off(instance)
        assert driver.get_info(instance).state == power_state.SHUTDOWN
        driver.attach_volume(ctxt, info, instance, "/dev/vdb")
        mark = console_size(driver, instance)
        bdi = {"block_device_mapping": [{"connection_info": info, "mount_device": "/dev/vdb"}]}
        driver.power_on(ctxt, instance, [], bdi)
        console(driver, instance, rf"VMSPAWN-BLOCK(-ADD)? \w+ serial={serial}", start=mark)

        driver.power_off(instance)
        driver.detach_volume(ctxt, info, instance, "/dev/vdb")
        driver.power_on(ctxt, instance, [], {"block_device_mapping": []})
        drives = driver.client.properties(mapping.machine_name(instance.name, instance.uuid))["Drives"]
        assert [d for d in drives if d["path"] == str(volume)] == []
        # The boot that follows (the log of a machine made again) has no such disk.
        text = console(driver, instance, r"(?s)VMSPAWN-PCI.*VMSPAWN-GUEST-READY").group(0)
        assert f"serial={mapping.serial(volume_id)}" not in text.split("VMSPAWN-GUEST-READY")[-2]
    finally:
        driver.destroy(ctxt, instance, [])


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def shell_driver(driver: VmspawndDriver, nova_conf: Any) -> Any:
    """The guest with a shell on its console; consoles on the loopback."""
    overrides = {"cmdline": nova_conf.vmspawnd.cmdline + " tinyguest.shell", "console_address": "127.0.0.1"}
    for key, value in overrides.items():
        nova_conf.set_override(key, value, group="vmspawnd")
    yield driver
    for key in overrides:
        nova_conf.clear_override(key, group="vmspawnd")


# Under Nova's eventlet: a proxy thread that dies of an exception fails the test.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_nova_proxies_reach_the_guests_display_and_serial_console_over_tcp(shell_driver: VmspawndDriver) -> None:
    driver = shell_driver
    ctxt = nova_context.get_admin_context()
    instance = new_instance()
    # Nova's [vnc] enabled (its default): the machine has a VNC display.
    driver.spawn(ctxt, instance, objects.ImageMeta.from_dict({}), [], None, {}, network_info=[])
    try:
        console(driver, instance, "VMSPAWN-GUEST-READY")
        console(driver, instance, r"/ # ")
        vnc = driver.get_vnc_console(ctxt, instance)
        assert vnc.host == "127.0.0.1"
        # What novncproxy does: a TCP connection, then RFB.
        with socket.create_connection((vnc.host, vnc.port), timeout=30) as sock:
            assert read_until(sock, r"RFB 003\.008\n") == "RFB 003.008\n"
        # The compute manager's validate_console_port asks again: the same port.
        assert driver.get_vnc_console(ctxt, instance).port == vnc.port
        with pytest.raises(exception.ConsoleTypeUnavailable):
            driver.get_spice_console(ctxt, instance)

        # What serialproxy does: bytes both ways to the guest's shell.
        serial = driver.get_serial_console(ctxt, instance)
        with socket.create_connection((serial.host, serial.port), timeout=30) as sock:
            sock.sendall(b"\r")
            read_until(sock, r"/ # ")
            sock.sendall(b"echo con''sole $((6*7))\r")
            read_until(sock, r"console 42")
    finally:
        driver.destroy(ctxt, instance, [])
    # Gone with the instance.
    assert refused(vnc.host, vnc.port) and refused(serial.host, serial.port)


class Images:
    """The two image service calls snapshot makes; the upload is kept (no Glance here)."""

    def __init__(self) -> None:
        self.uploaded: dict[str, tuple[dict[str, Any], bytes]] = {}

    def get(self, context: Any, image_id: str) -> dict[str, Any]:
        return {"id": image_id, "name": f"snapshot {image_id}"}

    def update(self, context: Any, image_id: str, metadata: dict[str, Any], data: Any = None, **kw: Any) -> None:
        self.uploaded[image_id] = metadata, data.read()


def guest_writes(sock: socket.socket, text: str, dev: str, block: int) -> None:
    """`text` onto the guest's /dev/`dev` at 4 KiB block `block`, down to the device."""
    sock.sendall(
        f"printf {text} | dd of=/dev/{dev} bs=4096 seek={block} conv=notrunc,fsync; echo WR''OTE-$?\r".encode()
    )
    read_until(sock, r"WROTE-0")


def at(path: Path, block: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(block * 4096)
        return f.read(length)


def test_a_running_instance_is_snapshotted_and_its_volume_swapped_under_the_guest(
    shell_driver: VmspawndDriver, nova_conf: Any, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = shell_driver
    disk = workdir / f"disk-{uuid.uuid4()}.raw"
    disk.write_bytes(b"\0" * MiB)
    nova_conf.set_override("image", str(disk), group="vmspawnd")
    images = Images()
    monkeypatch.setattr(driver, "_image_api", images)
    ctxt = nova_context.get_admin_context()
    instance = new_instance()
    name = mapping.machine_name(instance.name, instance.uuid)
    driver.spawn(ctxt, instance, objects.ImageMeta.from_dict({}), [], None, {}, network_info=[])
    try:
        console(driver, instance, "VMSPAWN-GUEST-READY")
        console(driver, instance, r"/ # ")
        sock = driver.client.open_console(name)
        # snapshot: the image uploaded holds the instance's disk as the guest wrote it; the guest runs on.
        guest_writes(sock, "ROOT-MARK", "vda", 8)
        states: list[str] = []
        driver.snapshot(ctxt, instance, "img-1", lambda task_state, **kw: states.append(task_state))
        metadata, data = images.uploaded["img-1"]
        assert data == disk.read_bytes() and at(disk, 8, 9) == b"ROOT-MARK"
        assert (metadata["disk_format"], metadata["properties"]["image_location"]) == ("raw", "snapshot")
        assert states == ["image_pending_upload", "image_uploading"]
        assert list((workdir / "instances" / instance.uuid).glob("snapshot-*")) == []
        assert driver.get_info(instance).state == power_state.RUNNING

        # swap_volume: the guest keeps its disk (no unplug) and writes into the new volume.
        old_id, new_id = str(uuid.uuid4()), str(uuid.uuid4())
        old, new = workdir / f"volume-{old_id}", workdir / f"volume-{new_id}"
        old.write_bytes(b"\0" * MiB)
        new.write_bytes(b"\0" * MiB)
        old_info = {"driver_volume_type": "local", "serial": old_id, "data": {"device_path": str(old)}}
        new_info = {"driver_volume_type": "local", "serial": new_id, "data": {"device_path": str(new)}}
        mark = console_size(driver, instance)
        driver.attach_volume(ctxt, old_info, instance, "/dev/vdb")
        dev = console(driver, instance, rf"VMSPAWN-BLOCK-ADD (\w+) serial={re.escape(mapping.serial(old_id))}", mark)
        guest_writes(sock, "BEFORE-SWAP", dev.group(1), 4)
        mark = console_size(driver, instance)
        driver.swap_volume(ctxt, old_info, new_info, instance, "/dev/vdb", 0)
        guest_writes(sock, "AFTER-SWAP", dev.group(1), 16)
        assert at(new, 4, 11) == b"BEFORE-SWAP" and at(new, 16, 10) == b"AFTER-SWAP"
        assert at(old, 16, 10) == b"\0" * 10
        assert "VMSPAWN-BLOCK-REMOVE" not in console_log(driver, instance).read_text(errors="replace")[mark:]
        drives = {d["id"]: d["path"] for d in driver.client.properties(name)["Drives"]}
        assert drives[mapping.drive_id(old_id)] == str(new)
        sock.close()
        # Nova's records name the new volume now: detach finds the drive that moved onto it.
        driver.detach_volume(ctxt, new_info, instance, "/dev/vdb")
        assert [
            p for p in (d["path"] for d in driver.client.properties(name)["Drives"]) if p in (str(old), str(new))
        ] == []
    finally:
        driver.destroy(ctxt, instance, [])
        nova_conf.clear_override("image", group="vmspawnd")


def test_the_host_offers_its_hotplug_ports(driver: VmspawndDriver, nova_conf: Any) -> None:
    tree = provider_tree.ProviderTree()
    tree.new_root("test-host", str(uuid.uuid4()))
    driver.update_provider_tree(tree, "test-host")
    inventory = tree.data("test-host").inventory
    assert inventory[mapping.HOTPLUG_RC]["total"] == nova_conf.vmspawnd.hotplug_ports
    assert inventory["MEMORY_MB"]["total"] > 0 and inventory["VCPU"]["total"] > 0
    assert driver.get_available_resource("test-host")["hypervisor_version"] > 0


# -- rescue and resize ----------------------------------------------------


@pytest.fixture
def disk_driver(driver: VmspawndDriver, nova_conf: Any, workdir: Path) -> Any:
    """The driver with a disk for every instance ([vmspawnd] image) and a
    rescue image; the kernel prints its memory (loglevel after quiet)."""
    disk, rescue = workdir / f"disk-{uuid.uuid4()}.raw", workdir / f"rescue-{uuid.uuid4()}.raw"
    disk.write_bytes(b"\0" * MiB)
    rescue.write_bytes(b"\0" * MiB)
    overrides = {"image": str(disk), "rescue_image": str(rescue), "cmdline": nova_conf.vmspawnd.cmdline + " loglevel=7"}
    for key, value in overrides.items():
        nova_conf.set_override(key, value, group="vmspawnd")
    yield driver
    for key in overrides:
        nova_conf.clear_override(key, group="vmspawnd")
    disk.unlink()
    rescue.unlink()


def memory_kib(driver: VmspawndDriver, instance: Any, start: int) -> int:
    """The guest kernel's own count of its memory ("Memory: 212345K/261624K available")."""
    return int(console(driver, instance, r"Memory: \d+K/(\d+)K available", start=start).group(1))


def test_rescue_resize_and_back(disk_driver: VmspawndDriver, nova_conf: Any, workdir: Path) -> None:
    driver = disk_driver
    ctxt = nova_context.get_admin_context()
    instance = new_instance()
    instance.host = "test-host"
    name = mapping.machine_name(instance.name, instance.uuid)
    driver.spawn(ctxt, instance, objects.ImageMeta.from_dict({}), [], None, {}, network_info=[])
    try:
        console(driver, instance, "VMSPAWN-GUEST-READY")
        old = memory_kib(driver, instance, 0)
        volume_id = str(uuid.uuid4())
        volume = workdir / f"volume-{volume_id}"
        volume.write_bytes(b"\0" * MiB)
        info = {"driver_volume_type": "local", "serial": volume_id, "data": {"device_path": str(volume)}}
        bdi = {"block_device_mapping": [{"connection_info": info, "mount_device": "/dev/vdb"}]}
        serial = re.escape(mapping.serial(volume_id))
        mark = console_size(driver, instance)
        driver.attach_volume(ctxt, info, instance, "/dev/vdb")
        console(driver, instance, rf"VMSPAWN-BLOCK-ADD \w+ serial={serial}", start=mark)

        # Rescue: a second machine boots its own disk, the instance's disk its second drive.
        driver.rescue(ctxt, instance, [], objects.ImageMeta.from_dict({}), "", None)
        rescue = mapping.rescue_name(instance.uuid)
        assert driver.client.properties(name)["State"] == "stopped"
        assert driver.list_instances() == [instance.name]
        assert driver.get_info(instance).state == power_state.RUNNING
        rescue_log = Path(driver.client.properties(rescue)["ConsoleLog"])
        boot = asyncio.run(wait_console(rescue_log, r"(?s)VMSPAWN-BLOCK.*VMSPAWN-GUEST-READY", timeout=BOOT)).group(0)
        disks = re.findall(r"VMSPAWN-BLOCK (\w+) serial=(.*)", boot)
        assert disks == [("vda", ""), ("vdb", RESCUED_DISK_SERIAL)]
        # The console is the rescue machine's, as libvirt's is the rescue domain's.
        vnc = driver.get_vnc_console(ctxt, instance)
        with socket.create_connection((vnc.host, vnc.port), timeout=30) as sock:
            assert read_until(sock, r"RFB 003\.008\n") == "RFB 003.008\n"

        # Unrescue: the rescue machine and its disk go, the instance boots again with its volume.
        mark = console_size(driver, instance)
        driver.unrescue(ctxt, instance)
        assert rescue not in [n for n, _ in driver.client.list_machines()]
        assert list((workdir / "instances" / instance.uuid).glob("*.rescue")) == []
        console(driver, instance, rf"VMSPAWN-BLOCK \w+ serial={serial}", start=mark)
        console(driver, instance, "VMSPAWN-GUEST-READY", start=mark)

        # A move to a host that does not see the disk is refused, the instance untouched.
        bigger = objects.Flavor(
            name="small", memory_mb=384, vcpus=1, root_gb=0, ephemeral_gb=0, swap=0, extra_specs={}, flavorid="2"
        )
        with pytest.raises(exception.InstanceFaultRollback, match="not in instances_path"):
            driver.migrate_disk_and_power_off(ctxt, instance, "192.0.2.1", bigger, [], bdi)
        assert driver.get_info(instance).state == power_state.RUNNING

        # Resize on this host: the guest comes back with the new memory, and its volume.
        disk_info = driver.migrate_disk_and_power_off(ctxt, instance, driver.get_host_ip_addr(), bigger, [], bdi)
        assert [d["path"] for d in jsonutils.loads(disk_info)] == [nova_conf.vmspawnd.image]
        assert driver.get_info(instance).state == power_state.SHUTDOWN
        instance.old_flavor, instance.flavor = instance.flavor, bigger
        migration = objects.Migration(source_compute="test-host", dest_compute="test-host")
        driver.finish_migration(ctxt, migration, instance, disk_info, [], instance.image_meta, True, {}, bdi)
        # The machine is made anew: its console log starts afresh.
        new = memory_kib(driver, instance, 0)
        # The kernel counts a little less than the machine has (its holes and reservations).
        assert 240 * 1024 < old <= 256 * 1024 < 368 * 1024 < new <= 384 * 1024, (old, new)
        console(driver, instance, rf"VMSPAWN-BLOCK \w+ serial={serial}")
        driver.confirm_migration(ctxt, migration, instance, [])
        assert driver.list_instances() == [instance.name]
        assert driver.get_info(instance).state == power_state.RUNNING
    finally:
        driver.destroy(ctxt, instance, [])
    assert driver.list_instances() == []
