"""The pure parts of recovery: who a QEMU is, and the runtime dir's lock."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmspawnd.daemon import RuntimeDirBusy, lock_runtime_dir
from vmspawnd.manager import is_machine, recorded_uuid
from vmspawnd.process import option

ID = uuid.UUID("0123456789abcdef0123456789abcdef")
ARGV = ["qemu-system-x86_64", "-name", "vm", "-uuid", str(ID), "-chardev", "file,id=console,path=/run/m/vm/console.log"]


def test_option_is_the_value_after_its_name() -> None:
    assert option(ARGV, "-uuid") == str(ID)
    assert option(ARGV, "-name") == "vm"
    assert option(ARGV, "-m") is None
    assert option(["-uuid"], "-uuid") is None


@given(st.lists(st.text(max_size=5), max_size=8), st.text(max_size=5))
def test_option_finds_the_first_value_or_none(argv: list[str], name: str) -> None:
    value = option(argv, name)
    if value is None:
        assert name not in argv[:-1]
    else:
        assert argv[argv.index(name) + 1] == value


def test_a_qemu_is_the_machine_with_its_uuid() -> None:
    assert is_machine(ARGV, ID, Path("/elsewhere"))
    assert is_machine(ARGV, uuid.UUID(ID.hex), Path("/elsewhere"))
    assert not is_machine(ARGV, uuid.uuid4(), Path("/run/m/vm"))
    assert not is_machine(["qemu-system-x86_64", "-uuid", "junk"], ID, Path("/run/m/vm"))
    assert not is_machine(["qemu-system-x86_64"], ID, Path("/run/m/vm"))


def test_without_a_uuid_its_console_log_path_names_it() -> None:
    assert is_machine(ARGV, None, Path("/run/m/vm"))
    # Today the console is an fdset, named in its opaque.
    fdset = ["qemu-system-x86_64", "-add-fd", "fd=4,set=1000000,opaque=/run/m/vm/console.log"]
    assert is_machine(fdset, None, Path("/run/m/vm"))
    assert not is_machine(fdset, None, Path("/run/m/v"))
    assert not is_machine(ARGV, None, Path("/run/m/v"))
    assert not is_machine(ARGV, None, Path("/run/m/vm2"))


def test_recorded_uuid_comes_from_the_kept_argv(tmp_path: Path) -> None:
    assert recorded_uuid(tmp_path) is None
    (tmp_path / "argv").write_text("\n".join(ARGV) + "\n")
    assert recorded_uuid(tmp_path) == ID
    (tmp_path / "argv").write_text("qemu\n-uuid\nnot-a-uuid\n")
    assert recorded_uuid(tmp_path) is None
    (tmp_path / "argv").write_bytes(b"\xff\xfe")
    assert recorded_uuid(tmp_path) is None


def test_one_daemon_per_runtime_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fd = lock_runtime_dir(run)
    try:
        assert (run / "lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(RuntimeDirBusy, match=rf"another vmspawnd \(pid {os.getpid()}\) is serving {run}"):
            lock_runtime_dir(run)
    finally:
        os.close(fd)
    # Released with the daemon: the next one takes it.
    os.close(lock_runtime_dir(run))
