"""Run every benchmark (`make bench`): print the figures, write bench/results/latest.md and latest.png.

Each benchmark runs as its own process with its own private bus, daemon and
machines, all torn down when it ends, also when it breaks (see
bench/README.md). Every figure is printed and tabled as ours vs its
baseline measured in the same run (median, min-max, ratio of the medians)
with the issue's target and PASS / MISS (info where the issue sets none,
n/a where the baseline cannot run here, with the reason).

Exit status: 0 when every benchmark ran (targets met or not), 1 when one
broke, 130 when interrupted (Ctrl-C / SIGTERM; the running benchmark tears
down first).
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from common import RESULTS, fmt, host_info, other_qemus

HERE = Path(__file__).resolve().parent
# name -> hard limit in seconds (a backstop: each benchmark has its own, shorter, --timeout).
BENCHMARKS = {
    "create": 360,
    "hotplug": 360,
    "hotplug_share": 360,
    "hotplug_net": 300,
    "weight": 480,
    "throughput": 480,
    "versus_libvirt": 460,
    "restart": 240,
    "hotplug-180": 480,
}
# Benchmarks that are another one run with other arguments: name -> (script, arguments).
VARIANTS = {
    # AddDrive/RemoveDrive on a machine whose spares sit behind PCIe switches; 20 reps, as
    # its median over 10 swung between 1.35x and 1.65x on the same idle host.
    "hotplug-180": ("hotplug", ["--spares", "180", "--reps", "20", "--timeout", "400"]),
}
BUDGET_S = 15 * 60
CURRENT: list[subprocess.Popen[bytes]] = []


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Pass it on to the running benchmark (it tears down), then stop like Ctrl-C.
    for proc in CURRENT:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    raise KeyboardInterrupt


def run_one(name: str, limit: float) -> int:
    script, extra = VARIANTS.get(name, (name, []))
    proc = subprocess.Popen(
        [sys.executable, str(HERE / f"{script}.py"), *extra, "--json", str(RESULTS / f"{name}.json")]
    )
    CURRENT.append(proc)
    try:
        return proc.wait(limit)
    except subprocess.TimeoutExpired:
        print(f"run.py: {name} still runs after {limit:g} s; stopping it", file=sys.stderr, flush=True)
        proc.terminate()
        try:
            return proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        CURRENT.remove(proc)


def wait_teardown() -> None:
    """After Ctrl-C the benchmark got SIGINT too: give it time to tear down."""
    for proc in list(CURRENT):
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def broken_row(name: str, why: str) -> dict[str, Any]:
    return {
        "figure": f"{name} (benchmark broke)",
        "unit": "",
        "ours": None,
        "baseline": None,
        "baseline_label": "-",
        "ratio": None,
        "target": "-",
        "target_ratio": None,
        "verdict": "ERROR",
        "note": why,
    }


def cell(s: dict[str, Any] | None, unit: str) -> str:
    return "n/a" if s is None else fmt(s, unit)


def markdown(runs: list[dict[str, Any]], info: dict[str, Any]) -> str:
    rows = [r for run in runs for r in run["rows"]]
    lines = [
        "# vmspawnd benchmarks: latest run",
        "",
        f"`make bench` (`.venv/bin/python bench/run.py`), {info['when']}. Host: {info['host']['cpus']} CPUs, "
        f"kernel {info['host']['kernel']}, QEMU {info['host']['qemu']} (accel=tcg), Python {info['host']['python']}"
        + (f", libvirt {info['libvirt']}" if info.get("libvirt") else "")
        + ".",
        "",
        f"Whole run: {info['total_s'] / 60:.1f} min ({info['total_s']:.0f} s; budget {BUDGET_S // 60} min: "
        f"{'within' if info['total_s'] <= BUDGET_S else 'OVER'}). QEMU processes of others on the host: "
        f"{info['others_start']} at the start, {info['others_end']} at the end (their load shifts every figure; "
        "each comparison is interleaved in the same run, so the ratios stay fair).",
        "",
        "ours / baseline: median (min-max) over the counted repetitions; ratio = ours median / baseline median.",
        "",
        "| figure | ours | baseline | ratio | target | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(
            f"| {r['figure']} | {cell(r['ours'], r['unit'])} | {cell(r['baseline'], r['unit'])} | {ratio} "
            f"| {r['target']} | {r['verdict']} |"
        )
    lines += ["", "## What each baseline is", ""]
    for r in rows:
        n = "" if r["ours"] is None else f" (n = {r['ours']['n']})"
        lines.append(
            f"- **{r['figure']}**{n}: baseline: {r['baseline_label']}." + (f" {r['note']}." if r["note"] else "")
        )
    lines += ["", "## Benchmarks", "", "| benchmark | status | time |", "|---|---|---|"]
    for run in runs:
        lines.append(f"| `bench/{run['name']}.py` | {run['status']} | {run['seconds']:.0f} s |")
    lines += ["", "Method and caveats: `bench/README.md`. Raw figures: `bench/results/<benchmark>.json`.", ""]
    return "\n".join(lines)


def chart(runs: list[dict[str, Any]], info: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for run in runs for r in run["rows"] if r["ratio"] is not None]
    colors = {"PASS": "tab:green", "MISS": "tab:red", "info": "tab:gray"}
    fig, ax = plt.subplots(figsize=(13, 0.55 * len(rows) + 2.2))
    for y, r in enumerate(rows):
        base = r["baseline"]["median"]
        lo, hi = r["ours"]["min"] / base, r["ours"]["max"] / base
        # From 1.0 (on par with the baseline) to the ratio: left is ours smaller, right ours larger.
        ax.barh(y, r["ratio"] - 1.0, left=1.0, color=colors.get(r["verdict"], "tab:blue"), height=0.6)
        ax.plot([lo, hi], [y, y], color="black", linewidth=1)
        if r["target_ratio"]:
            ax.plot([r["target_ratio"]] * 2, [y - 0.38, y + 0.38], color="black", linewidth=2.5)
        right = max(hi, r["ratio"], r["target_ratio"] or 0, 1.0)
        ax.text(right * 1.06, y, f"{r['ratio']:.2f}x {r['verdict']}", va="center", fontsize=8)
    ax.axvline(1.0, color="tab:blue", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), [r["figure"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(
        "ours / baseline (ratio of the medians, log scale; 1 = on par)\n"
        "whisker: ours min-max / baseline median; black tick: target limit; green PASS, red MISS, grey no target"
    )
    ax.set_title(f"vmspawnd vs baselines, {info['when']} ({info['host']['cpus']} CPUs, QEMU {info['host']['qemu']})")
    lo = min(0.1, *(r["ours"]["min"] / r["baseline"]["median"] for r in rows)) if rows else 0.1
    hi = max(3.0, *(r["ours"]["max"] / r["baseline"]["median"] * 1.8 for r in rows)) if rows else 3.0
    ax.set_xlim(lo * 0.8, hi)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only this one (repeatable)")
    args = parser.parse_args()
    names = args.only or list(BENCHMARKS)
    try:
        import matplotlib  # noqa: F401

        have_matplotlib = True
    except ImportError:
        have_matplotlib = False
        print(
            "run.py: matplotlib is missing, so bench/results/latest.png cannot be drawn "
            "(install it: .venv/bin/pip install matplotlib, or the project's 'bench' extra); "
            "the benchmarks and latest.md run anyway",
            file=sys.stderr,
            flush=True,
        )
    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.monotonic()
    info: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": host_info(),
        "others_start": other_qemus(),
    }
    runs = []
    try:
        for name in names:
            out = RESULTS / f"{name}.json"
            out.unlink(missing_ok=True)
            print(f"=== {name} ===", flush=True)
            t0 = time.monotonic()
            code = run_one(name, BENCHMARKS[name])
            seconds = time.monotonic() - t0
            if code == 130:
                raise KeyboardInterrupt
            if code == 0 and out.exists():
                result = json.loads(out.read_text())
                rows = result.get("rows") or [
                    broken_row(name, "its JSON has no table rows; see its output above")
                    | {"figure": f"{name} (see its own output)", "verdict": "info"}
                ]
                status = "ran" if "unavailable" not in result else f"ran; baseline n/a: {result['unavailable']}"
                if result.get("libvirt"):
                    info["libvirt"] = result["libvirt"]
            else:
                rows = [broken_row(name, f"exit status {code}; see its output above")]
                status = f"BROKE (exit status {code})"
            runs.append({"name": name, "rows": rows, "status": status, "seconds": seconds})
            print(f"=== {name}: {status}, {seconds:.0f} s ===\n", flush=True)
    except KeyboardInterrupt:
        wait_teardown()
        print("run.py: interrupted; the running benchmark has torn down", file=sys.stderr)
        return 130
    info["total_s"] = time.monotonic() - started
    info["others_end"] = other_qemus()

    RESULTS.mkdir(parents=True, exist_ok=True)
    md = RESULTS / "latest.md"
    md.write_text(markdown(runs, info))
    print(md.read_text())
    if have_matplotlib:
        chart(runs, info, RESULTS / "latest.png")
        print(f"chart: {RESULTS / 'latest.png'}")
    else:
        print("chart: not drawn (matplotlib is missing, see above)")
    verdict = "within" if info["total_s"] <= BUDGET_S else "OVER"
    print(f"whole run: {info['total_s']:.0f} s ({verdict} the {BUDGET_S // 60}-minute budget); table: {md}")
    broken = [run["name"] for run in runs if run["status"].startswith("BROKE")]
    if broken:
        print(f"broken: {', '.join(broken)}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
