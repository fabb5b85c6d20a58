"""Which -device types are PCI devices, as QEMU itself says.

Asked once per QEMU binary (path + mtime) and kept in memory: a hand list
of PCI types would rot as QEMU adds devices. The planner stays pure and
takes the answer (a model.DeviceTypes) as an input.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from typing import Any

from .cmdline import TCG
from .errors import QemuFailed
from .model import DeviceTypes

QUERY_TIMEOUT = 10.0
# -machine none: no board, no devices, just the type registry.
# TCG's split-wx: the unit's MemoryDenyWriteExecute= holds for this QEMU too.
QUERY_ARGS = ("-machine", "none", "-accel", TCG, "-nodefaults", "-display", "none", "-no-user-config")
_QMP_INPUT = "".join(
    json.dumps(c) + "\n"
    for c in (
        {"execute": "qmp_capabilities"},
        {"execute": "qom-list-types", "arguments": {"implements": "device", "abstract": False}, "id": "device"},
        {"execute": "qom-list-types", "arguments": {"implements": "pci-device", "abstract": False}, "id": "pci"},
        {
            "execute": "qom-list-types",
            "arguments": {"implements": "base-pci-bridge", "abstract": False},
            "id": "bridge",
        },
        {"execute": "quit"},
    )
).encode()
_ALIAS = re.compile(r'^name "([^"]+)".*, alias "([^"]+)"', re.M)

_cache: dict[tuple[str, int], DeviceTypes] = {}
_lock = asyncio.Lock()


def parse(qmp_output: str, device_help: str) -> DeviceTypes:
    """QMP replies (one JSON object a line) and `-device help` -> DeviceTypes."""
    replies: dict[str, list[Any]] = {}
    for line in qmp_output.splitlines():
        msg = json.loads(line)
        if isinstance(msg, dict) and msg.get("id") in ("device", "pci", "bridge"):
            replies[msg["id"]] = msg["return"]
    if set(replies) != {"device", "pci", "bridge"}:
        raise ValueError(f"QEMU answered {sorted(replies)} of qom-list-types device/pci/bridge")
    names = {k: frozenset(str(t["name"]) for t in v) for k, v in replies.items()}
    aliases = tuple(sorted((a, n) for n, a in _ALIAS.findall(device_help)))
    return DeviceTypes(known=names["device"], pci=names["pci"], bridges=names["bridge"], aliases=aliases)


async def _run(argv: list[str], stdin: bytes | None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(QUERY_TIMEOUT):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise QemuFailed(f"{argv[0]} did not list its device types within {QUERY_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        raise QemuFailed(f"{' '.join(argv)} failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


async def query(qemu: str) -> DeviceTypes:
    """Ask `qemu` for its device types (two short runs, ~0.1 s each)."""
    qmp, help_text = await asyncio.gather(
        _run([qemu, *QUERY_ARGS, "-qmp", "stdio"], _QMP_INPUT),
        _run([qemu, "-machine", "q35", "-accel", TCG, "-device", "help"], None),
    )
    try:
        return parse(qmp, help_text)
    except (ValueError, KeyError, TypeError) as e:
        raise QemuFailed(f"cannot read {qemu}'s device type list: {e}") from e


def _binary(qemu: str) -> tuple[str, int]:
    """(real path, mtime): a QEMU upgrade is a new binary to ask."""
    path = shutil.which(qemu)
    if path is None:
        raise QemuFailed(f"{qemu} is not installed: apt-get install qemu-system-x86")
    return os.path.realpath(path), os.stat(path).st_mtime_ns


async def device_types(qemu: str) -> DeviceTypes:
    """The cached answer for this binary; a new binary (other mtime) is asked again."""
    key = _binary(qemu)
    path = key[0]
    async with _lock:
        if key not in _cache:
            _cache[key] = await query(path)
        return _cache[key]


def to_json(types: DeviceTypes) -> dict[str, list[Any]]:
    return {
        "known": sorted(types.known),
        "pci": sorted(types.pci),
        "bridges": sorted(types.bridges),
        "aliases": [list(a) for a in types.aliases],
    }


def from_json(data: dict[str, list[Any]]) -> DeviceTypes:
    return DeviceTypes(
        known=frozenset(data["known"]),
        pci=frozenset(data["pci"]),
        bridges=frozenset(data["bridges"]),
        aliases=tuple((str(a), str(t)) for a, t in data["aliases"]),
    )


def main() -> int:
    """`python -m vmspawnd.pcitypes [QEMU]`: the list as JSON (tests/data snapshots)."""
    types = asyncio.run(query(sys.argv[1] if len(sys.argv) > 1 else "qemu-system-x86_64"))
    json.dump(to_json(types), sys.stdout, indent=0)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
