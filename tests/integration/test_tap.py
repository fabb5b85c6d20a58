"""`network tap:NAME`: the daemon opens the tap with the creator's claim checked, QEMU gets an fd.

Issue 11 (5): QEMU, as root, opened any tap a creator named, one another
user owns too. Now a non-root creator may use a tap it owns (or one
vmspawnd.conf grants it); QEMU gets `-netdev tap,fd=N` and never opens
/dev/net/tun by name. A non-root creator goes through polkit (test_system's
fixtures and rules: `daemon` may create).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

# Fixtures of test_system's (the parameters below reuse their names: F811).
from .test_system import System, gdbus_manager, owned_file, polkit, root, system  # noqa: F401

TAPS = [f"vmst{os.getpid() % 10000}{suffix}" for suffix in ("n", "d", "x")]


@pytest.fixture
async def taps(root: Any) -> AsyncIterator[dict[str, str]]:  # noqa: F811
    """Persistent taps: one `nobody` owns, one `daemon` owns; a third name that does not exist."""
    made = {"nobody": TAPS[0], "daemon": TAPS[1], "missing": TAPS[2]}
    for user in ("nobody", "daemon"):
        subprocess.run(["ip", "tuntap", "add", "dev", made[user], "mode", "tap", "user", user], check=True)
    try:
        yield made
    finally:
        # A tap QEMU still holds cannot be deleted: machines first.
        await root.terminate_all()
        for name in TAPS:
            subprocess.run(["ip", "tuntap", "del", "dev", name, "mode", "tap"], capture_output=True)
        assert not [n for n in TAPS if Path(f"/sys/class/net/{n}").exists()]


def options(where: System, network: str) -> str:
    return (
        f"{{'image': <'{owned_file(where, 'daemon')}'>, 'firmware': <'bios'>, 'accel': <'tcg'>, "
        f"'memory': <uint64 {64 << 20}>, 'hotplug_spares': <uint32 1>, 'network': <'{network}'>}}"
    )


async def test_a_creator_may_use_its_own_tap_only(polkit: System, root: Any, taps: dict[str, str]) -> None:  # noqa: F811
    await polkit.start_polkit(rules=True)
    theirs = await gdbus_manager(polkit, "daemon", "CreateMachine", "theirs", options(polkit, f"tap:{taps['nobody']}"))
    assert theirs.error == "org.vmspawnd1.Error.AccessDenied", theirs
    assert taps["nobody"] in theirs.err and "owned by uid 65534" in theirs.err, theirs.err
    missing = await gdbus_manager(
        polkit, "daemon", "CreateMachine", "missing", options(polkit, f"tap:{taps['missing']}")
    )
    assert missing.error == "org.vmspawnd1.Error.InvalidArgument", missing
    assert "does not exist" in missing.err, missing.err
    assert not Path(f"/sys/class/net/{taps['missing']}").exists()

    mine = await gdbus_manager(polkit, "daemon", "CreateMachine", "mine", options(polkit, f"tap:{taps['daemon']}"))
    assert mine.code == 0, mine
    argv = (polkit.daemon.runtime_dir / "machines" / "mine" / "argv").read_text().splitlines()
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev.startswith("tap,id=net0,fd="), netdev
    assert taps["daemon"] not in " ".join(argv) and "/dev/net/tun" not in argv
    # The fd QEMU holds is attached to that tap (tun's fdinfo names it).
    (machine,) = await root.call("GetMachine", "s", ["mine"])
    leader = await root.prop(machine, "Leader")
    fdinfo = Path(f"/proc/{leader}/fdinfo")
    attached = [f.name for f in fdinfo.iterdir() if f"iff:\t{taps['daemon']}\n" in f.read_text()]
    assert len(attached) == 1, attached
    await root.call("TerminateMachine", "s", ["mine"])
