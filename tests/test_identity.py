import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.identity import Exhausted, Identity, Pool


def never(n: int) -> bool:
    return False


def test_lowest_free_id_first_and_uid_equals_gid() -> None:
    pool = Pool(1000, 3)
    assert [pool.allocate(never) for _ in range(3)] == [
        Identity(1000, 1000),
        Identity(1001, 1001),
        Identity(1002, 1002),
    ]
    with pytest.raises(Exhausted, match="all 3 QEMU identities from 1000"):
        pool.allocate(never)


def test_ids_the_host_uses_are_skipped() -> None:
    pool = Pool(1000, 4)
    assert pool.allocate(lambda n: n in (1000, 1001)) == Identity(1002, 1002)


def test_a_released_id_is_free_again_a_claimed_one_is_not() -> None:
    pool = Pool(1000, 3)
    pool.claim(Identity(1000, 1000))
    second = pool.allocate(never)
    assert second == Identity(1001, 1001)
    pool.release(second)
    assert pool.allocate(never) == second
    assert pool.taken == {1000, 1001}


def test_identities_outside_the_range_are_not_claimed() -> None:
    pool = Pool(1000, 3)
    for outside in (Identity(0, 0), Identity(999, 999), Identity(1003, 1003), Identity(1001, 1002)):
        pool.claim(outside)
    assert pool.taken == frozenset()


@given(
    count=st.integers(1, 20),
    host=st.sets(st.integers(0, 19)),
    ops=st.lists(st.one_of(st.just(None), st.integers(0, 19)), max_size=60),
)
def test_never_two_live_machines_share_an_id(count: int, host: set[int], ops: list[int | None]) -> None:
    """Any sequence of allocations and releases: live ids are distinct, in range, and not the host's."""
    pool = Pool(5000, count)
    used_by_host = {5000 + h for h in host}
    live: list[Identity] = []
    for op in ops:
        if op is None:
            try:
                identity = pool.allocate(lambda n: n in used_by_host)
            except Exhausted:
                assert len(live) + len(used_by_host & set(range(5000, 5000 + count))) == count
                continue
            assert identity not in live
            assert 5000 <= identity.uid < 5000 + count and identity.uid not in used_by_host
            live.append(identity)
        elif live:
            pool.release(live.pop(op % len(live)))
        assert pool.taken == {i.uid for i in live}
