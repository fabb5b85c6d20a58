"""Nova's own virt-driver conformance suite run against VmspawndDriver over the fake client.

Nova's `catch_notimplementederror` passes a test whose driver raised
NotImplementedError. So that passes mean the driver really ran, each test
records whether it hit NotImplementedError, and a test fails when that
differs from NOT_IMPLEMENTED below (the list is the plain truth of what the
driver leaves to Nova's fallbacks).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import fixtures
from nova.tests.unit.virt import test_virt_drivers as upstream

from driver_tests.fakeclient import FakeClient
from nova import test

# Tests whose driver method raises NotImplementedError, and why.
NOT_IMPLEMENTED = {
    # vmspawnd has no disk snapshot of a running machine yet.
    "test_snapshot_running",
    # No guest agent.
    "test_set_admin_password",
    # No rescue boot.
    "test_rescue",
    "test_unrescue_unrescued_instance",
    "test_unrescue_rescued_instance",
    # No cold migration or resize (no shared disk handling).
    "test_migrate_disk_and_power_off",
    # A swap keeps the guest's disk while its backing changes (a block mirror): vmspawnd has none.
    "test_swap_volume",
    # vmspawnd exposes no NMI.
    "test_trigger_crash_dump",
    # vmspawnd exposes no block statistics.
    "test_block_stats",
    # No graphics; the serial console is vmspawnd's OpenConsole, not a TCP port Nova's proxy reaches.
    "test_get_vnc_console",
    "test_get_spice_console",
    "test_get_serial_console",
    "test_get_mks_console",
    # No live migration.
    "test_live_migration_force_complete",
    "test_live_migration_abort",
    # Host power and enabling are the operator's, as with libvirt.
    "test_set_host_enabled",
    "test_host_power_action_reboot",
    "test_host_power_action_shutdown",
    "test_host_power_action_startup",
}


def fake_volume(data: dict[str, Any]) -> tuple[str, str]:
    """Nova's tests attach `driver_volume_type: fake` volumes: an empty local file."""
    fd, path = tempfile.mkstemp(prefix="fake-volume-")
    os.close(fd)
    return path, "raw"


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


class VmspawndDriverTestCase(upstream._VirtDriverTestCase, test.TestCase):
    def setUp(self) -> None:
        self.driver_module = "nova.virt.vmspawnd.VmspawndDriver"
        self.useFixture(fixtures.MonkeyPatch("nova.virt.vmspawnd.client.Client", FakeClient))
        self.log = RecordingLog(upstream.LOG)
        self.useFixture(fixtures.MonkeyPatch("nova.tests.unit.virt.test_virt_drivers.LOG", self.log))
        self.useFixture(
            fixtures.MonkeyPatch("nova.virt.vmspawnd.VmspawndDriver.volume_types", {"local": None, "fake": fake_volume})
        )
        super().setUp()
        # Nova's test image is an AMI: boot the configured kernel, as a test host does.
        self.flags(kernel="/boot/vmlinuz-test", group="vmspawnd")
        self.addCleanup(self._check_implemented)
        self.connection.init_host("myhostname")

    def _check_implemented(self) -> None:
        name = self._testMethodName
        hit = bool(self.log.not_implemented)
        if hit != (name in NOT_IMPLEMENTED):
            self.fail(
                f"{name}: NotImplementedError from {self.log.not_implemented} but not listed"
                if hit
                else f"{name} is listed in NOT_IMPLEMENTED but ran without NotImplementedError"
            )

    def test_live_migration(self) -> None:
        self.skipTest("vmspawnd has no live migration yet")
