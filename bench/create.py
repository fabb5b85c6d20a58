"""Create: CreateMachine over D-Bus versus exec of the identical QEMU argv until QMP is ready.

For two machines, a 4-port one and a 14-port one with 20 `-device nvme` in
qemu_extra, the benchmark first creates a probe machine through the daemon
and reads the argv the daemon used ($RUNTIME/machines/NAME/argv, one arg a
line). The raw series runs that same argv with only what ties it to the
daemon replaced: the listening chardevs `socket,id=X,fd=N,...` (QMP, the
serial console) become `socket,id=X,path=...,...`, every `/proc/self/fd/N` (files
the daemon opened for QEMU: kernel, initrd) becomes the real path (readlink
of /proc/<Leader>/fd/N while the probe runs), the machine's runtime dir
(console log) becomes a dir of the benchmark's, and the console's `-add-fd`
gets a file the benchmark opens before each exec, as the daemon does.

Both series use `-S` (in qemu_extra, so in both argvs): the guest CPU stays
paused, so no booting guest competes for the host CPUs; what is timed is the
control path only.

- ours: CreateMachine(name, options) from call to reply (the daemon plans,
  opens the boot files, binds the QMP socket, spawns QEMU, waits for the QMP
  greeting and qmp_capabilities);
- raw:  exec of the argv -> connect to the QMP socket (retried every 0.5 ms
  until QEMU listens) -> greeting -> qmp_capabilities answered.

Not timed: TerminateMachine / `quit` between repetitions. Order alternates
every repetition. Target: ours median <= 1.2 x raw median.

Run: .venv/bin/python bench/create.py   (as root; under a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import Env, bench_main, document, ms, print_rows, row

from tests.integration.harness import Client, guest_options

CONFIGS = {
    "4 ports": {"spares": 4, "nvme": 0},
    "14 ports + 20 nvme": {"spares": 14, "nvme": 20},
    # Past 120 ports: 6 PCIe switches of 30 downstream ports behind root ports.
    "180 spares (switches)": {"spares": 180, "nvme": 0},
}
TARGET = 1.2


def options(env: Env, spares: int, nvme: int) -> dict[str, Any]:
    extra = ["-S"]
    for j in range(nvme):
        extra += ["-device", f"nvme,serial=bench{j}"]
    return guest_options(env.guest, hotplug_spares=spares, qemu_extra=extra)


async def raw_argv(env: Env, client: Client, name: str, opts: dict[str, Any], rawdir: Path) -> list[str]:
    """The daemon's argv for `opts`, made runnable without the daemon."""
    path = await client.create(name, **opts)
    try:
        leader = await client.prop(path, "Leader")
        mdir = env.machine_dir(name)
        argv = (mdir / "argv").read_text().splitlines()
        out = []
        for prev, arg in zip(["", *argv[:-1]], argv, strict=True):
            if prev == "-add-fd":
                # The fd is opened anew for every exec (raw_start); its opaque names the file.
                fields = dict(field.split("=", 1) for field in arg.split(",", 2))
                arg = f"fd={{}},set={fields['set']},opaque={fields['opaque']}"
            elif m := re.match(r"socket,id=(\w+),fd=\d+,", arg):
                # The daemon's listening sockets (QMP, the serial console) become paths.
                arg = arg.replace(m[0], f"socket,id={m[1]},path={rawdir / m[1]}.sock,", 1)
            elif arg.startswith("/proc/self/fd/"):
                arg = os.readlink(f"/proc/{leader}/fd/{arg.rsplit('/', 1)[1]}")
            elif "/proc/self/fd/" in arg:
                raise RuntimeError(f"unexpected fd path inside an argument: {arg!r}")
            out.append(arg.replace(str(mdir), str(rawdir)))
        return out
    finally:
        await client.call("TerminateMachine", "s", [name])


def raw_start(argv: list[str], rawdir: Path) -> tuple[subprocess.Popen[bytes], socket.socket, int]:
    """exec -> QMP connect -> greeting -> qmp_capabilities answered; (process, monitor, ns)."""
    sock_path = rawdir / "qmp.sock"
    sock_path.unlink(missing_ok=True)
    log = open(rawdir / "qemu.log", "ab")  # noqa: SIM115 - handed to the child, closed below
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        t0 = time.perf_counter_ns()
        # The console log, as the daemon opens it for QEMU's -add-fd (the only fdset of these machines).
        fds = [
            os.open(arg.rsplit("opaque=", 1)[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            for prev, arg in zip(["", *argv[:-1]], argv, strict=True)
            if prev == "-add-fd"
        ]
        it = iter(fds)
        argv = [
            arg.format(next(it)) if prev == "-add-fd" else arg for prev, arg in zip(["", *argv[:-1]], argv, strict=True)
        ]
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, pass_fds=fds
            )
        finally:
            for fd in fds:
                os.close(fd)
        while True:
            try:
                sock.connect(str(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"raw QEMU exited with {proc.returncode}: {(rawdir / 'qemu.log').read_text()[-500:]}"
                    ) from None
                time.sleep(0.0005)
        with sock.makefile("rb") as reader:
            greeting = json.loads(reader.readline())
            if "QMP" not in greeting:
                raise RuntimeError(f"no QMP greeting: {greeting}")
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            while "return" not in (reply := json.loads(reader.readline())):
                if "error" in reply:
                    raise RuntimeError(f"qmp_capabilities failed: {reply}")
        took = time.perf_counter_ns() - t0
        return proc, sock, took
    except BaseException:
        sock.close()
        raise
    finally:
        log.close()


def raw_stop(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    """quit, and wait for its answer: QEMU drops a command whose connection closes under it."""
    try:
        sock.sendall(b'{"execute": "quit"}\n')
        with sock.makefile("rb") as reader:
            while (line := reader.readline()) and b'"return"' not in line:
                pass
    except OSError:
        pass
    finally:
        sock.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def raw_once(argv: list[str], rawdir: Path) -> int:
    proc = None
    sock = None
    try:
        proc, sock, took = raw_start(argv, rawdir)
        return took
    finally:
        if proc is not None and sock is not None:
            raw_stop(proc, sock)
        elif proc is not None:
            proc.kill()
            proc.wait()


async def run(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    client = await Client.connect()
    rows = []
    detail: dict[str, Any] = {}
    try:
        for c, (label, cfg) in enumerate(CONFIGS.items()):
            opts = options(env, cfg["spares"], cfg["nvme"])
            rawdir = env.workdir / f"raw{c}"
            rawdir.mkdir()
            argv = await raw_argv(env, client, f"probe{c}", opts, rawdir)
            samples: dict[str, list[int]] = {"ours": [], "raw": []}

            async def ours(i: int, c: int = c, opts: dict[str, Any] = opts) -> int:
                name = f"c{c}-{i}"
                t0 = time.perf_counter_ns()
                await client.create(name, **opts)
                took = time.perf_counter_ns() - t0
                await client.call("TerminateMachine", "s", [name])
                return took

            async def raw(i: int, argv: list[str] = argv, rawdir: Path = rawdir) -> int:
                return await asyncio.to_thread(raw_once, argv, rawdir)

            for i in range(args.warmup + args.reps):
                order = (("ours", ours), ("raw", raw)) if i % 2 == 0 else (("raw", raw), ("ours", ours))
                for series, op in order:
                    await asyncio.sleep(args.settle)
                    took = await op(i)
                    if i >= args.warmup:
                        samples[series].append(took)
            o, r = ms(samples["ours"]), ms(samples["raw"])
            rows.append(
                row(
                    f"Create, {label} (-S): CreateMachine vs exec of the same QEMU argv",
                    "ms",
                    o,
                    r,
                    "raw: exec identical argv -> QMP connect -> qmp_capabilities answered",
                    f"<= {TARGET}x",
                    o["median"] <= TARGET * r["median"],
                    f"D-Bus + daemon cost {o['median'] - r['median']:+.1f} ms; {len(argv)} QEMU args",
                    target_ratio=TARGET,
                )
            )
            detail[label] = {"argv": argv, "spares": cfg["spares"], "nvme": cfg["nvme"]}
    finally:
        await client.terminate_all()
        client.close()
    return document(
        "create",
        rows,
        reps=args.reps,
        warmup_reps_not_counted=args.warmup,
        settle_s=args.settle,
        paused="-S in qemu_extra on both sides: guest CPUs never run",
        configs=detail,
    )


def report(r: dict[str, Any], out: Path) -> None:
    print(
        f"create: {r['reps']} reps per series (+{r['warmup_reps_not_counted']} warm-up not counted), order alternating, "
        f"{r['settle_s']:g} s idle before each; QEMU {r['host']['qemu']} accel=tcg -S, {r['host']['cpus']} host CPUs; "
        f"{r['duration_s']} s in all"
    )
    print_rows(r["rows"])
    print(f"  figures written to {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=10, help="counted repetitions per series (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="leading repetitions not counted (default 1)")
    parser.add_argument("--settle", type=float, default=0.2, help="idle seconds before each timed create (default 0.2)")
    return bench_main("create", parser, run, report, default_timeout=300)


if __name__ == "__main__":
    sys.exit(main())
