"""org.vmspawnd1.Machine: one object per VM."""

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, TypeVar

from dbus_fast import Message, MessageFlag, PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusSignature, DBusStr, DBusUInt32, DBusUInt64, DBusUnixFd
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from .. import auth, cmdline, share, tap
from ..chainopen import OpenedChain, open_chain
from ..errors import InvalidArgument
from ..machine import Machine, Outgoing
from ..model import Drive, DriveSpec, MachineShare, NetworkMode, Nic
from ..topology import Port
from . import MACHINE_IFACE, MANAGER_PATH, caller
from . import options as parse
from .errors import replies_errors

Options = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
DictList = Annotated[list[dict[str, Variant]], DBusSignature("aa{sv}")]
DrivePort = Annotated[list[str], DBusSignature("ss")]
UsedBudget = Annotated[list[int], DBusSignature("(uu)")]
CountFlag = Annotated[list[Any], DBusSignature("(ub)")]
Counters = Annotated[dict[str, int], DBusSignature("a{st}")]
T = TypeVar("T")

DEFAULT_UNPLUG_TIMEOUT = 10.0
# What a machine's next run changes (Start() of a kept machine).
RUN_PROPERTIES = ("State", "StateReason", "Leader", "Drives", "Ports", "FreeSparePorts", "ConsoleClients", "Accel")
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"


def object_path(name: str) -> str:
    """systemd's bus label escaping: every byte outside [A-Za-z0-9] becomes _xx."""
    label = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in name) or "_"
    return f"{MANAGER_PATH}/machine/{label}"


def port_entry(port: Port, device: str) -> dict[str, Variant]:
    """One level of the port tree: a root port, a switch's upstream port or
    one of its downstream ports (parent: the port it sits behind)."""
    return {
        "id": Variant("s", port.id),
        "addr": Variant("s", port.addr),
        "chassis": Variant("u", port.chassis),
        "role": Variant("s", str(port.role)),
        "device": Variant("s", device),
        "kind": Variant("s", str(port.kind)),
        "parent": Variant("s", port.parent),
        "multifunction": Variant("b", port.multifunction),
        "buses": Variant("u", port.buses),
    }


EMITS_CHANGED = "org.freedesktop.DBus.Property.EmitsChangedSignal"
# Properties whose PropertiesChanged names them without their value.
INVALIDATED = frozenset({"Ports"})


class PortsValue:
    """The Ports property. Each entry is built once and again only when its
    port's device changes: a 180-spare machine's 192 entries, rebuilt for
    every hotplug's PropertiesChanged, cost the event loop ~3.5 ms a call."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        # port id -> (the planned port, its device, the entry)
        self._entries: dict[str, tuple[Port, str, dict[str, Variant]]] = {}

    def __call__(self) -> list[dict[str, Variant]]:
        out = []
        for port in self.machine.plan.ports:
            device = self.machine.ports.holder(port.id)
            cached = self._entries.get(port.id)
            if cached is None or cached[0] is not port or cached[1] != device:
                cached = self._entries[port.id] = (port, device, port_entry(port, device))
            out.append(cached[2])
        return out


def drives_value(machine: Machine) -> list[dict[str, Variant]]:
    return [
        {
            "id": Variant("s", d.id),
            "path": Variant("s", d.path),
            "disk_type": Variant("s", str(d.disk_type)),
            "port": Variant("s", d.port),
            "state": Variant("s", str(d.state)),
        }
        for d in machine.drives.values()
    ]


def shares_value(machine: Machine) -> list[dict[str, Variant]]:
    return [
        {
            "id": Variant("s", s.id),
            "tag": Variant("s", s.tag),
            "directory": Variant("s", s.directory),
            "port": Variant("s", s.port),
            "read_only": Variant("b", s.read_only),
            "state": Variant("s", str(s.state)),
        }
        for s in machine.shares.values()
    ]


def networks_value(machine: Machine) -> list[dict[str, Variant]]:
    return [
        {
            "id": Variant("s", n.id),
            "network": Variant("s", n.network),
            "mac": Variant("s", n.mac),
            "port": Variant("s", n.port),
            "state": Variant("s", str(n.state)),
        }
        for n in machine.nics.values()
    ]


def bus_ping() -> Message:
    """A message with nothing to say (the bus daemon's Peer.Ping, unanswered)
    to follow a reply out when nothing changed to signal."""
    return Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus.Peer",
        member="Ping", flags=MessageFlag.NO_REPLY_EXPECTED,
    )  # fmt: skip


@contextlib.contextmanager
def passed_fd(fd: int, method: str) -> Iterator[None]:
    """The fd argument `fd` must have come with the call: without fds in the
    message dbus-fast hands over the bare index, never to be taken for one of
    the daemon's own fds. Every fd of the call is closed once the body is done
    (QEMU holds its own copies by then)."""
    passed = caller.passed_fds()
    try:
        if fd not in passed:
            raise InvalidArgument(
                f"{method} needs an open file descriptor sent with the call (busctl cannot send one; "
                "use gdbus call --unix-fd or vmspawnctl)"
            )
        yield
    finally:
        for each in passed:
            os.close(each)


class MachineInterface(ServiceInterface):
    def __init__(
        self,
        machine: Machine,
        bus: MessageBus,
        authorize: Any,
        start: Callable[[str], Awaitable[Machine]],
        taps: Callable[[int], tuple[str, ...]] = lambda uid: (),
    ) -> None:
        super().__init__(MACHINE_IFACE)
        self.machine = machine
        self.bus = bus
        self.path = object_path(machine.name)
        self._authorize = authorize
        self._start = start
        # uid -> the taps vmspawnd.conf's [taps] grants it.
        self._taps = taps
        self.unplug_timeout = DEFAULT_UNPLUG_TIMEOUT
        self._ports = PortsValue(machine)
        # Ports changes are signalled by name only: a 180-spare machine's
        # value is a 45 KB PropertiesChanged that went to the bus before every
        # AddDrive/RemoveDrive reply (+20-30 ms a call, measured); Drives and
        # FreeSparePorts still carry their values, Get reads Ports.
        for prop in ServiceInterface._get_properties(self):
            if prop.name in INVALIDATED:
                prop.introspection.annotations[EMITS_CHANGED] = "invalidates"

    # Observer of the machine: PropertiesChanged and signals.
    def changed(self, machine: Machine, properties: set[str]) -> None:
        getters: dict[str, Callable[[], object]] = {
            "State": lambda: str(machine.state),
            "StateReason": lambda: machine.reason,
            "Leader": lambda: machine.leader,
            "Drives": lambda: drives_value(machine),
            "Shares": lambda: shares_value(machine),
            "Networks": lambda: networks_value(machine),
            "FreeSparePorts": lambda: machine.ports.free_count,
            "ConsoleClients": lambda: list(machine.console.roster.summary),
            "Accel": lambda: machine.accel,
            "Migration": lambda: machine.migration_status,
        }
        self.emit_properties_changed(
            {p: getters[p]() for p in properties if p in getters}, sorted(properties & INVALIDATED)
        )

    def drive_added(self, machine: Machine, drive: Drive) -> None:
        self.DriveAdded(drive.id, drive.port)

    def drive_removed(self, machine: Machine, drive_id: str) -> None:
        self.DriveRemoved(drive_id)

    def share_added(self, machine: Machine, added: MachineShare) -> None:
        self.ShareAdded(added.id, added.port)

    def share_removed(self, machine: Machine, share_id: str) -> None:
        self.ShareRemoved(share_id)

    def network_added(self, machine: Machine, card: Nic) -> None:
        self.NetworkAdded(card.id, card.port)

    def network_removed(self, machine: Machine, nic_id: str) -> None:
        self.NetworkRemoved(nic_id)

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> DBusStr:
        return self.machine.name

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:
        return self.machine.id

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return str(self.machine.state)

    @dbus_property(access=PropertyAccess.READ)
    def StateReason(self) -> DBusStr:
        """Why the machine is unmanaged; empty otherwise."""
        return self.machine.reason

    @dbus_property(access=PropertyAccess.READ)
    def Accel(self) -> DBusStr:
        """The accelerator QEMU runs with: kvm or tcg ("" while unknown)."""
        return self.machine.accel

    @dbus_property(access=PropertyAccess.READ)
    def Migration(self) -> DBusStr:
        """QEMU's status of the last migration in or out (setup, active,
        completed, failed, cancelled...); "" before any."""
        return self.machine.migration_status

    @dbus_property(access=PropertyAccess.READ)
    def Graphics(self) -> DBusStr:
        """none, vnc or spice: what OpenGraphics speaks."""
        return str(self.machine.spec.graphics)

    @dbus_property(access=PropertyAccess.READ)
    def Keep(self) -> DBusBool:
        """Created with keep: stays defined when it stops, Start() boots it again."""
        return self.machine.spec.keep

    @dbus_property(access=PropertyAccess.READ)
    def Leader(self) -> DBusUInt32:
        return self.machine.leader

    @dbus_property(access=PropertyAccess.READ)
    def Ports(self) -> DictList:
        return self._ports()

    @dbus_property(access=PropertyAccess.READ)
    def Drives(self) -> DictList:
        return drives_value(self.machine)

    @dbus_property(access=PropertyAccess.READ)
    def Shares(self) -> DictList:
        return shares_value(self.machine)

    @dbus_property(access=PropertyAccess.READ)
    def Networks(self) -> DictList:
        return networks_value(self.machine)

    @dbus_property(access=PropertyAccess.READ)
    def FreeSparePorts(self) -> DBusUInt32:
        return self.machine.ports.free_count

    @dbus_property(access=PropertyAccess.READ)
    def PcieSlots(self) -> UsedBudget:
        return [self.machine.plan.used, self.machine.plan.budget]

    @dbus_property(access=PropertyAccess.READ)
    def ConsoleLog(self) -> DBusStr:
        return str(self.machine.console_log)

    @dbus_property(access=PropertyAccess.READ)
    def ConsoleClients(self) -> CountFlag:
        return list(self.machine.console.roster.summary)

    @dbus_method()
    @replies_errors
    async def Terminate(self) -> None:
        await self._authorize(self.machine)
        await self.machine.terminate()

    @dbus_method()
    @replies_errors
    async def Start(self) -> None:
        """Boot a kept, stopped machine again (AlreadyRunning if it runs)."""
        await self._authorize(self.machine)
        await self._start(self.machine.name)

    @dbus_method()
    @replies_errors
    async def AddDrive(self, path: DBusStr, options: Options) -> DrivePort:
        uid = await self._authorize(self.machine)
        drive, drive_id = parse.add_drive(path, options)
        port = parse.add_drive_port(options, drive)
        # Refuse bad options before touching the file.
        self.machine.validate_drive(drive, drive_id, port)
        return await self._attach(drive, drive_id, port, uid)

    @dbus_method()
    @replies_errors
    async def AddDriveFd(self, fd: DBusUnixFd, options: Options) -> DrivePort:
        with passed_fd(fd, "AddDriveFd"):
            uid = await self._authorize(self.machine)
            # Relative backing names count from the directory the fd's file is in.
            drive, drive_id = parse.add_drive(os.readlink(f"/proc/self/fd/{fd}"), options)
            port = parse.add_drive_port(options, drive)
            self.machine.validate_drive(drive, drive_id, port)
            return await self._attach(drive, drive_id, port, uid, os.dup(fd))

    async def _attach(self, drive: DriveSpec, drive_id: str, port: str, uid: int, fd: int | None = None) -> list[str]:
        """Every layer of the drive's image opened as `uid` (the image itself
        from `fd` when given, which is then the chain's), handed to QEMU."""
        chain: OpenedChain = await open_chain(uid, str(drive.path), drive.format, cmdline.read_only(drive), fd=fd)
        try:
            added = await self.machine.add_drive(drive, chain, drive_id, port)
        finally:
            # QEMU holds its own copies now.
            chain.close()
        return [added.id, added.port]

    @dbus_method()
    @replies_errors
    async def RemoveDrive(self, drive_id: DBusStr) -> None:
        await self._authorize(self.machine)
        await self.machine.remove_drive(drive_id, self.unplug_timeout)

    @dbus_method()
    @replies_errors
    async def RemoveDriveEx(self, drive_id: DBusStr, options: Options) -> None:
        await self._authorize(self.machine)
        await self.machine.remove_drive(drive_id, parse.remove_timeout(options, self.unplug_timeout))

    @dbus_method()
    @replies_errors
    async def AddShare(self, directory: DBusStr, options: Options) -> DrivePort:
        """The directory opened and checked as a boot-time share's, as the caller."""
        uid = await self._authorize(self.machine)
        wanted, read_only, share_id = parse.add_share(directory, options)
        share.need_virtiofsd()
        share.check_share(wanted, read_only)
        self.machine.validate_share(wanted.tag, share_id)
        opened = await share.open_share(uid, wanted)
        try:
            added = await self.machine.add_share(opened, share_id)
        finally:
            # virtiofsd holds its own copy now.
            os.close(opened.fd)
        return [added.id, added.port]

    @dbus_method()
    @replies_errors
    async def RemoveShare(self, share_id: DBusStr) -> None:
        await self._authorize(self.machine)
        await self.machine.remove_share(share_id, self.unplug_timeout)

    @dbus_method()
    @replies_errors
    async def RemoveShareEx(self, share_id: DBusStr, options: Options) -> None:
        await self._authorize(self.machine)
        await self.machine.remove_share(share_id, parse.remove_timeout(options, self.unplug_timeout, "RemoveShare"))

    @dbus_method()
    @replies_errors
    async def ReplaceDrive(self, drive_id: DBusStr, path: DBusStr, options: Options) -> None:
        """A cdrom's new medium, opened with the caller's rights, QEMU gets the fds."""
        uid = await self._authorize(self.machine)
        medium = parse.replace_drive(path, options)
        # Refused before the file is touched.
        self.machine.media_drive(drive_id, "ReplaceDrive")
        chain = await open_chain(uid, str(medium.path), medium.format, True)
        try:
            await self.machine.change_medium(drive_id, medium, chain)
        finally:
            # QEMU holds its own copies now.
            chain.close()

    @dbus_method()
    @replies_errors
    async def SnapshotDrive(self, drive_id: DBusStr, fd: DBusUnixFd, options: Options) -> None:
        """The drive as it is now, copied into the file `fd` the caller opened read-write; the guest runs on."""
        with passed_fd(fd, "SnapshotDrive"):
            await self._authorize(self.machine)
            fmt, timeout, max_bandwidth = parse.block_job(options, "SnapshotDrive")
            await self.machine.snapshot_drive(drive_id, fd, fmt, timeout, max_bandwidth)

    @dbus_method()
    @replies_errors
    async def SwapDrive(self, drive_id: DBusStr, path: DBusStr, options: Options) -> None:
        """The drive's contents move to `path` (each layer opened with the caller's rights); the disk stays."""
        uid = await self._authorize(self.machine)
        target, timeout, max_bandwidth = parse.swap_target(path, options, "SwapDrive")
        # Refused before the file is touched.
        self.machine.check_swap(drive_id)
        await self._swap(drive_id, target, timeout, max_bandwidth, uid)

    @dbus_method()
    @replies_errors
    async def SwapDriveFd(self, drive_id: DBusStr, fd: DBusUnixFd, options: Options) -> None:
        with passed_fd(fd, "SwapDriveFd"):
            uid = await self._authorize(self.machine)
            # Relative backing names count from the directory the fd's file is in.
            path = os.readlink(f"/proc/self/fd/{fd}")
            target, timeout, max_bandwidth = parse.swap_target(path, options, "SwapDriveFd")
            self.machine.check_swap(drive_id)
            await self._swap(drive_id, target, timeout, max_bandwidth, uid, os.dup(fd))

    async def _swap(
        self, drive_id: str, target: DriveSpec, timeout: float, max_bandwidth: int, uid: int, fd: int | None = None
    ) -> None:
        chain = await open_chain(uid, str(target.path), target.format, False, fd=fd)
        try:
            await self.machine.swap_drive(drive_id, target, chain, timeout, max_bandwidth)
        finally:
            # QEMU holds its own copies now.
            chain.close()

    @dbus_method()
    @replies_errors
    async def EjectDrive(self, drive_id: DBusStr) -> None:
        await self._authorize(self.machine)
        await self.machine.change_medium(drive_id, None, None)

    @dbus_method()
    @replies_errors
    async def AddNetwork(self, options: Options) -> DrivePort:
        uid = await self._authorize(self.machine)
        net, nic_id, mac = parse.add_network(options)
        self.machine.validate_nic(nic_id, mac)
        if net.mode is NetworkMode.USER:
            added = await self.machine.add_network("user", nic_id, mac)
            return [added.id, added.port]
        # Attached with the caller's rights (the tap rules), QEMU gets the fd.
        fd = tap.open_tap(uid, net.tap, self._taps(uid))
        try:
            added = await self.machine.add_network(f"tap:{net.tap}", nic_id, mac, fd)
        finally:
            # QEMU holds its own copy now.
            os.close(fd)
        return [added.id, added.port]

    @dbus_method()
    @replies_errors
    async def AddNetworkFd(self, tap_fd: DBusUnixFd, options: Options) -> DrivePort:
        with passed_fd(tap_fd, "AddNetworkFd"):
            await self._authorize(self.machine)
            nic_id, mac = parse.add_network_fd(options)
            name = tap.passed_tap(tap_fd)
            added = await self.machine.add_network(f"fd:{name}", nic_id, mac, tap_fd)
        return [added.id, added.port]

    @dbus_method()
    @replies_errors
    async def RemoveNetwork(self, nic_id: DBusStr) -> None:
        await self._authorize(self.machine)
        await self.machine.remove_network(nic_id, self.unplug_timeout)

    @dbus_method()
    @replies_errors
    async def RemoveNetworkEx(self, nic_id: DBusStr, options: Options) -> None:
        await self._authorize(self.machine)
        await self.machine.remove_network(nic_id, parse.remove_timeout(options, self.unplug_timeout, "RemoveNetwork"))

    @dbus_method()
    @replies_errors
    async def PowerOff(self, timeout_usec: DBusUInt64) -> None:
        await self._power_off(timeout_usec)

    @dbus_method()
    @replies_errors
    async def PowerOffEx(self, timeout_usec: DBusUInt64) -> DBusBool:
        """Returns whether the guest had to be stopped by force."""
        return await self._power_off(timeout_usec)

    async def _power_off(self, timeout_usec: int) -> bool:
        timeout = parse.power_off_timeout(timeout_usec)
        await self._authorize(self.machine)
        return await self.machine.power_off(timeout)

    @dbus_method()
    @replies_errors
    async def Migrate(self, fd: DBusUnixFd, options: Options) -> None:
        """The machine into the stream `fd` (a socket the caller connected to
        the destination's Incoming); returns once it completed and this side is gone."""

        async def start(stream: int) -> tuple[Outgoing, float]:
            max_bandwidth, timeout = parse.migrate(options)
            return await self.machine.start_migration(stream, max_bandwidth), timeout

        outgoing, timeout = await self._pass_stream(fd, "Migrate", start)
        await self.machine.finish_migration(outgoing, timeout)

    @dbus_method()
    @replies_errors
    async def Incoming(self, fd: DBusUnixFd, options: Options) -> None:
        """Feed a machine created with `incoming` its migration stream; returns once it runs here."""

        async def start(stream: int) -> tuple[asyncio.Future[str], float]:
            timeout = parse.incoming_timeout(options)
            return await self.machine.start_incoming(stream), timeout

        end, timeout = await self._pass_stream(fd, "Incoming", start)
        await self.machine.finish_incoming(end, timeout)

    async def _pass_stream(self, fd: int, method: str, start: Callable[[int], Awaitable[T]]) -> T:
        """The caller's migration stream handed to QEMU by `start`; our
        copies closed at once after: a cancel closing QEMU's must reach the
        other side as the stream's end."""
        with passed_fd(fd, method):
            await self._authorize(self.machine)
            return await start(fd)

    @dbus_method()
    @replies_errors
    async def CancelMigration(self) -> None:
        await self._authorize(self.machine)
        await self.machine.cancel_migration()

    @dbus_method()
    @replies_errors
    async def ForceCompleteMigration(self) -> None:
        await self._authorize(self.machine)
        await self.machine.force_complete_migration()

    @dbus_method()
    @replies_errors
    async def Pause(self) -> None:
        await self._authorize(self.machine)
        await self.machine.pause()

    @dbus_method()
    @replies_errors
    async def Resume(self) -> None:
        await self._authorize(self.machine)
        await self.machine.resume()

    @dbus_method()
    @replies_errors
    async def Suspend(self) -> None:
        """Save a kept machine's state to disk and stop its QEMU; Start() resumes it."""
        await self._authorize(self.machine)
        await self.machine.suspend()

    @dbus_method()
    @replies_errors
    async def Reboot(self) -> None:
        await self._authorize(self.machine)
        await self.machine.reboot()

    @dbus_method()
    @replies_errors
    async def InjectNMI(self) -> None:
        await self._authorize(self.machine)
        await self.machine.inject_nmi()

    @dbus_method()
    @replies_errors
    async def DriveStats(self, drive_id: DBusStr) -> Counters:
        """rd_req, rd_bytes, wr_req, wr_bytes, flush, errors since the drive was plugged."""
        await self._authorize(self.machine)
        return await self.machine.drive_stats(drive_id)

    @dbus_method()
    @replies_errors
    async def SetUserPassword(self, user: DBusStr, password: DBusStr, crypted: DBusBool) -> None:
        """The guest agent sets `user`'s password (`crypted`: a crypt(3) hash)."""
        await self._authorize(self.machine, auth.Action.SET_PASSWORD)
        await self.machine.set_user_password(user, password, crypted)

    @dbus_method()
    @replies_errors
    async def OpenConsole(self) -> DBusUnixFd:
        return await self._open_console(True)

    @dbus_method()
    @replies_errors
    async def OpenConsoleEx(self, options: Options) -> DBusUnixFd:
        return await self._open_console(parse.console_writable(options))

    async def _open_console(self, writable: bool) -> int:
        await self._authorize(self.machine)
        sock = await self.machine.console.open(writable)
        fd = sock.detach()

        def clients() -> Message:
            return Message.new_signal(
                self.path, PROPERTIES_IFACE, "PropertiesChanged", "sa{sv}as",
                [MACHINE_IFACE, {"ConsoleClients": Variant("(ub)", list(self.machine.console.roster.summary))}, []],
            )  # fmt: skip

        self._close_after_reply(fd, clients)
        return fd

    @dbus_method()
    @replies_errors
    async def OpenGraphics(self, options: Options) -> DBusUnixFd:
        """A new client's stream to the machine's display (VNC's RFB or SPICE, as it was created)."""
        parse.open_graphics(options)
        await self._authorize(self.machine)
        fd = (await self.machine.open_graphics()).detach()
        self._close_after_reply(fd, bus_ping)
        return fd

    def _close_after_reply(self, fd: int, after: Callable[[], Message]) -> None:
        """Our copy of a returned fd may go only once the reply carrying it
        is on the wire (sendmsg): dbus-fast queues the reply from a done
        callback of this method's task, registered before the method ran;
        ours runs after it and queues the message `after` makes behind the
        reply, whose send future says when both are out."""
        task = asyncio.current_task()
        assert task is not None

        def queued(_: object) -> None:
            try:
                sent = self.bus.send(after())
            except Exception:  # the bus is gone: nothing will be sent any more
                os.close(fd)
                raise
            sent.add_done_callback(lambda _: os.close(fd))

        task.add_done_callback(queued)

    @dbus_signal()
    def DriveAdded(self, drive_id: str, port: str) -> Annotated[list[str], DBusSignature("ss")]:
        return [drive_id, port]

    @dbus_signal()
    def DriveRemoved(self, drive_id: str) -> DBusStr:
        return drive_id

    @dbus_signal()
    def ShareAdded(self, share_id: str, port: str) -> Annotated[list[str], DBusSignature("ss")]:
        return [share_id, port]

    @dbus_signal()
    def ShareRemoved(self, share_id: str) -> DBusStr:
        return share_id

    @dbus_signal()
    def NetworkAdded(self, nic_id: str, port: str) -> Annotated[list[str], DBusSignature("ss")]:
        return [nic_id, port]

    @dbus_signal()
    def NetworkRemoved(self, nic_id: str) -> DBusStr:
        return nic_id
