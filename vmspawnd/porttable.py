"""Which port holds which device: pure bookkeeping, no I/O.

Builtin ports carry their boot-time devices for the machine's whole life.
Spare ports are handed out by hotplug, one device per port (QEMU unplugs
whole slots), always the first free one in the plan's order: the plan lists
spares in hotplug order, so the ports of a PCIe switch fill in order too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from .errors import InvalidArgument, NoFreePort
from .model import PortRole


class PlannedPort(Protocol):
    """What the table needs of a planned port (topology.Port has it)."""

    @property
    def id(self) -> str: ...
    @property
    def role(self) -> PortRole: ...
    @property
    def carries(self) -> str: ...


class PortTable:
    def __init__(
        self, ports: Iterable[PlannedPort], machine: str = "", observed: Mapping[str, str] | None = None
    ) -> None:
        """The table at boot: every port holds what the plan put on it.

        With `observed` ({port: device}, what QEMU shows after a daemon
        restart) the other ports hold what the plan says, spares what QEMU has
        on them; a port outside the plan or a planned port holding something
        else is a ValueError.
        """
        ports = tuple(ports)
        self.machine = machine
        self._order = tuple(p.id for p in ports)
        if len(set(self._order)) != len(self._order):
            raise ValueError(f"duplicate port ids in {self._order}")
        # Builtin ports (and any other that is no spare): what the plan put there, for good.
        self._fixed = {p.id: p.carries for p in ports if p.role is not PortRole.SPARE}
        self.spares = tuple(p.id for p in ports if p.role is PortRole.SPARE)
        self._holder: dict[str, str] = {}
        self._port: dict[str, str] = {}
        for p in ports:
            if p.carries and (observed is None or p.id in self._fixed):
                self._hold(p.id, p.carries)
        for port, device in (observed or {}).items():
            if port in self._fixed:
                if device != self._fixed[port]:
                    raise ValueError(f"builtin port {port} carries {self._fixed[port]!r}, not {device!r}")
            elif port in self.spares:
                self._hold(port, device)
            else:
                raise ValueError(f"{port} is not a port of the plan")

    def _hold(self, port: str, device: str) -> None:
        if not device:
            raise ValueError(f"port {port}: an empty device id")
        if device in self._port:
            raise ValueError(f"{device} already holds {self._port[device]}; one port per device")
        if port in self._holder:
            raise ValueError(f"{port} already holds {self._holder[port]}; one device per port")
        self._holder[port] = device
        self._port[device] = port

    # -- changes --------------------------------------------------------------

    def check_spare(self, port: str) -> None:
        """A port a caller names must be one of the spares, free or not."""
        if port not in self.spares:
            listed = ", ".join(self.spares) or "none"
            raise InvalidArgument(f"{port!r} is not a spare port of {self.machine}; its spare ports are {listed}")

    def take(self, device: str, port: str = "") -> str:
        """Put `device` on spare `port` (by default the first free one) and return that port."""
        if device in self._port:
            raise ValueError(f"{device} already holds {self._port[device]}; one port per device")
        if port:
            self.check_spare(port)
            if port in self._holder:
                raise NoFreePort(
                    f"spare port {port} of {self.machine} holds {self._holder[port]}; "
                    "pick a free one (FreeSparePorts, Ports) or leave port out"
                )
            self._hold(port, device)
            return port
        for port in self.spares:
            if port not in self._holder:
                self._hold(port, device)
                return port
        holders = ", ".join(f"{port}={self._holder[port]}" for port in self.spares)
        raise NoFreePort(
            f"all {len(self.spares)} spare ports of {self.machine} are taken ({holders}); "
            "remove a device first (RemoveDrive, RemoveShare, RemoveNetwork), or create the machine with more "
            "hotplug_spares"
        )

    def release(self, device: str) -> str | None:
        """Free the one spare port `device` holds; the port, or None if it held none."""
        port = self._port.get(device)
        if port is None:
            return None
        if port in self._fixed:
            raise ValueError(f"{device} sits on builtin port {port}, which is never freed")
        del self._port[device]
        del self._holder[port]
        return port

    # -- questions ------------------------------------------------------------

    def port_of(self, device: str) -> str | None:
        return self._port.get(device)

    def holder(self, port: str) -> str:
        """The device on `port`, "" when it is free."""
        return self._holder.get(port, "")

    def holders(self) -> dict[str, str]:
        """{port: device} for every held port, in plan order."""
        return {port: self._holder[port] for port in self._order if port in self._holder}

    def devices(self) -> set[str]:
        return set(self._port)

    @property
    def free_spares(self) -> tuple[str, ...]:
        return tuple(port for port in self.spares if port not in self._holder)

    @property
    def free_count(self) -> int:
        return len(self.spares) - sum(1 for port in self.spares if port in self._holder)
