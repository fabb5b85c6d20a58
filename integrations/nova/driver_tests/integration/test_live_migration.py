"""Live migration between two drivers, each over its own vmspawnd (two
daemons on two private buses), the tiny guest under TCG, as Nova's compute
manager drives them: the destination's check, the source's, the
destination's pre_live_migration, the source's live_migration over TCP on
127.0.0.1, then post_method (or recover_method) and what Nova calls after.

The guest prints its uptime twice a second (tinyguest.tick): ticks that go
on at the destination with a larger uptime, and no second READY, show it
moved without a reboot.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nova.compute import power_state
from tests.integration.harness import Daemon, Site, not_just_logs, qemu_pids, wait_console

from driver_tests.integration.instances import MiB, console, console_log, console_size, new_instance
from nova import context as nova_context
from nova import exception, objects
from nova.virt import fake
from nova.virt.vmspawnd import VmspawndDriver, mapping

TICK = r"VMSPAWN-TICK (\d+\.\d+)"
# A migration reads every page of the guest's memory, all of which then counts
# against its cgroup limit: 128 MiB, as the daemon's own migration test.
MEMORY_MB = 128
MIGRATION = 300  # s: the longest a test waits for a migration of the tiny guest under TCG


class Host:
    def __init__(self, name: str, driver: VmspawndDriver, daemon: Daemon) -> None:
        self.name, self.driver, self.daemon = name, driver, daemon

    def left(self) -> tuple[list[str], list[int], list[Path]]:
        """Instances, QEMUs and machine dirs (but logs) of this host's daemon."""
        machines = self.daemon.runtime_dir / "machines"
        return self.driver.list_instances(), qemu_pids(str(self.daemon.runtime_dir)), not_just_logs(machines)


@pytest.fixture
def hosts(guest_conf: Any, daemon: Daemon, site: Site, system_bus: str) -> Iterator[tuple[Host, Host]]:
    """The source over the session's daemon, the destination over a daemon of the test's own."""
    guest_conf.set_override("cmdline", guest_conf.vmspawnd.cmdline + " tinyguest.tick", group="vmspawnd")
    guest_conf.set_override("my_ip", "127.0.0.1")
    source = VmspawndDriver(fake.FakeVirtAPI())
    source.init_host("source")
    # Each driver keeps the bus address it was made with.
    guest_conf.set_override("bus_address", site.address, group="vmspawnd")
    destination = VmspawndDriver(fake.FakeVirtAPI())
    destination.init_host("destination")
    guest_conf.set_override("bus_address", system_bus, group="vmspawnd")
    yield Host("source", source, daemon), Host("destination", destination, site.daemon)
    for host in (source, destination):
        host.cleanup_host(host._host)
    guest_conf.clear_override("my_ip")
    guest_conf.set_override("cmdline", guest_conf.vmspawnd.cmdline.removesuffix(" tinyguest.tick"), group="vmspawnd")


class Calls:
    """Nova's post_method and recover_method, noted."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def post(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("post", args, kwargs))

    def recover(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("recover", args, kwargs))


def prepare(source: Host, destination: Host, instance: Any, bdi: dict[str, Any]) -> Any:
    """The checks and pre_live_migration, as the conductor and compute manager call them."""
    ctxt = nova_context.get_admin_context()
    dest_check = destination.driver.check_can_live_migrate_destination(ctxt, instance, {}, {}, None, False)
    try:
        data = source.driver.check_can_live_migrate_source(ctxt, instance, dest_check, bdi)
    finally:
        destination.driver.cleanup_live_migration_destination_check(ctxt, dest_check)
    return destination.driver.pre_live_migration(ctxt, instance, bdi, [], None, data)


def spawned(host: Host) -> Any:
    """A new instance of the tiny guest, spawned on `host`."""
    instance = new_instance(MEMORY_MB)
    ctxt = nova_context.get_admin_context()
    host.driver.spawn(ctxt, instance, objects.ImageMeta.from_dict({}), [], None, {}, network_info=[])
    return instance


def last_tick(driver: VmspawndDriver, instance: Any) -> float:
    return float(re.findall(TICK, console_log(driver, instance).read_text(errors="replace"))[-1])


def test_an_instance_with_a_volume_live_migrates_and_runs_on_at_the_destination(
    hosts: tuple[Host, Host], workdir: Path
) -> None:
    source, destination = hosts
    ctxt = nova_context.get_admin_context()
    instance = spawned(source)
    try:
        console(source.driver, instance, TICK)
        volume_id = str(uuid.uuid4())
        volume = workdir / f"volume-{volume_id}"
        volume.write_bytes(b"\0" * MiB)
        info = {"driver_volume_type": "local", "serial": volume_id, "data": {"device_path": str(volume)}}
        bdi = {"block_device_mapping": [{"connection_info": info, "mount_device": "/dev/vdb"}]}
        source.driver.attach_volume(ctxt, info, instance, "/dev/vdb")
        console(source.driver, instance, rf"VMSPAWN-BLOCK-ADD \w+ serial={re.escape(mapping.serial(volume_id))}")
        port = source.driver.client.properties(mapping.machine_name(instance.name, instance.uuid))["Drives"][-1]["port"]

        data = prepare(source, destination, instance, bdi)
        calls = Calls()
        before = last_tick(source.driver, instance)
        source.driver.live_migration(ctxt, instance, "destination", calls.post, calls.recover, False, data)
        assert calls.calls == [("post", (ctxt, instance, "destination", False, data), {})]
        assert not source.driver.instance_exists(instance)
        # What Nova's post_method calls then.
        source.driver.post_live_migration(ctxt, instance, bdi, data)
        destination.driver.post_live_migration_at_destination(ctxt, instance, [], False, bdi)
        source.driver.post_live_migration_at_source(ctxt, instance, [])

        assert source.left() == ([], [], [])
        assert destination.driver.get_info(instance).state == power_state.RUNNING
        name = mapping.machine_name(instance.name, instance.uuid)
        drives = destination.driver.client.properties(name)["Drives"]
        assert [(d["path"], d["port"]) for d in drives if d["path"] == str(volume)] == [(str(volume), port)]
        # The same guest goes on there: its uptime ticks on, it did not boot again.
        log = console_log(destination.driver, instance)
        moved = float(asyncio.run(wait_console(log, TICK)).group(1))
        assert moved > before and "VMSPAWN-GUEST-READY" not in log.read_text(errors="replace")
        # And its volume unplugs there (hotplug works at the destination).
        mark = console_size(destination.driver, instance)
        destination.driver.detach_volume(ctxt, info, instance, "/dev/vdb")
        console(destination.driver, instance, r"VMSPAWN-BLOCK-REMOVE \w+", start=mark)
    finally:
        source.driver.destroy(ctxt, instance, [], destroy_disks=False)
        destination.driver.destroy(ctxt, instance, [])
    assert destination.left() == ([], [], [])


def test_an_aborted_live_migration_leaves_the_guest_running_at_the_source(
    hosts: tuple[Host, Host], guest_conf: Any
) -> None:
    source, destination = hosts
    ctxt = nova_context.get_admin_context()
    instance = spawned(source)
    name = mapping.machine_name(instance.name, instance.uuid)
    try:
        console(source.driver, instance, TICK)
        # 1 MiB/s: 128 MiB cannot go over before the abort comes.
        with migrating(ctxt, source, destination, instance, guest_conf, 1) as (calls, data):
            source.driver.live_migration_abort(instance)
        assert calls.calls == [("recover", (ctxt, instance, "destination", data), {"migration_status": "cancelled"})]
        # What Nova's recover_method calls at the destination.
        destination.driver.rollback_live_migration_at_destination(ctxt, instance, [], {}, False, data)
        assert destination.left() == ([], [], [])
        assert source.driver.get_info(instance).state == power_state.RUNNING
        assert source.driver.client.properties(name)["Migration"] == "cancelled"
        mark = console_size(source.driver, instance)
        console(source.driver, instance, TICK, start=mark)
        # Nothing is migrating any more: a late abort or force-complete changes nothing.
        source.driver.live_migration_abort(instance)
        source.driver.live_migration_force_complete(instance)
        assert source.driver.get_info(instance).state == power_state.RUNNING
    finally:
        source.driver.destroy(ctxt, instance, [])
    assert source.left() == ([], [], [])


def test_a_forced_live_migration_completes_and_the_guest_runs_on_at_the_destination(
    hosts: tuple[Host, Host], guest_conf: Any
) -> None:
    source, destination = hosts
    ctxt = nova_context.get_admin_context()
    instance = spawned(source)
    try:
        console(source.driver, instance, TICK)
        # 8 MiB/s: slow enough for the force-complete to land while it runs.
        with migrating(ctxt, source, destination, instance, guest_conf, 8) as (calls, data):
            before = last_tick(source.driver, instance)
            source.driver.live_migration_force_complete(instance)
        assert calls.calls == [("post", (ctxt, instance, "destination", False, data), {})]
        # The source paused it to converge: it comes in paused, and runs on once Nova is done.
        assert destination.driver.get_info(instance).state == power_state.PAUSED
        destination.driver.post_live_migration_at_destination(ctxt, instance, [], False, {})
        source.driver.post_live_migration_at_source(ctxt, instance, [])
        assert destination.driver.get_info(instance).state == power_state.RUNNING
        assert source.left() == ([], [], [])
        moved = float(console(destination.driver, instance, TICK).group(1))
        assert moved > before
    finally:
        source.driver.destroy(ctxt, instance, [])
        destination.driver.destroy(ctxt, instance, [])
    assert destination.left() == ([], [], [])


def test_a_destination_without_the_source_s_volume_refuses_before_anything_moves(
    hosts: tuple[Host, Host], workdir: Path
) -> None:
    source, destination = hosts
    ctxt = nova_context.get_admin_context()
    instance = spawned(source)
    try:
        volume = workdir / f"volume-{uuid.uuid4()}"
        volume.write_bytes(b"\0" * MiB)
        info = {"driver_volume_type": "local", "serial": "vol1", "data": {"device_path": str(volume)}}
        with pytest.raises(exception.MigrationPreCheckError, match="not attached at the source"):
            prepare(source, destination, instance, {"block_device_mapping": [{"connection_info": info}]})
        assert destination.left() == ([], [], [])
        assert source.driver.get_info(instance).state == power_state.RUNNING
    finally:
        source.driver.destroy(ctxt, instance, [])


@contextlib.contextmanager
def migrating(
    ctxt: Any, source: Host, destination: Host, instance: Any, guest_conf: Any, mib_per_s: int
) -> Iterator[tuple[Calls, Any]]:
    """`instance` live-migrating to `destination` at `mib_per_s` on a thread of
    its own (as the compute manager runs it), under way at the destination when
    the body runs; the thread is joined, bounded, and the bandwidth is as it
    was, when the body is done."""
    data = prepare(source, destination, instance, {})
    guest_conf.set_override("live_migration_bandwidth", mib_per_s, group="vmspawnd")
    try:
        calls = Calls()
        thread = threading.Thread(
            target=source.driver.live_migration,
            args=(ctxt, instance, "destination", calls.post, calls.recover, False, data),
        )
        thread.start()
        try:
            asyncio.run(
                wait_migration(destination.driver, mapping.machine_name(instance.name, instance.uuid), {"active"})
            )
            yield calls, data
        finally:
            thread.join(MIGRATION)
    finally:
        guest_conf.clear_override("live_migration_bandwidth", group="vmspawnd")
    assert not thread.is_alive()


async def wait_migration(driver: VmspawndDriver, name: str, wanted: set[str]) -> None:
    """Until the machine's Migration is one of `wanted` (the destination's QEMU gets data: both ends are handed on)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MIGRATION
    while (status := driver.client.properties(name).get("Migration")) not in wanted:
        assert loop.time() < deadline, f"Migration of {name} is {status!r}, never one of {wanted}"
        await asyncio.sleep(0.05)
