"""Start-up, signals and readiness."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path

from . import __version__, config, systemd, units
from .bus.service import BusService, NameTaken
from .cgroup import Cgroups
from .manager import Manager, default_runtime_dir
from .model import MachineState

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
    parser.add_argument(
        "--config", type=Path, default=config.DEFAULT_PATH, help=f"configuration file (default: {config.DEFAULT_PATH})"
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    parser.add_argument("--version", action="version", version=f"vmspawnd {__version__}")
    return parser.parse_args(argv)


LOCK = "lock"


class RuntimeDirBusy(Exception):
    """Another vmspawnd serves this runtime dir."""


def lock_runtime_dir(runtime_dir: Path) -> int:
    """flock on <runtime dir>/lock, held for the daemon's life; its pid is written in.

    Two daemons on one directory would each take the other's machines for
    dead and clean them up.
    """
    runtime_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(runtime_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RuntimeDirBusy(
            f"another vmspawnd (pid {holder}) is serving {runtime_dir}; stop it first, or give this one "
            "its own --runtime-dir"
        ) from None
    os.ftruncate(fd, 0)
    # The pid is for the message above only: a full disk must not stop the daemon.
    with contextlib.suppress(OSError):
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def serve(args: argparse.Namespace) -> int:
    runtime_dir = args.runtime_dir or default_runtime_dir(args.user)
    try:
        lock = lock_runtime_dir(runtime_dir)
    except (RuntimeDirBusy, OSError) as e:
        log.error("%s", e)
        return 1
    try:
        return await _serve(args, runtime_dir)
    finally:
        os.close(lock)


async def _serve(args: argparse.Namespace, runtime_dir: Path) -> int:
    try:
        conf = config.load(args.config)
    except config.ConfigError as e:
        log.error("bad configuration, not starting: %s", e)
        return 1
    sd = units.Systemd() if units.running() else None
    manager = Manager(runtime_dir, conf, Cgroups(conf, systemd=sd), sd)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        service = await BusService.connect(manager, args.user)
    except (OSError, ValueError) as e:
        variable = "DBUS_SESSION_BUS_ADDRESS" if args.user else "DBUS_SYSTEM_BUS_ADDRESS"
        log.error("cannot connect to the %s bus (%s=%s): %s", "session" if args.user else "system", variable,
                  os.environ.get(variable, "unset"), e)  # fmt: skip
        return 1
    # The name first: a second daemon on the bus fails at once, before it
    # touches any machine; machines are published as they are taken back.
    try:
        await service.start()
    except NameTaken as e:
        log.error("%s", e)
        service.close()
        return 1
    started = loop.time()
    await manager.recover()
    unmanaged = sum(m.state is MachineState.UNMANAGED for m in manager.machines.values())
    systemd.notify("READY=1", f"STATUS={manager.status()}")
    log.info(
        "vmspawnd %s serving on the %s bus, state in %s; recovered %d machines in %.2f s (%d unmanaged)",
        __version__, "session" if args.user else "system", runtime_dir, len(manager.machines),
        loop.time() - started, unmanaged,
    )  # fmt: skip
    stopped = loop.create_task(stop.wait())
    lost = loop.create_task(service.wait_for_disconnect())
    await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if lost.done():
        # Nobody can reach us: stop feeding the watchdog and exit non-zero so
        # Restart= brings a daemon back that takes the name and the machines.
        systemd.stop_watchdog()
        log.error("lost the bus connection (%s); exiting, machines keep running", service.disconnect_reason(lost))
        await manager.close()
        return 1
    lost.cancel()
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
