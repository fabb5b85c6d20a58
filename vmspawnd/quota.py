"""Per-uid quotas: the pure check of one more machine against a uid's caps."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .config import Quota
from .errors import QuotaExceeded
from .model import MiB


@dataclass(frozen=True)
class Usage:
    """What one machine takes from its owner's quota."""

    memory: int
    cpus: int
    spares: int


def held(usage: Usage, running: bool) -> Usage:
    """What a machine holds of its owner's quota. A kept machine that is
    stopped still counts toward `machines` (it keeps its name, its record,
    its object: it is defined), but not toward memory_total, which caps
    what runs (libvirt: defined domains take no running resources)."""
    return usage if running else Usage(0, usage.cpus, usage.spares)


def check(quota: Quota | None, uid: int, held: Iterable[Usage], new: Usage) -> None:
    """Raise QuotaExceeded if `new` on top of `held` (the uid's machines,
    running or being created) goes over a cap; None (root) has none."""
    if quota is None:
        return
    held = list(held)
    if new.cpus > quota.cpus_per_machine:
        raise QuotaExceeded(
            f"uid {uid} may give a machine at most {quota.cpus_per_machine} vCPUs (quota cpus_per_machine), "
            f"asked for {new.cpus}; ask for fewer cpus"
        )
    if new.spares > quota.spares_per_machine:
        raise QuotaExceeded(
            f"uid {uid} may give a machine at most {quota.spares_per_machine} hotplug spares "
            f"(quota spares_per_machine), asked for {new.spares}; ask for fewer hotplug_spares"
        )
    if len(held) + 1 > quota.machines:
        raise QuotaExceeded(
            f"uid {uid} may run at most {quota.machines} machines (quota machines) and has {len(held)}; "
            "terminate one first"
        )
    used = sum(u.memory for u in held)
    if used + new.memory > quota.memory_total:
        raise QuotaExceeded(
            f"uid {uid} may give its machines {quota.memory_total // MiB} MiB in all (quota memory_total), "
            f"uses {used // MiB} MiB and asked for {new.memory // MiB} MiB more; ask for less memory or "
            "terminate a machine"
        )
