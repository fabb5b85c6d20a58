"""What the level-2 tests share: a Nova instance of the tiny guest, and its console."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import Any

from nova.tests.unit import fake_instance
from tests.integration.harness import wait_console

from nova import context as nova_context
from nova import objects
from nova.virt.vmspawnd import VmspawndDriver, mapping

BOOT = 120  # s: the tiny guest boots in a few seconds, but under TCG on a loaded host
MiB = 1024 * 1024


def console_log(driver: VmspawndDriver, instance: Any) -> Path:
    return Path(driver.client.properties(mapping.machine_name(instance.name, instance.uuid))["ConsoleLog"])


def console(driver: VmspawndDriver, instance: Any, pattern: str, start: int = 0) -> re.Match[str]:
    return asyncio.run(wait_console(console_log(driver, instance), pattern, timeout=BOOT, start=start))


def console_size(driver: VmspawndDriver, instance: Any) -> int:
    """Where the log ends now, counted as wait_console counts (text, not bytes)."""
    return len(console_log(driver, instance).read_text(errors="replace"))


def new_instance(memory_mb: int = 256) -> Any:
    ctxt = nova_context.get_admin_context()
    flavor = objects.Flavor(
        name="tiny", memory_mb=memory_mb, vcpus=1, root_gb=0, ephemeral_gb=0, swap=0, extra_specs={}, flavorid="1"
    )
    instance = fake_instance.fake_instance_obj(ctxt, uuid=str(uuid.uuid4()), flavor=flavor)
    # Loaded, as Nova's compute manager has it (no database here to lazy-load from).
    instance.system_metadata = {}
    return instance
