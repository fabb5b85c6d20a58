"""opener.open_as: the kernel decides, with the caller's uid (real fork + setuid)."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmspawnd.errors import InvalidArgument
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
    with pytest.raises(InvalidArgument, match="as uid 65534: Permission denied"):
        await open_as(NOBODY, files["secret"], read_only=True)


async def test_nobody_opens_a_world_readable_file_read_only_but_not_writable(files: dict[str, str]) -> None:
    fd = await open_as(NOBODY, files["public"], read_only=True)
    assert os.read(fd, 1) == b"p"
    os.close(fd)
    with pytest.raises(InvalidArgument, match="Permission denied"):
        await open_as(NOBODY, files["public"], read_only=False)


async def test_shadow_is_refused_for_nobody() -> None:
    with pytest.raises(InvalidArgument, match="Permission denied"):
        await open_as(NOBODY, "/etc/shadow", read_only=True)


async def test_directories_and_missing_files(files: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument, match="is a directory"):
        await open_as(0, files["dir"], read_only=True)
    with pytest.raises(InvalidArgument, match="No such file"):
        await open_as(NOBODY, files["dir"] + "/missing", read_only=True)


async def test_unknown_uid_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="no user account"):
        await open_as(54321, "/etc/hostname", read_only=True)
