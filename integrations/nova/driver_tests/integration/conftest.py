"""The real parts of vmspawnd's own integration tests: the tiny guest, a
private system bus, the daemon (tests/integration/conftest.py), and Nova's
configuration for a driver that talks to that bus."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))

from tests.integration.conftest import daemon, guest, site, system_bus, workdir  # noqa: E402

__all__ = ["daemon", "guest", "site", "system_bus", "workdir"]


@pytest.fixture(scope="session")
def nova_conf(system_bus: str, workdir: Path) -> Iterator[object]:
    import nova.conf

    from nova import objects

    objects.register_all()
    conf = nova.conf.CONF
    conf([], project="nova", default_config_files=[])
    conf.set_override("instances_path", str(workdir / "instances"))
    conf.set_override("bus_address", system_bus, group="vmspawnd")
    yield conf
    conf.reset()


@pytest.fixture
def guest_conf(nova_conf: Any, guest: Any) -> Any:
    """Every instance boots the tiny guest under TCG."""
    nova_conf.set_override("kernel", str(guest.kernel), group="vmspawnd")
    nova_conf.set_override("initrd", str(guest.initrd), group="vmspawnd")
    nova_conf.set_override("cmdline", guest.cmdline, group="vmspawnd")
    nova_conf.set_override("accel", "tcg", group="vmspawnd")
    return nova_conf
