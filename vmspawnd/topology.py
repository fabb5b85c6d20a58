"""The PCIe port plan: pure, no I/O.

Root ports are packed eight per pcie.0 device number (multifunction) from
slot 0x10, so a machine with many drives and spares still leaves room on
pcie.0 for everything else (QEMU docs/pcie.txt, systemd vmspawn's
"multifunction-pack pcie-root-ports on pcie.0").
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from .errors import InvalidArgument, PcieSlotsExhausted, TooManyPorts
from .model import MachineSpec, NetworkMode, PortRole

BASE_SLOT = 0x10
# Exclusive: q35's ICH9 LPC sits at 0x1f.0 as a single-function device.
END_SLOT = 0x1F
FUNCTIONS_PER_SLOT = 8
MAX_PORTS = (END_SLOT - BASE_SLOT) * FUNCTIONS_PER_SLOT
# pcie.0 device numbers 0x01..0x1e: 0x00 is the host bridge, 0x1f the LPC.
PCIE0_SLOT_BUDGET = 30
# Added to every machine, auto-addressed on pcie.0.
IMPLICIT_DEVICES = ("virtio-rng-pci", "virtio-balloon-pci", "virtio-serial-pci")
SCSI_CONTROLLER = "scsi0"


@dataclass(frozen=True)
class Port:
    index: int
    role: PortRole
    # The device id planned onto this port at boot, "" for a free spare.
    carries: str = ""

    @property
    def id(self) -> str:
        return f"rp{self.index}"

    @property
    def slot(self) -> int:
        return BASE_SLOT + self.index // FUNCTIONS_PER_SLOT

    @property
    def function(self) -> int:
        return self.index % FUNCTIONS_PER_SLOT

    @property
    def addr(self) -> str:
        return f"0x{self.slot:x}.{self.function}"

    @property
    def chassis(self) -> int:
        return self.index + 1

    @property
    def multifunction(self) -> bool:
        return self.function == 0


@dataclass(frozen=True)
class SlotConsumer:
    what: str
    slots: int


@dataclass(frozen=True)
class Plan:
    ports: tuple[Port, ...]
    consumers: tuple[SlotConsumer, ...]
    budget: int = PCIE0_SLOT_BUDGET

    @property
    def used(self) -> int:
        return sum(c.slots for c in self.consumers)

    @property
    def spares(self) -> tuple[Port, ...]:
        return tuple(p for p in self.ports if p.role is PortRole.SPARE)

    def port_carrying(self, device: str) -> Port:
        return next(p for p in self.ports if p.carries == device)


def drive_id(index: int) -> str:
    return f"disk{index}"


def builtin_devices(spec: MachineSpec) -> list[str]:
    """Device ids that need a builtin root port, in command-line order."""
    devices = [drive_id(i) for i, d in enumerate(spec.boot_drives) if not d.disk_type.is_scsi]
    if spec.network.mode is not NetworkMode.NONE:
        devices.append("net0")
    if spec.directory is not None:
        devices.append("rootfs")
    devices += [f"fs{i}" for i in range(len(spec.mounts))]
    if spec.vsock:
        devices.append("vsock0")
    return devices


def _split_device_arg(value: str) -> dict[str, str]:
    """Parse a -device value (QEMU key=value with ',,' escapes, or JSON)."""
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise InvalidArgument(f"qemu_extra: -device {value[:100]!r} is not valid JSON: {e}") from e
        if not isinstance(parsed, dict):
            raise InvalidArgument(f"qemu_extra: -device {value[:100]!r} must be a JSON object")
        # "bus": null is no bus at all: the device lands on pcie.0.
        return {str(k): str(v) for k, v in parsed.items() if v is not None}
    parts = value.replace(",,", "\0").split(",")
    props = {"driver": parts[0].replace("\0", ",")}
    for part in parts[1:]:
        key, _, val = part.partition("=")
        props[key] = val.replace("\0", ",")
    return props


def extra_devices_on_pcie0(qemu_extra: tuple[str, ...]) -> list[str]:
    """Driver names of the extra -device entries that land on pcie.0."""
    drivers = []
    args = iter(qemu_extra)
    for arg in args:
        if arg in ("-device", "--device"):
            value = next(args, None)
            if value is None:
                raise InvalidArgument("qemu_extra ends with -device but no value; give it e.g. 'nvme,serial=x'")
        elif arg.startswith(("-device=", "--device=")):
            value = arg.partition("=")[2]
        else:
            continue
        props = _split_device_arg(value)
        if props.get("bus", "pcie.0") == "pcie.0":
            drivers.append(props.get("driver", "?"))
    return drivers


def _too_many_ports_hint(spec: MachineSpec, builtin: int) -> str:
    return (
        f"Reduce hotplug_spares (now {spec.hotplug_spares}) or the number of "
        f"non-SCSI drives, mounts and devices needing a builtin port (now {builtin}); "
        "SCSI drives share one controller and need no port of their own."
    )


def plan_machine(spec: MachineSpec) -> Plan:
    """Lay out the root ports for `spec` and check pcie.0's slot budget.

    Raises TooManyPorts past 120 ports and PcieSlotsExhausted when the ports,
    the implicit devices and the extra -device entries do not fit pcie.0.
    """
    builtin = builtin_devices(spec)
    n_ports = len(builtin) + spec.hotplug_spares
    if n_ports > MAX_PORTS:
        raise TooManyPorts(
            f"Too many PCIe root ports requested ({n_ports}, max {MAX_PORTS}). "
            + _too_many_ports_hint(spec, len(builtin))
        )
    needs_scsi = any(d.disk_type.is_scsi for d in spec.boot_drives)
    if needs_scsi and spec.hotplug_spares == 0:
        raise InvalidArgument(
            "virtio-scsi drives share a controller that takes a spare root port; set hotplug_spares to at least 1"
        )

    ports = [Port(i, PortRole.BUILTIN, dev) for i, dev in enumerate(builtin)]
    ports += [
        Port(i, PortRole.SPARE, SCSI_CONTROLLER if needs_scsi and i == len(builtin) else "")
        for i in range(len(builtin), n_ports)
    ]

    port_slots = -(-n_ports // FUNCTIONS_PER_SLOT)
    consumers = [
        SlotConsumer(f"{n_ports} PCIe root ports, {FUNCTIONS_PER_SLOT} per slot", port_slots),
        SlotConsumer("implicit devices (" + ", ".join(IMPLICIT_DEVICES) + ")", len(IMPLICIT_DEVICES)),
    ]
    for driver, count in sorted(Counter(extra_devices_on_pcie0(spec.qemu_extra)).items()):
        consumers.append(SlotConsumer(f"qemu_extra -device {driver} without bus=", count))

    plan = Plan(tuple(ports), tuple(c for c in consumers if c.slots))
    if plan.used > plan.budget:
        detail = ", ".join(f"{c.slots} for {c.what}" for c in plan.consumers)
        raise PcieSlotsExhausted(
            f"pcie.0 has {plan.budget} free device slots but this machine needs {plan.used}: "
            f"{detail}. Put extra devices behind a root port (bus=...), "
            "pass fewer -device entries, or lower hotplug_spares."
        )
    return plan
