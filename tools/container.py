#!/usr/bin/env python3
"""A real systemd as PID 1 in a systemd-nspawn container, for tests of vmspawnd's unit.

The root file system is Debian's minbase (``PACKAGES``, by mmdebstrap) plus the
Python dependencies Debian does not ship in the versions vmspawnd needs
(``pypi_pins()``, the versions the test run itself uses). It is built once
and cached in ``~/.cache/vmspawnd-container/rootfs-<key>``, the key being a
hash of everything that goes into it; a changed list builds a new one and
the old ones are removed.

Each ``Container`` runs on an overlay over the cached root (the cache is
never written), gets the checked-out vmspawnd installed into it by ``make
install DESTDIR=<overlay> PREFIX=/usr`` as a distribution would, and boots
with systemd as PID 1:

- ``--keep-unit --register=no``: there is no systemd (so no machined) on a
  host where the tests run as PID 1's children in a sandbox.
- the container runs in cgroups of its own, created below the caller's in
  every hierarchy for each run and removed after it;
- on a hybrid cgroup host nspawn mounts the v1 controllers read-only, and
  systemd then silently enforces no limit: ``INIT`` remounts them
  read-write before exec'ing systemd;
- nspawn's own sd_notify messages tell the leader's pid and, with
  ``--notify-ready=yes``, when the container's systemd finished booting.

Commands go in with ``nsenter -t LEADER -a``. ``stop()`` powers the container
off (SIGRTMIN+4 to its systemd), then removes the overlay, the run directory
and the cgroups: nothing is left.

CLI: ``python3 tools/container.py build`` builds (or finds) the root and
prints its path; ``python3 tools/container.py shell`` boots one and opens a
shell inside it (debugging).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
# polkitd does not configure without libpam-systemd; python3-systemd is
# vmspawnd's systemd-python; usr-is-merged, or apt picks usrmerge (and perl)
# for init-system-helpers' "usrmerge | usr-is-merged" (the merged-usr hook
# merges /usr itself, as debootstrap does).
PACKAGES = (
    "usr-is-merged", "systemd", "systemd-sysv", "libpam-systemd", "dbus", "polkitd", "systemd-container",
    "qemu-system-x86", "python3", "python3-systemd", "iproute2", "procps",
)  # fmt: skip
# Debian 12's python3-dbus-fast is 1.84, older than vmspawnd wants; qemu.qmp is not packaged.
PYPI = ("dbus-fast", "qemu.qmp")
# Bump when the build steps change (the key must change with them).
RECIPE = 2
# mmdebstrap, not debootstrap: apt fetches the ~200 packages in parallel over
# one pipelined connection (debootstrap: one wget after the other, 45-50 s
# here) and dpkg runs under eatmydata (no fsync; a build that fails is thrown
# away anyway; mmdebstrap empties apt's cache at the end). Measured on this
# host at load 5-11: debootstrap 266 s (185 s with dpkg's force-unsafe-io),
# mmdebstrap with these hooks 43 s (89 s without eatmydata).
HOOKS = Path("/usr/share/mmdebstrap/hooks")
MMDEBSTRAP = (
    "mmdebstrap", "--variant=minbase", "--aptopt=APT::Install-Recommends \"false\"",
    f"--hook-dir={HOOKS / 'merged-usr'}", f"--hook-dir={HOOKS / 'eatmydata'}",
)  # fmt: skip
INIT = "/usr/local/sbin/vmspawnd-test-init"
# nspawn mounts these v1 controllers read-only (see the module docstring).
CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "blkio", "devices", "freezer")
INIT_SCRIPT = f"""#!/bin/sh
# Test container init: the cgroup v1 controllers read-write, so that
# systemd's MemoryMax=/TasksMax= are enforced, then systemd itself.
for c in {" ".join(CONTROLLERS)}; do
    if [ -d /sys/fs/cgroup/$c ]; then
        mount -o remount,bind,rw /sys/fs/cgroup/$c || echo "vmspawnd-test-init: cannot remount $c" >&2
    fi
done
exec /usr/lib/systemd/systemd "$@"
"""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vmspawnd-container"


def unavailable() -> str | None:
    """Why a container cannot run here, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter"):
        if shutil.which(tool) is None:
            package = {"systemd-nspawn": "systemd-container", "nsenter": "util-linux"}.get(tool, tool)
            return f"{tool} is not installed (Debian package {package}; `make deps` installs it)"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup file system at /sys/fs/cgroup"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay file system"
    return None


def apt_mirror(apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses (deb822 .sources or one-line .list entries), for mmdebstrap."""
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]
    for file in files:
        if not file.is_file():
            continue
        text = file.read_text(errors="replace")
        if file.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
                if SUITE in fields.get("Suites", "").split() and "main" in fields.get("Components", "").split():
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE and "main" in words[3:]:
                    return words[1]
    return "http://deb.debian.org/debian"


def pypi_pins() -> tuple[str, ...]:
    """The versions this test run itself uses."""
    return tuple(f"{name}=={metadata.version(name)}" for name in PYPI)


def rootfs_key() -> str:
    recipe = json.dumps([RECIPE, SUITE, PACKAGES, MMDEBSTRAP, pypi_pins(), INIT_SCRIPT])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """A command whose failure is an error with its output in the message."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def build_rootfs(cache: Path | None = None) -> Path:
    """The cached root for today's package list, built first if needed.

    One build at a time per cache (other runs wait for it); a root another
    run's container still uses (it holds a shared lock on its .complete) is
    not removed.
    """
    cache = cache or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"rootfs-{rootfs_key()}"
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").exists():
            return final
        for stale in cache.glob("build-*"):
            remove_tree(stale)
        for stale in cache.glob("rootfs-*"):
            if not in_use(stale):
                remove_tree(stale)
        partial = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
        try:
            run([*MMDEBSTRAP, f"--include={','.join(PACKAGES)}", SUITE, str(partial), apt_mirror()], timeout=900)
            site = partial / "usr/local/lib/python3.11/dist-packages"
            run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
                 "--target", str(site), *pypi_pins()],
                timeout=300,
            )  # fmt: skip
            init = partial / INIT.lstrip("/")
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text(INIT_SCRIPT)
            init.chmod(0o755)
            (partial / ".complete").touch()
            partial.rename(final)
        except BaseException:
            remove_tree(partial)
            raise
    return final


def in_use(rootfs: Path) -> bool:
    try:
        with open(rootfs / ".complete") as marker:
            fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def remove_tree(path: Path) -> None:
    """A directory, after whatever is mounted below it (an interrupted mmdebstrap leaves /proc there)."""
    prefix = f"{path.resolve()}/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mount], check=False, timeout=30)
    shutil.rmtree(path, ignore_errors=True)


def own_cgroups(name: str) -> list[Path]:
    """A new cgroup below the caller's in every hierarchy this process is in."""
    paths = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount = "unified" if Path("/sys/fs/cgroup/unified").is_dir() else ""
        else:
            mount = controllers.removeprefix("name=")
        base = Path("/sys/fs/cgroup") / mount if mount else Path("/sys/fs/cgroup")
        if (base / path.lstrip("/")).is_dir():
            paths.append(base / path.lstrip("/") / name)
    return paths


def make_cgroup(path: Path) -> None:
    path.mkdir(exist_ok=True)
    # A new v1 cpuset has no cpus and no memory nodes, and takes no process until it has.
    for name in ("cpuset.cpus", "cpuset.mems"):
        if (path / name).exists() and not (path / name).read_text().strip():
            (path / name).write_text((path.parent / name).read_text())


def remove_cgroup(path: Path) -> None:
    """A cgroup and every cgroup below it (systemd inside made them), deepest first."""
    if not path.is_dir():
        return
    for dirpath, _, _ in sorted(os.walk(path), key=lambda e: -e[0].count("/")):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(dirpath)


class Container:
    """One booted container over the cached root; `stop()` leaves nothing behind."""

    def __init__(self, rootfs: Path, name: str = "") -> None:
        self.rootfs = rootfs
        self.name = name or f"vmspawnd-test-{os.getpid()}"
        self.rundir = Path(tempfile.mkdtemp(prefix="vmspawnd-container-", dir="/var/tmp"))
        self.root = self.rundir / "root"
        self.log = self.rundir / "nspawn.log"
        self.cgroups = own_cgroups(self.name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self._mounted = False
        # Held while the overlay uses the root: build_rootfs() leaves it alone.
        self._in_use = open(rootfs / ".complete")  # noqa: SIM115 - closed by stop()
        fcntl.flock(self._in_use, fcntl.LOCK_SH)

    # Set-up, in the order start() does it.

    def mount(self) -> None:
        upper, work = self.rundir / "upper", self.rundir / "work"
        for d in (upper, work, self.root):
            d.mkdir()
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.rootfs},upperdir={upper},workdir={work}", str(self.root)], timeout=30)  # fmt: skip
        self._mounted = True

    def install(self) -> None:
        """vmspawnd from this checkout, as a distribution installs it."""
        run(["make", "-C", str(ROOT), "install", f"DESTDIR={self.root}", "PREFIX=/usr"], timeout=120)

    def copy_in(self, source: Path, target: str, mode: int = 0o644) -> str:
        """A host file copied into the container (readable by every uid there)."""
        dest = self.root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        dest.chmod(mode)
        return target

    def boot(self) -> None:
        notify_path = self.rundir / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        cgroups = self.cgroups

        for cgroup in cgroups:
            make_cgroup(cgroup)

        def enter_cgroups() -> None:
            for cgroup in cgroups:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        argv = [
            "systemd-nspawn", "-D", str(self.root), "-M", self.name, "--register=no", "--keep-unit",
            "--private-network", "--kill-signal=SIGRTMIN+3", "--console=pipe", "--notify-ready=yes", INIT,
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=enter_cgroups,
                env={"PATH": PATH, "NOTIFY_SOCKET": str(notify_path)},
            )  # fmt: skip
        deadline = time.monotonic() + BOOT_TIMEOUT
        try:
            ready = False
            while not ready:
                notify.settimeout(max(0.0, deadline - time.monotonic()))
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    raise RuntimeError(self.failure(f"not booted within {BOOT_TIMEOUT:.0f} s")) from None
                if found := re.search(r"^X_NSPAWN_LEADER_PID=(\d+)$", message, re.MULTILINE):
                    self.leader = int(found.group(1))
                ready = "READY=1" in message.split("\n")
        finally:
            notify.close()
        if not self.leader:
            raise RuntimeError(self.failure("nspawn never told its leader's pid"))

    def start(self) -> Container:
        try:
            self.mount()
            self.install()
            self.boot()
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=BOOT_TIMEOUT)
            if state.stdout.strip() != "running":
                failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
                raise RuntimeError(self.failure(f"system is {state.stdout.strip()}; failed units:\n{failed}"))
        except BaseException:
            self.stop()
            raise
        return self

    def failure(self, what: str) -> str:
        log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return f"container {self.name}: {what}; nspawn's output:\n{log}"

    # Use.

    def path(self, inside: str) -> Path:
        """A path inside the container, seen from the host."""
        return self.root / inside.lstrip("/")

    @property
    def bus_address(self) -> str:
        """The container's system bus, from the host (the container's /run is its own tmpfs)."""
        return f"unix:path=/proc/{self.leader}/root/run/dbus/system_bus_socket"

    def nsenter(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", *argv]

    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the container (its namespaces; a client of its systemd)."""
        result = subprocess.run(self.nsenter(argv), capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(
                f"in {self.name}: {' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result

    def spawn(self, argv: Sequence[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command run by the container's systemd, so it lands in the container's cgroups."""
        return self.run(["systemd-run", "--wait", "--pipe", "--quiet", "--collect", "--", *argv], check, timeout)

    # Tear-down.

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.leader:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGRTMIN + 4)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._kill_leftovers()
        if self._mounted:
            run(["umount", str(self.root)], timeout=30)
            self._mounted = False
        for cgroup in self.cgroups:
            remove_cgroup(cgroup)
        shutil.rmtree(self.rundir, ignore_errors=True)
        self._in_use.close()

    def _kill_leftovers(self) -> None:
        """Anything still in the container's cgroups once nspawn is gone (nothing, normally)."""
        for cgroup in self.cgroups:
            for procs in cgroup.rglob("cgroup.procs") if cgroup.is_dir() else ():
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def booted(rootfs: Path | None = None) -> Iterator[Container]:
    container = Container(rootfs or build_rootfs()).start()
    try:
        yield container
    finally:
        container.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "shell"])
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="where the roots are kept")
    args = parser.parse_args()
    if reason := unavailable():
        sys.exit(f"container.py: {reason}")
    rootfs = build_rootfs(args.cache)
    if args.command == "build":
        print(rootfs)
        return
    with booted(rootfs) as container:
        print(f"{container.name}: leader {container.leader}, root {container.root}", file=sys.stderr)
        subprocess.run(container.nsenter(["bash", "-l"]), check=False)


if __name__ == "__main__":
    main()
