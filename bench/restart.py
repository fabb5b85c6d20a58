"""Daemon restart: time until every machine is re-attached, and the daemon's memory.

Two private buses, two vmspawnd processes, in the same run:

- with10: a daemon with 10 machines (created over D-Bus, each a QEMU that
          keeps running across the daemon's restarts);
- with0:  the baseline, a daemon with no machine at all (own bus, own runtime dir).

Each round restarts both, one after the other (the order alternates every
round): Daemon.stop(signal) (SIGTERM, or SIGKILL in a few spread-out rounds),
--settle seconds idle, then a new vmspawnd process. Timed from just before
the new process is spawned (subprocess.Popen) to

- READY=1:  the datagram on NOTIFY_SOCKET (sent after every machine is
            re-attached and the bus name is taken);
- listed:   a client, connected to the bus all along, gets the expected
            machines from ListMachines (it wakes on NameOwnerChanged and
            polls every 20 ms until then).

After every restart the benchmark checks STATUS= names the right count,
ListMachines names the same machines and the very same QEMU pids run.

Memory: VmRSS of the with10 daemon, fresh with 0 machines, after creating 1
and 20 machines; then once restarted with the 20 re-attached (compared with
the with0 daemon, also freshly restarted). 10 of the 20 are terminated before
the restart rounds.

Unresponsive: then 3 of the 10 QEMUs are stopped (SIGSTOP) and the with10
daemon restarted --stopped-rounds times (SIGTERM): READY=1 and ListMachines
must not wait for them (each re-attach is bounded, all run at once); the 3
must be listed as unmanaged. They are continued (SIGCONT) afterwards and
must be adopted again by the daemon's background retry.

Machines: paused (-S: the vCPUs never run), accel=tcg, 64 MiB, a 1 MiB raw
image each (sparse, all zeroes), no network, default hotplug spares.

Run: .venv/bin/python bench/restart.py   (as root; about a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, Env, environment, figures, testbus
from dbus_fast import DBusError, Message, MessageType

from tests.integration.harness import VMSPAWND, Client, Daemon, qemu_pids
from vmspawnd.bus import BUS_NAME

MiB = 1024 * 1024
MACHINE = {"accel": "tcg", "memory": 64 * MiB, "qemu_extra": ["-S"]}
DESCRIBED = "paused (-S, vCPUs never run), accel=tcg, 64 MiB, 1 MiB raw image each, no network, default hotplug spares"
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
MATCH_OWNER = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    f"member='NameOwnerChanged',arg0='{BUS_NAME}'"
)


@dataclass
class Site:
    """One bus, one vmspawnd, one client watching the bus name."""

    label: str
    daemon: Daemon
    client: Client
    names: list[str] = field(default_factory=list)  # the machines it must list, sorted
    pids: list[int] = field(default_factory=list)  # their QEMU pids, sorted
    owned: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def connect(cls, label: str, daemon: Daemon, address: str) -> Site:
        site = cls(label, daemon, await Client.connect(address))
        site.client.bus.add_message_handler(site._on_message)
        await site.client.call(
            "AddMatch", "s", [MATCH_OWNER],
            path="/org/freedesktop/DBus", interface="org.freedesktop.DBus", destination="org.freedesktop.DBus",
        )  # fmt: skip
        return site

    def _on_message(self, msg: Message) -> None:
        if (
            msg.message_type is MessageType.SIGNAL
            and msg.member == "NameOwnerChanged"
            and msg.body[0] == BUS_NAME
            and msg.body[2]
        ):
            self.owned.set()

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def running_qemus(self) -> list[int]:
        return sorted(qemu_pids(str(self.daemon.runtime_dir)))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def settled_rss(site: Site, settle: float = 0.5) -> int:
    """RSS once the daemon answered a call and idled a moment."""
    await site.client.names()
    await asyncio.sleep(settle)
    return rss_kib(site.pid)


async def wait_ready(proc: subprocess.Popen[bytes], notify: socket.socket) -> tuple[int, str]:
    # One receive in flight, never cancelled on the poll's timeout: a
    # cancelled sock_recv that had just read the datagram loses READY=1 (it
    # once broke the run: "no READY=1 within 30 s" from a daemon that was up).
    loop = asyncio.get_running_loop()
    recv: asyncio.Future[bytes] | None = None
    try:
        while True:
            recv = recv or asyncio.ensure_future(loop.sock_recv(notify, 4096))
            done, _ = await asyncio.wait({recv}, timeout=0.25)
            if not done:
                if proc.poll() is not None:
                    raise RuntimeError(f"vmspawnd exited with status {proc.returncode} before READY=1")
                continue
            msg, recv = recv.result(), None
            if b"READY=1" in msg:
                now = time.perf_counter_ns()
                status = [line for line in msg.decode(errors="replace").splitlines() if line.startswith("STATUS=")]
                return now, status[0].removeprefix("STATUS=") if status else ""
    finally:
        if recv is not None:
            recv.cancel()


async def wait_listed(site: Site) -> int:
    while True:
        if not site.owned.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.02):
                    await site.owned.wait()
        try:
            names: list[str] | None = await site.client.names()
        except DBusError:
            names = None  # not there yet (ServiceUnknown)
        if names is not None and sorted(names) == site.names:
            return time.perf_counter_ns()
        if site.owned.is_set():
            await asyncio.sleep(0.002)


async def timed_start(site: Site, timeout: float) -> tuple[int, int]:
    """Start vmspawnd (as Daemon.start does); ns from spawn to READY=1 and to a full ListMachines."""
    daemon = site.daemon
    assert daemon.proc is None
    notify_path = daemon.runtime_dir.parent / f"notify-{site.label}-{os.getpid()}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.setblocking(False)
    try:
        notify.bind(str(notify_path))
        env = os.environ | daemon.env | {"NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": str(ROOT)}
        argv = [*VMSPAWND, "--runtime-dir", str(daemon.runtime_dir)]
        site.owned.clear()
        with open(daemon.log, "ab") as log:
            t0 = time.perf_counter_ns()
            daemon.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        try:
            async with asyncio.timeout(timeout), asyncio.TaskGroup() as tg:
                ready_task = tg.create_task(wait_ready(daemon.proc, notify))
                listed_task = tg.create_task(wait_listed(site))
        except TimeoutError:
            raise RuntimeError(
                f"{site.label}: no READY=1 and full ListMachines within {timeout:g} s; see {daemon.log}"
            ) from None
    finally:
        notify.close()
        notify_path.unlink(missing_ok=True)
    ready, status = ready_task.result()
    want = f"{len(site.names)} machines running"
    if status != want:
        raise RuntimeError(f"{site.label}: READY=1 came with STATUS={status!r}, expected {want!r}")
    return ready - t0, listed_task.result() - t0


async def restart(site: Site, sig: signal.Signals, settle: float, timeout: float) -> tuple[int, int, int]:
    """(stop, ready, listed) in ns; the same QEMUs must run before and after."""
    t0 = time.perf_counter_ns()
    code = site.daemon.stop(sig)
    stop_ns = time.perf_counter_ns() - t0
    if code != (0 if sig is signal.SIGTERM else -sig):
        raise RuntimeError(f"{site.label}: vmspawnd exited with {code} on {sig.name}")
    if site.running_qemus() != site.pids:
        raise RuntimeError(
            f"{site.label}: QEMUs changed while vmspawnd was down: {site.running_qemus()} != {site.pids}"
        )
    await asyncio.sleep(settle)
    ready_ns, listed_ns = await timed_start(site, timeout)
    if site.running_qemus() != site.pids:
        raise RuntimeError(f"{site.label}: QEMUs changed over the restart: {site.running_qemus()} != {site.pids}")
    return stop_ns, ready_ns, listed_ns


def spread(term: int, kill: int) -> list[str]:
    """term SIGTERMs with kill SIGKILLs spread evenly among them."""
    n = term + kill
    return ["SIGKILL" if (i + 1) * kill // n > i * kill // n else "SIGTERM" for i in range(n)]


def make_image(path: Path) -> str:
    with open(path, "wb") as f:
        f.truncate(1 * MiB)
    return str(path)


async def create(site: Site, images: Path, names: list[str]) -> None:
    for name in names:
        await site.client.create(name, image=make_image(images / f"{name}.raw"), **MACHINE)
    site.names = sorted(await site.client.names())
    site.pids = site.running_qemus()
    if len(site.pids) != len(site.names):
        raise RuntimeError(f"{len(site.names)} machines but QEMU pids {site.pids}")


async def terminate(site: Site, names: list[str]) -> None:
    for name in names:
        await site.client.call("TerminateMachine", "s", [name])
    site.names = sorted(await site.client.names())
    site.pids = site.running_qemus()
    if len(site.pids) != len(site.names):
        raise RuntimeError(f"{len(site.names)} machines but QEMU pids {site.pids}")


def qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False).stdout
    words = out.split()
    return words[3] if len(words) > 3 and words[:3] == ["QEMU", "emulator", "version"] else out.strip()


async def run(env: Env, idle: Daemon, idle_address: str, args: argparse.Namespace) -> dict[str, Any]:
    busy = await Site.connect("with10", env.daemon, os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
    images = env.workdir / "images"
    images.mkdir()
    zero: Site | None = None
    try:
        zero = await Site.connect("with0", idle, idle_address)
        # Memory, on the fresh daemon.
        rss = {"fresh_0_machines_kib": await settled_rss(busy)}
        t0 = time.monotonic()
        await create(busy, images, ["vm00"])
        rss["after_creating_1_kib"] = await settled_rss(busy)
        await create(busy, images, [f"vm{i:02d}" for i in range(1, args.rss_machines)])
        create_s = time.monotonic() - t0
        rss["after_creating_20_kib"] = await settled_rss(busy)
        stop20, ready20, listed20 = await restart(busy, signal.SIGTERM, args.settle, args.start_timeout)
        rss["restarted_20_reattached_kib"] = await settled_rss(busy)
        await terminate(busy, busy.names[args.machines :])
        if len(busy.names) != args.machines:
            raise RuntimeError(f"expected {args.machines} machines, have {busy.names}")

        # Restart rounds, with0 and with10 alternating.
        schedule = ["SIGTERM"] * args.warmup + spread(args.term, args.kill)
        sites = {"with0": zero, "with10": busy}
        samples: dict[str, dict[str, dict[str, list[int]]]] = {
            s: {sig: {"stop": [], "ready": [], "listed": []} for sig in SIGNALS} for s in sites
        }
        warmup: dict[str, list[list[float]]] = {s: [] for s in sites}
        order_log = []
        for i, sig_name in enumerate(schedule):
            order = ["with0", "with10"] if i % 2 == 0 else ["with10", "with0"]
            order_log.append(f"{'/'.join(order)} {sig_name}")
            for label in order:
                took = await restart(sites[label], SIGNALS[sig_name], args.settle, args.start_timeout)
                if i < args.warmup:
                    warmup[label].append([round(t / 1e6, 3) for t in took])
                    continue
                for what, ns in zip(("stop", "ready", "listed"), took, strict=True):
                    samples[label][sig_name][what].append(ns)
        rss["restarted_0_machines_kib"] = await settled_rss(zero)
        stopped = await unresponsive_rounds(busy, args)
    finally:
        with contextlib.suppress(Exception):
            if busy.daemon.proc is not None:
                async with asyncio.timeout(30):
                    await busy.client.terminate_all()
        busy.client.close()
        if zero is not None:
            zero.client.close()

    series = {
        label: {sig: {what: figures(v) for what, v in per_sig.items() if v} for sig, per_sig in per_label.items()}
        for label, per_label in samples.items()
    }
    ratios = {
        sig: {
            what: round(series["with10"][sig][what]["median_ms"] / series["with0"][sig][what]["median_ms"], 3)
            for what in ("ready", "listed")
        }
        for sig in SIGNALS
        if series["with0"][sig]
    }
    rss["per_machine_created_kib"] = round((rss["after_creating_20_kib"] - rss["fresh_0_machines_kib"]) / 20, 1)
    rss["per_machine_created_after_first_kib"] = round(
        (rss["after_creating_20_kib"] - rss["after_creating_1_kib"]) / 19, 1
    )
    rss["per_machine_reattached_kib"] = round(
        (rss["restarted_20_reattached_kib"] - rss["restarted_0_machines_kib"]) / 20, 1
    )
    return {
        "benchmark": "restart",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": ".venv/bin/python bench/restart.py",
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "qemu": qemu_version(),
        "machines_desc": DESCRIBED,
        "machine_options": MACHINE | {"image": "1 MiB raw, one per machine"},
        "machines": args.machines,
        "rss_machines": args.rss_machines,
        "create_s": round(create_s, 2),
        "settle_s": args.settle,
        "rounds": {"SIGTERM": args.term, "SIGKILL": args.kill, "warmup_not_counted": args.warmup},
        "order": order_log,
        "timed": "from just before Popen of the new vmspawnd to READY=1 on NOTIFY_SOCKET (ready), "
        "and to a client's ListMachines returning all machines (listed); stop = signal to exit (info)",
        "series": series,
        "warmup_ms_stop_ready_listed": warmup,
        "baseline": "with0",
        "ratio_with10_over_with0": ratios,
        "restart_with_20_once_ms": {
            "stop": round(stop20 / 1e6, 3),
            "ready": round(ready20 / 1e6, 3),
            "listed": round(listed20 / 1e6, 3),
        },
        "rss": rss,
        "stopped_3_of_10": {
            "rounds": args.stopped_rounds,
            "ready": figures(stopped["ready"]),
            "listed": figures(stopped["listed"]),
            "adopted_after_sigcont_s": stopped["adopted_s"],
        },
    }


async def states(site: Site) -> list[str]:
    (machines,) = await site.client.call("ListMachines")
    return sorted(str(m[1]) for m in machines)


async def unresponsive_rounds(site: Site, args: argparse.Namespace) -> dict[str, Any]:
    """Restarts with 3 of the machines' QEMUs stopped; ns to READY and to a full ListMachines."""
    frozen = site.pids[:3]
    samples: dict[str, Any] = {"ready": [], "listed": []}
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(args.stopped_rounds):
            _stop, ready, listed = await restart(site, signal.SIGTERM, args.settle, args.start_timeout)
            samples["ready"].append(ready)
            samples["listed"].append(listed)
            if (got := await states(site)).count("unmanaged") != len(frozen):
                raise RuntimeError(f"{site.label}: expected {len(frozen)} unmanaged machines, states {got}")
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    t0 = time.monotonic()
    # -S machines: their State is QEMU's own, paused.
    while (got := await states(site)) != ["paused"] * len(site.names):
        if time.monotonic() - t0 > 30:
            raise RuntimeError(f"{site.label}: stopped machines not adopted 30 s after SIGCONT: {got}")
        await asyncio.sleep(0.1)
    samples["adopted_s"] = round(time.monotonic() - t0, 2)
    return samples


def report(r: dict[str, Any], out: Path) -> None:
    rounds = r["rounds"]
    print(
        f"restart: new vmspawnd process -> all machines re-attached; {rounds['SIGTERM']} SIGTERM + "
        f"{rounds['SIGKILL']} SIGKILL restarts per series (+{rounds['warmup_not_counted']} SIGTERM warm-up not counted), "
        f"with0/with10 alternating, {r['settle_s']:g} s idle before each start; QEMU {r['qemu']}, {r['host']['cpus']} host CPUs"
    )
    print(f"  machines: {r['machines_desc']}")
    print(f"  {'':<30} {'median':>9} {'min':>9} {'max':>9}   (ms, from spawning the new process)")
    for sig in SIGNALS:
        for label, count in (("with0", 0), ("with10", r["machines"])):
            s = r["series"][label][sig]
            if not s:
                continue
            for what, name in (("ready", "READY=1"), ("listed", f"ListMachines={count}")):
                f = s[what]
                print(
                    f"  {sig} {count:>2} machines {name:<16}"
                    f"{f['median_ms']:9.1f} {f['min_ms']:9.1f} {f['max_ms']:9.1f}   n={f['n']}"
                )
        if sig in r["ratio_with10_over_with0"]:
            ratio = r["ratio_with10_over_with0"][sig]
            print(
                f"  {sig} ratio with{r['machines']}/with0 (medians): READY {ratio['ready']:.2f}, ListMachines {ratio['listed']:.2f}"
            )
    once = r["restart_with_20_once_ms"]
    print(
        f"  (info: one SIGTERM restart with {r['rss_machines']} machines: READY {once['ready']:.1f} ms, "
        f"ListMachines {once['listed']:.1f} ms; stop medians SIGTERM with0 "
        f"{r['series']['with0']['SIGTERM']['stop']['median_ms']:.1f} ms, with{r['machines']} "
        f"{r['series']['with10']['SIGTERM']['stop']['median_ms']:.1f} ms)"
    )
    m = r["rss"]
    mib = 1024
    print(
        f"  RSS of vmspawnd: 0 machines {m['fresh_0_machines_kib'] / mib:.1f} MiB, "
        f"after creating 1 {m['after_creating_1_kib'] / mib:.1f} MiB, "
        f"after creating {r['rss_machines']} {m['after_creating_20_kib'] / mib:.1f} MiB -> "
        f"{m['per_machine_created_kib']:.0f} KiB per machine ({m['per_machine_created_after_first_kib']:.0f} KiB past the first)"
    )
    print(
        f"  RSS after a restart: {r['rss_machines']} re-attached {m['restarted_20_reattached_kib'] / mib:.1f} MiB, "
        f"0 machines {m['restarted_0_machines_kib'] / mib:.1f} MiB -> {m['per_machine_reattached_kib']:.0f} KiB per machine"
    )
    st = r["stopped_3_of_10"]
    print(
        f"  3 of {r['machines']} QEMUs stopped (SIGSTOP), {st['rounds']} SIGTERM restarts: READY median "
        f"{st['ready']['median_ms']:.1f} ms (max {st['ready']['max_ms']:.1f}), ListMachines={r['machines']} median "
        f"{st['listed']['median_ms']:.1f} ms; adopted {st['adopted_after_sigcont_s']:.1f} s after SIGCONT"
    )
    print(f"  figures written to {out}")


@contextlib.contextmanager
def idle_daemon(env: Env) -> Iterator[tuple[Daemon, str]]:
    """The baseline's own bus and vmspawnd (no machines); both gone afterwards."""
    bus: subprocess.Popen[bytes] | None = None
    daemon: Daemon | None = None
    try:
        bus, address = testbus.start(env.workdir / "bus0")
        daemon = Daemon(
            env.workdir / "empty-run", env.workdir / "daemon0.log", env={"DBUS_SYSTEM_BUS_ADDRESS": address}
        )
        daemon.start()
        yield daemon, address
    except Exception:
        log = env.workdir / "daemon0.log"
        tail = log.read_text(errors="replace").splitlines()[-30:] if log.exists() else []
        if tail:
            print(f"--- last lines of {log}:", *tail, "---", sep="\n", file=sys.stderr)
        raise
    finally:
        if daemon is not None and daemon.proc is not None:
            proc = daemon.proc
            try:
                daemon.stop()
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if daemon is not None:
            for pid in qemu_pids(str(daemon.runtime_dir)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if bus is not None:
            bus.terminate()
            bus.wait(10)


async def main_async(env: Env, idle: Daemon, address: str, args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with asyncio.timeout(args.timeout):
        return await run(env, idle, address, args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--term", type=int, default=12, help="counted SIGTERM restarts per series (default 12)")
    parser.add_argument("--kill", type=int, default=4, help="counted SIGKILL restarts per series (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="leading SIGTERM rounds not counted (default 1)")
    parser.add_argument("--stopped-rounds", type=int, default=4, help="restarts with 3 QEMUs stopped (default 4)")
    parser.add_argument("--settle", type=float, default=0.2, help="idle seconds before each start (default 0.2)")
    parser.add_argument("--start-timeout", type=float, default=30, help="seconds a start may take")
    parser.add_argument("--timeout", type=float, default=170, help="give up after this many seconds")
    parser.add_argument("--json", type=Path, default=RESULTS / "restart.json", help="where the figures go")
    args = parser.parse_args()
    args.machines, args.rss_machines = 10, 20
    if args.term < 1 or args.kill < 0 or args.warmup < 0 or args.stopped_rounds < 1:
        parser.error("need --term >= 1, --kill >= 0, --warmup >= 0 and --stopped-rounds >= 1")
    # SIGTERM stops the run like Ctrl-C: everything started is torn down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with environment() as env, idle_daemon(env) as (idle, address):
            try:
                result = asyncio.run(main_async(env, idle, address, args))
            finally:
                # Closing the event loop reset SIGTERM to its default.
                signal.signal(signal.SIGTERM, signal.default_int_handler)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("restart: interrupted; machines, daemons and buses are stopped", file=sys.stderr)
        return 130
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
