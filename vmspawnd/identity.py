"""QEMU identities: one uid/gid per machine from the configured range.

Pure bookkeeping. Whether the host itself uses an id (a passwd or group
entry, a process running as it) is asked through the `in_use` predicate,
so the I/O stays with the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int


class Exhausted(Exception):
    """Every id in the range is taken or used by the host."""


class Pool:
    """Ids in [base, base + count); uid and gid of one identity are the same number."""

    def __init__(self, base: int, count: int) -> None:
        self.base = base
        self.count = count
        self._taken: set[int] = set()

    @property
    def range(self) -> range:
        return range(self.base, self.base + self.count)

    @property
    def taken(self) -> frozenset[int]:
        return frozenset(self._taken)

    def owns(self, identity: Identity) -> bool:
        """The identity is one of this range's (uid and gid alike)."""
        return identity.uid == identity.gid and self.base <= identity.uid < self.base + self.count

    def claim(self, identity: Identity) -> None:
        """Mark a re-attached machine's identity taken; ids outside the range are not ours."""
        if self.owns(identity):
            self._taken.add(identity.uid)

    def allocate(self, in_use: Callable[[int], bool]) -> Identity:
        """The lowest id neither taken nor `in_use` by the host, now taken."""
        for n in self.range:
            if n not in self._taken and not in_use(n):
                self._taken.add(n)
                return Identity(n, n)
        raise Exhausted(f"all {self.count} QEMU identities from {self.base} are in use")

    def release(self, identity: Identity) -> None:
        self._taken.discard(identity.uid)
