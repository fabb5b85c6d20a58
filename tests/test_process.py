import os
import subprocess

import pytest

from vmspawnd import sealed
from vmspawnd.process import Confinement, setpriv_argv, uids_in_use


def test_setpriv_drops_identity_groups_and_every_capability() -> None:
    assert setpriv_argv(Confinement(5000, 5001, (107,))) == [
        "setpriv", "--reuid=5000", "--regid=5001", "--groups=107",
        "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--",
    ]  # fmt: skip
    assert "--clear-groups" in setpriv_argv(Confinement(5000, 5000))


def test_without_cap_setpcap_the_bounding_set_stays_and_the_rest_goes() -> None:
    assert setpriv_argv(Confinement(5000, 5000, (), drop_bounding_set=False)) == [
        "setpriv", "--reuid=5000", "--regid=5000", "--clear-groups", "--no-new-privs", "--inh-caps=-all", "--",
    ]  # fmt: skip


def test_an_unprivileged_daemon_keeps_its_identity_but_not_its_privileges() -> None:
    assert setpriv_argv(Confinement(None, None, drop_bounding_set=False)) == [
        "setpriv", "--no-new-privs", "--inh-caps=-all", "--",
    ]  # fmt: skip


def test_sealed_copy_holds_the_file_and_cannot_change(tmp_path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "k").write_bytes(data)
    fd = os.open(tmp_path / "k", os.O_RDONLY)
    try:
        memfd = sealed.copy(fd, "kernel", len(data))
    finally:
        os.close(fd)
    try:
        assert os.pread(memfd, len(data) + 1, 0) == data
        with pytest.raises(PermissionError):
            os.pwrite(memfd, b"x", 0)
        for size in (0, len(data) + 1):
            with pytest.raises(PermissionError):
                os.ftruncate(memfd, size)
        # QEMU reopens it by /proc/self/fd/N: as read-only it still can.
        with open(f"/proc/self/fd/{memfd}", "rb") as f:
            assert f.read() == data
    finally:
        os.close(memfd)


def test_sealed_copy_refuses_a_file_over_the_limit(tmp_path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 1001)
    fd = os.open(tmp_path / "big", os.O_RDONLY)
    try:
        with pytest.raises(sealed.TooLarge) as e:
            sealed.copy(fd, "initrd", 1000)
    finally:
        os.close(fd)
    assert e.value.size == 1001


# Ids no host account uses, far from the daemon's default [identity] range.
TEST_IDS = range(2_100_000_000, 2_100_000_002)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a process as another uid")
def test_a_live_process_keeps_its_uid_taken_and_a_zombie_does_not() -> None:
    live_uid, zombie_uid = TEST_IDS
    argv = ["setpriv", "--clear-groups"]
    live = subprocess.Popen(
        [*argv, f"--reuid={live_uid}", f"--regid={live_uid}", "sh", "-c", "echo up; exec sleep 60"],
        stdout=subprocess.PIPE,
    )
    zombie = subprocess.Popen([*argv, f"--reuid={zombie_uid}", f"--regid={zombie_uid}", "true"])
    try:
        # The zombie's exit, without reaping it: waitid with WNOWAIT leaves it a zombie.
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)
        # The shell speaks once setpriv has given it the uid.
        assert live.stdout is not None and live.stdout.readline() == b"up\n"
        assert uids_in_use(TEST_IDS) == {live_uid}
    finally:
        live.kill()
        live.wait()
        live.stdout.close()
        zombie.wait()
