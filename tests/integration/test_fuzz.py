"""Hypothesis fuzzing of the D-Bus API against the running daemon.

Arbitrary machine names, a{sv} option dicts (unknown keys, wrong and nested
variant signatures, huge numbers, odd strings, junk aa{sv} drives) and drive
requests go over the bus. Every call must succeed or fail with an
org.vmspawnd1.Error.* reply, never a generic D-Bus error, a missing reply or
a dropped connection. After every example the daemon process is alive,
answers Ping, holds no more file descriptors than before, and no QEMU
process, runtime dir, block node or fdset is left behind.

@given is synchronous and the session fixtures live on pytest-asyncio's
loop, so the fuzz calls go through a client of their own on a private event
loop in a thread.

Where the fuzzer found daemon bugs, the failing reply is tolerated inside the
fuzz loop only for exactly that trigger (counted and printed as KNOWN BUG),
and a strict xfail test below reproduces each one; each KNOWN_* flag goes
to False with its fix.

Knobs: VMSPAWND_FUZZ_MANAGER_EXAMPLES / VMSPAWND_FUZZ_MACHINE_EXAMPLES (700 /
200: each machine example costs a hotplug and an unplug, and the suite must
fit its 20 minutes; every run draws new examples), VMSPAWND_FUZZ_SEED
(replay), VMSPAWND_FUZZ_VERBOSE (timings).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dbus_fast import DBusError, Variant
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

from vmspawnd.bus import MACHINE_IFACE, MANAGER_IFACE, MANAGER_PATH
from vmspawnd.bus.options import (
    ADD_DRIVE_OPTIONS,
    ADD_NETWORK_FD_OPTIONS,
    ADD_NETWORK_OPTIONS,
    ADD_SHARE_OPTIONS,
    BLOCK_JOB_OPTIONS,
    DRIVE_OPTIONS,
    MACHINE_OPTIONS,
    MOUNT_OPTIONS,
    OPEN_GRAPHICS_OPTIONS,
    PLUGGED_OPTIONS,
    REPLACE_DRIVE_OPTIONS,
)

from .harness import ROOT, Client, Daemon, guest_options, not_just_logs, qemu_pids, virtiofsd_pids, wait_console
from .qmp_probe import Probe
from .test_stress import KNOWN_FDSET_LEAK, devices_on

sys.path.insert(0, str(ROOT / "tools"))
import testbus

E = "org.vmspawnd1.Error."
FAILED = "org.freedesktop.DBus.Error.Failed"
MiB = 1024 * 1024
CALL_TIMEOUT = 60.0
MANAGER_EXAMPLES = int(os.environ.get("VMSPAWND_FUZZ_MANAGER_EXAMPLES", "700"))
MACHINE_EXAMPLES = int(os.environ.get("VMSPAWND_FUZZ_MACHINE_EXAMPLES", "200"))
FUZZ_SEED = os.environ.get("VMSPAWND_FUZZ_SEED")
T = TypeVar("T")


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the work tree
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def maybe_seeded(fn: Any) -> Any:
    return seed(int(FUZZ_SEED))(fn) if FUZZ_SEED else fn


# -- known daemon bugs the fuzzer found ------------------------------------

# vmspawnd/manager.py check_file: Path.exists() raises OSError for
# ENAMETOOLONG (only ENOENT/ENOTDIR/EBADF/ELOOP are swallowed), which
# replies_errors turns into org.freedesktop.DBus.Error.Failed.
KNOWN_LONG_PATH = False
# The other bugs, each reproduced by a strict xfail test below: set a flag to
# False once its bug is fixed (the strict xfail reports the fix as XPASS).
KNOWN_JSON_RECURSION = False
KNOWN_FD_LEAK = False
KNOWN_FD_INDEX = False
KNOWN_NVME_NODE_ID = False
KNOWN_SCSI_ID = False
# KNOWN_FDSET_LEAK (test_stress): a refusal that is no QmpError (NoFreePort, a
# refused SCSI controller) skips the add-fd rollback; its fdset stays in QEMU.
BOOT_FILE_KEYS = ("kernel", "initrd", "image")


def path_too_long(path: str) -> bool:
    raw = path.encode()
    return len(raw) >= 4096 or any(len(part) > 255 for part in raw.split(b"/"))


def boot_paths(options: dict[str, Variant]) -> list[str]:
    paths = [v.value for k, v in options.items() if k in BOOT_FILE_KEYS and v.signature == "s"]
    drives = options.get("drives")
    if drives is not None and drives.signature == "aa{sv}":
        for d in drives.value:
            p = d.get("path")
            if isinstance(p, Variant) and p.signature == "s":
                paths.append(p.value)
    return paths


# -- strategies --------------------------------------------------------------

# D-Bus strings: valid UTF-8 (no surrogates) without NUL.
CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
text = st.text(CHARS, max_size=24)
long_text = st.builds(lambda c, n: c * n, st.sampled_from(["a", "ü", "/", ".", "\U0001f600"]), st.integers(60, 6000))
U64 = st.one_of(
    st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)
)
U32 = st.one_of(st.sampled_from([0, 1, 2, 4, 120, 121, 288, 289, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
I32 = st.one_of(st.sampled_from([-(2**31), -1, 0, 1, 2**31 - 1]), st.integers(-(2**31), 2**31 - 1))

leaf_variants = st.one_of(
    text.map(lambda s: Variant("s", s)),
    st.booleans().map(lambda b: Variant("b", b)),
    U64.map(lambda n: Variant("t", n)),
    U32.map(lambda n: Variant("u", n)),
    I32.map(lambda n: Variant("i", n)),
    st.lists(text, max_size=4).map(lambda xs: Variant("as", xs)),
    st.binary(max_size=16).map(lambda b: Variant("ay", b)),
)
any_variant = st.recursive(
    leaf_variants,
    lambda inner: st.one_of(
        inner.map(lambda v: Variant("v", v)),
        st.lists(st.dictionaries(text, inner, max_size=3), max_size=3).map(lambda ds: Variant("aa{sv}", ds)),
    ),
    max_leaves=6,
)


@dataclass(frozen=True)
class Files:
    """Real files the fuzzer may name (fresh ones are made per example)."""

    dir: Path
    kernel: str
    initrd: str

    def fresh(self) -> str:
        path = self.dir / f"f{time.monotonic_ns()}"
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        return str(path)


ODD_PATHS = [
    "", "/", "//", "/.", "..", "relative/x", "/nonexistent", "/nonexistent/x",
    "/dev/null", "/tmp", "/etc/hostname/x", "/" + "a" * 255, "/a,b=c", "/x y", "~/x",
]  # fmt: skip
ODD_IDS = [
    "disk0", "disk3", "rp0", "rp3", "scsi1", "scsi2", "implicit0", "qmp",
    "console", "pcie.0", "1bad", "a" * 32, "a" * 33, "x-node", "a,b", "",
]  # fmt: skip
QEMU_ARGS = [
    "-S", "-device", "nvme", "nvme,serial=x", '{"driver":"nvme","serial":"j"}', '{"driver":', "[1]", "-device=nvme,serial=z",
    "--device", "bus=pcie.0", "-m", "64", "-smp", "2", "", "-",
    "--", "-object", "-nodefaults",
]  # fmt: skip

FRESH = "/@fresh@"  # placeholder: a new 1 MiB file, made when the example runs


def junk_paths(with_fresh: bool) -> st.SearchStrategy[str]:
    choices = [
        st.sampled_from(ODD_PATHS),
        text.map(lambda s: "/" + s),
        text,
        long_text.map(lambda s: "/" + s),
    ]
    if with_fresh:
        choices.append(st.just(FRESH))
    return st.one_of(*choices)


def typed_value(key: str, schema: dict[str, str]) -> st.SearchStrategy[Variant]:
    """A value of the documented type for `key`, leaning to edge cases."""
    sig = schema[key]
    if key in ("kernel", "initrd", "image", "directory", "path", "source"):
        return junk_paths(with_fresh=key == "path").map(lambda s: Variant("s", s))
    if key in ("disk_type",):
        values = st.sampled_from(["nvme", "virtio-blk", "virtio-scsi", "virtio-scsi-cdrom", "floppy", "", "NVME"])
    elif key in ("format", "image_format"):
        values = st.sampled_from(["raw", "qcow2", "vmdk", "", "RAW"])
    elif key == "accel":
        values = st.sampled_from(["kvm", "tcg", "auto", "hvf", ""])
    elif key == "firmware":
        values = st.sampled_from(["bios", "uefi", "coreboot", ""])
    elif key == "graphics":
        values = st.sampled_from(["none", "vnc", "spice", "sdl", "", "VNC", "vnc,spice"])
    elif key == "network":
        # Never a valid tap name: QEMU as root would create that host interface.
        values = st.one_of(
            st.sampled_from(["none", "user", "tap:", "tap:" + "x" * 16, "tap:a b", "bridge", "user:x", "none:"]),
            text.filter(lambda s: not re.fullmatch(r"tap:[A-Za-z0-9_.-]{1,15}", s)),
        )
    elif key == "serial":
        values = st.one_of(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40), text)
    elif key == "id":
        values = st.one_of(
            st.sampled_from(ODD_IDS),
            st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,31}", fullmatch=True),
            text,
        )
    elif key == "qemu_extra":
        arg = st.one_of(
            st.sampled_from(QEMU_ARGS),
            text,
        )
        return st.lists(arg, max_size=6).map(lambda xs: Variant("as", xs))
    elif key == "drives":
        return st.lists(option_dicts(DRIVE_OPTIONS), max_size=3).map(lambda ds: Variant("aa{sv}", ds))
    elif key == "mounts":
        return st.lists(option_dicts(MOUNT_OPTIONS), max_size=2).map(lambda ds: Variant("aa{sv}", ds))
    elif key == "plugged":
        return st.lists(option_dicts(PLUGGED_OPTIONS), max_size=2).map(lambda ds: Variant("aa{sv}", ds))
    elif sig == "s":
        values = st.one_of(text, long_text)
    elif sig == "b":
        return st.booleans().map(lambda b: Variant("b", b))
    elif sig == "t":
        values = st.one_of(U64, st.sampled_from([32 * MiB - 1, 32 * MiB, 64 * MiB, 1 << 40, (1 << 40) + 1]))
    elif sig == "u":
        values = U32
    else:  # pragma: no cover - every documented signature is handled above
        raise AssertionError(sig)
    return values.map(lambda v: Variant(sig, v))


def option_dicts(schema: dict[str, str], max_size: int = 6) -> st.SearchStrategy[dict[str, Variant]]:
    """a{sv}: documented keys with right or wrong types, and unknown keys."""
    known = st.sampled_from(sorted(schema)).flatmap(
        lambda k: st.tuples(st.just(k), st.one_of(typed_value(k, schema), typed_value(k, schema), any_variant))
    ) if schema else st.nothing()  # fmt: skip
    unknown = st.tuples(st.one_of(text, st.sampled_from(["", "Kernel", "memory ", "drives[0]", "timeout_usec"])),
                        any_variant)  # fmt: skip
    return st.lists(st.one_of(known, known, known, unknown), max_size=max_size).map(dict)


names = st.one_of(
    st.sampled_from(["", "/", "..", ".", "a" * 64, "a" * 65, "ü", "a b", "x/y", "-", "_", "a\nb", "fz"]),
    st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    text,
    long_text,
)


# -- the private loop --------------------------------------------------------


class BusThread:
    """An event loop of its own in a thread, with its own Client on the test bus."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-bus", daemon=True)
        self.thread.start()
        self.client: Client = self.run(Client.connect())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT + 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.client.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Tally:
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    known: Counter[str] = field(default_factory=Counter)
    examples: int = 0
    created: int = 0

    def report(self, what: str, elapsed: float) -> None:
        print(f"\nfuzz {what}: {self.examples} examples, {sum(self.calls.values())} calls in {elapsed:.1f} s"
              f"{f', {self.created} machines really created and terminated' if self.created else ''}")  # fmt: skip
        for method in sorted({m for m, _ in self.calls}):
            outcomes = {o: n for (m, o), n in sorted(self.calls.items()) if m == method}
            print(f"  {method:16} {outcomes}")
        for bug, n in sorted(self.known.items()):
            print(f"  KNOWN BUG tolerated {n}x: {bug}")


def daemon_fds(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


@dataclass
class Fuzz:
    bus: BusThread
    daemon: Daemon
    tally: Tally
    fds: int = 0

    def call(
        self,
        member: str,
        signature: str,
        body: list[Any],
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
        unix_fds: tuple[int, ...] = (),
        known_bug: str = "",
    ) -> tuple[str, Any]:
        """("ok", reply body) or (error name, text); anything but the daemon's own errors fails."""

        async def send() -> tuple[str, Any]:
            try:
                async with asyncio.timeout(CALL_TIMEOUT):
                    reply = await self.bus.client.call(
                        member, signature, body, path=path, interface=interface, unix_fds=unix_fds
                    )
            except DBusError as e:
                return e.type, e.text
            except TimeoutError:
                return "timeout", f"no reply within {CALL_TIMEOUT:g} s"
            return "ok", reply

        outcome, result = self.bus.run(send())
        note(f"{member} -> {outcome}: {str(result)[:300]}")
        if known_bug and outcome == FAILED:
            self.tally.known[known_bug] += 1
            self.tally.calls[(member, "Failed (known bug)")] += 1
            return outcome, result
        self.tally.calls[(member, outcome.removeprefix(E))] += 1
        assert outcome == "ok" or outcome.startswith(E), f"{member}{body!r:.500}: {outcome}: {result}"
        return outcome, result

    def healthy(self, machines: list[str], leaders: list[int], fds: bool = True) -> None:
        """The daemon is alive, answers, and nothing leaked (its fds: as many as at the start)."""
        assert self.daemon.proc is not None and self.daemon.proc.poll() is None, "the daemon died"
        self.bus.run(self.bus.client.call("Ping", path="/", interface="org.freedesktop.DBus.Peer"))
        listed = self.bus.run(self.bus.client.names())
        assert sorted(listed) == sorted(machines), f"machines: {listed}"
        runtime = self.daemon.runtime_dir
        deadline = time.monotonic() + 5
        while True:
            pids = sorted(qemu_pids(str(runtime)))
            dirs = sorted(p.name for p in not_just_logs(runtime / "machines"))
            held = daemon_fds(self.daemon) if fds else self.fds
            if (pids, dirs, held) == (sorted(leaders), sorted(machines), self.fds) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert pids == sorted(leaders), f"stray QEMU: {pids}"
        assert dirs == sorted(machines), f"runtime dirs left: {dirs}"
        assert held == self.fds, (
            f"the daemon holds {held} fds, {self.fds} before: {os.listdir(f'/proc/{self.daemon.proc.pid}/fd')}"
        )


@pytest.fixture
def bus(client: Client, daemon: Daemon) -> Iterator[BusThread]:
    """Depends on `client`, whose leak check runs after this is gone."""
    thread = BusThread()
    yield thread
    thread.close()


@pytest.fixture
def files(tmp_path: Path, guest: Any) -> Files:
    (tmp_path / "files").mkdir()
    return Files(tmp_path / "files", str(guest.kernel), str(guest.initrd))


# -- CreateMachine / PlanMachine / GetMachine / TerminateMachine -------------


def near_valid(files: Files) -> st.SearchStrategy[dict[str, Variant]]:
    """A real boot source, cheap (TCG, 64 MiB, -S), with a few fuzzed options on top."""
    base = {
        "kernel": Variant("s", files.kernel),
        "accel": Variant("s", "tcg"),
        "memory": Variant("t", 64 * MiB),
        "qemu_extra": Variant("as", ["-S"]),
    }
    keys = ["initrd", "cmdline", "image_format", "disk_type", "drives", "hotplug_spares", "firmware", "mounts",
            "network", "vsock", "qemu_extra", "image", "graphics"]  # fmt: skip
    extra = st.lists(
        st.sampled_from(keys).flatmap(lambda k: st.tuples(st.just(k), typed_value(k, MACHINE_OPTIONS))), max_size=3
    )
    return extra.map(lambda kv: base | dict(kv))


def cheap(options: dict[str, Variant], files: Files) -> dict[str, Variant]:
    """Replace FRESH placeholders; make a spec that may really start QEMU cheap to run."""
    out = dict(options)
    drives = out.get("drives")
    if drives is not None and drives.signature == "aa{sv}":
        out["drives"] = Variant("aa{sv}", [
            {k: Variant("s", files.fresh()) if k == "path" and v == Variant("s", FRESH) else v for k, v in d.items()}
            for d in drives.value
        ])  # fmt: skip
    real = [p for p in boot_paths(out) if p in (files.kernel, files.initrd) or p.startswith(str(files.dir))]
    if real:
        out["accel"] = Variant("s", "tcg")
        out["memory"] = Variant("t", 64 * MiB)
        out.pop("cpus", None)
        extra = out.get("qemu_extra")
        out["qemu_extra"] = Variant("as", ["-S", *(extra.value if extra and extra.signature == "as" else [])])
    if "qemu_extra" in out and out["qemu_extra"].signature == "as" and "-S" not in out["qemu_extra"].value:
        # Whatever boots, boots paused: the fuzz is about the daemon, not the guest.
        out["qemu_extra"] = Variant("as", ["-S", *out["qemu_extra"].value])
    return out


def test_fuzz_manager_calls(bus: BusThread, daemon: Daemon, files: Files) -> None:
    tally = Tally()
    fuzz = Fuzz(bus, daemon, tally, daemon_fds(daemon))
    fuzz.healthy([], [])
    options = st.one_of(option_dicts(MACHINE_OPTIONS, max_size=8), near_valid(files))
    method = st.sampled_from(["CreateMachine", "CreateMachine", "CreateMachine", "PlanMachine", "GetMachine",
                              "TerminateMachine"])  # fmt: skip

    @maybe_seeded
    @fuzz_settings(MANAGER_EXAMPLES)
    @given(method=method, name=names, options=options)
    def example(method: str, name: str, options: dict[str, Variant]) -> None:
        tally.examples += 1
        if method in ("GetMachine", "TerminateMachine"):
            outcome, _ = fuzz.call(method, "s", [name])
            assert outcome == E + "NoSuchMachine", outcome
            fuzz.healthy([], [])
            return
        options = cheap(options, files)
        note(f"{method}({name!r}, {options!r:.2000})")
        long_path = any(path_too_long(p) for p in boot_paths(options))
        known = "ENAMETOOLONG from check_file -> DBus.Error.Failed" if KNOWN_LONG_PATH and long_path else ""
        outcome, result = fuzz.call(method, "sa{sv}", [name, options], known_bug=known)
        if method == "CreateMachine" and outcome == "ok":
            tally.created += 1
            try:
                leader = bus.run(bus.client.prop(result[0], "Leader"))
                fuzz.healthy([name], [leader], fds=False)
            finally:
                terminated, _ = fuzz.call("TerminateMachine", "s", [name])
            # QEMU may have died on its own already (a failed machine is gone from the list).
            assert terminated in ("ok", E + "NoSuchMachine"), terminated
        fuzz.healthy([], [])

    started = time.monotonic()
    example()
    tally.report("CreateMachine/PlanMachine/GetMachine/TerminateMachine", time.monotonic() - started)
    assert tally.examples >= min(MANAGER_EXAMPLES, 300)


# -- AddDrive / AddDriveFd / RemoveDrive on a running machine ----------------


@dataclass
class VM:
    name: str
    path: str
    probe: Probe
    leader: int
    nodes: set[str]


@pytest.fixture
def fuzz_vm(bus: BusThread, guest: Any, tmp_path: Path) -> Iterator[VM]:
    monitor = tmp_path / "fz.qmp"

    async def boot() -> VM:
        path = await bus.client.create(
            "fuzzvm", **guest_options(guest, hotplug_spares=4, qemu_extra=Probe.extra(monitor))
        )
        await wait_console(await bus.client.prop(path, "ConsoleLog"), "VMSPAWN-GUEST-READY", timeout=120)
        return VM("fuzzvm", path, Probe(monitor), await bus.client.prop(path, "Leader"), set())

    vm = bus.run(boot(), timeout=180)
    vm.nodes = vm.probe.block_nodes()
    yield vm
    bus.run(bus.client.call("TerminateMachine", "s", ["fuzzvm"]))


FD_KINDS = ("file-rw", "file-ro", "directory", "dev-null", "pipe")


def open_fd(kind: str, files: Files) -> int:
    if kind == "file-rw":
        return os.open(files.fresh(), os.O_RDWR)
    if kind == "file-ro":
        return os.open(files.fresh(), os.O_RDONLY)
    if kind == "directory":
        return os.open(files.dir, os.O_RDONLY | os.O_DIRECTORY)
    if kind == "dev-null":
        return os.open("/dev/null", os.O_RDWR)
    r, w = os.pipe()
    os.close(w)
    return r


# "$added": the drive an earlier step of the same example added (if any).
drive_ids = st.one_of(
    st.just("$added"),
    st.just("$added"),
    st.sampled_from(["disk0", "disk1", "rp0", "scsi1", "implicit0", "", "nope", "disk0-node"]),
    text,
    long_text,
)
# RemoveDriveEx: timeout_usec (0, tiny, huge, wrong types) and unknown keys.
remove_options = st.one_of(
    option_dicts({"timeout_usec": "t", "id": "s", "force": "s"}, max_size=3),
    st.fixed_dictionaries(
        {},
        optional={
            "timeout_usec": st.sampled_from([0, 1, 1000, 30_000_000, 3_600_000_000, 3_600_000_001, 2**64 - 1]).map(
                lambda v: Variant("t", v)
            )
        },
    ),
)
# Mostly well-formed AddDrive options, so that requests also get through to QEMU.
plausible_add_options = st.fixed_dictionaries(
    {},
    optional={
        "disk_type": st.sampled_from(["nvme", "virtio-blk", "virtio-scsi", "virtio-scsi-cdrom"]).map(
            lambda v: Variant("s", v)
        ),
        "serial": st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20).map(
            lambda v: Variant("s", v)
        ),
        "read_only": st.booleans().map(lambda v: Variant("b", v)),
        "format": st.sampled_from(["raw", "qcow2"]).map(lambda v: Variant("s", v)),
        "id": st.one_of(st.sampled_from(ODD_IDS), st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,31}", fullmatch=True)).map(
            lambda v: Variant("s", v)
        ),
    },
)
add_options = st.one_of(option_dicts(ADD_DRIVE_OPTIONS), plausible_add_options)
add_steps = st.one_of(
    st.tuples(st.just("AddDrive"), junk_paths(with_fresh=True), add_options),
    st.tuples(st.just("AddDrive"), st.just(FRESH), add_options),
    st.tuples(st.just("AddDriveFd"), st.sampled_from(FD_KINDS), add_options),
)
remove_steps = st.one_of(
    st.tuples(st.just("RemoveDrive"), drive_ids, st.just({})),
    st.tuples(st.just("RemoveDriveEx"), drive_ids, remove_options),
)
# Any order, or adds first so that removals find something to remove.
actions = st.one_of(
    st.lists(st.one_of(add_steps, remove_steps), min_size=1, max_size=4),
    st.tuples(st.lists(add_steps, min_size=1, max_size=2), st.lists(remove_steps, min_size=1, max_size=2)).map(
        lambda t: t[0] + t[1]
    ),
)


def test_fuzz_machine_drive_calls(bus: BusThread, daemon: Daemon, files: Files, fuzz_vm: VM) -> None:
    tally = Tally()
    fuzz = Fuzz(bus, daemon, tally, daemon_fds(daemon))
    vm = fuzz_vm
    fuzz.healthy([vm.name], [vm.leader])
    leaked_fdsets: set[str] = set()

    @maybe_seeded
    @fuzz_settings(MACHINE_EXAMPLES)
    @given(steps=actions)
    def example(steps: list[tuple[str, str, dict[str, Variant]]]) -> None:
        tally.examples += 1
        t0 = time.monotonic()
        added: list[str] = []
        refused: set[str] = set()
        for method, arg, options in steps:
            where = {"path": vm.path, "interface": MACHINE_IFACE}
            if method == "AddDrive":
                file = files.fresh() if arg == FRESH else arg
                options = {
                    k: Variant("s", files.fresh()) if v == Variant("s", FRESH) else v for k, v in options.items()
                }
                outcome, result = fuzz.call(method, "sa{sv}", [file, options], **where)
            elif method == "AddDriveFd":
                fd = open_fd(arg, files)
                try:
                    file = os.readlink(f"/proc/self/fd/{fd}")
                    outcome, result = fuzz.call(method, "ha{sv}", [0, options], unix_fds=(fd,), **where)
                finally:
                    os.close(fd)
            else:
                drive = added.pop() if arg == "$added" and added else arg
                if method == "RemoveDrive":
                    outcome, result = fuzz.call(method, "s", [drive], **where)
                else:
                    outcome, result = fuzz.call(method, "sa{sv}", [drive, options], **where)
                continue
            if outcome == "ok":
                added.append(result[0])
            elif outcome == E + "NoFreePort" or "refused the SCSI controller" in str(result):
                refused.add(file)
        settle(bus, vm)
        fdsets = vm.probe.fdsets()
        for f in fdsets:
            path = f["fds"][0]["opaque"].partition(":")[2] if f["fds"] else ""
            assert KNOWN_FDSET_LEAK and path in refused | leaked_fdsets, f"fdset left behind: {f}"
            if path not in leaked_fdsets:
                tally.known["a refused AddDrive leaves its fdset in QEMU (no rollback)"] += 1
                leaked_fdsets.add(path)
        assert vm.probe.block_nodes() == vm.nodes
        scsi_named = any(
            isinstance(v := options.get("id"), Variant) and v.signature == "s" and re.fullmatch(r"scsi\d+", v.value)
            for _, _, options in steps
        )
        for port in ("rp0", "rp1", "rp2", "rp3"):
            if KNOWN_SCSI_ID and scsi_named and devices_on(vm.probe, port):
                # test_a_scsi_drive_named_like_its_new_controller_frees_no_busy_port:
                # the port was freed while its controller's unplug is pending.
                tally.known["a rollback freed a port its SCSI controller still holds"] += 1
                deadline = time.monotonic() + 15
                while devices_on(vm.probe, port) and time.monotonic() < deadline:
                    time.sleep(0.1)
            assert devices_on(vm.probe, port) == [], port
        fuzz.healthy([vm.name], [vm.leader])
        if os.environ.get("VMSPAWND_FUZZ_VERBOSE") and time.monotonic() - t0 > 1:
            print(f"slow example {time.monotonic() - t0:.1f} s: {[(m, a[:40]) for m, a, _ in steps]}")

    started = time.monotonic()
    example()
    tally.report("AddDrive/AddDriveFd/RemoveDrive/RemoveDriveEx on a running machine", time.monotonic() - started)
    assert tally.examples >= min(MACHINE_EXAMPLES, 150)


def settle(bus: BusThread, vm: VM) -> None:
    """Remove what the example added; wait until every port is free again."""

    async def run() -> None:
        c = bus.client
        drives = [d["id"] for d in await c.prop(vm.path, "Drives") if d["state"] == "attached"]
        t0 = time.monotonic()
        await asyncio.gather(*(c.remove_drive(vm.path, d, timeout_usec=30_000_000) for d in drives))
        t1 = time.monotonic()
        async with asyncio.timeout(40):
            while (await c.prop(vm.path, "Drives"), await c.prop(vm.path, "FreeSparePorts")) != ([], 4):
                await asyncio.sleep(0.05)
        if os.environ.get("VMSPAWND_FUZZ_VERBOSE"):
            print(f"settle {drives}: {t1 - t0:.2f} + {time.monotonic() - t1:.2f}")

    bus.run(run())


# -- SnapshotDrive / SwapDrive / SwapDriveFd on a running machine ---------------

JOB_EXAMPLES = int(os.environ.get("VMSPAWND_FUZZ_JOB_EXAMPLES", str(MACHINE_EXAMPLES // 5)))
# Mostly options that pass; a crawl with a tiny bound reaches the cancel path
# (never a crawl without one: it would copy for the default half hour).
formats = st.sampled_from(["raw", "raw", "qcow2", "vmdk", ""]).map(lambda v: Variant("s", v))
plausible_job_options = st.fixed_dictionaries(
    {},
    optional={
        "format": formats,
        "timeout_usec": st.sampled_from([0, 1, 1000, 300_000, 2**64 - 1]).map(lambda v: Variant("t", v)),
        "max_bandwidth": st.sampled_from([0, 64 << 20, 2**63, 2**64 - 1]).map(lambda v: Variant("t", v)),
    },
)
crawling_job_options = st.fixed_dictionaries(
    {
        "max_bandwidth": st.sampled_from([1, 4096]).map(lambda v: Variant("t", v)),
        "timeout_usec": st.sampled_from([1, 1000, 300_000]).map(lambda v: Variant("t", v)),
    },
    optional={"format": formats},
)
job_options = st.one_of(
    option_dicts({k: v for k, v in BLOCK_JOB_OPTIONS.items() if k != "max_bandwidth"}),
    plausible_job_options,
    plausible_job_options,
    crawling_job_options,
)
# "$drive": the example's own disk.
job_drives = st.one_of(st.just("$drive"), st.just("$drive"), drive_ids)
job_steps = st.one_of(
    st.tuples(st.just("SnapshotDrive"), job_drives, st.sampled_from(FD_KINDS), job_options),
    st.tuples(st.just("SwapDrive"), job_drives, st.one_of(junk_paths(with_fresh=True), st.just(FRESH)), job_options),
    st.tuples(st.just("SwapDriveFd"), job_drives, st.sampled_from(FD_KINDS), job_options),
)


def test_fuzz_machine_block_job_calls(bus: BusThread, daemon: Daemon, files: Files, fuzz_vm: VM) -> None:
    """Snapshots and swaps with any input: a typed error or success, and
    afterwards no job, block node or fdset of theirs in QEMU."""
    tally = Tally()
    fuzz = Fuzz(bus, daemon, tally, daemon_fds(daemon))
    vm = fuzz_vm
    fuzz.healthy([vm.name], [vm.leader])
    where = {"path": vm.path, "interface": MACHINE_IFACE}

    @maybe_seeded
    @fuzz_settings(JOB_EXAMPLES)
    @given(steps=st.lists(job_steps, min_size=1, max_size=4))
    def example(steps: list[tuple[str, str, str, dict[str, Variant]]]) -> None:
        tally.examples += 1
        outcome, result = fuzz.call("AddDrive", "sa{sv}", [files.fresh(), {}], **where)
        assert outcome == "ok", result
        for method, drive, arg, options in steps:
            target = result[0] if drive == "$drive" else drive
            if method == "SwapDrive":
                file = files.fresh() if arg == FRESH else arg
                fuzz.call(method, "ssa{sv}", [target, file, options], **where)
                continue
            fd = open_fd(arg, files)
            try:
                fuzz.call(method, "sha{sv}", [target, 0, options], unix_fds=(fd,), **where)
            finally:
                os.close(fd)
        settle(bus, vm)
        assert vm.probe("query-jobs") == []
        assert vm.probe.block_nodes() == vm.nodes
        assert vm.probe.fdsets() == []
        fuzz.healthy([vm.name], [vm.leader])

    started = time.monotonic()
    example()
    tally.report("SnapshotDrive/SwapDrive/SwapDriveFd on a running machine", time.monotonic() - started)
    assert tally.examples >= min(JOB_EXAMPLES, 30)


# -- AddShare / RemoveShare on a running machine ------------------------------

SHARED = "$shared"  # the one real directory the fuzzer shares (world-readable, as nobody must enter it)
share_ids = st.one_of(
    st.just("$added"),
    st.sampled_from(["share0", "share1", "rootfs", "fs0", "disk0", "rp0", "", "nope", "share0-vfs"]),
    text,
    long_text,
)
# Mostly tags and ids that pass, so that requests reach virtiofsd and QEMU.
plausible_share_options = st.fixed_dictionaries(
    {
        "tag": st.one_of(
            st.from_regex(r"[a-z]{1,3}", fullmatch=True),
            st.from_regex(r"[a-z]{1,3}", fullmatch=True),
            st.sampled_from(["root", "a" * 36, "a" * 37, "a b", "", "a,b"]),
            text,
        ).map(lambda v: Variant("s", v))
    },
    optional={
        "read_only": st.sampled_from([False, False, True]).map(lambda v: Variant("b", v)),
        "id": st.one_of(
            st.from_regex(r"s[a-z0-9]{0,4}", fullmatch=True),
            st.sampled_from([*ODD_IDS, "share0", "rootfs", "fs0"]),
            text,
        ).map(lambda v: Variant("s", v)),
    },
)
share_steps = st.one_of(
    st.tuples(
        st.just("AddShare"),
        st.one_of(st.just(SHARED), junk_paths(with_fresh=False)),
        st.one_of(option_dicts(ADD_SHARE_OPTIONS), plausible_share_options),
    ),
    st.tuples(st.just("AddShare"), st.just(SHARED), plausible_share_options),
    st.tuples(st.just("RemoveShare"), share_ids, st.just({})),
    st.tuples(st.just("RemoveShareEx"), share_ids, remove_options),
)


def test_fuzz_machine_share_calls(bus: BusThread, daemon: Daemon, files: Files, fuzz_vm: VM) -> None:
    """Every answer is one of the daemon's errors or a success; after each example (its shares
    removed) no port, chardev or virtiofsd is left and the daemon holds no more fds."""
    tally = Tally()
    fuzz = Fuzz(bus, daemon, tally, daemon_fds(daemon))
    vm = fuzz_vm
    fuzz.healthy([vm.name], [vm.leader])
    shared = files.dir / "shared"
    shared.mkdir(exist_ok=True)
    shared.chmod(0o755)
    chardevs = {c["label"] for c in vm.probe("query-chardev")}

    @maybe_seeded
    @fuzz_settings(MACHINE_EXAMPLES // 3)
    @given(steps=st.lists(share_steps, min_size=1, max_size=4))
    def example(steps: list[tuple[str, str, dict[str, Variant]]]) -> None:
        tally.examples += 1
        added: list[str] = []
        where = {"path": vm.path, "interface": MACHINE_IFACE}
        for method, arg, options in steps:
            if method == "AddShare":
                outcome, result = fuzz.call(method, "sa{sv}", [str(shared) if arg == SHARED else arg, options], **where)
                if outcome == "ok":
                    added.append(result[0])
                continue
            share_id = added.pop() if arg == "$added" and added else arg
            if method == "RemoveShare":
                fuzz.call(method, "s", [share_id], **where)
            else:
                fuzz.call(method, "sa{sv}", [share_id, options], **where)
        settle_shares(bus, vm)
        assert {c["label"] for c in vm.probe("query-chardev")} == chardevs
        assert daemon.proc is not None and virtiofsd_pids(daemon.proc.pid) == []
        fuzz.healthy([vm.name], [vm.leader])

    started = time.monotonic()
    example()
    tally.report("AddShare/RemoveShare/RemoveShareEx on a running machine", time.monotonic() - started)
    assert tally.examples >= min(MACHINE_EXAMPLES // 3, 50)


def settle_shares(bus: BusThread, vm: VM) -> None:
    """Remove what the example shared; wait until every port is free again."""

    async def run() -> None:
        c = bus.client
        shares = [s["id"] for s in await c.prop(vm.path, "Shares") if s["state"] == "attached"]
        await asyncio.gather(*(c.remove_share(vm.path, s, timeout_usec=30_000_000) for s in shares))
        async with asyncio.timeout(40):
            while (await c.prop(vm.path, "Shares"), await c.prop(vm.path, "FreeSparePorts")) != ([], 4):
                await asyncio.sleep(0.05)

    bus.run(run())


# -- AddNetwork / AddNetworkFd / RemoveNetwork, ReplaceDrive / EjectDrive ---

NET_EXAMPLES = int(os.environ.get("VMSPAWND_FUZZ_NET_EXAMPLES", str(MACHINE_EXAMPLES // 3)))
# Valid ones, and ones that are not: group, zero, short, long, other separators.
macs = st.one_of(
    st.from_regex(r"[0-9a-f][26ae](:[0-9a-f]{2}){5}", fullmatch=True),
    st.sampled_from(["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "00:00:00:00:00:00", "02:00:00:00:00",
                     "02-00-00-00-00-01", "02:00:00:00:00:01:02", "02:00:00:00:00:0G", ""]),
    text,
)  # fmt: skip
plausible_nic_options = st.fixed_dictionaries(
    {},
    optional={
        "mac": macs.map(lambda v: Variant("s", v)),
        "id": st.one_of(
            st.sampled_from([*ODD_IDS, "net0", "nic1", "$cdrom"]),
            st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,31}", fullmatch=True),
        ).map(lambda v: Variant("s", v)),
        # Never a tap: root would make that host interface (typed_value's network never names one either).
        "network": st.sampled_from(["user", "none", "tap:", "user:x", "bridge", ""]).map(lambda v: Variant("s", v)),
    },
)
nic_options = st.one_of(option_dicts(ADD_NETWORK_OPTIONS | {"mac": "s"}), plausible_nic_options)
nic_fd_options = st.one_of(option_dicts(ADD_NETWORK_FD_OPTIONS), plausible_nic_options)
# "$added": a NIC an earlier step added; "$cdrom": the example's cdrom.
device_ids = st.one_of(st.just("$added"), st.just("$cdrom"), st.just("$cdrom"), drive_ids)
replace_options = st.one_of(
    option_dicts(REPLACE_DRIVE_OPTIONS),
    st.fixed_dictionaries({}, optional={"format": st.sampled_from(["raw", "qcow2"]).map(lambda v: Variant("s", v))}),
)
net_steps = st.one_of(
    st.tuples(st.just("AddNetwork"), st.just(""), nic_options),
    st.tuples(st.just("AddNetworkFd"), st.sampled_from(FD_KINDS), nic_fd_options),
    st.tuples(st.just("RemoveNetwork"), device_ids, st.just({})),
    st.tuples(st.just("RemoveNetworkEx"), device_ids, remove_options),
    st.tuples(st.just("ReplaceDrive"), st.one_of(junk_paths(with_fresh=True), st.just(FRESH)), replace_options),
    st.tuples(st.just("EjectDrive"), device_ids, st.just({})),
    # The fuzz machine has no graphics.
    st.tuples(st.just("OpenGraphics"), st.just(""), option_dicts(OPEN_GRAPHICS_OPTIONS)),
)


def test_fuzz_machine_network_and_media_calls(bus: BusThread, daemon: Daemon, files: Files, fuzz_vm: VM) -> None:
    """Every new method's bad input gets a typed error and leaves nothing
    behind: no netdev, no block node, no fdset, no port, no daemon fd."""
    tally = Tally()
    fuzz = Fuzz(bus, daemon, tally, daemon_fds(daemon))
    vm = fuzz_vm
    netdevs = vm.probe.netdevs()
    fuzz.healthy([vm.name], [vm.leader])
    where = {"path": vm.path, "interface": MACHINE_IFACE}

    @maybe_seeded
    @fuzz_settings(NET_EXAMPLES)
    @given(steps=st.lists(net_steps, min_size=1, max_size=5), with_cdrom=st.booleans())
    def example(steps: list[tuple[str, str, dict[str, Variant]]], with_cdrom: bool) -> None:
        tally.examples += 1
        cdrom = "nope"
        if with_cdrom:
            cd = {"disk_type": Variant("s", "virtio-scsi-cdrom"), "read_only": Variant("b", True)}
            outcome, result = fuzz.call("AddDrive", "sa{sv}", [files.fresh(), cd], **where)
            assert outcome == "ok", result
            cdrom = result[0]
        added: list[str] = []
        for method, arg, options in steps:
            options = {k: Variant("s", cdrom) if v == Variant("s", "$cdrom") else v for k, v in options.items()}
            target = added.pop() if arg == "$added" and added else cdrom if arg == "$cdrom" else arg
            if method == "AddNetwork":
                outcome, result = fuzz.call(method, "a{sv}", [options], **where)
            elif method == "AddNetworkFd":
                fd = open_fd(arg, files)
                try:
                    outcome, result = fuzz.call(method, "ha{sv}", [0, options], unix_fds=(fd,), **where)
                finally:
                    os.close(fd)
                # No fd of those kinds is a tap.
                assert outcome == E + "InvalidArgument", (outcome, result)
            elif method == "ReplaceDrive":
                file = files.fresh() if arg == FRESH else arg
                outcome, result = fuzz.call(method, "ssa{sv}", [cdrom, file, options], **where)
            elif method == "OpenGraphics":
                outcome, result = fuzz.call(method, "a{sv}", [options], **where)
                assert outcome in (E + "NoGraphics", E + "InvalidArgument"), (outcome, result)
            elif method in ("RemoveNetwork", "EjectDrive"):
                outcome, result = fuzz.call(method, "s", [target], **where)
            else:
                outcome, result = fuzz.call(method, "sa{sv}", [target, options], **where)
            if method == "AddNetwork" and outcome == "ok":
                added.append(result[0])
        settle_all(bus, vm)
        assert vm.probe.netdevs() == netdevs
        assert vm.probe.block_nodes() == vm.nodes
        assert vm.probe.fdsets() == []
        for port in ("rp0", "rp1", "rp2", "rp3"):
            assert devices_on(vm.probe, port) == [], port
        fuzz.healthy([vm.name], [vm.leader])

    started = time.monotonic()
    example()
    tally.report(
        "AddNetwork/AddNetworkFd/RemoveNetwork(Ex)/ReplaceDrive/EjectDrive/OpenGraphics", time.monotonic() - started
    )
    assert tally.examples >= min(NET_EXAMPLES, 50)


def settle_all(bus: BusThread, vm: VM) -> None:
    """Remove every NIC (then every drive, as settle does) the example left."""

    async def run() -> None:
        c = bus.client
        nics = [n["id"] for n in await c.prop(vm.path, "Networks") if n["state"] == "attached"]
        opts = {"timeout_usec": Variant("t", 30_000_000)}
        await asyncio.gather(
            *(c.call("RemoveNetworkEx", "sa{sv}", [n, opts], path=vm.path, interface=MACHINE_IFACE) for n in nics)
        )
        async with asyncio.timeout(40):
            while await c.prop(vm.path, "Networks") != []:
                await asyncio.sleep(0.05)

    bus.run(run())
    settle(bus, vm)


# -- reproductions of the bugs the fuzzer found (strict xfail) ---------------


async def plan(client: Client, options: dict[str, Variant]) -> tuple[str, str]:
    try:
        await client.call("PlanMachine", "sa{sv}", ["m", options])
    except DBusError as e:
        return e.type, e.text
    return "ok", ""


@pytest.mark.xfail(KNOWN_LONG_PATH, strict=True, reason="daemon bug: check_file lets ENAMETOOLONG escape")
async def test_overlong_boot_path_is_invalid_argument(client: Client) -> None:
    """vmspawnd/manager.py check_file: Path.exists() raises on ENAMETOOLONG."""
    for options in (
        {"kernel": Variant("s", "/" + "a" * 256)},
        # 3001 characters pass the 4096-character limit, 4501 bytes do not fit PATH_MAX.
        {"kernel": Variant("s", "/" + "ü/" * 1500)},
        {"image": Variant("s", "/" + "a" * 300)},
    ):
        outcome, text = await plan(client, options)
        assert outcome == E + "InvalidArgument", (outcome, text)


@pytest.mark.xfail(
    KNOWN_JSON_RECURSION,
    strict=True,
    reason="daemon bug: deeply nested JSON in qemu_extra -device raises RecursionError",
)
async def test_deeply_nested_json_device_is_invalid_argument(client: Client, guest: Any) -> None:
    """vmspawnd/topology.py _split_device_arg: json.loads RecursionError escapes
    (qemu_extra items are not length-checked either: MAX_STRING applies to 's' only)."""
    extra = ["-device", '{"driver":' + "[" * 100_000]
    outcome, text = await plan(client, {"kernel": Variant("s", str(guest.kernel)), "qemu_extra": Variant("as", extra)})
    assert outcome == E + "InvalidArgument", (outcome, text)


@pytest.mark.xfail(KNOWN_FD_LEAK, strict=True, reason="daemon bug: fds attached to a call are never closed")
async def test_fds_sent_with_a_call_are_not_kept(client: Client, daemon: Daemon, tmp_path: Path) -> None:
    """dbus-fast hands unused unix fds to no one: the daemon leaks one per fd a
    caller attaches, even to ListMachines (public), so any client can exhaust
    its fd limit."""
    (tmp_path / "f").write_bytes(b"x")
    before = daemon_fds(daemon)
    for _ in range(8):
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            await client.call("ListMachines", unix_fds=[fd])
        finally:
            os.close(fd)
    assert daemon_fds(daemon) == before


@pytest.mark.xfail(
    KNOWN_FD_INDEX, strict=True, reason="daemon bug: AddDriveFd does not check that an fd came with the call"
)
async def test_add_drive_fd_with_a_bad_fd_index(client: Client, guest: Any, tmp_path: Path) -> None:
    """An 'h' index past the attached fds reaches AddDriveFd as None:
    os.close(None) raises TypeError -> DBus.Error.Failed, and the fd that
    was attached leaks."""
    path = await client.create("fdidx", **guest_options(guest, hotplug_spares=1, qemu_extra=["-S"]))
    (tmp_path / "f").write_bytes(b"\0" * 4096)
    fd = os.open(tmp_path / "f", os.O_RDWR)
    try:
        with pytest.raises(DBusError) as e:
            await client.call("AddDriveFd", "ha{sv}", [1, {}], path=path, interface=MACHINE_IFACE, unix_fds=[fd])
    finally:
        os.close(fd)
    assert e.value.type == E + "InvalidArgument", (e.value.type, e.value.text)


@pytest.fixture
def site(workdir: Path) -> Iterator[tuple[str, Daemon]]:
    """A bus and daemon of their own: the test below damages its daemon."""
    base = workdir / "site-fuzz-fd"
    proc, address = testbus.start(base / "bus")
    daemon = Daemon(base / "run", base / "daemon.log", env={"DBUS_SYSTEM_BUS_ADDRESS": address})
    daemon.start()
    yield address, daemon
    if daemon.proc is not None:
        daemon.stop(signal.SIGKILL)
    for pid in qemu_pids(str(daemon.runtime_dir)):
        os.kill(pid, signal.SIGKILL)
    proc.terminate()
    proc.wait()


@pytest.mark.xfail(
    KNOWN_FD_INDEX, strict=True, reason="daemon bug: AddDriveFd uses the caller's 'h' index as its own fd number"
)
async def test_add_drive_fd_without_an_fd_touches_no_daemon_fd(site: tuple[str, Daemon], guest: Any) -> None:
    """With no fd attached, dbus-fast leaves the raw 'h' index in the body, and
    AddDriveFd takes it as one of the daemon's own fds: it readlinks it, hands
    it to QEMU, and closes it. Index 2 is the daemon's stderr (its log);
    the daemon's bus socket or a machine's QMP socket can be closed the same
    way (tried by hand: the daemon drops off the bus, still running)."""
    address, daemon = site
    client = await Client.connect(address)
    try:
        path = await client.create("fdless", **guest_options(guest, hotplug_spares=1, qemu_extra=["-S"]))
        assert daemon.proc is not None
        stderr = os.readlink(f"/proc/{daemon.proc.pid}/fd/2")
        with pytest.raises(DBusError) as e:
            await client.call("AddDriveFd", "ha{sv}", [2, {}], path=path, interface=MACHINE_IFACE)
        fd2 = f"/proc/{daemon.proc.pid}/fd/2"
        assert os.path.exists(fd2) and os.readlink(fd2) == stderr, f"the daemon closed its stderr ({stderr})"
        assert e.value.type == E + "InvalidArgument" and stderr not in e.value.text, e.value.text
        await client.terminate_all()
    finally:
        client.close()


@pytest.mark.xfail(
    KNOWN_NVME_NODE_ID, strict=True, reason="daemon bug: a node QEMU could not delete blocks its drive id for good"
)
async def test_failed_nvme_add_does_not_block_the_next_drive(client: Client, guest: Any, tmp_path: Path) -> None:
    """QEMU 7.2 keeps an nvme's node "in use" after a failed realize (here: the
    image's write lock). The daemon logs the failed rollback but hands out the
    same id again, so every later AddDrive without an explicit id fails with
    "Duplicate nodes with node-name='diskN-node'" although ports are free
    (vmspawnd/machine.py _undo / _new_drive_id)."""
    path = await client.create("nvmeleak", **guest_options(guest, hotplug_spares=3, qemu_extra=["-S"]))
    a, b = tmp_path / "a", tmp_path / "b"
    for f in (a, b):
        f.write_bytes(b"\0" * 4096)
    await client.add_drive(path, str(a), disk_type="nvme")
    with pytest.raises(DBusError) as e:
        await client.add_drive(path, str(a), disk_type="nvme")
    assert 'Failed to get "write" lock' in e.value.text
    assert (await client.prop(path, "FreeSparePorts")) == 2
    await client.add_drive(path, str(b), disk_type="virtio-blk")


@pytest.mark.xfail(
    KNOWN_SCSI_ID, strict=True, reason="daemon bug: a drive whose id starts with 'scsi' is taken for a SCSI controller"
)
async def test_a_drive_named_like_a_controller_does_not_break_scsi(client: Client, guest: Any, tmp_path: Path) -> None:
    """vmspawnd/machine.py _scsi_controller picks any port owner starting with
    "scsi" as the live controller. The fuzzer's ids include "scsi1": after a
    virtio-blk drive with that id, every SCSI drive fails with "Bus 'scsi1.0'
    not found" although ports are free."""
    path = await client.create("scsiname", **guest_options(guest, hotplug_spares=3, qemu_extra=["-S"]))
    a, b = tmp_path / "a", tmp_path / "b"
    for f in (a, b):
        f.write_bytes(b"\0" * 4096)
    try:
        await client.add_drive(path, str(a), id="scsi1")
    except DBusError as e:
        # Refusing ids that look like the daemon's own controller names is a fix too.
        assert e.type == E + "InvalidArgument", e.type
        return
    await client.add_drive(path, str(b), disk_type="virtio-scsi")


@pytest.mark.xfail(
    KNOWN_SCSI_ID, strict=True, reason="daemon bug: a rollback frees a port its SCSI controller still holds"
)
async def test_a_scsi_drive_named_like_its_new_controller_frees_no_busy_port(
    client: Client, guest: Any, tmp_path: Path
) -> None:
    """Seen as a flaky fuzz failure: the first SCSI drive of a machine, with id
    "scsi1", gets a new controller also named "scsi1" (_scsi_controller); the
    drive's device_add fails ("Duplicate device ID 'scsi1'"), and _undo frees
    the port because port_owner[port] == dev, while the controller's
    device_del is still pending in QEMU. The next AddDrive gets that port:
    "PCI: slot 0 function 0 not available ... in use by virtio-scsi-pci"."""
    path = await client.create("scsiport", **guest_options(guest, hotplug_spares=3, qemu_extra=["-S"]))
    a, b = tmp_path / "a", tmp_path / "b"
    for f in (a, b):
        f.write_bytes(b"\0" * 4096)
    with pytest.raises(DBusError):
        await client.add_drive(path, str(a), id="scsi1", disk_type="virtio-scsi")
    await client.add_drive(path, str(b))
