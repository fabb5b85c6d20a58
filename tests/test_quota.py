"""quota.check: every cap, for all inputs; root has none."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.config import Quota
from vmspawnd.errors import QuotaExceeded
from vmspawnd.model import MiB
from vmspawnd.quota import Usage, check

usages = st.builds(Usage, memory=st.integers(0, 64 * 1024).map(lambda m: m * MiB), cpus=st.integers(1, 300),
                   spares=st.integers(0, 200))  # fmt: skip
quotas = st.builds(Quota, machines=st.integers(0, 40), memory_total=st.integers(0, 64 * 1024).map(lambda m: m * MiB),
                   cpus_per_machine=st.integers(0, 300), spares_per_machine=st.integers(0, 200))  # fmt: skip


@given(quotas, st.lists(usages, max_size=40), usages)
def test_allowed_exactly_when_within_every_cap(quota: Quota, held: list[Usage], new: Usage) -> None:
    within = (
        new.cpus <= quota.cpus_per_machine
        and new.spares <= quota.spares_per_machine
        and len(held) + 1 <= quota.machines
        and sum(u.memory for u in held) + new.memory <= quota.memory_total
    )
    try:
        check(quota, 1000, held, new)
    except QuotaExceeded as e:
        assert not within
        # The message names the cap and the use.
        assert "quota " in str(e) and "uid 1000" in str(e)
    else:
        assert within


@given(st.lists(usages, max_size=100), usages)
def test_root_is_never_limited(held: list[Usage], new: Usage) -> None:
    check(None, 0, held, new)


@pytest.mark.parametrize(
    ("held", "new", "words"),
    [
        ([Usage(MiB, 1, 0)] * 2, Usage(MiB, 1, 0), "at most 2 machines (quota machines) and has 2"),
        ([Usage(600 * MiB, 1, 0)], Usage(500 * MiB, 1, 0), "1024 MiB in all (quota memory_total), uses 600 MiB"),
        ([], Usage(MiB, 3, 0), "at most 2 vCPUs (quota cpus_per_machine), asked for 3"),
        ([], Usage(MiB, 1, 5), "at most 4 hotplug spares (quota spares_per_machine), asked for 5"),
    ],
)
def test_each_cap_names_itself_and_the_use(held: list[Usage], new: Usage, words: str) -> None:
    quota = Quota(machines=2, memory_total=1024 * MiB, cpus_per_machine=2, spares_per_machine=4)
    with pytest.raises(QuotaExceeded, match=words.replace("(", r"\(").replace(")", r"\)")):
        check(quota, 1000, held, new)
