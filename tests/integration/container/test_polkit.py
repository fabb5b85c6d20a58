"""polkit inside the container, with a rules file in /etc/polkit-1/rules.d: the `machine` and
`owner_uid` details vmspawnd passes for org.vmspawnd1.manage-machine work in a real rule.

Real users made with useradd in the container, vmspawnctl run as them (runuser), the
installed polkitd reading the rule live. Root's machine `pkmine` and bob's `pkbob` may be
managed by alice (one by name, one by owner), root's `pkother` may not.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.harness import Client

from .conftest import tinyguest, tool
from .support import boot

RULES = "/etc/polkit-1/rules.d/50-vmspawnd-test.rules"
RULE = """\
polkit.addRule(function(action, subject) {
    if (action.id == "org.vmspawnd1.create-machine" && subject.user == "bob")
        return polkit.Result.YES;
    if (action.id == "org.vmspawnd1.manage-machine" && subject.user == "alice") {
        if (action.lookup("machine") == "pkmine" || action.lookup("owner_uid") == "%(bob)s")
            return polkit.Result.YES;
        return polkit.Result.NO;
    }
});
"""


def uid(box: tool.Container, user: str) -> str:
    return box.run(["id", "-u", user]).stdout.strip()


@pytest.fixture
def users(container: tool.Container) -> Iterator[None]:
    for user in ("alice", "bob"):
        container.run(["useradd", "--no-create-home", user])
    rules = container.path(RULES)
    rules.write_text(RULE % {"bob": uid(container, "bob")})
    rules.chmod(0o644)
    yield
    rules.unlink()
    for user in ("alice", "bob"):
        container.run(["userdel", user])


def ctl(box: tool.Container, user: str, *argv: str) -> tuple[int, str]:
    result = box.run(["runuser", "-u", user, "--", "vmspawnctl", "--no-ask-password", *argv], check=False)
    return result.returncode, result.stdout + result.stderr


async def test_a_rule_hands_alice_one_machine_by_name_and_bobs_by_owner(
    container: tool.Container, client: Client, guest: tinyguest.Guest, users: None
) -> None:
    for name in ("pkmine", "pkother"):
        await boot(container, client, guest, name)
    status, out = ctl(
        container, "bob", "create", "pkbob", "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
        "--cmdline", guest.cmdline, "--accel", "tcg", "--memory", "128M",
    )  # fmt: skip
    assert status == 0, out
    for name in ("pkmine", "pkbob"):
        assert ctl(container, "alice", "pause", name) == (0, ""), name
        assert ctl(container, "alice", "resume", name)[0] == 0, name
    status, out = ctl(container, "alice", "pause", "pkother")
    assert status == 4 and "may not manage this machine" in out, out
    # Nobody else is handed anything by the rule: bob may not manage root's machine.
    assert ctl(container, "bob", "pause", "pkmine")[0] == 4
