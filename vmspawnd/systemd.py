"""sd_notify and the journal, when they are there; harmless when not."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def notify(*assignments: str) -> None:
    """sd_notify; a no-op without NOTIFY_SOCKET, a warning if the socket is gone."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd import daemon

    try:
        daemon.notify("\n".join(assignments))
    except OSError as e:
        log.warning("sd_notify(%s) failed: %s", ", ".join(assignments), e)


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if os.path.exists(JOURNAL_SOCKET):
        from systemd.journal import JournalHandler

        # MACHINE= and DRIVE= come from the records' extra fields.
        handler = JournalHandler(SYSLOG_IDENTIFIER="vmspawnd")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vmspawnd: %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # qemu.qmp logs every dropped connection as an error; a dying QEMU is ours to report.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
