"""Nova's own virt-driver conformance suite run against VmspawndDriver over the fake client.

Nova's `catch_notimplementederror` passes a test whose driver raised
NotImplementedError. So that passes mean the driver really ran, each test
records whether it hit NotImplementedError, and a test fails when that
differs from NOT_IMPLEMENTED below (the list is the plain truth of what the
driver leaves to Nova's fallbacks).
"""

from __future__ import annotations

import glob
import os
import tempfile
import uuid
from typing import Any
from unittest import mock

import fixtures
import nova.conf
from nova.tests.unit.virt import test_virt_drivers as upstream
from oslo_serialization import jsonutils

from driver_tests.fakeclient import FakeClient
from nova import objects, test

CONF = nova.conf.CONF

# Tests whose driver method raises NotImplementedError, and why.
NOT_IMPLEMENTED = {
    # VMware's MKS console: no such thing in QEMU.
    "test_get_mks_console",
    # A running host cannot start itself up (its BMC does); reboot and shutdown go to logind.
    "test_host_power_action_startup",
}


def fake_volume(data: dict[str, Any]) -> tuple[str, str]:
    """Nova's tests attach `driver_volume_type: fake` volumes: an empty local file."""
    fd, path = tempfile.mkstemp(prefix="fake-volume-")
    os.close(fd)
    return path, "raw"


def attach_named_volume(driver: Any, context: Any, instance: Any, device: str) -> str:
    """A fake volume attached at `device`, with the mapping the compute manager records."""
    volume_id = str(uuid.uuid4())
    connection_info = {"driver_volume_type": "fake", "serial": volume_id, "data": {}}
    objects.BlockDeviceMapping(
        context, instance_uuid=instance.uuid, volume_id=volume_id, device_name=device, source_type="volume",
        destination_type="volume", connection_info=jsonutils.dumps(connection_info),
    ).create()  # fmt: skip
    driver.attach_volume(context, connection_info, instance, device)
    return volume_id


class RecordingLog:
    """Stands in for the upstream module's LOG: notes NotImplementedError reports."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.not_implemented: list[str] = []

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if "does not implement" in msg:
            self.not_implemented.append(str(args[0]["method"]) if args else msg)
        self.real.error(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class FakeVmspawnd(fixtures.Fixture):
    """The driver over the in-memory vmspawnd, taking Nova's fake volumes."""

    def _setUp(self) -> None:
        self.useFixture(fixtures.MonkeyPatch("nova.virt.vmspawnd.client.Client", FakeClient))
        self.useFixture(
            fixtures.MonkeyPatch("nova.virt.vmspawnd.VmspawndDriver.volume_types", {"local": None, "fake": fake_volume})
        )


class VmspawndDriverTestCase(upstream._VirtDriverTestCase, test.TestCase):
    def setUp(self) -> None:
        self.driver_module = "nova.virt.vmspawnd.VmspawndDriver"
        self.useFixture(FakeVmspawnd())
        self.log = RecordingLog(upstream.LOG)
        self.useFixture(fixtures.MonkeyPatch("nova.tests.unit.virt.test_virt_drivers.LOG", self.log))
        # The test host must not reboot: logind's answer is faked here, the real
        # one is driver_tests/integration/test_host_power.py's (a container's systemd).
        self.host_power: list[str] = []
        self.useFixture(
            fixtures.MonkeyPatch(
                "nova.virt.vmspawnd.hostpower.power_action",
                lambda address, action, timeout: self.host_power.append(action),
            )
        )
        super().setUp()
        # Nova's test image is an AMI: boot the configured kernel, as a test host does.
        self.flags(kernel="/boot/vmlinuz-test", group="vmspawnd")
        self.addCleanup(self._check_implemented)
        self.connection.init_host("myhostname")
        # The console listeners and their threads end with the test.
        self.addCleanup(self.connection.cleanup_host, "myhostname")
        self.flags(console_address="127.0.0.1", group="vmspawnd")

    def _check_implemented(self) -> None:
        name = self._testMethodName
        hit = bool(self.log.not_implemented)
        if hit != (name in NOT_IMPLEMENTED):
            self.fail(
                f"{name}: NotImplementedError from {self.log.not_implemented} but not listed"
                if hit
                else f"{name} is listed in NOT_IMPLEMENTED but ran without NotImplementedError"
            )

    def test_set_host_enabled(self) -> None:
        # By the time os-hosts reaches a nova-compute it has its service record.
        objects.Service(
            self.ctxt, host="myhostname", binary="nova-compute", topic="compute", disabled=True,
            disabled_reason="AUTO: lost its hypervisor",
        ).create()  # fmt: skip
        super().test_set_host_enabled()
        service = objects.Service.get_by_compute_host(self.ctxt, "myhostname")
        self.assertFalse(service.disabled)
        self.assertIsNone(service.disabled_reason)

    def test_block_stats(self) -> None:
        # Nova names the disk by its device name: here "someid" is a volume's.
        running = self._get_running_instance

        def with_volume(obj: bool = True) -> tuple[Any, Any]:
            instance, network_info = running(obj)
            attach_named_volume(self.connection, self.ctxt, instance, "/dev/someid")
            return instance, network_info

        self._get_running_instance = with_volume  # type: ignore[method-assign]
        super().test_block_stats()

    @mock.patch("nova.utils.get_image_from_system_metadata")
    @mock.patch("nova.tests.unit.utils.get_test_image_object")
    def test_set_admin_password(self, spawned: Any, image: Any) -> None:
        # As libvirt's suite: the image asks for the guest agent (at spawn and after).
        image.return_value = {"properties": {"hw_qemu_guest_agent": "yes"}}
        spawned.return_value = objects.ImageMeta.from_dict(image.return_value)
        instance, _ = self._get_running_instance(obj=True)
        self.connection.set_admin_password(instance, "p4ssw0rd")
        machine = self.connection.client.machines[self.connection._name(instance)]
        self.assertEqual({"root": "p4ssw0rd"}, machine.passwords)

    def test_get_spice_console(self) -> None:
        # As Nova's libvirt suite has it: the host serves SPICE, not VNC.
        self.flags(enabled=False, group="vnc")
        self.flags(enabled=True, group="spice")
        super().test_get_spice_console()

    def test_snapshot_running(self) -> None:
        # A test host boots the configured kernel with a configured image: the instance's disk.
        fd, disk = tempfile.mkstemp(prefix="fake-root-")
        os.write(fd, b"ROOT-DISK-BYTES")
        os.close(fd)
        self.addCleanup(os.unlink, disk)
        self.flags(image=disk, group="vmspawnd")
        # The fixture's update keeps no data: what the driver uploads is read here.
        uploaded: list[bytes] = []
        api = self.connection._image_api
        real_update = api.update

        def update(context: Any, image_id: str, metadata: Any, data: Any = None, **kw: Any) -> Any:
            uploaded.append(data.read())
            return real_update(context, image_id, metadata, **kw)

        with mock.patch.object(api, "update", update):
            super().test_snapshot_running()
        self.assertEqual([b"ROOT-DISK-BYTES"], uploaded)
        (image,) = [i for i in self.image_service.detail(self.ctxt) if i["name"] == "snap-1"]
        self.assertEqual(("raw", "snapshot"), (image["disk_format"], image["properties"]["image_location"]))
        # The copy made in the instance's directory is gone.
        self.assertEqual([], glob.glob(os.path.join(glob.escape(CONF.instances_path), "*", "snapshot-*")))

    def test_swap_volume(self) -> None:
        client = self.connection.client
        with mock.patch.object(client, "swap_drive", wraps=client.swap_drive) as swap:
            super().test_swap_volume()
        # The volume's drive moved onto the new volume's file; no drive came or went.
        name, drive, path, fmt, _ = swap.call_args.args
        self.assertEqual({drive: path}, client.machines[name].drives)
        self.assertEqual("raw", fmt)
