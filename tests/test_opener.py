"""opener.open_as: the kernel decides, with the caller's uid (real fork + setuid)."""

import asyncio
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmspawnd import opener
from vmspawnd.errors import InvalidArgument, OpenTimeout
from vmspawnd.opener import open_as

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to change uid")


@pytest.fixture
def files() -> Iterator[dict[str, str]]:
    # Not under pytest's 0700 tmp root: nobody must be able to reach the files.
    tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))
    tmp_path.chmod(0o755)
    secret = tmp_path / "secret"
    secret.write_bytes(b"s")
    secret.chmod(0o600)
    public = tmp_path / "public"
    public.write_bytes(b"p")
    public.chmod(0o644)
    yield {"secret": str(secret), "public": str(public), "dir": str(tmp_path)}
    shutil.rmtree(tmp_path)


async def test_root_opens_anything(files: dict[str, str]) -> None:
    fd = await open_as(0, files["secret"], read_only=False)
    assert os.read(fd, 1) == b"s"
    os.close(fd)


async def test_nobody_cannot_open_a_root_only_file(files: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument, match="as uid 65534: it does not exist or uid 65534 may not open it"):
        await open_as(NOBODY, files["secret"], read_only=True)


async def test_nobody_opens_a_world_readable_file_read_only_but_not_writable(files: dict[str, str]) -> None:
    fd = await open_as(NOBODY, files["public"], read_only=True)
    assert os.read(fd, 1) == b"p"
    os.close(fd)
    with pytest.raises(InvalidArgument, match="may not open it"):
        await open_as(NOBODY, files["public"], read_only=False)


async def test_shadow_is_refused_for_nobody() -> None:
    with pytest.raises(InvalidArgument, match="may not open it"):
        await open_as(NOBODY, "/etc/shadow", read_only=True)


async def test_directories_and_missing_files(files: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument, match="is a directory"):
        await open_as(0, files["dir"], read_only=True)
    with pytest.raises(InvalidArgument, match="does not exist or uid 65534 may not open it"):
        await open_as(NOBODY, files["dir"] + "/missing", read_only=True)


async def test_unknown_uid_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="no user account"):
        await open_as(54321, "/etc/hostname", read_only=True)


async def test_missing_and_hidden_paths_read_the_same_for_nobody(files: dict[str, str]) -> None:
    """Finding 8: nobody must not learn whether a path it may not look at exists."""
    hidden = Path(files["dir"]) / "private"
    hidden.mkdir(mode=0o700)
    (hidden / "there").write_bytes(b"x")
    messages = []
    for name in ("there", "absent"):
        with pytest.raises(InvalidArgument) as info:
            await open_as(NOBODY, str(hidden / name), read_only=True, what="kernel")
        messages.append(str(info.value).replace(name, "NAME"))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("uid", [0, NOBODY])
async def test_fifo_socket_and_char_device_are_refused_at_once(files: dict[str, str], uid: int) -> None:
    """Finding 7: a FIFO used to block the opener for good."""
    fifo = Path(files["dir"]) / "fifo"
    os.mkfifo(fifo)
    fifo.chmod(0o666)
    sock_path = Path(files["dir"]) / "sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock_path))
        for path, kind in ((fifo, "a FIFO"), (Path("/dev/null"), "a character device")):
            for read_only in (True, False):
                started = time.monotonic()
                with pytest.raises(InvalidArgument, match=f"kernel '{path}' is {kind}; give a regular file"):
                    await open_as(uid, str(path), read_only, "kernel")
                assert time.monotonic() - started < 1
        # A socket cannot be open()ed at all: refused as well, whatever the words.
        with pytest.raises(InvalidArgument, match="sock"):
            await open_as(uid, str(sock_path), True, "kernel")


def _hang(*args: object) -> int:
    time.sleep(60)
    return 0


async def test_a_hung_open_is_killed_and_fails_typed(monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> None:
    monkeypatch.setattr(opener, "_child", _hang)
    monkeypatch.setattr(opener, "OPEN_TIMEOUT", 0.3)
    before = children()
    started = time.monotonic()
    with pytest.raises(OpenTimeout, match="did not finish"):
        await open_as(NOBODY, files["public"], read_only=True)
    assert time.monotonic() - started < 3
    # The killed child is reaped: no child of ours is left but those that were there before.
    assert children() <= before


def children() -> set[int]:
    """This process's children (other tests' may still be there), from /proc."""
    tasks = Path("/proc/self/task")
    return {int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()}


async def test_one_uids_stuck_opens_do_not_hold_up_root(monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> None:
    real_child = opener._child

    def child(uid: int, *args: object) -> int:
        return _hang() if uid == NOBODY else real_child(uid, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(opener, "_child", child)
    monkeypatch.setattr(opener, "OPEN_TIMEOUT", 3.0)
    stuck = [asyncio.create_task(open_as(NOBODY, files["public"], True)) for _ in range(opener.OPENS_PER_UID * 2)]
    # One turn of the loop: every stuck open has forked its child and waits on it.
    await asyncio.sleep(0)
    started = time.monotonic()
    fd = await open_as(0, files["secret"], read_only=True)
    os.close(fd)
    assert time.monotonic() - started < 1
    results = await asyncio.gather(*stuck, return_exceptions=True)
    assert all(isinstance(r, OpenTimeout) for r in results)
