"""The pure rules of mapping.py, for all inputs where a rule holds for all."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nova.virt.vmspawnd import mapping

names = st.from_regex(r"[A-Za-z0-9_-]{1,27}", fullmatch=True)
uuids = st.uuids().map(str)


@given(names, uuids)
def test_a_machine_name_gives_back_its_instance(name: str, instance_uuid: str) -> None:
    machine = mapping.machine_name(name, instance_uuid)
    assert mapping.MACHINE_NAME.fullmatch(machine)
    assert mapping.parse_machine_name(machine) == mapping.Owned(name, instance_uuid)


@pytest.mark.parametrize("name", ["a.b", "x" * 28, "", "sp ace", "ü"])
def test_an_instance_name_that_cannot_be_a_machine_name_is_refused(name: str) -> None:
    with pytest.raises(mapping.NameRefused, match="instance_name_template"):
        mapping.machine_name(name, str(uuid.uuid4()))


@given(st.text(max_size=80))
def test_a_machine_nova_did_not_make_is_not_claimed(name: str) -> None:
    owned = mapping.parse_machine_name(name)
    assert owned is None or name == f"{owned.instance_name}.{owned.instance_uuid}"


@pytest.mark.parametrize(
    "name", ["web", "web.", ".0c1d2b6e-3c8f-4c5e-9b1a-2b3c4d5e6f70", "a.0C1D2B6E-3C8F-4C5E-9B1A-2B3C4D5E6F70", "a.x"]
)
def test_names_without_an_instance_and_a_canonical_uuid_are_not_nova_s(name: str) -> None:
    assert mapping.parse_machine_name(name) is None


@given(st.text(max_size=100))
def test_a_volume_drive_id_is_one_the_daemon_and_qemu_take(volume_id: str) -> None:
    drive = mapping.drive_id(volume_id)
    assert len(drive) <= mapping.DRIVE_ID_LENGTH
    assert drive.startswith("v") and mapping.is_volume_drive(drive)
    assert mapping.drive_id(volume_id) == drive


@given(uuids, uuids)
def test_two_volumes_get_two_drive_ids(a: str, b: str) -> None:
    assert (mapping.drive_id(a) == mapping.drive_id(b)) == (a == b)


def test_the_daemon_s_own_drive_ids_are_not_volumes() -> None:
    assert not mapping.is_volume_drive("disk0")
    assert not mapping.is_volume_drive("rootfs")


@given(st.text(max_size=60))
def test_a_serial_fits_virtio_blk(volume_id: str) -> None:
    serial = mapping.serial(volume_id)
    assert len(serial.encode()) <= mapping.SERIAL_BYTES
    assert all("\x21" <= c <= "\x7e" for c in serial)


@given(st.lists(st.sampled_from(["disk0", "v1", "v2", "v3", "rootfs"]), unique=True),
       st.sets(st.sampled_from(["v1", "v2", "v4"])))  # fmt: skip
def test_volumes_to_change_make_the_machine_hold_exactly_nova_s(present: list[str], wanted: set[str]) -> None:
    plug, unplug = mapping.volumes_to_change(present, {d: d for d in wanted})
    after = (set(present) - set(unplug)) | set(plug)
    assert {d for d in after if mapping.is_volume_drive(d)} == wanted
    assert set(after) - wanted == {d for d in present if not mapping.is_volume_drive(d)}


def test_every_daemon_state_has_a_power_state() -> None:
    states = ["starting", "running", "paused", "stopping", "stopped", "suspended", "failed", "unmanaged"]
    assert [mapping.power_state_name(s) for s in states] == [
        "RUNNING", "RUNNING", "PAUSED", "RUNNING", "SHUTDOWN", "SUSPENDED", "CRASHED", "NOSTATE",
    ]  # fmt: skip
    assert mapping.power_state_name("something new") == "NOSTATE"


@given(st.integers(1, 1 << 20))
def test_a_save_may_take_longer_the_more_memory_and_never_less_than_half_a_minute(memory_mb: int) -> None:
    assert 30 <= mapping.save_timeout(memory_mb) < mapping.save_timeout(memory_mb + 1024)


@given(st.none() | st.integers(0, 300), st.integers(0, 300), st.integers(0, 300), st.integers(1, 300))
def test_hotplug_spares(requested: int | None, default: int, volumes: int, most: int) -> None:
    spares = mapping.hotplug_spares(requested, default, volumes, most)
    assert spares <= most
    assert spares >= min(volumes, most)
    assert spares == min(max(default if requested is None else requested, volumes), most)


def test_requested_ports_sums_placement_s_allocations() -> None:
    rc = mapping.HOTPLUG_RC
    assert mapping.requested_ports(None) is None
    assert mapping.requested_ports({"rp": {"resources": {"VCPU": 1}}}) is None
    assert mapping.requested_ports({"a": {"resources": {rc: 2}}, "b": {"resources": {rc: 3, "VCPU": 1}}}) == 5


@given(st.integers(1, 512), st.integers(1, 1 << 22), st.integers(0, 1 << 16), st.integers(0, 1024), st.integers(1, 200))
def test_inventory(vcpus: int, memory_mb: int, disk_gb: int, ports: int, most: int) -> None:
    inv = mapping.inventory(vcpus, memory_mb, disk_gb, ports, most)
    assert inv["VCPU"]["total"] == vcpus and inv["MEMORY_MB"]["total"] == memory_mb
    assert ("DISK_GB" in inv) == (disk_gb > 0)
    assert (mapping.HOTPLUG_RC in inv) == (ports > 0)
    for entry in inv.values():
        assert 1 <= entry["min_unit"] <= entry["max_unit"] <= entry["total"]


volume_ids = st.uuids().map(str)
device_names = st.from_regex(r"[sv]d[a-z]{1,2}", fullmatch=True)


@given(st.dictionaries(device_names, volume_ids, max_size=6), st.booleans(), st.data())
def test_block_stats_finds_a_volume_by_its_device_name_with_or_without_dev_or_its_id(
    named: dict[str, str], with_dev: bool, data: st.DataObject
) -> None:
    volumes: list[tuple[str | None, str]] = [(f"/dev/{name}" if with_dev else name, v) for name, v in named.items()]
    volumes.append((None, "unnamed-volume"))
    for name, volume_id in named.items():
        assert mapping.volume_for_disk(name, volumes) == volume_id
        assert mapping.volume_for_disk(f"/dev/{name}", volumes) == volume_id
        assert mapping.volume_for_disk(volume_id, volumes) == volume_id
    assert mapping.volume_for_disk("unnamed-volume", volumes) == "unnamed-volume"
    unknown = data.draw(device_names.filter(lambda n: n not in named))
    assert mapping.volume_for_disk(unknown, volumes) is None


def test_a_device_name_wins_over_a_volume_id_that_looks_the_same() -> None:
    assert mapping.volume_for_disk("vdb", [("/dev/vdc", "vdb"), ("/dev/vdb", "v2")]) == "v2"


@given(st.fixed_dictionaries({k: st.integers(0, 2**64 - 1) for k in (*mapping.BLOCK_STATS, "flush")}))
def test_block_stats_are_libvirts_five_counters_in_its_order(counters: dict[str, int]) -> None:
    assert mapping.block_stats(counters) == tuple(
        counters[k] for k in ("rd_req", "rd_bytes", "wr_req", "wr_bytes", "errors")
    )


@given(names, uuids)
def test_a_rescue_machine_is_its_instance_s_and_never_an_instance(name: str, instance_uuid: str) -> None:
    rescue = mapping.rescue_name(instance_uuid)
    assert mapping.MACHINE_NAME.fullmatch(rescue)
    assert mapping.rescued_instance(rescue) == instance_uuid
    assert mapping.parse_machine_name(rescue) is None
    assert rescue != mapping.machine_name(name, instance_uuid)
    assert mapping.rescued_instance(mapping.machine_name(name, instance_uuid)) is None


@given(st.text(max_size=80))
def test_only_a_rescue_name_names_a_rescued_instance(name: str) -> None:
    rescued = mapping.rescued_instance(name)
    assert rescued is None or name == mapping.rescue_name(rescued)


@pytest.mark.parametrize(
    ("paths", "outside"),
    [
        (["/i/u/disk", "/i/u/sub/disk.local"], []),
        (["/i/u/../v/disk", "/i/uu/disk", "/var/lib/x.raw"], ["/i/u/../v/disk", "/i/uu/disk", "/var/lib/x.raw"]),
        (["/i/u"], []),
    ],
)
def test_what_is_outside_an_instance_directory(paths: list[str], outside: list[str]) -> None:
    assert mapping.outside(paths, "/i/u/") == outside


@given(uuids, uuids, st.lists(st.tuples(st.sampled_from(["disk0", "disk1", "vx"]), st.sampled_from(["/a", "/b"]))))
def test_a_volume_is_found_by_its_own_drive_or_by_the_file_a_swap_moved_a_drive_onto(
    old: str, new: str, others: list[tuple[str, str]]
) -> None:
    drives = [*others, (mapping.drive_id(old), "/new")]
    # attach made its drive: found by its id, whatever its path.
    assert mapping.volume_drive(drives, old, "/elsewhere") == mapping.drive_id(old)
    # After a swap the new volume's drive is the old one's, found by the new volume's file.
    assert mapping.volume_drive(drives, new, "/new") == mapping.drive_id(old)
    # Not attached: no drive; and a drive the daemon named (diskN) is never a volume's.
    assert mapping.volume_drive(drives, new, "/nowhere") is None
    assert mapping.volume_drive(drives, new, None) is None
    assert mapping.volume_drive([("disk1", "/new")], new, "/new") is None


# -- live migration --------------------------------------------------------

hosts = st.ip_addresses().map(str) | st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True)


@given(hosts, st.integers(1, 65535))
def test_a_stream_address_gives_back_its_host_and_port(host: str, port: int) -> None:
    assert mapping.parse_stream_address(mapping.stream_address(host, port)) == (host, port)


@pytest.mark.parametrize(
    "text", ["", "host", "host:", ":80", "host:0", "host:65536", "host:x", "[::1]", "::1:80", "[::1:80"]
)
def test_a_stream_address_without_a_host_and_port_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        mapping.parse_stream_address(text)


@given(st.integers(1, 1 << 22), st.integers(1, 10_000))
def test_a_migration_may_take_longer_the_more_memory_and_counts_at_least_two_gib(memory_mb: int, per_gib: int) -> None:
    timeout = mapping.migration_timeout(memory_mb, per_gib)
    assert timeout >= 2 * per_gib
    assert timeout <= mapping.migration_timeout(memory_mb + 1024, per_gib)
    assert timeout == per_gib * max(2, memory_mb / 1024)


def test_the_volume_ports_of_a_machine_are_its_volume_drives_on_spare_ports() -> None:
    drives = [
        {"id": "disk0", "port": "port0"},
        {"id": "vabc", "port": "port4"},
        {"id": "vdef", "port": "port2"},
        {"id": "vnone", "port": ""},
    ]
    assert mapping.volume_ports(drives) == {"vabc": "port4", "vdef": "port2"}


def test_spare_ports_are_the_spares_with_the_volume_on_each() -> None:
    ports = [
        {"id": "port0", "role": "builtin"},
        {"id": "port1", "role": "spare"},
        {"id": "switch0", "role": "switch"},
        {"id": "port2", "role": "spare"},
        {"id": "port3", "role": "spare"},
    ]
    drives = [{"id": "disk0", "port": "port0"}, {"id": "vabc", "port": "port2"}, {"id": "disk1", "port": "port3"}]
    assert mapping.spare_ports(ports, drives) == [("port1", ""), ("port2", "vabc"), ("port3", "")]


@given(st.dictionaries(st.sampled_from(["v1", "v2", "v3"]), st.sampled_from(["p1", "p2", "p3"])))
def test_plugged_puts_every_volume_on_its_port_at_the_source(ports: dict[str, str]) -> None:
    volumes = {drive: (f"/dev/{drive}", "raw", f"serial-{drive}") for drive in ports}
    plugged = mapping.plugged(volumes, ports)
    assert {p["id"]: p["port"] for p in plugged} == ports
    assert all(p["path"] == f"/dev/{p['id']}" and p["serial"] == f"serial-{p['id']}" for p in plugged)
    assert all(p["format"] == "raw" for p in plugged)


def test_plugged_refuses_a_volume_the_source_does_not_have() -> None:
    with pytest.raises(ValueError, match=r"v2.*not attached at the source"):
        mapping.plugged({"v1": ("/a", "raw", "s1"), "v2": ("/b", "raw", "s2")}, {"v1": "p1"})


def test_plugged_refuses_a_volume_only_the_source_has() -> None:
    with pytest.raises(ValueError, match=r"v2.*no connection on this host"):
        mapping.plugged({"v1": ("/a", "raw", "s1")}, {"v1": "p1", "v2": "p2"})
