"""accel: "auto" falls back to TCG where KVM is there but unusable; "kvm" is never replaced.

This host's /dev/kvm is a nested KVM that Linux guests cannot use. It fails
one of two ways, depending on load: QEMU aborts at the first vCPU reset
("failed to set MSR 0x10a"), so the start fails; or the guest runs until
an instruction KVM cannot emulate and QEMU stops it in runstate
internal-error. "auto" must survive both, and the daemon then remembers
that KVM is unusable here.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError

from vmspawnd.bus.machine import object_path

from .harness import Client, Daemon, Site, guest_options, not_just_logs, qemu_pids, record_states, wait_console

KVM = Path("/dev/kvm")
READY = "VMSPAWN-GUEST-READY"
# KVM fails at the latest while the guest's kernel starts, well within this.
KVM_FAILS_WITHIN = 60
# The tiny guest boots under TCG within this, on a loaded host too.
TCG_BOOT = 150


async def test_tcg_is_tcg(client: Client, guest: Any) -> None:
    path = await client.create("acc-tcg", **guest_options(guest))
    assert await client.prop(path, "Accel") == "tcg"


def log_since(daemon: Daemon, offset: int) -> str:
    return daemon.log.read_text(errors="replace")[offset:]


def argv(daemon: Daemon, name: str) -> list[str]:
    return (daemon.runtime_dir / "machines" / name / "argv").read_text().splitlines()


async def kvm_outcome(client: Client, path: str, done: set[str], console: Path) -> str:
    """Poll until the machine's State is one of `done` or its guest is up;
    the State then ("" when the guest came up with KVM in use)."""
    deadline = time.monotonic() + KVM_FAILS_WITHIN
    while (state := await client.prop(path, "State")) not in done and await client.prop(path, "Accel") == "kvm":
        if READY in console.read_text(errors="replace"):
            return ""
        assert time.monotonic() < deadline, f"KVM neither failed nor booted the guest in {KVM_FAILS_WITHIN} s"
        await asyncio.sleep(0.1)
    return str(state)


@pytest.mark.skipif(not KVM.exists(), reason="no /dev/kvm: QEMU itself falls back to TCG")
async def test_auto_falls_back_to_tcg_where_kvm_is_unusable_and_kvm_fails(
    site_client: Client, site: Site, guest: Any
) -> None:
    # A daemon of its own: what it learns about KVM lasts for its life.
    client, daemon = site_client, site.daemon
    offset = len(daemon.log.read_text()) if daemon.log.exists() else 0
    states = await record_states(client, object_path("acc-auto"))
    path = await client.create("acc-auto", **guest_options(guest, accel="auto"))
    console = Path(await client.prop(path, "ConsoleLog"))
    # Started with KVM, it may fail later, under the guest.
    if await client.prop(path, "Accel") == "kvm" and not await kvm_outcome(client, path, set(), console):
        pytest.skip("KVM works on this host: nothing to fall back from")
    assert await client.prop(path, "Accel") == "tcg"
    assert await client.prop(path, "State") == "running"
    log = log_since(daemon, offset)
    assert "acc-auto: KVM is present but QEMU cannot use it" in log
    late = "runstate internal-error" in log
    print(f"KVM failed {'under the guest (internal-error)' if late else 'at start (QEMU aborted)'}")
    if late:
        # Honest transitions on its one object: paused by QEMU, stopped, started again.
        seen = [s for s, _ in itertools.groupby(states)]
        assert seen[seen.index("paused") :] == ["paused", "stopping", "starting", "running"], states
    assert ("-accel", "kvm") not in itertools.pairwise(argv(daemon, "acc-auto"))
    await wait_console(console, READY, timeout=TCG_BOOT)

    # Learnt once for the daemon's life: the next "auto" machine starts with TCG, no KVM tried.
    offset = len(daemon.log.read_text())
    path2 = await client.create("acc-auto2", **guest_options(guest, accel="auto"))
    assert await client.prop(path2, "Accel") == "tcg"
    assert ("-accel", "kvm") not in itertools.pairwise(argv(daemon, "acc-auto2"))
    assert "acc-auto2: accel=auto starts with TCG: KVM failed under machine acc-auto earlier" in log_since(
        daemon, offset
    )

    # Asked for explicitly, KVM is tried again and never replaced.
    try:
        path3 = await client.create("acc-kvm", **guest_options(guest, accel="kvm"))
    except DBusError as e:
        # Failed at start: QEMU's own words come back, nothing is left behind.
        assert e.type == "org.vmspawnd1.Error.QemuFailed"
        assert "qemu-system-x86_64:" in e.text
        assert "acc-kvm" not in await client.names()
        assert not (daemon.runtime_dir / "machines" / "acc-kvm" / "state.json").exists()
    else:
        # Failed under the guest: it stays paused, with KVM, and the log says so.
        assert await client.prop(path3, "Accel") == "kvm"
        console3 = Path(await client.prop(path3, "ConsoleLog"))
        assert await kvm_outcome(client, path3, {"paused"}, console3) in ("paused", "")
        if await client.prop(path3, "State") == "paused":
            said = re.escape("acc-kvm: KVM failed: QEMU stopped the guest in runstate internal-error")
            await wait_console(daemon.log, said, timeout=10, start=offset)
            assert await client.prop(path3, "State") == "paused"
            assert await client.prop(path3, "Accel") == "kvm"

    await client.terminate_all()
    assert await client.names() == []
    assert qemu_pids(str(daemon.runtime_dir)) == []
    assert not_just_logs(daemon.runtime_dir / "machines") == []
