"""Finding 6 and 9: per-uid quotas, a cgroup per machine, polkit rules per machine or owner.

Run under `flock /tmp/vmspawnd-polkit.lock`: it installs global polkit files
(see test_system.py, whose System it uses). The daemon reads a quota file
given with --config; `nobody` is allowed to create by a polkit rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import DBusError

from vmspawnd.cgroup import own_cgroups
from vmspawnd.model import MiB

from . import test_system
from .harness import ROOT, VMSPAWND, Client, qemu_pids
from .test_system import Result, System, gdbus_manager, machine_options, new_image, owned_file

# test_system's fixtures, on this module's `system`: `polkit` stops polkitd and
# removes the polkit files after each test; `root` checks no QEMU is left.
polkit = test_system.polkit
root = test_system.root

E = "org.vmspawnd1.Error."
CONFIG = """\
[quota]
machines = 2
memory_total_mib = 160
cpus_per_machine = 2
spares_per_machine = 4

[limits]
memory_overhead_mib = 100
tasks_base = 50
tasks_per_cpu = 5
"""
RULES = """\
// Installed by vmspawnd's tests/integration/test_quota.py, then removed.
polkit.addRule(function(action, subject) {
    if (action.id == "org.vmspawnd1.create-machine" && subject.user == "nobody")
        return polkit.Result.YES;
    if (action.id == "org.vmspawnd1.manage-machine" && subject.user == "daemon") {
        // One machine by name, and every machine of one owner (nobody, 65534).
        if (action.lookup("machine") == "allowedvm" || action.lookup("owner_uid") == "65534")
            return polkit.Result.YES;
        return polkit.Result.NO;
    }
});
"""


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    directory = Path(tempfile.mkdtemp(prefix="vmspawnd-quota-", dir="/tmp"))
    directory.chmod(0o755)
    sys_ = System(directory)
    (directory / "vmspawnd.conf").write_text(CONFIG)
    try:
        sys_.start_daemon("--config", str(directory / "vmspawnd.conf"))
        yield sys_
    finally:
        sys_.close()
        shutil.rmtree(directory, ignore_errors=True)


def options(image: str, memory_mib: int = 64, cpus: int = 1, spares: int = 2) -> str:
    """GVariant text for gdbus."""
    return (
        f"{{'image': <'{image}'>, 'firmware': <'bios'>, 'accel': <'tcg'>, 'memory': <uint64 {memory_mib * MiB}>, "
        f"'cpus': <uint32 {cpus}>, 'hotplug_spares': <uint32 {spares}>}}"
    )


async def create_as(system: System, user: str, name: str, **kw: int) -> Result:
    return await gdbus_manager(system, user, "CreateMachine", name, options(owned_file(system, user), **kw))


def refused(result: Result, words: str) -> None:
    assert result.error == E + "QuotaExceeded", result
    assert words in result.err, result


# -- 6: quotas ----------------------------------------------------------------


async def test_over_each_cap_is_quota_exceeded_naming_cap_and_use(polkit: System, root: Client) -> None:
    system = polkit
    await system.start_polkit(RULES)
    refused(await create_as(system, "nobody", "big", cpus=3), "at most 2 vCPUs (quota cpus_per_machine), asked for 3")
    refused(
        await create_as(system, "nobody", "big", spares=5),
        "at most 4 hotplug spares (quota spares_per_machine), asked for 5",
    )
    first = await create_as(system, "nobody", "n1")
    assert first.code == 0, first
    refused(
        await create_as(system, "nobody", "n2", memory_mib=128),
        "160 MiB in all (quota memory_total), uses 64 MiB and asked for 128 MiB more",
    )
    assert (await create_as(system, "nobody", "n2")).code == 0
    refused(await create_as(system, "nobody", "n3"), "at most 2 machines (quota machines) and has 2")
    assert sorted(await root.names()) == ["n1", "n2"]
    # Root is not limited, and not counted against anyone.
    path = await root.create("rootvm", **(machine_options(new_image(system)) | {"cpus": 3, "hotplug_spares": 8}))
    assert await root.prop(path, "State") == "running"
    # A machine that ends gives its share back.
    await root.call("TerminateMachine", "s", ["n1"])
    assert (await create_as(system, "nobody", "n3")).code == 0


async def test_two_creations_at_once_cannot_both_take_the_last_slot(polkit: System, root: Client) -> None:
    system = polkit
    await system.start_polkit(RULES)
    assert (await create_as(system, "nobody", "n1")).code == 0
    results = await asyncio.gather(create_as(system, "nobody", "n2"), create_as(system, "nobody", "n3"))
    assert sorted(r.code == 0 for r in results) == [False, True], results
    refused(next(r for r in results if r.code), "at most 2 machines (quota machines) and has 2")
    assert len(await root.names()) == 2


def test_a_bad_config_file_is_a_clear_start_up_error(tmp_path: Path) -> None:
    bad = tmp_path / "vmspawnd.conf"
    bad.write_text("[quota]\nmachines = -1\n")
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [*VMSPAWND, "--config", str(bad), "--runtime-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert run.returncode == 1
    assert (
        "bad configuration, not starting" in run.stderr
        and "quota.machines must be a non-negative integer" in run.stderr
    )


# -- 6: a cgroup per machine ---------------------------------------------------


def cgroup_dirs(daemon_pid: int, name: str) -> dict[str, Path]:
    own = own_cgroups(Path(f"/proc/{daemon_pid}/cgroup").read_text())
    return {c: Path("/sys/fs/cgroup") / c / own[c].lstrip("/") / f"vmspawnd-{name}" for c in ("memory", "pids")}


@pytest.mark.skipif(not Path("/sys/fs/cgroup/memory/cgroup.procs").exists(), reason="this test reads cgroup v1 files")
async def test_each_machine_has_its_own_cgroup_with_limits_gone_when_it_ends(system: System, root: Client) -> None:
    assert system.daemon.proc is not None
    paths = {}
    for name, cpus in (("cg1", 1), ("cg2", 2)):
        paths[name] = await root.create(name, **(machine_options(new_image(system)) | {"cpus": cpus}))
    for name, cpus in (("cg1", 1), ("cg2", 2)):
        dirs = cgroup_dirs(system.daemon.proc.pid, name)
        leader = await root.prop(paths[name], "Leader")
        assert (dirs["memory"] / "memory.limit_in_bytes").read_text().strip() == str((64 + 100) * MiB)
        assert (dirs["pids"] / "pids.max").read_text().strip() == str(50 + 5 * cpus)
        for d in dirs.values():
            assert (d / "cgroup.procs").read_text().split() == [str(leader)]
    # Re-found after a daemon restart: the machines keep running in theirs.
    system.daemon.stop()
    system.start_daemon("--config", str(system.dir / "vmspawnd.conf"))
    assert system.daemon.proc is not None
    leader = await root.prop(paths["cg1"], "Leader")
    assert (cgroup_dirs(system.daemon.proc.pid, "cg1")["pids"] / "cgroup.procs").read_text().split() == [str(leader)]
    await root.call("TerminateMachine", "s", ["cg1"])
    assert not any(d.exists() for d in cgroup_dirs(system.daemon.proc.pid, "cg1").values())
    assert all(d.exists() for d in cgroup_dirs(system.daemon.proc.pid, "cg2").values())
    await root.call("TerminateMachine", "s", ["cg2"])
    assert not any(d.exists() for d in cgroup_dirs(system.daemon.proc.pid, "cg2").values())


@pytest.mark.skipif(
    not Path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists(), reason="needs cgroup v1 swap accounting"
)
async def test_a_cgroup_that_cannot_take_its_limits_fails_the_create_and_leaves_nothing(
    system: System, root: Client
) -> None:
    # QEMU is put into its cgroup while it starts up: a failure there still
    # fails the create and ends that QEMU. The kernel refuses a memory limit
    # above memsw's, so a cgroup left with a small memsw limit is a real fault.
    assert system.daemon.proc is not None
    memory = cgroup_dirs(system.daemon.proc.pid, "cgbad")["memory"]
    memory.mkdir()
    try:
        (memory / "memory.limit_in_bytes").write_text(str(16 * MiB))
        (memory / "memory.memsw.limit_in_bytes").write_text(str(16 * MiB))
        before = set(qemu_pids(str(system.dir)))
        with pytest.raises(DBusError) as failed:
            await root.create("cgbad", **machine_options(new_image(system)))
        assert failed.value.type == E + "QemuFailed" and "cgroup" in failed.value.text
        assert set(qemu_pids(str(system.dir))) <= before
        assert "cgbad" not in await root.names()
    finally:
        with contextlib.suppress(FileNotFoundError):
            memory.rmdir()


# -- 9: polkit sees the machine and its owner -----------------------------------


async def test_a_polkit_rule_allows_one_machine_by_name_and_one_owners_machines(polkit: System, root: Client) -> None:
    system = polkit
    await system.start_polkit(RULES)
    for name in ("allowedvm", "othervm"):
        await root.create(name, **machine_options(new_image(system)))
    assert (await create_as(system, "nobody", "nobodyvm")).code == 0
    denied = await gdbus_manager(system, "daemon", "TerminateMachine", "othervm")
    assert denied.error == E + "AccessDenied", denied
    for name in ("allowedvm", "nobodyvm"):
        allowed = await gdbus_manager(system, "daemon", "TerminateMachine", name)
        assert allowed.code == 0, allowed
    assert await root.names() == ["othervm"]
