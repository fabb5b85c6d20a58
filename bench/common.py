"""Shared pieces for the benchmarks: a private bus, the daemon, the tiny guest, figures.

Everything is real, as in the integration tests (whose harness this reuses):
a private system-style dbus-daemon with the project's policy, vmspawnd as a
process, QEMU booting the tiny guest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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


@dataclass
class Env:
    workdir: Path
    daemon: Daemon
    guest: tinyguest.Guest

    @property
    def log(self) -> Path:
        return self.daemon.log


@contextlib.contextmanager
def environment() -> Iterator[Env]:
    """Tiny guest, private bus and a fresh vmspawnd; all of it gone afterwards.

    Teardown runs on any exit (errors, Ctrl-C): the daemon gets SIGTERM (then
    SIGKILL), any QEMU still running from this run's runtime dir is killed
    by pid, the bus stops and the work dir is removed.
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
        raise
    finally:
        if daemon.proc is not None:
            proc = daemon.proc
            try:
                daemon.stop()
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in qemu_pids(str(workdir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if bus is not None:
            bus.terminate()
            bus.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


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
