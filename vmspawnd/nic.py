"""Network interfaces: MAC addresses and the QMP arguments of a NIC. Pure, no I/O.

A hotplugged NIC is a virtio-net-pci device on a spare port with a netdev of
the same id (QEMU keeps netdev and device ids apart).
"""

from __future__ import annotations

import hashlib
import re

from .errors import InvalidArgument

DRIVER = "virtio-net-pci"
MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
# The first octet's bits: a group (multicast/broadcast) address, a locally administered one.
GROUP_BIT = 0x01
LOCAL_BIT = 0x02


def default_mac(machine_id: str, nic_id: str) -> str:
    """A stable, locally administered unicast MAC for `nic_id` of machine
    `machine_id`: the same machine and id always get the same one."""
    octets = bytearray(hashlib.sha256(f"{machine_id}/{nic_id}".encode()).digest()[:6])
    octets[0] = (octets[0] & ~GROUP_BIT & 0xFF) | LOCAL_BIT
    return ":".join(f"{b:02x}" for b in octets)


def parse_mac(value: str) -> str:
    """A MAC a caller gave, normalised to lower case; InvalidArgument for
    anything a guest could not use as its own address."""
    if not MAC.fullmatch(value):
        raise InvalidArgument(f"mac {value!r} is not six hex octets separated by ':' (like 52:54:00:12:34:56)")
    octets = bytes.fromhex(value.replace(":", ""))
    if octets[0] & GROUP_BIT:
        raise InvalidArgument(
            f"mac {value!r} is a multicast or broadcast address (the first octet is odd); give a unicast one"
        )
    if not any(octets):
        raise InvalidArgument(f"mac {value!r} is all zeros, which no interface may have; give another")
    return value.lower()


def netdev_tap(nic_id: str, fdname: str) -> dict[str, object]:
    """netdev_add for a tap QEMU got by getfd (never by name)."""
    return {"type": "tap", "id": nic_id, "fd": fdname}


def netdev_user(nic_id: str) -> dict[str, object]:
    return {"type": "user", "id": nic_id}


def device(nic_id: str, mac: str, port: str) -> dict[str, object]:
    """device_add for the NIC: one device per root port, at addr 0 like drives."""
    return {"driver": DRIVER, "id": nic_id, "netdev": nic_id, "mac": mac, "bus": port, "addr": "0"}
