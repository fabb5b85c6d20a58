"""300 random hotplug and life-cycle operations, up to 8 in flight, checked against QEMU.

Four tiny guests boot under TCG, each with the test's own QMP monitor (the
probe). Then random AddDrive / RemoveDrive / CreateMachine / TerminateMachine
run in batches of 1-8 concurrent requests (between 2 and 4 machines at any
time). After every batch has settled, the daemon's Ports/Drives properties
must agree with each other and with what QEMU itself reports, and the QEMU
processes must be exactly the listed machines' leaders.

The seed is printed; VMSPAWND_STRESS_SEED=N replays its choices (the
outcomes depend on timing), VMSPAWND_STRESS_VERBOSE=1 prints every batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError

from vmspawnd.cmdline import BOOT_FDSETS
from vmspawnd.imagechain import parse_opaque

from .harness import Client, Daemon, guest_options, not_just_logs, qemu_pids, unwrap, wait_console
from .qmp_probe import Probe

E = "org.vmspawnd1.Error."
MACHINE_IFACE = "org.vmspawnd1.Machine"
SEED = int(os.environ.get("VMSPAWND_STRESS_SEED", "5318008"))
VERBOSE = bool(os.environ.get("VMSPAWND_STRESS_VERBOSE"))
OPERATIONS = 300
IN_FLIGHT = 8
MIN_MACHINES, MAX_MACHINES = 2, 4
DISK_TYPES = ("nvme", "virtio-blk", "virtio-scsi")
# A booted guest releases a device in well under a second; generous for a loaded host.
UNPLUG_TIMEOUT_USEC = 20_000_000
OP_TIMEOUT = 60.0
# Errors a well-behaved daemon gives under this load; anything else fails the test.
EXPECTED = {
    "AddDrive": {"NoFreePort"},
    "RemoveDrive": {"UnplugInProgress", "NoSuchDrive", "UnplugTimeout"},
    "CreateMachine": set(),
    "TerminateMachine": set(),
}
DRIVE_DEVICES = {
    "nvme": "nvme",
    "virtio-blk-pci": "virtio-blk",
    "scsi-hd": "virtio-scsi",
    "scsi-cd": "virtio-scsi-cdrom",
}
SERIAL_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))
# Daemon bug (vmspawnd/machine.py add_drive): the fd is passed to QEMU (add-fd)
# before a port is taken, and NoFreePort is not a QmpError, so the rollback
# never runs: each AddDrive refused with NoFreePort leaves its fdset (an open
# fd of the caller's file) in QEMU. Tolerated here only for exactly those
# requests and counted; test_no_free_port_leaves_no_fdset reproduces it.
KNOWN_FDSET_LEAK = False


@dataclass
class VM:
    name: str
    path: str
    probe: Probe
    spares: int
    booted: bool  # a guest OS runs (no -S): only such a guest answers device_del
    ready: bool = False
    # Files of AddDrive requests refused with NoFreePort (see KNOWN_FDSET_LEAK).
    refused: set[str] = field(default_factory=set)
    leaked_fdsets: set[str] = field(default_factory=set)
    watcher: asyncio.Task[None] | None = None


@dataclass
class Op:
    seq: int
    kind: str
    run: Callable[[], Awaitable[Any]]
    what: str


@dataclass
class Stress:
    client: Client
    guest: Any
    tmp: Path
    daemon: Daemon
    rng: random.Random
    vms: dict[str, VM] = field(default_factory=dict)
    drives: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ops: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    checks: int = 0
    next_name: int = 0
    next_file: int = 0
    peak_drives: int = 0

    # -- machines ----------------------------------------------------------

    async def create(self, booted: bool) -> VM:
        name = f"st{self.next_name}"
        self.next_name += 1
        monitor = self.tmp / f"{name}.qmp"
        spares = self.rng.randint(4, 6)
        extra = Probe.extra(monitor) if booted else ["-S", *Probe.extra(monitor)]
        path = await self.client.create(name, **guest_options(self.guest, hotplug_spares=spares, qemu_extra=extra))
        vm = VM(name, path, Probe(monitor), spares, booted)
        if booted:
            vm.watcher = asyncio.ensure_future(self._wait_ready(vm))
        self.vms[name] = vm
        self.drives[name] = []
        return vm

    async def _wait_ready(self, vm: VM) -> None:
        console = await self.client.prop(vm.path, "ConsoleLog")
        try:
            await wait_console(console, "VMSPAWN-GUEST-READY", timeout=150)
        except AssertionError as e:
            self.unexpected.append(f"{vm.name} never booted: {e}")
            return
        vm.ready = True

    async def terminate(self, vm: VM) -> None:
        if vm.watcher:
            vm.watcher.cancel()
        await self.client.call("TerminateMachine", "s", [vm.name])
        del self.vms[vm.name]
        del self.drives[vm.name]

    async def add_drive(self, vm: VM, file: str, options: dict[str, Any]) -> None:
        try:
            await self.client.add_drive(vm.path, file, **options)
        except DBusError as e:
            if e.type == E + "NoFreePort":
                vm.refused.add(file)
            raise

    def disk(self) -> str:
        path = self.tmp / f"d{self.next_file}.raw"
        self.next_file += 1
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        return str(path)

    # -- one batch ---------------------------------------------------------

    def plan_batch(self, first_seq: int, size: int) -> list[Op]:
        """Ops drawn from the state after the previous batch settled.

        A machine being terminated is not touched by the rest of its batch
        (that race would give NotRunning / UnknownObject by design); new
        machines join in the next batch.
        """
        ops: list[Op] = []
        targeted: set[str] = set()
        terminating: set[str] = set()
        creating = 0
        for seq in range(first_seq, first_seq + size):
            live = [vm for vm in self.vms.values() if vm.name not in terminating]
            removable = [vm for vm in live if vm.ready and self.drives[vm.name]]
            booted_left = sum(vm.booted for vm in live)
            killable = [vm for vm in live if vm.name not in targeted and (booted_left > MIN_MACHINES or not vm.booted)]
            weights = {
                "AddDrive": 45 if live else 0,
                "RemoveDrive": 40 if removable else 0,
                "CreateMachine": 8 if len(self.vms) + creating < MAX_MACHINES else 0,
                "TerminateMachine": 7 if killable and len(self.vms) - len(terminating) > MIN_MACHINES else 0,
            }
            kind = self.rng.choices(list(weights), list(weights.values()))[0]
            if kind == "AddDrive":
                vm = self.rng.choice(live)
                targeted.add(vm.name)
                disk_type = self.rng.choice(DISK_TYPES)
                serial = "".join(self.rng.choices(SERIAL_CHARS, k=self.rng.randint(0, 20)))
                options: dict[str, Any] = {"disk_type": disk_type} | ({"serial": serial} if serial else {})
                file = self.disk()
                ops.append(Op(seq, kind, self._bind(self.add_drive, vm, file, options),
                              f"AddDrive({vm.name}, {disk_type}, serial={serial!r})"))  # fmt: skip
            elif kind == "RemoveDrive":
                vm = self.rng.choice(removable)
                targeted.add(vm.name)
                # Any listed drive, also one already removing or picked earlier in this batch.
                drive = self.rng.choice(self.drives[vm.name])["id"]
                ops.append(Op(seq, kind,
                              self._bind(self.client.remove_drive, vm.path, drive, timeout_usec=UNPLUG_TIMEOUT_USEC),
                              f"RemoveDrive({vm.name}, {drive})"))  # fmt: skip
            elif kind == "CreateMachine":
                creating += 1
                # Mostly booted guests; a paused one (-S) never gets a RemoveDrive.
                booted = self.rng.random() < 0.6
                ops.append(Op(seq, kind, self._bind(self.create, booted), f"CreateMachine(booted={booted})"))
            else:
                vm = self.rng.choice(killable)
                terminating.add(vm.name)
                ops.append(Op(seq, kind, self._bind(self.terminate, vm), f"TerminateMachine({vm.name})"))
        return ops

    @staticmethod
    def _bind(fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Callable[[], Awaitable[Any]]:
        return lambda: fn(*args, **kwargs)

    async def run_batch(self, ops: list[Op]) -> None:
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(op: Op) -> None:
            async with gate:
                self.ops[op.kind] += 1
                try:
                    async with asyncio.timeout(OP_TIMEOUT):
                        await op.run()
                except DBusError as e:
                    name = e.type.removeprefix(E)
                    self.outcomes[(op.kind, name)] += 1
                    if not e.type.startswith(E) or name not in EXPECTED[op.kind]:
                        self.unexpected.append(f"#{op.seq} {op.what}: {e.type}: {e.text}")
                except TimeoutError:
                    self.outcomes[(op.kind, "timeout")] += 1
                    self.unexpected.append(f"#{op.seq} {op.what}: no answer in {OP_TIMEOUT:g} s")
                else:
                    self.outcomes[(op.kind, "ok")] += 1

        await asyncio.gather(*(one(op) for op in ops))

    # -- invariants --------------------------------------------------------

    async def check(self, where: str) -> None:
        self.checks += 1
        assert self.unexpected == [], f"after {where}:\n" + "\n".join(self.unexpected)
        listed = {m[0]: m[1] for m in (await self.client.call("ListMachines"))[0]}
        # A -S machine's vCPUs never ran: its State is QEMU's own, paused.
        assert listed == {n: "running" if vm.booted else "paused" for n, vm in self.vms.items()}, f"after {where}"
        leaders = []
        for vm in self.vms.values():
            (props,) = await self.client.call(
                "GetAll", "s", [MACHINE_IFACE], path=vm.path, interface="org.freedesktop.DBus.Properties"
            )
            props = unwrap(props)
            leaders.append(props["Leader"])
            self.drives[vm.name] = props["Drives"]
            self.peak_drives = max(self.peak_drives, len(props["Drives"]))
            try:
                check_daemon_view(vm, props)
                await asyncio.wait_for(asyncio.to_thread(check_qemu_view, vm, props), 30)
            except AssertionError as e:
                raise AssertionError(f"after {where}, machine {vm.name}: {e}\nPorts={props['Ports']}\n"
                                     f"Drives={props['Drives']}") from None  # fmt: skip
        runtime = str(self.daemon.runtime_dir)
        assert sorted(qemu_pids(runtime)) == sorted(leaders), f"after {where}: stray or missing QEMU"
        machines = self.daemon.runtime_dir / "machines"
        dirs = {p.name for p in not_just_logs(machines)}
        assert dirs == set(self.vms), f"after {where}: runtime dirs {sorted(dirs)}"


def check_daemon_view(vm: VM, props: dict[str, Any]) -> None:
    """Ports, Drives and FreeSparePorts agree with each other."""
    ports = {p["id"]: p for p in props["Ports"]}
    spares = [p for p in props["Ports"] if p["role"] == "spare"]
    assert len(spares) == vm.spares
    held = [p["device"] for p in props["Ports"] if p["device"]]
    assert len(held) == len(set(held)), f"a device holds two ports: {held}"
    assert props["FreeSparePorts"] == sum(p["device"] == "" for p in spares)
    drives = props["Drives"]
    assert len({d["id"] for d in drives}) == len(drives)
    own_ports = [d["port"] for d in drives if not d["disk_type"].startswith("virtio-scsi")]
    assert len(own_ports) == len(set(own_ports)), f"two drives share a port: {own_ports}"
    ids = {d["id"] for d in drives}
    for d in drives:
        assert d["state"] in ("attached", "removing")
        assert ports[d["port"]]["role"] == "spare"
        owner = ports[d["port"]]["device"]
        if d["disk_type"].startswith("virtio-scsi"):
            assert owner.startswith("scsi"), f"SCSI drive {d['id']} on {d['port']} held by {owner!r}"
        else:
            assert owner == d["id"], f"drive {d['id']} on {d['port']} held by {owner!r}"
    for p in spares:
        # A spare port is free, carries a drive, or a SCSI controller.
        assert p["device"] in ids or p["device"] == "" or p["device"].startswith("scsi"), p


def devices_on(probe: Probe, port: str) -> list[str]:
    """Probe.devices_on, but a device that goes away between the listing and
    the look-up (a pending unplug completing) gives a fresh listing, not an
    error dict."""
    bus = f"/machine/peripheral/{port}/{port}"
    for _ in range(10):
        links = [c["name"] for c in probe("qom-list", path=bus) if c["name"].startswith("child[")]
        targets = probe.run(*(("qom-get", {"path": bus, "property": link}) for link in links))
        if all(isinstance(t, str) for t in targets):
            return [t.rpartition("/")[2] for t in targets]
    raise AssertionError(f"QEMU's view of {port} kept changing: {targets}")


def check_qemu_view(vm: VM, props: dict[str, Any]) -> None:
    """The daemon's view equals QEMU's, allowing only for unplugs still in flight.

    The daemon was read first: a drive it lists as 'removing' (or a SCSI
    controller without drives, whose unplug is pending) may be gone from
    QEMU by now. Anything else must match exactly.
    """
    drives = {d["id"]: d for d in props["Drives"]}
    attached = {i for i, d in drives.items() if d["state"] == "attached"}
    scsi_ports_in_use = {d["port"] for d in drives.values() if d["disk_type"].startswith("virtio-scsi")}
    for port in props["Ports"]:
        if port["role"] != "spare":
            continue
        dev, on_port = port["device"], devices_on(vm.probe, port["id"])
        if dev == "":
            assert on_port == [], f"free port {port['id']} has {on_port} in QEMU"
        elif dev in drives and dev in attached:
            assert on_port == [dev], f"{port['id']}: daemon {dev}, QEMU {on_port}"
        elif dev in drives:
            assert on_port in ([dev], []), f"{port['id']}: daemon {dev} (removing), QEMU {on_port}"
        elif port["id"] in {drives[i]["port"] for i in attached}:
            assert on_port == [dev], f"{port['id']}: daemon controller {dev}, QEMU {on_port}"
        else:
            assert on_port in ([dev], []), f"{port['id']}: daemon controller {dev} (unplugging), QEMU {on_port}"

    peripheral, nodes, fdsets = vm.probe.run(
        ("qom-list", {"path": "/machine/peripheral"}), ("query-named-block-nodes", {}), ("query-fdsets", {})
    )
    devices = {c["name"]: c["type"][len("child<") : -1] for c in peripheral if c["type"].startswith("child<")}
    in_qemu = {dev: DRIVE_DEVICES[t] for dev, t in devices.items() if t in DRIVE_DEVICES}
    assert attached <= set(in_qemu) <= set(drives), f"drive devices in QEMU: {sorted(in_qemu)}"
    for dev, disk_type in in_qemu.items():
        assert drives[dev]["disk_type"] == disk_type, f"{dev} is a {disk_type} in QEMU"
    # Where QEMU has each drive: its own root port, or the SCSI bus of the controller on its port.
    buses = vm.probe.run(*(("qom-get", {"path": f"/machine/peripheral/{dev}", "property": "parent_bus"})
                           for dev in in_qemu))  # fmt: skip
    owners = {p["id"]: p["device"] for p in props["Ports"]}
    for dev, bus in zip(in_qemu, buses, strict=True):
        bus = str(bus).rpartition("/")[2]
        want = f"{owners[drives[dev]['port']]}.0" if in_qemu[dev].startswith("virtio-scsi") else drives[dev]["port"]
        assert bus == want, f"{dev} sits on {bus} in QEMU, daemon says {want}"
    controllers = {dev for dev, t in devices.items() if t == "virtio-scsi-pci"}
    assert controllers <= set(owners.values()), f"SCSI controllers in QEMU the daemon lost: {controllers}"
    assert scsi_ports_in_use <= {p for p, d in owners.items() if d in controllers} | {
        drives[i]["port"] for i in drives if i not in attached
    }, "an attached SCSI drive's controller is missing in QEMU"

    ours = {n["node-name"].removesuffix("-node") for n in nodes if n["node-name"].endswith("-node")}
    assert attached <= ours <= set(drives), f"block nodes {sorted(ours)} vs drives {sorted(drives)}"
    # The command line's fdsets (console, boot drives) are QEMU's for good.
    fdsets = [f for f in fdsets if f["fdset-id"] < BOOT_FDSETS]
    assert all(f["fds"] for f in fdsets), f"an emptied fdset stays behind: {fdsets}"
    passed = {}
    for f in fdsets:
        dev, _, path = parse_opaque(f["fds"][0]["opaque"])
        if dev in drives and drives[dev]["path"] == path:
            passed[dev] = path
        elif path in vm.refused and not vm.booted:
            # QEMU closes a removed fd only while the VM runs: on a -S machine
            # even a rolled-back fdset stays listed.
            pass
        elif KNOWN_FDSET_LEAK and path in vm.refused:
            vm.leaked_fdsets.add(path)
        else:
            raise AssertionError(f"fdset {f} belongs to no drive")
    assert attached <= set(passed), f"fdsets {sorted(passed)} vs drives {sorted(drives)}"


async def test_300_random_operations_keep_daemon_and_qemu_in_step(
    client: Client, daemon: Daemon, guest: Any, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    print(f"\nstress: seed {SEED} (VMSPAWND_STRESS_SEED={SEED} replays this run)")
    stress = Stress(client, guest, tmp_path, daemon, rng)
    started = time.monotonic()
    try:
        await asyncio.gather(*(stress.create(booted=True) for _ in range(MAX_MACHINES)))
        watchers = [vm.watcher for vm in stress.vms.values() if vm.watcher]
        await asyncio.wait_for(asyncio.gather(*watchers), 180)
        booted_in = time.monotonic() - started
        await stress.check("boot")

        done, batches = 0, 0
        while done < OPERATIONS:
            size = min(rng.randint(1, IN_FLIGHT), OPERATIONS - done)
            ops = stress.plan_batch(done + 1, size)
            t0 = time.monotonic()
            await stress.run_batch(ops)
            t1 = time.monotonic()
            done += len(ops)
            batches += 1
            await stress.check(f"batch {batches} (ops {ops[0].seq}-{ops[-1].seq}: {', '.join(o.what for o in ops)})")
            if VERBOSE:
                print(
                    f"  batch {batches}: {t1 - t0:.2f} s + check {time.monotonic() - t1:.2f} s: "
                    + ", ".join(o.what for o in ops)
                )
        # Late unplugs (after an UnplugTimeout) may still land: the state must stay consistent.
        await asyncio.sleep(1)
        await stress.check("the end")
    finally:
        for vm in stress.vms.values():
            if vm.watcher:
                vm.watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*(vm.watcher for vm in stress.vms.values() if vm.watcher), return_exceptions=True)
    wall = time.monotonic() - started

    print(f"stress: {sum(stress.ops.values())} operations in {batches} batches (<= {IN_FLIGHT} in flight), "
          f"{stress.checks} invariant checks, wall time {wall:.1f} s (initial boot {booted_in:.1f} s)")  # fmt: skip
    for kind in EXPECTED:
        results = {r: n for (k, r), n in sorted(stress.outcomes.items()) if k == kind}
        print(f"  {kind:17} {stress.ops[kind]:4}  {results}")
    errors = Counter({r: n for (_k, r), n in stress.outcomes.items() if r != "ok"})
    print(f"  errors by name: {dict(errors)}; machines created {stress.next_name}, "
          f"drive files {stress.next_file}, most drives on one machine {stress.peak_drives}")  # fmt: skip
    leaked = sum(len(vm.leaked_fdsets) for vm in stress.vms.values())
    print(f"  KNOWN BUG: fdsets left in QEMU by NoFreePort refusals on the surviving machines: {leaked}")
    assert sum(stress.ops.values()) == OPERATIONS
    # The run did exercise what it is about.
    assert stress.outcomes[("AddDrive", "ok")] > 30 and stress.outcomes[("RemoveDrive", "ok")] > 20


@pytest.mark.xfail(KNOWN_FDSET_LEAK, strict=True, reason="daemon bug: NoFreePort skips the add-fd rollback")
async def test_no_free_port_leaves_no_fdset(client: Client, guest: Any, tmp_path: Path) -> None:
    """Found by the stress run: a refused AddDrive leaves its fd in QEMU.

    vmspawnd/machine.py add_drive passes the fd (add-fd) before it takes a
    port; NoFreePort is no QmpError, so the undo list never runs."""
    monitor = tmp_path / "full.qmp"
    # Not -S: QEMU closes removed fds only while the VM runs.
    path = await client.create("full", **guest_options(guest, hotplug_spares=1, qemu_extra=Probe.extra(monitor)))
    probe = Probe(monitor)
    files = []
    for name in ("a", "b"):
        files.append(str(tmp_path / name))
        Path(files[-1]).write_bytes(b"\0" * 4096)
    await client.add_drive(path, files[0])
    before = probe.fdsets()
    try:
        await client.add_drive(path, files[1])
    except DBusError as e:
        assert e.type == E + "NoFreePort"
    else:
        raise AssertionError("a second drive found a port on a machine with one spare")
    assert probe.fdsets() == before, f"the refused request's fd stays in QEMU: {probe.fdsets()}"
