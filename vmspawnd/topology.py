"""The PCIe port plan: pure, no I/O.

Root ports are packed eight per pcie.0 device number (multifunction), from
slot 0x10 and then in every other free slot, so a machine with many drives
and spares still leaves room on pcie.0 for everything else (QEMU
docs/pcie.txt, systemd vmspawn's "multifunction-pack pcie-root-ports on
pcie.0"). Past 120 ports, spares fan out through PCIe switches
(x3130-upstream + xio3130-downstream) behind root ports; what ends it is
the number of PCI buses (bridges) the firmware and guest can number.

What counts against pcie.0 is what really sits there: a -device whose type
QEMU lists as a PCI device, without bus= (or with bus=pcie.0). The ids the
daemon gives its own devices are chosen around the ids in qemu_extra.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from .errors import InvalidArgument, NoFreePort, PcieSlotsExhausted, TooManyPorts
from .model import DeviceTypes, Graphics, MachineSpec, NetworkMode, PluggedDrive, PortKind, PortRole

FUNCTIONS_PER_SLOT = 8
# pcie.0 device numbers 0x01..0x1e: 0x00 is the host bridge, 0x1f the ICH9 LPC.
PCIE0_SLOTS = tuple(range(0x01, 0x1F))
PCIE0_SLOT_BUDGET = len(PCIE0_SLOTS)
# Root ports go to 0x10..0x1e first (the seed's layout, left of it stay the
# auto-addressed devices), then downwards from 0x0f.
PORT_SLOTS = (*range(0x10, 0x1F), *range(0x0F, 0x00, -1))
BASE_SLOT = PORT_SLOTS[0]
# Root ports directly on pcie.0 before spares go behind switches.
DIRECT_PORTS = 120
# Device numbers on a switch's internal bus: one downstream port each.
SWITCH_PORTS = 32
# PCI buses (bridges: root ports, switch ports, a user's bridges) with which
# a vmspawnd machine boots on QEMU 7.2 q35 with SeaBIOS and the tiny guest
# (1 vCPU) still sees a disk hotplugged on the last port: 192 (6 switches
# of 30) do; 196 (7 x 26) boot but the guest's driver finds no interrupt
# vector left for the disk, each bridge holds one (README "How many hotplug
# ports"). The implicit devices use INTx for that (cmdline.IMPLICIT_PROPS).
BUS_LIMIT = 192
# Added to every machine on pcie.0, at the lowest free slots.
IMPLICIT_DEVICES = ("virtio-rng-pci", "virtio-balloon-pci", "virtio-serial-pci")
# A machine with graphics has a display, after those: QEMU's standard VGA
# (SeaBIOS and OVMF drive it, any guest has a driver; VNC and SPICE show it).
DISPLAY_DEVICE = "VGA"
SERIAL_CONTROLLER = "virtio-serial-pci"
PCIE0 = "pcie.0"
# Options in qemu_extra whose values carry ids (device, node, backend names).
_ID_OPTIONS = ("device", "blockdev", "drive", "netdev", "nic", "chardev", "object", "fsdev", "add-fd", "audiodev")
# Ids and names the daemon uses outside the plan (cmdline.build_argv).
FIXED_IDS = ("qmp", "console", "mem")
# The guest agent's chardev and its virtserialport (guest_agent machines).
AGENT_ID = "qga0"


@dataclass(frozen=True)
class Port:
    id: str
    role: PortRole
    kind: PortKind = PortKind.ROOT_PORT
    # The device id planned onto this port at boot, "" for a free spare.
    carries: str = ""
    # Where it plugs in: pcie.0, a root port (a switch's upstream port) or
    # an upstream port (a downstream port).
    bus: str = PCIE0
    slot: int = BASE_SLOT
    function: int = 0
    # 0 for an upstream port: it has no slot of its own.
    chassis: int = 0
    multifunction: bool = False
    # Bus numbers this port and everything behind it take.
    buses: int = 1

    @property
    def addr(self) -> str:
        return f"0x{self.slot:x}.{self.function}"

    @property
    def parent(self) -> str:
        return "" if self.bus == PCIE0 else self.bus

    @property
    def hotplug(self) -> bool:
        """Whether the guest may plug and unplug here: builtin ports refuse.
        A switch's root port must stay hotplug-capable, or QEMU's ACPI
        hotplug never reaches the downstream ports behind it."""
        return self.role is not PortRole.BUILTIN


@dataclass(frozen=True)
class SlotConsumer:
    what: str
    slots: int


@dataclass(frozen=True)
class ImplicitDevice:
    id: str
    driver: str
    slot: int

    @property
    def addr(self) -> str:
        return f"0x{self.slot:x}.0"


@dataclass(frozen=True)
class Plan:
    ports: tuple[Port, ...]
    consumers: tuple[SlotConsumer, ...]
    budget: int = PCIE0_SLOT_BUDGET
    implicit: tuple[ImplicitDevice, ...] = ()
    # The boot SCSI controller's id ("" without SCSI boot drives).
    scsi_controller: str = ""
    # Ids defined in qemu_extra: the daemon never gives one to its own devices.
    taken: frozenset[str] = frozenset()
    # fdset numbers qemu_extra's -add-fd uses.
    taken_fdsets: frozenset[int] = frozenset()
    buses: int = 0
    bus_budget: int = BUS_LIMIT
    # The most hotplug_spares this machine could have.
    max_spares: int = 0

    @property
    def used(self) -> int:
        return sum(c.slots for c in self.consumers)

    @property
    def spares(self) -> tuple[Port, ...]:
        """Spare ports in the order hotplug hands them out: root ports, or
        each switch's downstream ports in order, switch after switch."""
        return tuple(p for p in self.ports if p.role is PortRole.SPARE)

    def port_carrying(self, device: str) -> Port:
        return next(p for p in self.ports if p.carries == device)

    @property
    def serial_controller(self) -> str:
        """The implicit virtio-serial-pci's id: the guest agent's port sits on
        it (every plan has one: its slot counts in the budget)."""
        return next(i.id for i in self.implicit if i.driver == SERIAL_CONTROLLER)


def implicit_devices(spec: MachineSpec) -> tuple[str, ...]:
    """What the daemon adds on pcie.0 besides the ports, in slot order."""
    return IMPLICIT_DEVICES + ((DISPLAY_DEVICE,) if spec.graphics is not Graphics.NONE else ())


def drive_id(index: int) -> str:
    return f"disk{index}"


def builtin_devices(spec: MachineSpec, scsi_controller: str) -> list[str]:
    """Device ids that need a builtin root port, in command-line order.

    A SCSI boot drive's controller is builtin too: the guest must not eject
    the controller its root disk hangs off.
    """
    devices = [drive_id(i) for i, d in enumerate(spec.boot_drives) if not d.disk_type.is_scsi]
    if scsi_controller:
        devices.append(scsi_controller)
    if spec.network.mode is not NetworkMode.NONE:
        devices.append("net0")
    if spec.directory is not None:
        devices.append("rootfs")
    devices += [f"fs{i}" for i in range(len(spec.mounts))]
    if spec.vsock:
        devices.append("vsock0")
    return devices


# -- qemu_extra ---------------------------------------------------------------


@dataclass(frozen=True)
class ExtraOption:
    """One option of qemu_extra that may name ids or take a PCI slot."""

    option: str
    props: dict[str, object]
    # The option as given (shortened), for messages.
    text: str

    @property
    def driver(self) -> str:
        return str(self.props.get("driver", ""))


def _split_option_value(option: str, value: str) -> dict[str, object]:
    """Parse an option value (QEMU key=value with ',,' escapes, or JSON)."""
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise InvalidArgument(f"qemu_extra: -{option} {value[:100]!r} is not valid JSON: {e}") from e
        if not isinstance(parsed, dict):
            raise InvalidArgument(f"qemu_extra: -{option} {value[:100]!r} must be a JSON object")
        # "bus": null is no bus at all: the device lands on pcie.0.
        return {str(k): v for k, v in parsed.items() if v is not None}
    parts = value.replace(",,", "\0").split(",")
    props: dict[str, object] = {}
    first = parts[0].replace("\0", ",")
    if "=" in first:
        # driver=nvme,... / if=virtio,file=...: key=value from the start.
        parts.insert(1, first)
    else:
        # -device nvme,... / -netdev user,... / -chardev socket,...: the type first.
        props["driver"] = first
        if option == "nic":
            props["backend"] = first
    for part in parts[1:]:
        key, _, val = part.partition("=")
        props[key] = val.replace("\0", ",")
    return props


def extra_options(qemu_extra: Iterable[str]) -> Iterator[ExtraOption]:
    """The options of qemu_extra that define ids or devices, in order."""
    args = iter(qemu_extra)
    for arg in args:
        if not arg.startswith("-"):
            continue
        name, eq, inline = arg.lstrip("-").partition("=")
        if name not in _ID_OPTIONS:
            continue
        value = inline if eq else next(args, None)
        if value is None:
            raise InvalidArgument(f"qemu_extra ends with {arg} but no value; give it e.g. 'nvme,serial=x'")
        yield ExtraOption(name, _split_option_value(name, value), f"-{name} {value[:80]}")


def extra_ids(options: Iterable[ExtraOption]) -> frozenset[str]:
    """Every id, node name and backend name qemu_extra defines."""
    ids = set()
    for opt in options:
        for key in ("id", "node-name"):
            if key in opt.props:
                ids.add(str(opt.props[key]))
    return frozenset(ids)


def extra_fdsets(options: Iterable[ExtraOption]) -> frozenset[int]:
    out = set()
    for opt in options:
        if opt.option == "add-fd" and str(opt.props.get("set", "")).isdigit():
            out.add(int(str(opt.props["set"])))
    return frozenset(out)


def parse_addr(value: object) -> tuple[int, int]:
    """QEMU's PCI addr: "slot[.function]" in hex, or a devfn integer (JSON)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value >> 3, value & 7
    slot_s, _, fn_s = str(value).partition(".")
    try:
        slot, fn = int(slot_s, 16), int(fn_s or "0", 16)
    except ValueError:
        raise InvalidArgument(
            f"qemu_extra: addr={value!r} is not a PCI address; use e.g. addr=0x5 or addr=0x5.1"
        ) from None
    if not (0 <= slot < 32 and 0 <= fn < FUNCTIONS_PER_SLOT):
        raise InvalidArgument(f"qemu_extra: addr={value!r} is out of range (slot 0x0-0x1f, function 0-7)")
    return slot, fn


@dataclass(frozen=True)
class Pcie0Device:
    """A qemu_extra device that sits on pcie.0."""

    driver: str
    # (slot, function) when the user gave addr=, None when QEMU picks the slot.
    addr: tuple[int, int] | None
    text: str


def _is_on_pcie0(props: dict[str, object]) -> bool:
    return str(props.get("bus", PCIE0)) == PCIE0


def pcie0_devices(options: Iterable[ExtraOption], types: DeviceTypes) -> list[Pcie0Device]:
    """The qemu_extra devices that take a pcie.0 slot, in command-line order.

    Unknown device types are refused: a guess could let QEMU fail later.
    """
    out = []
    for opt in options:
        if opt.option == "device":
            qtype = types.resolve(opt.driver)
            if qtype is None:
                raise InvalidArgument(
                    f"qemu_extra: {opt.text!r}: QEMU has no device type {opt.driver!r} "
                    "('qemu-system-x86_64 -device help' lists them)"
                )
            if qtype in types.pci and _is_on_pcie0(opt.props):
                addr = parse_addr(opt.props["addr"]) if "addr" in opt.props else None
                out.append(Pcie0Device(qtype, addr, opt.text))
        elif opt.option == "nic" and opt.driver != "none":
            # -nic puts its NIC model straight on pcie.0.
            out.append(Pcie0Device(f"-nic {opt.driver}", None, opt.text))
        elif opt.option == "drive" and opt.props.get("if") == "virtio":
            out.append(Pcie0Device("-drive if=virtio", None, opt.text))
    return out


def extra_devices_on_pcie0(qemu_extra: tuple[str, ...], types: DeviceTypes) -> list[str]:
    """Driver names of the extra entries that take a pcie.0 slot."""
    return [d.driver for d in pcie0_devices(extra_options(qemu_extra), types)]


def extra_bridges(options: Iterable[ExtraOption], types: DeviceTypes) -> int:
    """qemu_extra's own PCI bridges: each takes a bus number."""
    return sum(1 for o in options if o.option == "device" and types.resolve(o.driver) in types.bridges)


def extra_chassis(options: Iterable[ExtraOption]) -> frozenset[int]:
    """Chassis numbers qemu_extra's own ports use (a pair must be unique)."""
    out = set()
    for opt in options:
        for key in ("chassis", "chassis_nr"):
            if str(opt.props.get(key, "")).isdigit():
                out.add(int(str(opt.props[key])))
    return frozenset(out)


# -- slots ------------------------------------------------------------------


@dataclass(frozen=True)
class SlotMap:
    """Which pcie.0 slots the devices other than the root ports take."""

    # The user's addr= entries: (slot, function) -> the option that names it.
    named: dict[tuple[int, int], str]
    implicit: tuple[int, ...]
    # How many slots the user's auto-addressed devices take.
    auto: int
    # Slots root ports may take, in the order they are filled; the
    # auto-addressed devices get the lowest of those the ports leave.
    candidates: tuple[int, ...]

    @property
    def claimed(self) -> frozenset[int]:
        return frozenset(s for s, _ in self.named if s in PCIE0_SLOTS)


def place_slots(devices: list[Pcie0Device], implicit_count: int) -> SlotMap:
    """The user's addr= slots stay theirs, the implicit devices get the
    lowest others; root ports and auto-addressed devices share the rest."""
    named: dict[tuple[int, int], str] = {}
    for dev in devices:
        if dev.addr is None:
            continue
        if dev.addr in named:
            raise InvalidArgument(
                f"qemu_extra: {dev.text!r} and {named[dev.addr]!r} both ask for pcie.0 addr "
                f"0x{dev.addr[0]:x}.{dev.addr[1]}; give one another addr="
            )
        named[dev.addr] = dev.text
    claimed = {s for s, _ in named}
    implicit = tuple([s for s in PCIE0_SLOTS if s not in claimed][:implicit_count])
    candidates = tuple(s for s in PORT_SLOTS if s not in claimed and s not in implicit)
    return SlotMap(named, implicit, sum(1 for d in devices if d.addr is None), candidates)


def check_auto_slots(devices: list[Pcie0Device], slots: SlotMap, port_slots: set[int]) -> None:
    """QEMU gives an auto-addressed device the lowest slot whose function 0
    is free, in command-line order: it must not be one that a later
    qemu_extra device names with addr=."""
    filled = {(s, 0) for s in (*slots.implicit, *port_slots)}
    for dev in devices:
        if dev.addr is not None:
            filled.add(dev.addr)
            continue
        slot = next((s for s in PCIE0_SLOTS if (s, 0) not in filled), None)
        if slot in slots.claimed:
            names = next(text for (s, _), text in slots.named.items() if s == slot)
            raise InvalidArgument(
                f"qemu_extra: {dev.text!r} has no addr= and would take pcie.0 slot 0x{slot:x}, which "
                f"{names!r} names; give it an addr= or put it after that device"
            )
        filled.add((slot or 0, 0))


# -- ports ------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How many spares sit on root ports, and the downstream ports per switch."""

    direct_spares: int
    switches: tuple[int, ...]

    def buses(self, builtin: int) -> int:
        return builtin + self.direct_spares + sum(k + 2 for k in self.switches)

    def positions(self, builtin: int) -> int:
        """Root ports on pcie.0."""
        return builtin + self.direct_spares + len(self.switches)


def shape(builtin: int, spares: int, positions: int) -> Shape | None:
    """All ports on root ports while they fit in `positions`; otherwise the
    builtin ports stay on root ports and every spare goes behind as few
    switches as hold them, evenly filled (the layout measured to boot:
    root ports cost the firmware more bridge window than switch ports).
    None if even that does not fit."""
    if builtin + spares <= positions:
        return Shape(spares, ())
    w = -(-spares // SWITCH_PORTS)
    if builtin + w > positions:
        return None
    return Shape(0, tuple(spares // w + (1 if i < spares % w else 0) for i in range(w)))


def max_spares(builtin: int, positions: int, bus_budget: int) -> int:
    """The most spares that fit both the root-port positions and the buses."""
    for spares in range(bus_budget, -1, -1):
        s = shape(builtin, spares, positions)
        if s is not None and s.buses(builtin) <= bus_budget:
            return spares
    return -1


def _chassis_numbers(taken: frozenset[int]) -> Iterator[int]:
    return (c for c in itertools.count(1) if c not in taken)


def _ids(prefix: str, taken: frozenset[str]) -> Iterator[str]:
    return (f"{prefix}{i}" for i in itertools.count() if f"{prefix}{i}" not in taken)


def lay_out(
    builtin: list[str], s: Shape, slots: tuple[int, ...], taken: frozenset[str], chassis_taken: frozenset[int]
) -> list[Port]:
    """The ports in command-line order: every root port, then each switch."""
    rp_ids, sw_ids, chassis = _ids("rp", taken), _ids("sw", taken), _chassis_numbers(chassis_taken)
    roles = [(PortRole.BUILTIN, dev) for dev in builtin]
    roles += [(PortRole.SPARE, "")] * s.direct_spares + [(PortRole.SWITCH, "")] * len(s.switches)
    ports: list[Port] = []
    switch_ports: list[Port] = []
    sizes = iter(s.switches)
    for i, (role, dev) in enumerate(roles):
        slot, fn = slots[i // FUNCTIONS_PER_SLOT], i % FUNCTIONS_PER_SLOT
        # Function 0 says multifunction only when its slot holds more.
        mf = fn == 0
        rp = Port(next(rp_ids), role, PortKind.ROOT_PORT, dev, PCIE0, slot, fn, next(chassis), mf)
        if role is PortRole.SWITCH:
            size = next(sizes)
            up = next(sw_ids)
            rp = replace(rp, buses=size + 2)
            switch_ports.append(Port(up, PortRole.SWITCH, PortKind.UPSTREAM, "", rp.id, 0, 0, 0, buses=size + 1))
            switch_ports += [
                Port(f"{up}p{k}", PortRole.SPARE, PortKind.DOWNSTREAM, "", up, k, 0, next(chassis)) for k in range(size)
            ]
        ports.append(rp)
    return ports + switch_ports


def min_port_slots(builtin: int, spares: int) -> int:
    """The fewest pcie.0 slots these ports could live in (with switches)."""
    if builtin + spares == 0:
        return 0
    return next(
        (k for k in range(1, PCIE0_SLOT_BUDGET + 1) if shape(builtin, spares, FUNCTIONS_PER_SLOT * k)),
        PCIE0_SLOT_BUDGET + 1,
    )


def place_plugged(ports: list[Port], plugged: Iterable[PluggedDrive], machine: str) -> list[Port]:
    """Each drive a kept machine boots with on the spare port it had (its
    SCSI controller there, shared by the controller's drives). The spares
    are laid out as before (same spec, same plan), so the port is there; one
    that is not, or is taken twice, is refused (NoFreePort)."""
    wanted: dict[str, str] = {}
    placed: dict[str, str] = {}
    for p in plugged:
        holder = p.controller or p.id
        if wanted.setdefault(p.port, holder) != holder or placed.setdefault(holder, p.port) != p.port:
            raise NoFreePort(
                f"machine {machine}: drive {p.id} had port {p.port}, which clashes with another of its drives; "
                "terminate the machine and create it again"
            )
    spares = {port.id for port in ports if port.role is PortRole.SPARE}
    if missing := sorted(set(wanted) - spares):
        raise NoFreePort(
            f"machine {machine}: its drives had spare ports {', '.join(missing)}, which its plan no longer has; "
            "terminate the machine and create it again"
        )
    return [replace(port, carries=wanted[port.id]) if port.id in wanted else port for port in ports]


def plan_machine(spec: MachineSpec, types: DeviceTypes) -> Plan:
    """Lay out the ports for `spec` and check pcie.0's slot budget.

    `types` is QEMU's own device type list (vmspawnd.pcitypes). Raises
    TooManyPorts past the bus budget, PcieSlotsExhausted when the ports, the
    implicit devices and the extra devices do not fit pcie.0, and
    InvalidArgument for an unknown device type or an id the daemon needs.
    """
    options = list(extra_options(spec.qemu_extra))
    taken = extra_ids(options)
    needs_scsi = any(d.disk_type.is_scsi for d in spec.boot_drives)
    scsi_controller = next(_ids("scsi", taken)) if needs_scsi else ""
    builtin = builtin_devices(spec, scsi_controller)
    fixed = [drive_id(i) for i in range(len(spec.boot_drives))]
    fixed += [p.id for p in spec.plugged]
    fixed += [f"{d}-node" for d in fixed] + [d for d in builtin if d != scsi_controller] + list(FIXED_IDS)
    fixed += [AGENT_ID] if spec.guest_agent else []
    fixed += [p.controller for p in spec.plugged if p.controller]
    if clash := sorted(taken & set(fixed)):
        raise InvalidArgument(
            f"qemu_extra uses id {', '.join(map(repr, clash))}, which vmspawnd gives this machine's own "
            "devices; rename it in qemu_extra"
        )

    devices = pcie0_devices(options, types)
    implicit_drivers = implicit_devices(spec)
    slots = place_slots(devices, len(implicit_drivers))
    auto = Counter(d.driver for d in devices if d.addr is None)
    others = [
        SlotConsumer("implicit devices (" + ", ".join(implicit_drivers) + ")", len(implicit_drivers)),
        *(SlotConsumer(f"qemu_extra -device {driver} without bus=", n) for driver, n in sorted(auto.items())),
    ]
    if slots.claimed:
        listed = ", ".join(f"0x{s:x}" for s in sorted(slots.claimed))
        others.append(SlotConsumer(f"qemu_extra devices with addr= on pcie.0 (slots {listed})", len(slots.claimed)))
    n_ports = len(builtin) + spec.hotplug_spares
    free_slots = PCIE0_SLOT_BUDGET - sum(c.slots for c in others)
    fewest = min_port_slots(len(builtin), spec.hotplug_spares)
    if fewest > free_slots:
        needed = PCIE0_SLOT_BUDGET - free_slots + fewest
        detail = ", ".join(
            f"{c.slots} for {c.what}" for c in [SlotConsumer(f"{n_ports} PCIe ports (at the fewest)", fewest), *others]
        )
        raise PcieSlotsExhausted(
            f"pcie.0 has {PCIE0_SLOT_BUDGET} free device slots but this machine needs {needed}: "
            f"{detail}. Put extra devices behind a root port (bus=...), "
            "pass fewer -device entries, or lower hotplug_spares."
        )

    bus_budget = BUS_LIMIT - extra_bridges(options, types)
    free = slots.candidates[: len(slots.candidates) - slots.auto]
    positions = min(DIRECT_PORTS, FUNCTIONS_PER_SLOT * len(free))
    limit = max_spares(len(builtin), positions, bus_budget)
    if spec.hotplug_spares > limit:
        raise TooManyPorts(
            f"Too many PCIe ports requested ({n_ports}, max {max(limit, 0) + len(builtin)} on this machine: "
            f"{bus_budget} PCI buses for root ports, switch ports and qemu_extra's bridges, "
            f"{len(free)} free pcie.0 slots). Reduce hotplug_spares (now {spec.hotplug_spares}, "
            f"at most {max(limit, 0)} here) or the number of non-SCSI drives, mounts and devices "
            f"needing a builtin port (now {len(builtin)}); SCSI drives share one controller and need "
            "no port of their own."
        )
    layout = shape(len(builtin), spec.hotplug_spares, positions)
    assert layout is not None
    ports = place_plugged(lay_out(builtin, layout, free, taken, extra_chassis(options)), spec.plugged, spec.name)
    port_slots = {p.slot for p in ports if p.bus == PCIE0}
    check_auto_slots(devices, slots, port_slots)
    consumers = [
        SlotConsumer(f"{layout.positions(len(builtin))} PCIe root ports, 8 per slot", len(port_slots)),
        *others,
    ]
    implicit = tuple(
        ImplicitDevice(i, d, s)
        for i, d, s in zip(_ids("implicit", taken), implicit_drivers, slots.implicit, strict=False)
    )
    return Plan(
        ports=tuple(ports),
        consumers=tuple(c for c in consumers if c.slots),
        implicit=implicit,
        scsi_controller=scsi_controller,
        taken=taken,
        taken_fdsets=extra_fdsets(options),
        buses=layout.buses(len(builtin)),
        bus_budget=bus_budget,
        max_spares=limit,
    )
