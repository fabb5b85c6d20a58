"""What the container tests do inside the container: systemctl, machinectl, a booted guest."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.harness import Client, guest_options, wait_console

from .conftest import tinyguest, tool

UNIT = "vmspawnd.service"
DRIVES = "/var/lib/vmspawnd-test"


def show(box: tool.Container, unit: str, *props: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    """Poll systemd's view of the world (nothing signals a restart to an outside client)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.1)


def restarted(box: tool.Container, before: dict[str, str]) -> Callable[[], bool]:
    def check() -> bool:
        now = show(box, UNIT, "MainPID", "ActiveState", "NRestarts")
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])

    return check


def console(box: tool.Container, path: str) -> Path:
    return Path(f"/proc/{box.leader}/root{path}")


async def boot(box: tool.Container, client: Client, guest: tinyguest.Guest, name: str, **extra: object) -> str:
    path = await client.create(name, **guest_options(guest, **({"memory": 128 << 20} | extra)))
    await wait_console(console(box, await client.prop(path, "ConsoleLog")), r"VMSPAWN-GUEST-READY", timeout=60)
    return path


def drive_file(box: tool.Container, name: str) -> str:
    target = box.path(f"{DRIVES}/{name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"\0" * (1 << 20))
    return f"{DRIVES}/{name}"


def show_machine(box: tool.Container, name: str) -> dict[str, str]:
    out = box.run(["machinectl", "show", name]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(box: tool.Container, *match: str) -> str:
    return box.run(["journalctl", "--no-pager", "-o", "cat", *match]).stdout
