"""Weight: the daemon's memory (RSS) and its CPU time while idle, with 0, 1 and 20 machines.

The machines are paused (`-S` in qemu_extra) with 64 MiB of memory, so 20 of
them fit a small host and cost it little CPU; the daemon itself does not
care whether a guest runs.

- RSS (VmRSS of /proc/PID/status), sampled 10 times 0.2 s apart: idle right
  after start (no machine), with 1 machine, with 20 machines.
  Targets: idle <= 40 MiB; each machine adds <= 1 MiB.
- CPU time (utime+stime of /proc/PID/stat, all threads) over 60 s of idling
  with 20 machines, against the same 60 s with 0 machines measured first
  (the baseline). Target ~0: at most 0.1 % of one CPU (60 ms in 60 s) with
  20 machines. Wake-ups (context switches of all the daemon's threads) are
  counted over the same windows: a daemon that polls wakes up at least once
  per period, one that does not stays at ~0 however many machines it runs.

Nothing talks to the daemon during the idle windows.

Run: .venv/bin/python bench/weight.py   (as root; about 2.5 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    CLK_TCK,
    Env,
    MiB,
    bench_main,
    cpu_ms,
    cpu_ns_precise,
    document,
    print_rows,
    row,
    rss_mib,
    stats,
    wakeups,
)

from tests.integration.harness import Client, guest_options

IDLE_LIMIT_MIB = 40.0
PER_MACHINE_MIB = 1.0
# ~0: 0.1 % of one CPU, i.e. 1 ms of CPU time per second of idling.
CPU_LIMIT_MS_PER_S = 1.0


async def rss_samples(pid: int, n: int = 10, every: float = 0.2) -> dict[str, Any]:
    values = []
    for _ in range(n):
        values.append(rss_mib(pid))
        await asyncio.sleep(every)
    return stats(values)


async def idle_window(pid: int, seconds: float) -> dict[str, float]:
    cpu0, ns0, wake0 = cpu_ms(pid), cpu_ns_precise(pid), wakeups(pid)
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - t0
    return {
        "seconds": round(elapsed, 2),
        "cpu_ms": cpu_ms(pid) - cpu0,
        "cpu_ms_schedstat": round((cpu_ns_precise(pid) - ns0) / 1e6, 3),
        "wakeups": wakeups(pid) - wake0,
    }


async def run(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    pid = env.pid
    client = await Client.connect()
    opts = guest_options(env.guest, memory=64 * MiB, qemu_extra=["-S"])
    try:
        await client.names()  # one harmless call: the daemon has answered the bus once
        await asyncio.sleep(args.settle)
        rss0 = await rss_samples(pid)
        print(f"weight: RSS idle {rss0['median']:.1f} MiB; idling {args.window:g} s with 0 machines", flush=True)
        idle0 = await idle_window(pid, args.window)
        await client.create("vm0", **opts)
        await asyncio.sleep(args.settle)
        rss1 = await rss_samples(pid)
        for i in range(1, args.machines):
            await client.create(f"vm{i}", **opts)
        if len(await client.names()) != args.machines:
            raise RuntimeError(f"expected {args.machines} machines, the daemon lists {await client.names()}")
        await asyncio.sleep(args.settle)
        rssn = await rss_samples(pid)
        print(
            f"weight: RSS with {args.machines} machines {rssn['median']:.1f} MiB; idling {args.window:g} s",
            flush=True,
        )
        idlen = await idle_window(pid, args.window)
    finally:
        await client.terminate_all()
        client.close()

    n = args.machines
    limit = CPU_LIMIT_MS_PER_S * args.window
    per1 = rss1["median"] - rss0["median"]
    pern = (rssn["median"] - rss0["median"]) / n
    cpu = stats([idlen["cpu_ms"]], 1)
    cpu0 = stats([idle0["cpu_ms"]], 1)
    wake = stats([idlen["wakeups"]], 0)
    wake0 = stats([idle0["wakeups"]], 0)
    rows = [
        row(
            "Daemon RSS, idle (0 machines)",
            "MiB",
            rss0,
            None,
            "- (absolute target)",
            f"<= {IDLE_LIMIT_MIB:g} MiB",
            rss0["median"] <= IDLE_LIMIT_MIB,
        ),
        row(
            "Daemon RSS, 1 machine",
            "MiB",
            rss1,
            rss0,
            "the same daemon idle, 0 machines",
            f"<= idle + {PER_MACHINE_MIB:g} MiB",
            per1 <= PER_MACHINE_MIB,
            f"{per1:+.2f} MiB for the first machine",
            target_ratio=round((rss0["median"] + PER_MACHINE_MIB) / rss0["median"], 3),
        ),
        row(
            f"Daemon RSS, {n} machines",
            "MiB",
            rssn,
            rss0,
            "the same daemon idle, 0 machines",
            f"<= idle + {n} x {PER_MACHINE_MIB:g} MiB",
            pern <= PER_MACHINE_MIB,
            f"{pern:+.3f} MiB per machine ({rssn['median'] - rss0['median']:+.2f} MiB for {n})",
            target_ratio=round((rss0["median"] + n * PER_MACHINE_MIB) / rss0["median"], 3),
        ),
        row(
            f"Daemon CPU time in {args.window:g} s idle, {n} machines",
            "ms",
            cpu,
            cpu0,
            f"the same {args.window:g} s with 0 machines",
            f"~0: <= {limit:g} ms (0.1 % of a CPU)",
            idlen["cpu_ms"] <= limit,
            f"utime+stime, {1000 / CLK_TCK:g} ms ticks; schedstat: {idlen['cpu_ms_schedstat']:.2f} ms "
            f"(0 machines: {idle0['cpu_ms_schedstat']:.2f} ms)",
        ),
        row(
            f"Daemon wake-ups in {args.window:g} s idle, {n} machines",
            "wakeups",
            wake,
            wake0,
            f"the same {args.window:g} s with 0 machines",
            "no polling: <= 0-machine count + 5",
            idlen["wakeups"] <= idle0["wakeups"] + 5,
            "context switches of all daemon threads",
        ),
    ]
    return document(
        "weight",
        rows,
        machines=n,
        machine="tiny guest, -S (paused), 64 MiB, accel=tcg",
        window_s=args.window,
        idle_0=idle0,
        idle_n=idlen,
        rss_mib={"idle": rss0, "1": rss1, str(n): rssn},
    )


def report(r: dict[str, Any], out: Path) -> None:
    print(f"weight: {r['machines']} machines ({r['machine']}); {r['duration_s']} s in all")
    print_rows(r["rows"])
    print(f"  figures written to {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--machines", type=int, default=20, help="machines for the loaded figures (default 20)")
    parser.add_argument("--window", type=float, default=60, help="idle window in seconds (default 60)")
    parser.add_argument("--settle", type=float, default=2, help="seconds to wait before sampling (default 2)")
    return bench_main("weight", parser, run, report, default_timeout=420)


if __name__ == "__main__":
    sys.exit(main())
