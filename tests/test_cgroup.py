"""cgroup: which kind, which directories, which limits; the writes on a stand-in tree."""

import asyncio
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd import cgroup
from vmspawnd.cgroup import Cgroups, Kind, Limits, choose, directories, limit_files, limits, own_cgroups
from vmspawnd.config import Config
from vmspawnd.model import MiB

HYBRID = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/ac28
3:cpuset:/
0::/
"""


@given(st.integers(32, 1 << 20).map(lambda m: m * MiB), st.integers(1, 288))
def test_limits_are_guest_memory_plus_overhead_and_tasks_per_cpu(memory: int, cpus: int) -> None:
    config = Config(memory_overhead=128 * MiB, tasks_base=40, tasks_per_cpu=3)
    assert limits(memory, cpus, config) == Limits(memory + 128 * MiB, 40 + 3 * cpus)


def test_own_cgroups_reads_v1_and_v2_lines() -> None:
    own = own_cgroups(HYBRID + "2:cpu,cpuacct:/x\n")
    assert own["memory"] == "/process_api/ac28"
    assert own["pids"] == "/"
    assert own[""] == "/"
    assert own["cpu"] == own["cpuacct"] == "/x"


@given(st.booleans(), st.booleans(), st.booleans())
def test_systemd_first_then_v2_then_v1(systemd: bool, v2: bool, v1: bool) -> None:
    kind = choose(systemd, v2, v1)
    assert kind is (Kind.SCOPE if systemd else Kind.V2 if v2 else Kind.V1 if v1 else Kind.NONE)


def test_directories_sit_under_the_daemons_own_cgroups() -> None:
    own = own_cgroups(HYBRID)
    root = Path("/sys/fs/cgroup")
    assert directories(Kind.V1, root, own, "vm1") == [
        root / "memory/process_api/ac28/vmspawnd-vm1",
        root / "pids/vmspawnd-vm1",
    ]
    assert directories(Kind.V2, root, {"": "/a/b"}, "vm1") == [root / "a/b/vmspawnd-vm1"]
    assert directories(Kind.SCOPE, root, own, "vm1") == directories(Kind.NONE, root, own, "vm1") == []


def test_limit_files_per_kind() -> None:
    lim = Limits(300 * MiB, 72)
    assert limit_files(Kind.V1, lim) == {"memory.limit_in_bytes": str(300 * MiB), "pids.max": "72"}
    assert limit_files(Kind.V2, lim) == {"memory.max": str(300 * MiB), "pids.max": "72"}


def test_scope_properties() -> None:
    props = {name: v.value for name, v in cgroup.scope_properties(1234, Limits(300 * MiB, 72))}
    assert props["PIDs"] == [1234]
    assert props["MemoryMax"] == 300 * MiB and props["TasksMax"] == 72
    assert props["Delegate"] is False and props["CollectMode"] == "inactive-or-failed"
    assert cgroup.unit_name("vm1") == "vmspawnd-vm1.scope"


def test_place_holds_remove_on_a_stand_in_v1_tree(tmp_path: Path) -> None:
    own = own_cgroups(Path("/proc/self/cgroup").read_text())
    for controller in cgroup.V1_CONTROLLERS:
        (tmp_path / controller / own.get(controller, "/").lstrip("/")).mkdir(parents=True)
    groups = Cgroups(Config(), tmp_path)
    assert groups.kind is Kind.V1
    dirs = groups.directories("vm1")
    (dirs[0]).mkdir()
    (dirs[0] / "memory.limit_in_bytes").write_text("max")
    asyncio.run(groups.place("vm1", 4321, Limits(100, 7)))
    assert (dirs[0] / "memory.limit_in_bytes").read_text() == "100"
    assert not (dirs[1] / "pids.max").exists()  # only files the kernel made are written
    assert groups.holds("vm1", 4321) and not groups.holds("vm1", 1)
    for d in dirs:
        for f in d.iterdir():
            f.unlink()
    groups.remove("vm1")
    assert not any(d.exists() for d in dirs)


def test_nothing_usable_is_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    groups = Cgroups(Config(), tmp_path)
    assert groups.kind is Kind.NONE
    assert "machines get no cgroup of their own" in caplog.text
    assert groups.directories("vm1") == [] and groups.holds("vm1", 1)
