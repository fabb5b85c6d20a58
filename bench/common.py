"""Shared pieces for the benchmarks: a private bus, the daemon, the tiny guest, figures.

Everything is real, as in the integration tests (whose harness this reuses):
a private system-style dbus-daemon with the project's policy, vmspawnd as a
process, QEMU booting the tiny guest.

Every benchmark writes `bench/results/<name>.json` with a `rows` list, one
row per figure, which `bench/run.py` turns into `latest.md` and `latest.png`:

    {"figure": str, "unit": str, "ours": stats | None, "baseline": stats | None,
     "baseline_label": str, "ratio": float | None, "target": str,
     "verdict": "PASS" | "MISS" | "info" | "n/a", "note": str,
     "target_ratio": float | None}   # the ratio the target allows, for the chart

`stats` is {"n", "median", "min", "max", "samples"} in `unit`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
for _p in (ROOT / "tools", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import testbus  # noqa: E402
import tinyguest  # noqa: E402

from tests.integration.harness import Daemon, qemu_pids  # noqa: E402

MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Env:
    workdir: Path
    daemon: Daemon
    guest: tinyguest.Guest

    @property
    def log(self) -> Path:
        return self.daemon.log

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def machine_dir(self, name: str) -> Path:
        return self.daemon.runtime_dir / "machines" / name


@contextlib.contextmanager
def environment(keep_log: Path | None = None) -> Iterator[Env]:
    """Tiny guest, private bus and a fresh vmspawnd; all of it gone afterwards.

    Teardown runs on any exit (errors, Ctrl-C): the daemon gets SIGTERM (then
    SIGKILL), any QEMU still running from this run's work dir is killed
    by pid, the bus stops and the work dir is removed. On an error the
    daemon's log is copied to `keep_log` first.
    """
    guest = tinyguest.build(tinyguest.default_cache_dir())
    # Short and under /tmp: QMP socket paths must fit in sun_path.
    workdir = Path(tempfile.mkdtemp(prefix="vmspawnd-bench-", dir="/tmp"))
    workdir.chmod(0o755)
    bus: subprocess.Popen[bytes] | None = None
    daemon = Daemon(workdir / "run", workdir / "daemon.log")
    try:
        bus, address = testbus.start(workdir / "bus")
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
        daemon.start()
        yield Env(workdir, daemon, guest)
    except Exception:
        tail = daemon.log.read_text(errors="replace").splitlines()[-30:] if daemon.log.exists() else []
        if tail:
            print(f"--- last lines of {daemon.log}:", *tail, "---", sep="\n", file=sys.stderr)
        if keep_log is not None and daemon.log.exists():
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(daemon.log, keep_log)
            print(f"the whole daemon log is kept in {keep_log}", file=sys.stderr)
        raise
    finally:
        if daemon.proc is not None:
            proc = daemon.proc
            try:
                daemon.stop()
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        kill_qemus(workdir)
        if bus is not None:
            bus.terminate()
            bus.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def kill_qemus(marker: Path) -> None:
    """SIGKILL every QEMU whose command line mentions `marker` (this run's work dir)."""
    for pid in qemu_pids(str(marker)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- figures -----------------------------------------------------------------


def figures(samples_ns: list[int]) -> dict[str, Any]:
    """median/min/max in ms, plus every sample (ms, in run order)."""
    ms = [s / 1e6 for s in samples_ns]
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
        "samples_ms": [round(v, 3) for v in ms],
    }


def stats(values: list[float], digits: int = 3) -> dict[str, Any]:
    """median/min/max of `values` (any unit), plus every sample in run order."""
    return {
        "n": len(values),
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "samples": [round(v, digits) for v in values],
    }


def ms(samples_ns: list[int]) -> dict[str, Any]:
    return stats([s / 1e6 for s in samples_ns])


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): a value that was measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def row(
    figure: str,
    unit: str,
    ours: dict[str, Any] | None,
    baseline: dict[str, Any] | None,
    baseline_label: str,
    target: str = "-",
    passed: bool | None = None,
    note: str = "",
    target_ratio: float | None = None,
) -> dict[str, Any]:
    """One line of the results table; verdict 'info' where the issue sets no target."""
    ratio = None
    if ours is not None and baseline is not None and baseline["median"]:
        ratio = round(ours["median"] / baseline["median"], 3)
    return {
        "figure": figure,
        "unit": unit,
        "ours": ours,
        "baseline": baseline,
        "baseline_label": baseline_label,
        "ratio": ratio,
        "target": target,
        "target_ratio": target_ratio,
        "verdict": "info" if passed is None else "PASS" if passed else "MISS",
        "note": note,
    }


def na_row(figure: str, unit: str, baseline_label: str, target: str, why: str) -> dict[str, Any]:
    return row(figure, unit, None, None, baseline_label, target, note=why) | {"verdict": "n/a"}


def fmt(s: dict[str, Any] | None, unit: str) -> str:
    """`median (min-max) unit` for a stats dict."""
    if s is None:
        return "n/a"
    digits = 1 if unit in ("ms", "MiB", "req/s") else 0 if unit in ("wakeups",) else 2
    d = f".{digits}f"
    if s["n"] == 1:
        return f"{s['median']:{d}} {unit}"
    return f"{s['median']:{d}} ({s['min']:{d}}-{s['max']:{d}}) {unit}"


def print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"  {r['figure']}")
        print(f"      ours     {fmt(r['ours'], r['unit'])}")
        print(f"      baseline {fmt(r['baseline'], r['unit'])}  [{r['baseline_label']}]")
        print(f"      ratio {ratio}   target {r['target']}   -> {r['verdict']}")
        if r["note"]:
            print(f"      {r['note']}")


# -- host and process facts ----------------------------------------------------


def host_info() -> dict[str, Any]:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=10).stdout
        qemu = m.group(1) if (m := re.search(r"version (\S+)", out)) else "?"
    except (OSError, subprocess.TimeoutExpired):
        qemu = "?"
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu,
    }


def rss_mib(pid: int) -> float:
    """VmRSS of `pid` in MiB (from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_ms(pid: int) -> float:
    """utime + stime of `pid` (all threads) in ms, from /proc/PID/stat (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / CLK_TCK


def cpu_ns_precise(pid: int) -> int:
    """CPU time of all threads of `pid` in ns from /proc/PID/task/*/schedstat (0 if unavailable)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def wakeups(pid: int) -> int:
    """Context switches (voluntary + involuntary) of all threads of `pid`: each is a wake-up or preemption."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
    return total


def other_qemus(marker: str = "") -> int:
    """QEMU processes on the host not started by this run (noise for every figure)."""
    ours = set(qemu_pids(marker)) if marker else set()
    return len(set(qemu_pids("")) - ours)


class Console:
    """A guest's serial console log, polled at a few ms for timing (QEMU appends, nothing signals)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    async def wait(
        self, pattern: str, start: int, timeout: float = 30, poll: float = 0.002
    ) -> tuple[re.Match[str], int]:
        """(match, perf_counter_ns when it was first seen) for `pattern` after byte offset `start`."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        text = ""
        while True:
            try:
                with open(self.path, "rb") as f:
                    f.seek(start)
                    text = f.read().decode(errors="replace")
            except FileNotFoundError:
                text = ""
            seen = time.perf_counter_ns()
            if m := regex.search(text):
                return m, seen
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"console {self.path} never matched {pattern!r} in {timeout} s; it ends with:\n{text[-2000:]}"
                )
            await asyncio.sleep(poll)


def make_disk(path: Path, size: int = MiB) -> str:
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    return str(path)


# -- running one benchmark -------------------------------------------------------


def document(name: str, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "benchmark": name,
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": f".venv/bin/python bench/{name}.py",
        "host": host_info(),
        "rows": rows,
    } | extra


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def bench_main(
    name: str,
    parser: argparse.ArgumentParser,
    run: Callable[[Env, argparse.Namespace], Awaitable[dict[str, Any]]],
    report: Callable[[dict[str, Any], Path], None],
    default_timeout: float,
) -> int:
    """CLI entry: environment up, run under a deadline, JSON out, report; everything torn down.

    Exit 0: ran (targets met or not); 1: broke; 130: interrupted (Ctrl-C or SIGTERM).
    """
    parser.add_argument("--timeout", type=float, default=default_timeout, help="give up after this many seconds")
    parser.add_argument("--json", type=Path, default=RESULTS / f"{name}.json", help="where the figures go")
    args = parser.parse_args()

    async def main_async(env: Env) -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        async with asyncio.timeout(args.timeout):
            return await run(env, args)

    # SIGTERM stops the run like Ctrl-C: everything started is torn down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    try:
        with environment(keep_log=RESULTS / f"{name}.daemon.log") as env:
            try:
                result = asyncio.run(main_async(env))
            finally:
                # Closing the event loop reset SIGTERM to its default.
                signal.signal(signal.SIGTERM, signal.default_int_handler)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"{name}: interrupted; machines, daemon and bus are stopped", file=sys.stderr)
        return 130
    result["duration_s"] = round(time.monotonic() - started, 1)
    write_json(args.json, result)
    report(result, args.json)
    return 0
