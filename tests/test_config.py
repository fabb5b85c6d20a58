import re
from pathlib import Path

import pytest

from vmspawnd.config import Config, ConfigError, Quota, load, parse
from vmspawnd.model import MiB


def test_defaults_when_the_file_is_missing(tmp_path) -> None:
    assert load(tmp_path / "absent.conf") == Config()


def test_root_has_no_quota_and_per_uid_quotas_override() -> None:
    cfg = parse(
        """
[quota]
machines = 2
memory_total_mib = 1024
[quota.65534]
machines = 5
[identity]
uid_base = 900000
uid_count = 10
[taps]
65534 = ["tap7"]
"""
    )
    assert cfg.quota_for(0) is None
    assert cfg.quota_for(1000) == Quota(machines=2, memory_total=1024 * MiB)
    # A per-uid table inherits the [quota] defaults for what it leaves out.
    assert cfg.quota_for(65534) == Quota(machines=5, memory_total=1024 * MiB)
    assert (cfg.identity_base, cfg.identity_count) == (900000, 10)
    assert cfg.taps_by_uid == {65534: ("tap7",)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[quota]\nmachines = -1", "quota.machines must be a non-negative integer"),
        ("[quota]\nmachine = 1", "unknown keys in [quota]: machine"),
        ("[quotas]\n", "unknown sections quotas"),
        ("[quota.bob]\nmachines = 1", "must name a numeric uid"),
        ("[identity]\nuid_base = 10", "not a usable range"),
        ("[taps]\n1000 = 'tap0'", "[taps] entries"),
        ("[quota", "vmspawnd.conf"),
    ],
)
def test_bad_files_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(text)


def test_the_shipped_example_documents_the_defaults() -> None:
    """etc/vmspawnd.conf: commented out it is the defaults, and so is every value it shows."""
    text = (Path(__file__).resolve().parents[1] / "etc" / "vmspawnd.conf").read_text()
    assert parse(text) == Config()
    # Uncomment the key = value lines of the four sections (not the examples of per-uid tables and taps).
    shown = re.sub(r"^# (\w+ = \d+)\b.*$", r"\1", text, flags=re.MULTILINE)
    shown = shown.replace("# [quota.1000]\nmachines = 8", "")
    assert parse(shown) == Config()
