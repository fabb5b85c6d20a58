"""Two nova-computes, each over its own vmspawnd (two daemons on two private
buses), real QEMU with the tiny guest under TCG, inside Nova's own
functional fixtures (API, conductor, scheduler, placement in one process).

The scheduler places two servers on the two hosts; one is stopped and
started, a volume is attached and its guest sees it; everything is deleted
and no QEMU of either daemon is left; placement shows each host's
hotplug-port inventory, and the ports the flavor asked for in use. A server
with a volume live-migrates to the other host through Nova's API, conductor
and both compute managers (the migrate data crossing Nova's RPC), and its
guest goes on there without a new boot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from nova.tests.fixtures import cinder as cinder_fixture
from nova.tests.functional import integrated_helpers

from nova.virt.vmspawnd import VmspawndDriver, mapping
from nova.virt.vmspawnd import client as vclient

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
import testbus  # noqa: E402
import tinyguest  # noqa: E402
from tests.integration.harness import Daemon, lost_errors, qemu_pids, wait_console  # noqa: E402

HOSTS = ("host1", "host2")
BOOT = 120  # s, the tiny guest under TCG on a loaded host
PORTS = 2
MiB = 1024 * 1024


class TwoHostsTestCase(integrated_helpers.ProviderUsageBaseTestCase):
    compute_driver = "vmspawnd.VmspawndDriver"

    def setUp(self) -> None:
        # Nova's test config looks for it in a source tree; pip puts it under the venv.
        self.flags(api_paste_config=os.path.join(sys.prefix, "etc/nova/api-paste.ini"), group="wsgi")
        super().setUp()
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vmspawnd-guest"
        guest = tinyguest.build(cache)
        self.flags(kernel=str(guest.kernel), initrd=str(guest.initrd), cmdline=guest.cmdline, group="vmspawnd")
        self.flags(accel="tcg", group="vmspawnd")
        # Short and world-traversable, as the daemon's own tests have it.
        self.workdir = Path(tempfile.mkdtemp(prefix="vmspawnd-nova-", dir="/tmp"))
        self.workdir.chmod(0o755)
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.flags(instances_path=str(self.workdir / "instances"))
        # One process holds both computes: each gets a node uuid of its own
        # (on a real host it is the one in Nova's compute_id file).
        self.stub_out(
            "nova.virt.vmspawnd.VmspawndDriver.get_nodenames_by_uuid",
            lambda driver, refresh=False: {str(uuid.uuid5(uuid.NAMESPACE_DNS, driver._host)): driver._host},
        )
        self.daemons: dict[str, Daemon] = {}
        for host in HOSTS:
            bus, address = testbus.start(self.workdir / host / "bus")
            self.addCleanup(bus.wait)
            self.addCleanup(bus.terminate)
            daemon = Daemon(self.workdir / host / "run", self.workdir / host / "daemon.log",
                            env={"DBUS_SYSTEM_BUS_ADDRESS": address})  # fmt: skip
            daemon.start()
            self.addCleanup(self._no_lost_errors, daemon)
            self.addCleanup(daemon.stop)
            self.addCleanup(self._terminate_all, address)
            self.daemons[host] = daemon
            self.flags(bus_address=address, group="vmspawnd")
            self._start_compute(host)
        self.flavor_id = self._create_flavor(
            memory_mb=256, vcpu=1, disk=0, ephemeral=0,
            extra_spec={mapping.HOTPLUG_EXTRA_SPEC: str(PORTS)},
        )  # fmt: skip

    def _no_lost_errors(self, daemon: Daemon) -> None:
        self.assertEqual([], lost_errors(daemon.log), f"unhandled errors in {daemon.log}")

    @staticmethod
    def _terminate_all(address: str) -> None:
        """Whatever a failed test left on a daemon goes before the daemon does."""
        client = vclient.Client(address)
        for name, _state in client.list_machines():
            client.terminate(name)
        client.close()

    def driver(self, host: str) -> VmspawndDriver:
        return self.computes[host].manager.driver  # type: ignore[no-any-return]

    def console_log(self, server: dict[str, Any]) -> Path:
        host = server["OS-EXT-SRV-ATTR:host"]
        name = mapping.machine_name(server["OS-EXT-SRV-ATTR:instance_name"], server["id"])
        return Path(self.driver(host).client.properties(name)["ConsoleLog"])

    def wait_console(self, server: dict[str, Any], pattern: str, start: int = 0) -> None:
        asyncio.run(wait_console(self.console_log(server), pattern, timeout=BOOT, start=start))

    def attach_local_volume(self, server: dict[str, Any]) -> tuple[str, Path]:
        """A volume (a local file, as os-brick's local connector gives it)
        attached through Nova's API and seen by the guest; its id and file."""
        volume_id = str(uuid.uuid4())
        volume = self.workdir / f"volume-{volume_id}"
        volume.write_bytes(b"\0" * MiB)
        self.stub_out(
            "nova.tests.fixtures.cinder.CinderFixture.VOLUME_CONNECTION_INFO",
            cinder_fixture.CinderFixture.VOLUME_CONNECTION_INFO
            | {volume_id: {"driver_volume_type": "local", "data": {"device_path": str(volume)}}},
        )
        mark = len(self.console_log(server).read_text(errors="replace"))
        self._attach_volume(server, volume_id)
        self.wait_console(server, f"VMSPAWN-BLOCK-ADD \\w+ serial={mapping.serial(volume_id)}", start=mark)
        return volume_id, volume

    def test_two_hosts(self) -> None:
        # Placement knows each host's hotplug ports.
        providers = {host: self._get_provider_uuid_by_host(host) for host in HOSTS}
        for rp in providers.values():
            inventory = self._get_provider_inventory(rp)
            self.assertEqual(256, inventory[mapping.HOTPLUG_RC]["total"])

        servers = [self._create_server(name=f"vm{i}", flavor_id=self.flavor_id, networks="none") for i in range(2)]
        self.assertEqual(set(HOSTS), {s["OS-EXT-SRV-ATTR:host"] for s in servers})
        for server in servers:
            usages = self._get_provider_usages(providers[server["OS-EXT-SRV-ATTR:host"]])
            self.assertEqual(PORTS, usages[mapping.HOTPLUG_RC])
            self.wait_console(server, "VMSPAWN-GUEST-READY")

        # One server stopped and started again.
        server = servers[0]
        self._stop_server(server, wait_for_stop=False)
        self._wait_for_server_parameter(server, {"status": "SHUTOFF"}, max_retries=240)
        mark = len(self.console_log(server).read_text(errors="replace"))
        self.api.post_server_action(server["id"], {"os-start": None})
        self._wait_for_server_parameter(server, {"status": "ACTIVE"}, max_retries=240)
        self.wait_console(server, "VMSPAWN-GUEST-READY", start=mark)

        self.attach_local_volume(server)

        for s in servers:
            self._delete_server(s)
        for s in servers:
            self._wait_until_deleted(s)
        for host, daemon in self.daemons.items():
            self.assertEqual([], self.driver(host).list_instances())
            self.assertEqual([], qemu_pids(str(daemon.runtime_dir)))

    def test_live_migration(self) -> None:
        # 128 MiB: a migration makes all of the guest's memory resident, which
        # 256 MiB with the boot files' copies takes past the machine's cgroup limit.
        flavor_id = self._create_flavor(
            memory_mb=128, vcpu=1, disk=0, ephemeral=0, extra_spec={mapping.HOTPLUG_EXTRA_SPEC: str(PORTS)}
        )
        server = self._create_server(name="mover", flavor_id=flavor_id, networks="none")
        source = server["OS-EXT-SRV-ATTR:host"]
        (destination,) = set(HOSTS) - {source}
        self.wait_console(server, "VMSPAWN-GUEST-READY")
        volume_id, volume = self.attach_local_volume(server)

        self.api.post_server_action(server["id"], {"os-migrateLive": {"host": None, "block_migration": "auto"}})
        server = self._wait_for_server_parameter(
            server, {"OS-EXT-SRV-ATTR:host": destination, "status": "ACTIVE"}, max_retries=240
        )
        self._wait_for_migration_status(server, ["completed"])
        self.assertEqual([], self.driver(source).list_instances())
        self.assertEqual([], qemu_pids(str(self.daemons[source].runtime_dir)))
        name = mapping.machine_name(server["OS-EXT-SRV-ATTR:instance_name"], server["id"])
        props = self.driver(destination).client.properties(name)
        self.assertEqual("running", props["State"])
        self.assertIn(str(volume), [d["path"] for d in props["Drives"]])
        # The same guest runs there (its volume unplugs), with no boot of its own.
        # The computes share one process and one CONF.host (the last one started),
        # and Nova's detach calls the driver only where CONF.host is the instance's.
        self.flags(host=destination)
        self.api.delete_server_volume(server["id"], volume_id)
        self.wait_console(server, r"VMSPAWN-BLOCK-REMOVE \w+")
        self.assertNotIn("VMSPAWN-GUEST-READY", self.console_log(server).read_text(errors="replace"))

        self._delete_server(server)
        self._wait_until_deleted(server)
        for host, daemon in self.daemons.items():
            self.assertEqual([], self.driver(host).list_instances())
            self.assertEqual([], qemu_pids(str(daemon.runtime_dir)))
