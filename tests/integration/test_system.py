"""vmspawnd as a system service: who may do what, polkit, machined, journal, watchdog.

The real daemon runs as root on a private system-style bus built from the
shipped policy (dbus/org.vmspawnd1.conf) plus polkit's own bus policy and a
test policy that lets root own org.freedesktop.machine1. Other callers are
real accounts, `nobody` and `daemon`, run through setpriv: gdbus for plain
calls (it prints the D-Bus error name), and for AddDriveFd (gdbus cannot
pass fds) a small dbus-fast script under /usr/bin/python3, since the venv's
interpreter lives under /root where those users cannot reach it.

polkit is the real polkitd, started by the tests on the private bus; it only
reads /usr/share/polkit-1/actions and the rules directories, so the tests
install dbus/org.vmspawnd1.policy and a test rules file there for their
duration and remove them afterwards.

systemd-machined cannot run on this machine (PID 1 is not systemd): the
machined tests serve a stand-in org.freedesktop.machine1 from this process
that records every call and its arguments.
"""

import asyncio
import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import dbus_fast
import pytest
from dbus_fast import DBusError, Message, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusObjectPath, DBusSignature, DBusStr, DBusUInt32
from dbus_fast.service import ServiceInterface, dbus_method

from vmspawnd import machined, systemd
from vmspawnd.model import MachineSpec, Network, NetworkMode

from .harness import ROOT, Client, Daemon, qemu_pids

sys.path.insert(0, str(ROOT / "tools"))
import testbus

MANAGER = ("-d", "org.vmspawnd1", "-o", "/org/vmspawnd1")
ACTIONS = Path("/usr/share/polkit-1/actions/org.vmspawnd1.policy")
RULES = Path("/etc/polkit-1/rules.d/49-vmspawnd-test.rules")
TEST_RULES = """\
// Installed by vmspawnd's tests/integration/test_system.py for one test, then removed.
polkit.addRule(function(action, subject) {
    if (action.id == "org.vmspawnd1.create-machine" && subject.user == "daemon")
        return polkit.Result.YES;
    if (action.id == "org.vmspawnd1.manage-machine" && (subject.user == "daemon" || subject.user == "nobody"))
        return polkit.Result.YES;
});
"""
MACHINED_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root"><allow own="org.freedesktop.machine1"/></policy>
  <policy context="default"><allow send_destination="org.freedesktop.machine1"/></policy>
</busconfig>
"""
USERS = {"nobody": ("nobody", "nogroup"), "daemon": ("daemon", "daemon")}
SITE_PACKAGES = Path(dbus_fast.__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"


# -- the bus, the daemon, polkitd --------------------------------------------


class System:
    """A private system bus with vmspawnd on it, and the means to add polkitd."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        (directory / "machined.conf").write_text(MACHINED_POLICY)
        self.bus_proc, self.address = testbus.start(
            directory / "bus", (testbus.POLKIT_POLICY, directory / "machined.conf")
        )
        self.daemon = Daemon(directory / "run", directory / "daemon.log")
        self.polkitd: subprocess.Popen[bytes] | None = None
        self._saved_actions: bytes | None = None

    def start_daemon(self, *args: str) -> None:
        saved = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        try:
            self.daemon.start("--verbose", *args)
        finally:
            if saved is None:
                del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
            else:
                os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = saved

    def log(self) -> str:
        return self.daemon.log.read_text(errors="replace")

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/", "DBUS_SYSTEM_BUS_ADDRESS": self.address}

    async def start_polkit(self, rules: bool | str) -> None:
        """(Re)start polkitd: it reads actions and rules once, at start-up.
        `rules`: the test rules, or a rules file's own text."""
        await self.stop_polkit()
        if self._saved_actions is None:
            self._saved_actions = ACTIONS.read_bytes() if ACTIONS.exists() else b""
            shutil.copyfile(ROOT / "dbus" / "org.vmspawnd1.policy", ACTIONS)
        if rules:
            RULES.write_text(rules if isinstance(rules, str) else TEST_RULES)
            RULES.chmod(0o644)
        else:
            RULES.unlink(missing_ok=True)
        with open(self.dir / "polkitd.log", "ab") as log:
            self.polkitd = subprocess.Popen(
                ["/usr/lib/polkit-1/polkitd", "--no-debug"], env=self.env(), stdout=log, stderr=log
            )
        bus = await MessageBus(bus_address=self.address).connect()
        try:
            deadline = time.monotonic() + 20
            while not await has_owner(bus, "org.freedesktop.PolicyKit1"):
                assert self.polkitd.poll() is None, f"polkitd exited; see {self.dir / 'polkitd.log'}"
                assert time.monotonic() < deadline, "polkitd did not take its bus name"
                await asyncio.sleep(0.05)
        finally:
            bus.disconnect()

    async def stop_polkit(self) -> None:
        if self.polkitd is not None:
            self.polkitd.terminate()
            self.polkitd.wait(10)
            self.polkitd = None

    def uninstall_polkit_files(self) -> None:
        RULES.unlink(missing_ok=True)
        if self._saved_actions is not None:
            if self._saved_actions:
                ACTIONS.write_bytes(self._saved_actions)
            else:
                ACTIONS.unlink(missing_ok=True)
            self._saved_actions = None

    def close(self) -> None:
        if self.polkitd is not None:
            self.polkitd.terminate()
            self.polkitd.wait(10)
        self.uninstall_polkit_files()
        if self.daemon.proc is not None:
            self.daemon.stop()
        self.bus_proc.terminate()
        self.bus_proc.wait()


async def has_owner(bus: MessageBus, name: str) -> bool:
    reply = await bus.call(
        Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                member="NameHasOwner", signature="s", body=[name])
    )  # fmt: skip
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN
    return bool(reply.body[0])


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    # World-traversable: nobody and daemon reach the bus socket and the drives here.
    directory = Path(tempfile.mkdtemp(prefix="vmspawnd-sys-", dir="/tmp"))
    directory.chmod(0o755)
    sys_ = System(directory)
    try:
        sys_.start_daemon()
        yield sys_
    finally:
        sys_.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def polkit(system: System) -> AsyncIterator[System]:
    yield system
    await system.stop_polkit()
    system.uninstall_polkit_files()


@pytest.fixture
async def root(system: System) -> AsyncIterator[Client]:
    client = Client(await MessageBus(bus_address=system.address, negotiate_unix_fd=True).connect())
    yield client
    await client.terminate_all()
    client.close()
    assert qemu_pids(str(system.daemon.runtime_dir)) == []


def new_image(system: System) -> str:
    """A blank raw disk: SeaBIOS finds nothing to boot and idles, cheaper than a kernel under TCG."""
    path = system.dir / f"image-{os.urandom(4).hex()}.raw"
    path.write_bytes(b"\0" * (1 << 20))
    return str(path)


@pytest.fixture
def image(system: System) -> str:
    return new_image(system)


def machine_options(image: str) -> dict[str, Any]:
    return {"image": image, "firmware": "bios", "accel": "tcg", "memory": 64 << 20, "hotplug_spares": 2}


def gvariant_options(image: str) -> str:
    """machine_options in GVariant text, for gdbus."""
    return f"{{'image': <'{image}'>, 'firmware': <'bios'>, 'accel': <'tcg'>, 'memory': <uint64 {64 << 20}>, 'hotplug_spares': <uint32 2>}}"


def owned_file(system: System, user: str, mode: int = 0o600) -> str:
    """A drive file belonging to `user`, only they (and root) may open."""
    path = system.dir / f"{user}-{os.urandom(4).hex()}.raw"
    path.write_bytes(b"\0" * (1 << 20))
    account = pwd.getpwnam(user)
    os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(mode)
    return str(path)


# -- callers that are not root -----------------------------------------------


class Result:
    def __init__(self, code: int, out: str, err: str, seconds: float) -> None:
        self.code, self.out, self.err, self.seconds = code, out, err, seconds

    @property
    def error(self) -> str:
        """The D-Bus error name gdbus reports, '' on success."""
        if self.code == 0:
            return ""
        marker = "GDBus.Error:"
        assert marker in self.err, self.err
        return self.err.split(marker, 1)[1].split(":", 1)[0]

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out!r}, err={self.err!r})"


async def run_as(system: System, user: str, *argv: str) -> Result:
    """argv as a real user: their uid and primary group, no supplementary groups."""
    uid, gid = USERS[user]
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv,
        env=system.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode(), time.monotonic() - start)


async def gdbus(system: System, user: str, *args: str) -> Result:
    return await run_as(system, user, "gdbus", "call", "--system", *args)


async def gdbus_manager(system: System, user: str, method: str, *args: str) -> Result:
    return await gdbus(system, user, *MANAGER, "-m", f"org.vmspawnd1.Manager.{method}", *args)


async def gdbus_machine(system: System, user: str, path: str, method: str, *args: str) -> Result:
    return await gdbus(system, user, "-d", "org.vmspawnd1", "-o", path, "-m", f"org.vmspawnd1.Machine.{method}", *args)


async def gdbus_property(system: System, user: str, path: str, interface: str, name: str) -> Result:
    return await gdbus(
        system, user, "-d", "org.vmspawnd1", "-o", path, "-m", "org.freedesktop.DBus.Properties.Get", interface, name
    )


# AddDriveFd needs fd passing: a dbus-fast client, run by the system python
# with the venv's site-packages (same Python minor version, checked).
FD_CLIENT = r"""
import asyncio, json, os, sys
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

async def main(machine, file):
    bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    fd = os.open(file, os.O_RDWR | os.O_CLOEXEC)
    reply = await bus.call(Message(
        destination="org.vmspawnd1", path=machine, interface="org.vmspawnd1.Machine",
        member="AddDriveFd", signature="ha{sv}", body=[0, {}], unix_fds=[fd]))
    if reply.message_type is MessageType.ERROR:
        print(json.dumps({"error": reply.error_name, "message": reply.body[0] if reply.body else ""}))
    else:
        print(json.dumps({"reply": reply.body}))

asyncio.run(main(*sys.argv[1:]))
"""


def system_python_matches() -> bool:
    try:
        out = subprocess.check_output([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"], text=True)
    except OSError:
        return False
    return out.strip() == str(sys.version_info[:2])


async def add_drive_fd_as(system: System, user: str, machine: str, file: str) -> dict[str, Any]:
    result = await run_as(
        system, user, "env", f"PYTHONPATH={SITE_PACKAGES}", SYSTEM_PYTHON, "-c", FD_CLIENT, machine, file
    )
    assert result.code == 0, result
    answer: dict[str, Any] = json.loads(result.out)
    return answer


# -- 1: nobody reads, and changes nothing of root's ----------------------------


async def test_nobody_reads_everything_but_may_not_create_or_manage_roots_machine(
    system: System, root: Client, image: str
) -> None:
    path = await root.create("rootvm", **machine_options(image))
    drive = owned_file(system, "nobody")

    listed = await gdbus_manager(system, "nobody", "ListMachines")
    assert listed.code == 0, listed
    assert "('rootvm', 'running', objectpath '/org/vmspawnd1/machine/rootvm')" in listed.out
    state = await gdbus_property(system, "nobody", path, "org.vmspawnd1.Machine", "State")
    assert state.out.strip() == "(<'running'>,)", state
    count = await gdbus_property(system, "nobody", "/org/vmspawnd1", "org.vmspawnd1.Manager", "Machines")
    assert count.out.strip() == "(<uint32 1>,)", count
    got = await gdbus_manager(system, "nobody", "GetMachine", "rootvm")
    assert got.out.strip() == f"(objectpath '{path}',)", got

    # No polkit on the bus: refused, and at once.
    refused = [
        await gdbus_manager(system, "nobody", "CreateMachine", "nobodyvm", gvariant_options(new_image(system))),
        await gdbus_manager(system, "nobody", "TerminateMachine", "rootvm"),
        await gdbus_machine(system, "nobody", path, "Terminate"),
        await gdbus_machine(system, "nobody", path, "PowerOff", "0"),
        await gdbus_machine(system, "nobody", path, "AddDrive", drive, "@a{sv} {}"),
        await gdbus_machine(system, "nobody", path, "RemoveDrive", "disk0"),
        await gdbus_machine(system, "nobody", path, "SetUserPassword", "root", "pw", "false"),
    ]
    for result in refused:
        assert result.error == "org.vmspawnd1.Error.AccessDenied", result
        assert "uid 65534 may not" in result.err, result
        assert result.seconds < 5, result
    assert "uid 65534 may not create machines" in refused[0].err
    assert await root.names() == ["rootvm"]
    assert await root.prop(path, "State") == "running"
    assert [d["path"] for d in await root.prop(path, "Drives")] == [image]


async def test_nobody_cannot_own_the_bus_name(system: System, root: Client) -> None:
    do_not_queue = "4"
    taken = await gdbus(
        system, "nobody", "-d", "org.freedesktop.DBus", "-o", "/org/freedesktop/DBus",
        "-m", "org.freedesktop.DBus.RequestName", "org.vmspawnd1", do_not_queue,
    )  # fmt: skip
    assert taken.error == "org.freedesktop.DBus.Error.AccessDenied", taken
    assert 'not allowed to own the service "org.vmspawnd1"' in taken.err
    # Root may, by policy: the bus only says the name is taken (3: EXISTS).
    reply = await root.call(
        "RequestName", "su", ["org.vmspawnd1", 4],
        path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", destination="org.freedesktop.DBus",
    )  # fmt: skip
    assert reply == [RequestNameReply.EXISTS.value]


# -- 2: polkit decides for everybody else --------------------------------------


async def test_polkit_rules_let_a_user_create_and_manage_machines(polkit: System, root: Client, image: str) -> None:
    system = polkit
    path = await root.create("rootvm", **machine_options(image))
    drive = owned_file(system, "daemon")

    # polkit running, our actions known, no rule: auth_admin_keep needs an
    # agent nobody runs here, so polkit says "challenge" and we say no.
    await system.start_polkit(rules=False)
    created = await gdbus_manager(
        system, "daemon", "CreateMachine", "daemonvm", gvariant_options(owned_file(system, "daemon"))
    )
    assert created.error == "org.vmspawnd1.Error.AccessDenied", created
    assert "uid 1 may not create machines" in created.err
    assert "polkit would allow it after authentication" in created.err
    managed = await gdbus_manager(system, "daemon", "TerminateMachine", "rootvm")
    assert managed.error == "org.vmspawnd1.Error.AccessDenied", managed

    # The rule allows `daemon`: create, and manage root's machine too.
    await system.start_polkit(rules=True)
    created = await gdbus_manager(
        system, "daemon", "CreateMachine", "daemonvm", gvariant_options(owned_file(system, "daemon"))
    )
    assert created.out.strip() == "(objectpath '/org/vmspawnd1/machine/daemonvm',)", created
    added = await gdbus_machine(system, "daemon", path, "AddDrive", drive, "@a{sv} {}")
    assert added.code == 0, added
    assert re.fullmatch(r"\('disk1', 'rp\d'\)", added.out.strip()), added
    # Managing is not setting a guest's password: that action of its own has no rule, so auth_admin.
    password = await gdbus_machine(system, "daemon", path, "SetUserPassword", "root", "pw", "false")
    assert password.error == "org.vmspawnd1.Error.AccessDenied", password
    assert "uid 1 may not set a password in this machine's guest" in password.err
    assert "org.vmspawnd1.set-user-password" in password.err and "'pw'" not in password.err
    terminated = await gdbus_manager(system, "daemon", "TerminateMachine", "rootvm")
    assert terminated.code == 0, terminated
    # Even allowed to create, a user may not hand QEMU (running as root) raw options.
    extra = gvariant_options(owned_file(system, "daemon"))[:-1] + ", 'qemu_extra': <['-device', 'nvme,serial=x']>}"
    refused = await gdbus_manager(system, "daemon", "CreateMachine", "extravm", extra)
    assert refused.error == "org.vmspawnd1.Error.AccessDenied", refused
    assert "only root may use it" in refused.err
    assert await root.names() == ["daemonvm"]
    log = system.log()
    assert "polkit allows uid 1" in log and "org.vmspawnd1.create-machine" in log

    # No polkit on the bus at all: the same call is refused, and quickly.
    await system.stop_polkit()
    again = await gdbus_manager(
        system, "daemon", "CreateMachine", "daemonvm2", gvariant_options(owned_file(system, "daemon"))
    )
    assert again.error == "org.vmspawnd1.Error.AccessDenied", again
    assert again.seconds < 5
    # The creator needs no polkit for their own machine.
    own = await gdbus_manager(system, "daemon", "TerminateMachine", "daemonvm")
    assert own.code == 0, own
    assert await root.names() == []


async def test_a_machines_owner_reads_its_console_nobody_else_does(polkit: System, root: Client) -> None:
    system = polkit
    await system.start_polkit(rules=True)
    created = await gdbus_manager(
        system, "daemon", "CreateMachine", "ownedvm", gvariant_options(owned_file(system, "daemon"))
    )
    assert created.code == 0, created
    console = await root.prop("/org/vmspawnd1/machine/ownedvm", "ConsoleLog")
    own = await run_as(system, "daemon", "cat", console)
    assert own.code == 0, own
    other = await run_as(system, "nobody", "cat", console)
    assert other.code != 0 and "Permission denied" in other.err, other
    # Root's files beside it stay root's.
    for name in ("qemu.log", "state.json", "argv"):
        result = await run_as(system, "daemon", "cat", str(Path(console).parent / name))
        assert result.code != 0 and "Permission denied" in result.err, (name, result)


# -- 3: a path is opened with the caller's rights, an fd is the caller's own ---


async def test_add_drive_opens_paths_as_the_caller_and_takes_the_callers_fds(
    polkit: System, root: Client, image: str
) -> None:
    if not system_python_matches():
        pytest.skip(f"{SYSTEM_PYTHON} is not Python {sys.version_info[:2]}: cannot load the venv's dbus-fast")
    system = polkit
    path = await root.create("rootvm", **(machine_options(image) | {"hotplug_spares": 3}))
    await system.start_polkit(rules=True)  # nobody may manage machines, nothing more

    shadow = await gdbus_machine(system, "nobody", path, "AddDrive", "/etc/shadow", "@a{sv} {}")
    assert shadow.error == "org.vmspawnd1.Error.InvalidArgument", shadow
    assert "cannot open drive '/etc/shadow' as uid 65534: it does not exist or uid 65534 may not open it" in shadow.err
    # The same refusal for a file of another user nobody may not read.
    other = owned_file(system, "daemon")
    refused = await gdbus_machine(system, "nobody", path, "AddDrive", other, "@a{sv} {}")
    assert refused.error == "org.vmspawnd1.Error.InvalidArgument", refused
    assert "may not open it" in refused.err
    assert len(await root.prop(path, "Drives")) == 1

    # A file nobody may open, by path and by fd.
    by_path = await gdbus_machine(system, "nobody", path, "AddDrive", owned_file(system, "nobody"), "@a{sv} {}")
    assert by_path.code == 0, by_path
    mine = owned_file(system, "nobody")
    by_fd = await add_drive_fd_as(system, "nobody", path, mine)
    assert "reply" in by_fd, by_fd
    drive_id, port = by_fd["reply"]
    drives = {d["id"]: d for d in await root.prop(path, "Drives")}
    assert drives[drive_id]["path"] == mine and drives[drive_id]["port"] == port

    # vmspawnctl add-drive as nobody: it opens the file itself and passes the fd.
    ctl_file = owned_file(system, "nobody")
    ctl = await run_as(
        system, "nobody", "env", f"PYTHONPATH={SITE_PACKAGES}:{ROOT}", SYSTEM_PYTHON, "-c",
        "import sys; from vmspawnd.ctl import main; sys.exit(main())", "add-drive", "rootvm", ctl_file,
    )  # fmt: skip
    assert ctl.code == 0, ctl
    assert ctl_file in {d["path"] for d in await root.prop(path, "Drives")}

    # Without polkit nobody may not even try.
    await system.stop_polkit()
    denied = await add_drive_fd_as(system, "nobody", path, owned_file(system, "nobody"))
    assert denied["error"] == "org.vmspawnd1.Error.AccessDenied", denied


async def test_boot_images_are_opened_with_the_callers_rights(polkit: System, root: Client) -> None:
    system = polkit
    await system.start_polkit(rules=True)
    result = await gdbus_manager(system, "daemon", "CreateMachine", "shadowvm", gvariant_options("/etc/shadow"))
    if result.error == "org.vmspawnd1.Error.AccessDenied":
        pytest.fail(f"set-up: polkit should allow `daemon` to create machines: {result}")
    assert result.error == "org.vmspawnd1.Error.InvalidArgument", result
    assert "cannot open image '/etc/shadow' as uid 1: it does not exist or uid 1 may not open it" in result.err


# -- machined registration, against a stand-in ---------------------------------

ByteArray = Annotated[bytes, DBusSignature("ay")]
IntArray = Annotated[list[int], DBusSignature("ai")]


class FakeMachined(ServiceInterface):
    """org.freedesktop.machine1.Manager's two methods vmspawnd uses, recorded."""

    def __init__(self) -> None:
        super().__init__("org.freedesktop.machine1.Manager")
        self.calls: list[tuple[Any, ...]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.refuse = ""

    @dbus_method()
    async def RegisterMachineWithNetwork(
        self,
        name: DBusStr,
        machine_id: ByteArray,
        service: DBusStr,
        machine_class: DBusStr,
        leader: DBusUInt32,
        root_directory: DBusStr,
        netifs: IntArray,
    ) -> DBusObjectPath:
        self.calls.append(
            ("Register", name, bytes(machine_id), service, machine_class, leader, root_directory, list(netifs))
        )
        await self.gate.wait()
        if self.refuse:
            raise DBusError("org.freedesktop.DBus.Error.InvalidArgs", self.refuse)
        return f"/org/freedesktop/machine1/machine/{name}"

    @dbus_method()
    def UnregisterMachine(self, name: DBusStr) -> None:
        self.calls.append(("Unregister", name))


@pytest.fixture
async def fake_machined(system: System) -> AsyncIterator[FakeMachined]:
    bus = await MessageBus(bus_address=system.address).connect()
    service = FakeMachined()
    bus.export("/org/freedesktop/machine1", service)
    reply = await bus.request_name(machined.MACHINED, NameFlag.DO_NOT_QUEUE)
    assert reply is RequestNameReply.PRIMARY_OWNER
    yield service
    service.gate.set()
    await asyncio.sleep(0.05)
    bus.disconnect()


async def until(condition: Callable[[], bool], timeout: float = 10, context: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in {timeout} s; {context()}"
        await asyncio.sleep(0.02)


async def test_machines_are_registered_with_machined_without_delaying_the_reply(
    system: System, root: Client, fake_machined: FakeMachined, image: str
) -> None:
    # machined does not answer until the gate opens: CreateMachine must not wait for it.
    fake_machined.gate.clear()
    path = await asyncio.wait_for(root.create("regvm", **machine_options(image)), 8)
    await until(lambda: len(fake_machined.calls) == 1, context=system.log)
    machine_id = bytes.fromhex(await root.prop(path, "Id"))
    leader = await root.prop(path, "Leader")
    assert fake_machined.calls == [("Register", "regvm", machine_id, "vmspawnd", "vm", leader, "", [])]
    assert len(machine_id) == 16 and leader in qemu_pids(str(system.daemon.runtime_dir))

    # Terminated before machined answered: the unregistration waits its turn.
    await root.call("TerminateMachine", "s", ["regvm"])
    await asyncio.sleep(0.2)
    assert len(fake_machined.calls) == 1
    fake_machined.gate.set()
    await until(lambda: len(fake_machined.calls) == 2)
    assert fake_machined.calls[1] == ("Unregister", "regvm")


async def test_machined_absent_or_refusing_never_fails_creation(
    system: System, root: Client, image: str, fake_machined: FakeMachined
) -> None:
    fake_machined.refuse = "Invalid machine name"
    await root.create("refusedvm", **machine_options(image))
    await until(lambda: "systemd-machined refused the registration" in system.log(), context=system.log)
    assert "Invalid machine name" in system.log()
    await root.call("TerminateMachine", "s", ["refusedvm"])
    await asyncio.sleep(0.2)
    # Never registered, so never unregistered.
    assert [c[0] for c in fake_machined.calls] == ["Register"]


async def test_no_machined_on_the_bus_is_fine(system: System, root: Client, image: str) -> None:
    path = await root.create("plainvm", **machine_options(image))
    assert await root.prop(path, "State") == "running"
    await until(lambda: "plainvm: systemd-machined is not on the bus" in system.log(), context=system.log)


def test_a_tap_device_is_the_machines_network_interface() -> None:
    lo = MachineSpec("n", network=Network(NetworkMode.TAP, "lo"))
    assert machined.network_interfaces(lo) == [socket.if_nametoindex("lo")]
    assert machined.network_interfaces(MachineSpec("n", network=Network(NetworkMode.USER))) == []
    assert machined.network_interfaces(MachineSpec("n", network=Network(NetworkMode.TAP, "nosuchtap0"))) == []


# -- the journal ---------------------------------------------------------------

JOURNAL_CLIENT = r"""
import logging
from vmspawnd import systemd
systemd.setup_logging(False)
assert type(logging.getLogger().handlers[0]) is systemd.JournalHandler, logging.getLogger().handlers
logging.getLogger("vmspawnd.machine").info("machine %s running, QEMU pid %d", "vm1", 4242, extra={"MACHINE": "vm1"})
logging.getLogger("vmspawnd.machine").warning(
    "machine %s: unplug of %s\ntimed out", "vm1", "disk3", extra={"MACHINE": "vm1", "DRIVE": "disk3"})
logging.getLogger("vmspawnd").debug("not at INFO")
logging.getLogger("vmspawnd").info("no machine", extra={"lower": "x", "_TRUSTED": "y", "PRIORITY": "0"})
"""


def journal_entry(datagram: bytes) -> dict[str, str]:
    """journald's native protocol: KEY=value lines, or KEY\\n<le64 size><value>\\n for values with newlines."""
    fields: dict[str, str] = {}
    while datagram:
        line, _, rest = datagram.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            datagram = rest
        else:
            key, size = line, int.from_bytes(rest[:8], "little")
            value, datagram = rest[8 : 8 + size], rest[8 + size + 1 :]
        fields[key.decode()] = value.decode()
    return fields


def test_log_records_reach_the_journal_with_machine_and_drive_fields(tmp_path: Path) -> None:
    """python-systemd's journal.send has a fixed socket path: the client runs in its own
    mount namespace where /run is a tmpfs and /run/systemd/journal is this test's directory."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    journal = tmp_path / "journal"
    journal.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(journal / "socket"))
        script = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && mount --bind "$0" /run/systemd/journal && exec "$@"'
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(journal),
             sys.executable, "-c", JOURNAL_CLIENT],
            env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode != 0 and "mount" in result.stderr and "permission denied" in result.stderr.lower():
            pytest.skip(f"no mount namespace here: {result.stderr}")
        assert result.returncode == 0, result.stderr
        server.setblocking(False)
        entries = []
        with contextlib.suppress(BlockingIOError):
            while True:
                entries.append(journal_entry(server.recv(1 << 16)))
    assert [e["MESSAGE"] for e in entries] == [
        "machine vm1 running, QEMU pid 4242",
        "machine vm1: unplug of disk3\ntimed out",
        "no machine",
    ]
    running, timeout, plain = entries
    assert running["MACHINE"] == "vm1" and "DRIVE" not in running
    assert running["PRIORITY"] == "6" and running["SYSLOG_IDENTIFIER"] == "vmspawnd"
    assert running["LOGGER"] == "vmspawnd.machine" and running["CODE_FUNC"] == "<module>"
    assert (timeout["MACHINE"], timeout["DRIVE"], timeout["PRIORITY"]) == ("vm1", "disk3", "4")
    # Only journal field names go out; an extra PRIORITY does not override the level.
    assert "MACHINE" not in plain and "lower" not in plain and "_TRUSTED" not in plain and "msg" not in plain
    assert plain["PRIORITY"] == "6"


def test_journal_fields_come_from_the_records_extra() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    handler = systemd.JournalHandler(lambda message, **fields: sent.append((message, fields)), SYSLOG_IDENTIFIER="x")
    logger = logging.getLogger("vmspawnd.test-journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("gone", extra={"MACHINE": "m", "DRIVE": "disk1", "MESSAGE_ID": "0" * 32, "unused": 1})
    finally:
        logger.removeHandler(handler)
    ((message, fields),) = sent
    assert message == "gone"
    assert {k: fields[k] for k in ("MACHINE", "DRIVE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER")} == {
        "MACHINE": "m", "DRIVE": "disk1", "MESSAGE_ID": "0" * 32, "PRIORITY": "3", "SYSLOG_IDENTIFIER": "x",
    }  # fmt: skip
    assert "unused" not in fields


# -- the watchdog --------------------------------------------------------------


def notifications(sock: socket.socket) -> list[str]:
    out = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(sock.recv(4096).decode())
    return out


async def test_ready_starts_watchdog_pings_and_stopping_ends_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        monkeypatch.setenv("WATCHDOG_USEC", "100000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert systemd.watchdog_interval() == 0.05
        systemd.notify("READY=1")
        await asyncio.sleep(0.3)
        systemd.notify("STOPPING=1")
        sent = notifications(sock)
        assert sent[0] == "READY=1" and sent[-1] == "STOPPING=1"
        assert 3 <= sent.count("WATCHDOG=1") <= 8, sent
        await asyncio.sleep(0.15)
        assert notifications(sock) == []

        # Meant for another process (WATCHDOG_PID): no pings from us.
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
        systemd.notify("READY=1")
        await asyncio.sleep(0.15)
        systemd.notify("STOPPING=1")
        assert notifications(sock) == ["READY=1", "STOPPING=1"]


def test_watchdog_not_asked_for() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    code = "from vmspawnd import systemd; print(systemd.watchdog_interval())"
    out = subprocess.check_output([sys.executable, "-c", code], env=env | {"PYTHONPATH": str(ROOT)}, text=True)
    assert out.strip() == "None"


def test_daemon_logs_to_stderr_without_a_journal(system: System) -> None:
    if os.path.exists(systemd.JOURNAL_SOCKET):
        pytest.skip("this machine has a journal")
    assert "vmspawnd: INFO vmspawnd: vmspawnd" in system.log()
