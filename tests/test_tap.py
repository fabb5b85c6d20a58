"""Tap devices: who may attach to which."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd import tap
from vmspawnd.errors import AccessDenied, InvalidArgument
from vmspawnd.tap import IFF_TAP, UNSET, TunInfo, may_use

ids = st.integers(-1, 70000)


@given(st.integers(1, 70000), st.frozensets(st.integers(0, 70000), max_size=4), ids, ids, st.booleans())
def test_a_user_may_use_a_tap_it_owns_or_is_granted(
    uid: int, groups: frozenset[int], owner: int, group: int, granted: bool
) -> None:
    info = TunInfo(IFF_TAP, owner, group)
    allowed = may_use(uid, groups, "t0", info, ("t0",) if granted else ("other",))
    assert allowed == (granted or owner == uid or (group != UNSET and group in groups))
    assert may_use(0, frozenset(), "t0", info, ())


def test_a_tap_with_no_owner_is_roots_alone() -> None:
    info = TunInfo(IFF_TAP)
    assert not may_use(1000, frozenset({UNSET, 1000}), "t0", info, ())
    assert "owned by no user" in tap.refusal(1000, "t0", info)


def fake_device(root: Path, name: str, flags: int | None, owner: int = UNSET, group: int = UNSET) -> None:
    device = root / name
    device.mkdir(parents=True)
    if flags is not None:
        (device / "tun_flags").write_text(f"0x{flags:x}\n")
        (device / "owner").write_text(f"{owner}\n")
        (device / "group").write_text(f"{group}\n")


def test_check_reads_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tap, "SYS_NET", tmp_path)
    fake_device(tmp_path, "mine", IFF_TAP | tap.IFF_PERSIST, owner=65534)
    fake_device(tmp_path, "theirs", IFF_TAP | tap.IFF_PERSIST, owner=1)
    fake_device(tmp_path, "eth0", None)
    fake_device(tmp_path, "tun0", 0x0001, owner=65534)
    tap.check(65534, "mine", ())
    tap.check(65534, "theirs", ("theirs",))
    tap.check(0, "nosuch", ())
    with pytest.raises(AccessDenied, match="'theirs': it is owned by uid 1"):
        tap.check(65534, "theirs", ())
    with pytest.raises(InvalidArgument, match="does not exist"):
        tap.check(65534, "nosuch", ())
    for name in ("eth0", "tun0"):
        with pytest.raises(InvalidArgument, match="not a tap device"):
            tap.check(65534, name, ())
