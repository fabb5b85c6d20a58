"""set_host_enabled, block_stats and trigger_crash_dump beyond what Nova's conformance
suite asks: the service record both ways, the disks block_stats finds and the ones it
does not, the NMI reaching the machine (over the in-memory vmspawnd; the real daemon
is driver_tests/integration's)."""

from __future__ import annotations

from typing import Any

import fixtures
from nova.tests import fixtures as nova_fixtures
from nova.tests.unit import utils as test_utils
from oslo_utils import importutils

from driver_tests.nova_suites.test_virt_driver import FakeVmspawnd, attach_named_volume
from nova import exception, objects, test
from nova.virt import fake as fake_virt
from nova.virt.vmspawnd import driver as vdriver

HOST = "myhostname"


class HostAndStatsTestCase(test.TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.useFixture(FakeVmspawnd())
        self.flags(instances_path=self.useFixture(fixtures.TempDir()).path)
        self.flags(kernel="/boot/vmlinuz-test", group="vmspawnd")
        self.ctxt = test_utils.get_test_admin_context()
        self.useFixture(nova_fixtures.GlanceFixture(self))
        self.connection: Any = importutils.import_object("nova.virt.vmspawnd.VmspawndDriver", fake_virt.FakeVirtAPI())
        self.connection.init_host(HOST)

    def _service(self, **fields: Any) -> None:
        objects.Service(self.ctxt, host=HOST, binary="nova-compute", topic="compute", **fields).create()

    def _stored(self) -> Any:
        return objects.Service.get_by_compute_host(self.ctxt, HOST)

    def _running_instance(self) -> Any:
        instance = test_utils.get_test_instance(obj=True)
        image_meta = test_utils.get_test_image_object(None, instance)
        self.connection.spawn(self.ctxt, instance, image_meta, [], "herp", {}, network_info=[])
        return instance

    def test_set_host_enabled_disables_the_service_with_a_reason_and_enables_it_again(self) -> None:
        self._service()
        self.assertEqual("disabled", self.connection.set_host_enabled(False))
        self.assertTrue(self._stored().disabled)
        self.assertEqual(vdriver.HOST_DISABLED_REASON, self._stored().disabled_reason)
        self.assertEqual("enabled", self.connection.set_host_enabled(True))
        self.assertFalse(self._stored().disabled)
        self.assertIsNone(self._stored().disabled_reason)

    def test_set_host_enabled_is_the_operators_call_and_undoes_a_manual_disable(self) -> None:
        self._service(disabled=True, disabled_reason="maintenance")
        self.assertEqual("enabled", self.connection.set_host_enabled(True))
        self.assertFalse(self._stored().disabled)

    def test_set_host_enabled_of_a_host_without_its_service_record_says_so(self) -> None:
        self.assertRaises(exception.ComputeHostNotFound, self.connection.set_host_enabled, False)

    def test_block_stats_of_a_volume_by_device_name_or_id_and_none_when_it_is_not_there(self) -> None:
        instance = self._running_instance()
        volume_id = attach_named_volume(self.connection, self.ctxt, instance, "/dev/vdb")
        other = attach_named_volume(self.connection, self.ctxt, instance, "/dev/vdc")
        zero = (0, 0, 0, 0, 0)
        for disk_id in ("vdb", "/dev/vdb", volume_id, "vdc"):
            self.assertEqual(zero, self.connection.block_stats(instance, disk_id))
        # No such disk: libvirt's answer, None.
        self.assertIsNone(self.connection.block_stats(instance, "vdz"))
        connection_info = {"driver_volume_type": "fake", "serial": other, "data": {}}
        self.connection.detach_volume(self.ctxt, connection_info, instance, "/dev/vdc")
        # Detached, its mapping still recorded (the compute manager deletes it after).
        self.assertIsNone(self.connection.block_stats(instance, "vdc"))
        self.connection.power_off(instance)
        self.assertIsNone(self.connection.block_stats(instance, "vdb"))

    def test_trigger_crash_dump_reaches_the_machine_and_needs_it_running(self) -> None:
        instance = self._running_instance()
        self.connection.trigger_crash_dump(instance)
        (machine,) = self.connection.client.machines.values()
        self.assertEqual(1, machine.nmis)
        self.connection.power_off(instance)
        self.assertRaises(exception.InstanceNotRunning, self.connection.trigger_crash_dump, instance)
        self.connection.destroy(self.ctxt, instance, [])
        self.assertRaises(exception.InstanceNotFound, self.connection.trigger_crash_dump, instance)
