"""sd_notify, the watchdog and the journal, when they are there; harmless when not."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# journald's rule for a field name: upper-case letters, digits and '_', not
# starting with '_' (trusted fields) or a digit, at most 64 bytes. A log
# record's own attributes (msg, args, levelname, ...) never match, its
# `extra={"MACHINE": ..., "DRIVE": ...}` keys do.
_FIELD = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# Set by the handler itself; an `extra` of the same name is not sent twice.
_OWN_FIELDS = frozenset(
    {"MESSAGE", "PRIORITY", "LOGGER", "THREAD_NAME", "PROCESS_NAME", "CODE_FILE", "CODE_LINE", "CODE_FUNC"}
)

_watchdog: asyncio.Task[None] | None = None


def notify(*assignments: str) -> None:
    """sd_notify; a no-op without NOTIFY_SOCKET, a warning if the socket is gone.

    READY=1 also starts the watchdog pings when systemd asked for them
    (WATCHDOG_USEC, WatchdogSec= in the unit); STOPPING=1 ends them.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    _send(assignments)
    if "READY=1" in assignments:
        _start_watchdog()
    if "STOPPING=1" in assignments:
        stop_watchdog()


def _send(assignments: tuple[str, ...] | list[str]) -> None:
    from systemd import daemon

    try:
        daemon.notify("\n".join(assignments))
    except OSError as e:
        log.warning("sd_notify(%s) failed: %s", ", ".join(assignments), e)


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), None if not asked for."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2


async def _ping(interval: float) -> None:
    # Pinged from the event loop itself: a blocked loop misses its pings and
    # systemd restarts the daemon.
    while True:
        _send(["WATCHDOG=1"])
        await asyncio.sleep(interval)


def _start_watchdog() -> None:
    global _watchdog
    interval = watchdog_interval()
    if interval is None or (_watchdog is not None and not _watchdog.done()):
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        log.warning("WatchdogSec= is set but READY=1 was sent outside the event loop: no watchdog pings")
        return
    _watchdog = loop.create_task(_ping(interval), name="sd-watchdog")
    log.debug("watchdog: pinging every %.1f s", interval)


def stop_watchdog() -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.cancel()
        _watchdog = None


def journal_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra` entries that are journal fields (MACHINE=, DRIVE=, ...)."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if value is not None and key not in _OWN_FIELDS and _FIELD.fullmatch(key)
    }


class JournalHandler(logging.Handler):
    """Log records as journal entries, with their `extra` fields as journal fields.

    python-systemd's own JournalHandler sends the record's whole __dict__
    (msg, args, levelname, created, ... as lower-case "fields" journald then
    drops); this one sends the standard fields plus the valid upper-case
    `extra` keys only, so `journalctl MACHINE=vm1` finds a machine's lines.
    """

    def __init__(self, sender: Callable[..., Any] | None = None, **fields: str) -> None:
        super().__init__()
        if sender is None:
            from systemd import journal

            sender = journal.send
        self.sender = sender
        self.fields = fields
        # The journal has its own timestamp, level and logger fields: the
        # message alone (basicConfig would otherwise prefix "LEVEL:name:").
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sender(
                self.format(record),
                PRIORITY=str(priority(record.levelno)),
                LOGGER=record.name,
                THREAD_NAME=record.threadName,
                PROCESS_NAME=record.processName,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
                **(self.fields | journal_fields(record)),
            )
        except Exception:  # noqa: BLE001 - logging.Handler's contract: never raise from emit
            self.handleError(record)


def priority(levelno: int) -> int:
    """logging level -> syslog priority (journal PRIORITY=)."""
    if levelno <= logging.DEBUG:
        return 7
    if levelno <= logging.INFO:
        return 6
    if levelno <= logging.WARNING:
        return 4
    if levelno <= logging.ERROR:
        return 3
    if levelno <= logging.CRITICAL:
        return 2
    return 1


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if os.path.exists(JOURNAL_SOCKET):
        # MACHINE= and DRIVE= come from the records' extra fields.
        handler = JournalHandler(SYSLOG_IDENTIFIER="vmspawnd")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vmspawnd: %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # qemu.qmp logs every dropped connection as an error; a dying QEMU is ours to report.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
