"""vmspawnd.conf: per-uid quotas, the QEMU identity range, allowed taps.

TOML at /etc/vmspawnd/vmspawnd.conf (or --config PATH). Every key is
optional; a missing file means the documented defaults. Root is never
limited by quotas.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import MiB

DEFAULT_PATH = Path("/etc/vmspawnd/vmspawnd.conf")


class ConfigError(Exception):
    """The configuration file is unreadable or holds a bad value."""


@dataclass(frozen=True)
class Quota:
    """Caps for one non-root uid (summed over its machines where it says total)."""

    machines: int = 4
    memory_total: int = 8192 * MiB
    cpus_per_machine: int = 4
    spares_per_machine: int = 32


@dataclass(frozen=True)
class Config:
    quota: Quota = field(default_factory=Quota)
    # uid -> its own quota, overriding `quota`.
    quota_by_uid: dict[int, Quota] = field(default_factory=dict)
    # Each machine's QEMU (and its virtiofsd) runs as one uid/gid from
    # [identity_base, identity_base + identity_count): no passwd entry may use them.
    identity_base: int = 0x7A000000
    identity_count: int = 65536
    # uid -> tap device names it may use though it does not own them.
    taps_by_uid: dict[int, tuple[str, ...]] = field(default_factory=dict)
    # Added to a machine's memory for its cgroup's memory limit (QEMU's own needs).
    memory_overhead: int = 256 * MiB
    # Tasks (threads) a machine's cgroup may hold: base + per vCPU.
    tasks_base: int = 64
    tasks_per_cpu: int = 8

    def quota_for(self, uid: int) -> Quota | None:
        """None for root: root is not limited."""
        if uid == 0:
            return None
        return self.quota_by_uid.get(uid, self.quota)


def _int(table: dict[str, Any], key: str, where: str, default: int, scale: int = 1) -> int:
    value = table.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}.{key} must be a non-negative integer, got {value!r}")
    return value * scale


def _quota(table: dict[str, Any], where: str, base: Quota) -> Quota:
    known = {"machines", "memory_total_mib", "cpus_per_machine", "spares_per_machine"}
    if unknown := set(table) - known:
        raise ConfigError(f"unknown keys in [{where}]: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return Quota(
        machines=_int(table, "machines", where, base.machines),
        memory_total=_int(table, "memory_total_mib", where, base.memory_total, MiB),
        cpus_per_machine=_int(table, "cpus_per_machine", where, base.cpus_per_machine),
        spares_per_machine=_int(table, "spares_per_machine", where, base.spares_per_machine),
    )


def parse(text: str, where: str = "vmspawnd.conf") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: {e}") from e
    known = {"quota", "identity", "taps", "limits"}
    if unknown := set(data) - known:
        raise ConfigError(f"{where}: unknown sections {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    quota_table = dict(data.get("quota", {}))
    per_uid = {k: quota_table.pop(k) for k in list(quota_table) if isinstance(quota_table[k], dict)}
    quota = _quota(quota_table, "quota", Quota())
    by_uid = {}
    for key, table in per_uid.items():
        if not key.isdigit():
            raise ConfigError(f"{where}: [quota.{key}] must name a numeric uid")
        by_uid[int(key)] = _quota(table, f"quota.{key}", quota)
    identity = data.get("identity", {})
    base = _int(identity, "uid_base", "identity", Config.identity_base)
    count = _int(identity, "uid_count", "identity", Config.identity_count)
    if base < 1000 or count < 1 or base + count > 2**32 - 2:
        raise ConfigError(f"{where}: [identity] uid_base {base} / uid_count {count} is not a usable range")
    taps = {}
    for key, names in data.get("taps", {}).items():
        if not key.isdigit() or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{where}: [taps] entries are 'UID = [\"tap0\", ...]', got {key} = {names!r}")
        taps[int(key)] = tuple(names)
    limits = data.get("limits", {})
    return Config(
        quota=quota,
        quota_by_uid=by_uid,
        identity_base=base,
        identity_count=count,
        taps_by_uid=taps,
        memory_overhead=_int(limits, "memory_overhead_mib", "limits", Config.memory_overhead, MiB),
        tasks_base=_int(limits, "tasks_base", "limits", Config.tasks_base),
        tasks_per_cpu=_int(limits, "tasks_per_cpu", "limits", Config.tasks_per_cpu),
    )


def load(path: Path = DEFAULT_PATH) -> Config:
    """The configuration at `path`; defaults if it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    return parse(text, str(path))
