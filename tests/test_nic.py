"""The pure NIC rules: default and given MACs, the QMP arguments."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd import nic
from vmspawnd.errors import InvalidArgument

ids = st.text(min_size=1, max_size=32)


@given(ids, ids)
def test_the_default_mac_is_valid_local_unicast_and_stable(machine_id: str, nic_id: str) -> None:
    mac = nic.default_mac(machine_id, nic_id)
    assert nic.parse_mac(mac) == mac == nic.default_mac(machine_id, nic_id)
    first = int(mac[:2], 16)
    assert first & nic.LOCAL_BIT and not first & nic.GROUP_BIT


def test_default_macs_differ_by_machine_and_by_nic() -> None:
    macs = {nic.default_mac(m, n) for m in ("a" * 32, "b" * 32) for n in ("nic1", "nic2")}
    assert len(macs) == 4


@given(st.binary(min_size=6, max_size=6))
def test_any_six_octets_parse_unless_group_or_zero(octets: bytes) -> None:
    text = ":".join(f"{b:02X}" for b in octets)
    if octets[0] & 1 or not any(octets):
        with pytest.raises(InvalidArgument):
            nic.parse_mac(text)
    else:
        assert nic.parse_mac(text) == text.lower()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "six hex octets"),
        ("02:00:00:00:00", "six hex octets"),
        ("02:00:00:00:00:00:00", "six hex octets"),
        ("02-00-00-00-00-01", "six hex octets"),
        ("0200.0000.0001", "six hex octets"),
        ("02:00:00:00:00:0g", "six hex octets"),
        (" 02:00:00:00:00:01", "six hex octets"),
        ("01:00:5e:00:00:01", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "broadcast"),
        ("00:00:00:00:00:00", "all zeros"),
    ],
)
def test_bad_macs_are_refused_with_the_reason(value: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        nic.parse_mac(value)


def test_qmp_arguments() -> None:
    assert nic.netdev_user("nic1") == {"type": "user", "id": "nic1"}
    # A tap only ever by a name getfd gave QEMU, never an interface name.
    assert nic.netdev_tap("nic1", "nic1-tap") == {"type": "tap", "id": "nic1", "fd": "nic1-tap"}
    assert nic.device("nic1", "02:00:00:00:00:01", "rp3") == {
        "driver": "virtio-net-pci", "id": "nic1", "netdev": "nic1", "mac": "02:00:00:00:00:01", "bus": "rp3",
        "addr": "0",
    }  # fmt: skip
