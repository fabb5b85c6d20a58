"""Start-up, signals and readiness."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from . import __version__, systemd
from .bus.service import BusService, NameTaken
from .manager import Manager, default_runtime_dir

log = logging.getLogger("vmspawnd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vmspawnd", description="Run QEMU virtual machines, served on D-Bus.")
    parser.add_argument("--user", action="store_true", help="use the session bus instead of the system bus")
    parser.add_argument(
        "--runtime-dir", type=Path, help="state directory (default: $RUNTIME_DIRECTORY or /run/vmspawnd)"
    )
    parser.add_argument(
        "--stop-machines-on-exit",
        action="store_true",
        help="power machines off when the daemon stops (default: they keep running and are re-attached)",
    )
    parser.add_argument(
        "--stop-timeout", type=float, default=30.0, help="seconds a guest gets to power off before QEMU is stopped"
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    parser.add_argument("--version", action="version", version=f"vmspawnd {__version__}")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    runtime_dir = args.runtime_dir or default_runtime_dir(args.user)
    manager = Manager(runtime_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await manager.recover()
    try:
        service = await BusService.connect(manager, args.user)
    except (OSError, ValueError) as e:
        variable = "DBUS_SESSION_BUS_ADDRESS" if args.user else "DBUS_SYSTEM_BUS_ADDRESS"
        log.error("cannot connect to the %s bus (%s=%s): %s", "session" if args.user else "system", variable,
                  os.environ.get(variable, "unset"), e)  # fmt: skip
        await manager.close()
        return 1
    try:
        await service.start()
    except NameTaken as e:
        log.error("%s", e)
        service.close()
        return 1
    systemd.notify("READY=1", f"STATUS={len(manager.machines)} machines running")
    log.info(
        "vmspawnd %s serving on the %s bus, state in %s", __version__, "session" if args.user else "system", runtime_dir
    )
    await stop.wait()
    systemd.notify("STOPPING=1")
    if args.stop_machines_on_exit:
        log.info("stopping; powering off %d machines", len(manager.machines))
        await manager.power_off_all(args.stop_timeout)
    else:
        log.info("stopping; %d machines keep running and are taken back on the next start", len(manager.machines))
    await manager.close()
    await service.machined.flush()
    service.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    systemd.setup_logging(args.verbose)
    sys.exit(asyncio.run(serve(args)))
