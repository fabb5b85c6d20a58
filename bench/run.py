"""Run every benchmark (`make bench`); exits non-zero if one of them broke."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("hotplug.py",)


def main() -> int:
    failed = [name for name in BENCHMARKS if subprocess.run([sys.executable, str(HERE / name)]).returncode != 0]
    if failed:
        print(f"broken: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
