"""libvirt on the same host: createXML and attach/detach of a disk versus vmspawnd.

The benchmark starts its own libvirtd and virtlogd (Debian's
libvirt-daemon-system), by hand, in a private mount namespace
(`unshare --mount`): tmpfs over /run/libvirt, /var/lib/libvirt,
/var/log/libvirt and /var/cache/libvirt, and a private copy of /etc/libvirt
(without the host's defined networks and domains) bind-mounted over it, so
nothing of the host's libvirt state is read or changed. libvirtd listens on
a socket in the benchmark's work dir (unix_sock_dir in a libvirtd.conf
passed with -f); its qemu.conf is Debian's default (QEMU runs as
libvirt-qemu, DAC labelling, cgroups, private /dev). The client is the
libvirt Python binding, connected once before anything is timed.

Same guest on both sides: q35, TCG (`<domain type='qemu'>`), 1 vCPU,
256 MiB, `-cpu max`, the tiny guest's kernel, initrd and command line
(libvirt gets copies of both files in a dir its QEMU user can read), 4
hotpluggable PCIe root ports, virtio rng/balloon/serial on pcie.0, serial
console to a file, no USB, no network.

- create: CreateMachine (hotplug_spares=4, `-S`) vs createXML(xml,
  VIR_DOMAIN_START_PAUSED), each from call to return; paused on both sides.
  Between repetitions (not timed): TerminateMachine / destroy.
- attach: on one booted machine and one booted domain, AddDrive(path) vs
  attachDeviceFlags(<disk> virtio raw, LIVE), from call to return; then
  (not timed) the guest's VMSPAWN-BLOCK-ADD.
- detach: RemoveDrive vs detachDeviceFlags(LIVE), from call to return (both
  wait for QEMU's DEVICE_DELETED; libvirt gives up waiting after 5 s); then
  (not timed) the guest's VMSPAWN-BLOCK-REMOVE.

Order alternates every repetition, --settle s idle before each timed call.
Targets: faster than libvirt on create and attach (ratio < 1). Detach: info.
If libvirt cannot run here, the rows are "n/a" with the exact error, and
the run does not fail.

Run: .venv/bin/python bench/versus_libvirt.py   (as root; about 2 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from common import Console, Env, bench_main, document, kill_qemus, make_disk, ms, na_row, print_rows, row

from tests.integration.harness import Client, guest_options

LIBVIRT_MOUNTS = ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")
CGROUP_ROOT = Path("/sys/fs/cgroup")
ADDED = r"VMSPAWN-BLOCK-ADD (vd[a-z]+) "

FIGURES = (
    (
        "create",
        "Create vs libvirt createXML (4 root ports, paused)",
        "libvirt createXML(START_PAUSED)",
        "< 1.0x (faster)",
    ),
    ("attach", "Attach a disk: AddDrive vs libvirt attachDevice", "libvirt attachDeviceFlags(LIVE)", "< 1.0x (faster)"),
    ("detach", "Detach a disk: RemoveDrive vs libvirt detachDevice", "libvirt detachDeviceFlags(LIVE)", "-"),
)


class Unavailable(Exception):
    """libvirt cannot run here; the message says exactly why."""


def import_libvirt() -> tuple[Any, str]:
    try:
        import libvirt

        return libvirt, "libvirt-python in the venv"
    except ImportError as first:
        # Debian's python3-libvirt, if the venv's Python can load it (same 3.x ABI).
        dist = Path("/usr/lib/python3/dist-packages")
        if (dist / "libvirt.py").exists():
            sys.path.append(str(dist))
            try:
                import libvirt

                return libvirt, f"python3-libvirt from {dist}"
            except ImportError as e:
                raise Unavailable(f"cannot import the libvirt Python bindings: {e}") from e
        raise Unavailable(
            f"cannot import the libvirt Python bindings ({first}): install libvirt-python in the venv "
            "(needs libvirt-dev, pkg-config, gcc) or Debian's python3-libvirt"
        ) from first


def libvirt_version(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def cgroup_dirs() -> set[Path]:
    """libvirt's cgroup dirs (machine/...) that exist now, on every hierarchy."""
    found: set[Path] = set()
    if CGROUP_ROOT.is_dir():
        for top in [CGROUP_ROOT, *CGROUP_ROOT.iterdir()]:
            for base in (top / "machine", top / "machine.slice"):
                if base.is_dir():
                    found.add(base)
                    found.update(p for p in base.rglob("*") if p.is_dir())
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def stop_pid(pid: int, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL: for a process that is not our child (we cannot wait for it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.05)


@contextlib.contextmanager
def private_libvirtd(lv: Any, base: Path) -> Iterator[Any]:
    """A libvirtd + virtlogd of our own (see the module doc); yields an open connection."""
    for binary in ("libvirtd", "virtlogd", "unshare", "mount"):
        if shutil.which(binary) is None:
            raise Unavailable(f"{binary} not found in PATH: install libvirt-daemon-system (and util-linux)")
    base.mkdir()
    sock = base / "sock"
    sock.mkdir()
    etc = base / "etc"
    shutil.copytree("/etc/libvirt", etc, symlinks=True)
    # Nothing of the host's own definitions: no networks, domains or pools to autostart.
    for sub in ("qemu", "storage", "secrets"):
        shutil.rmtree(etc / sub, ignore_errors=True)
    (etc / "qemu").mkdir()
    conf = base / "libvirtd.conf"
    conf.write_text(
        f'unix_sock_dir = "{sock}"\n'
        'unix_sock_rw_perms = "0700"\n'
        'auth_unix_rw = "none"\n'
        'auth_unix_ro = "none"\n'
        f'log_outputs = "3:file:{base / "libvirtd.log"}"\n'
    )
    script = "\n".join(
        [
            "set -e",
            *(f"mount -t tmpfs -o mode=0755 vmspawnd-bench {d}" for d in LIBVIRT_MOUNTS),
            f"mount --bind {etc} /etc/libvirt",
            f"virtlogd -p {base / 'virtlogd.pid'} &",
            f"echo $! > {base / 'virtlogd.child'}",
            f"exec libvirtd -f {conf} -p {base / 'libvirtd.pid'}",
        ]
    )
    created = [Path(d) for d in LIBVIRT_MOUNTS if not Path(d).exists()]
    for d in created:
        d.mkdir(parents=True)
    cgroups_before = cgroup_dirs()
    # Not our private bus: libvirtd sees the host as it is (no system bus here means no machined).
    env = {k: v for k, v in os.environ.items() if k != "DBUS_SYSTEM_BUS_ADDRESS"}
    proc: subprocess.Popen[bytes] | None = None
    conn = None
    try:
        with open(base / "launcher.log", "wb") as out:
            proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        uri = f"qemu+unix:///system?socket={sock / 'libvirt-sock'}"
        deadline = time.monotonic() + 60
        error = ""
        while conn is None:
            if proc.poll() is not None:
                raise Unavailable(f"libvirtd exited with {proc.returncode}: {tail(base)}")
            if time.monotonic() > deadline:
                raise Unavailable(f"libvirtd did not answer on {uri} within 60 s ({error}): {tail(base)}")
            if (sock / "libvirt-sock").exists():
                try:
                    conn = lv.open(uri)
                except lv.libvirtError as e:
                    error = str(e)
            if conn is None:
                time.sleep(0.1)
        yield conn
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                for dom in conn.listAllDomains():
                    with contextlib.suppress(Exception):
                        dom.destroy()
            with contextlib.suppress(Exception):
                conn.close()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError, ValueError):
            stop_pid(int((base / "virtlogd.child").read_text()))
        kill_qemus(base)
        # Cgroups libvirt made for its machines, deepest first (only empty ones can go).
        for d in sorted(cgroup_dirs() - cgroups_before, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()


def tail(base: Path) -> str:
    lines = []
    for name in ("launcher.log", "libvirtd.log"):
        with contextlib.suppress(FileNotFoundError):
            lines += [f"{name}: {line}" for line in (base / name).read_text(errors="replace").splitlines()[-8:]]
    return " | ".join(lines) or "(no output)"


def domain_xml(name: str, kernel: Path, initrd: Path, cmdline: str, console: Path, ports: int = 4) -> str:
    root_ports = "".join(f"<controller type='pci' model='pcie-root-port' index='{i + 1}'/>" for i in range(ports))

    def on_pcie0(slot: int) -> str:
        return f"<address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' function='0x0'/>"

    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' model='pcie-root'/>
    {root_ports}
    <controller type='usb' model='none'/>
    <controller type='virtio-serial' index='0'>{on_pcie0(0x05)}</controller>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend>{on_pcie0(0x06)}</rng>
    <memballoon model='virtio'>{on_pcie0(0x07)}</memballoon>
  </devices>
</domain>"""


def disk_xml(path: str) -> str:
    return (
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{path}'/><target dev='vdb' bus='virtio'/></disk>"
    )


def timed(fn: Callable[[], Any]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


async def measure(env: Env, args: argparse.Namespace, lv: Any, conn: Any, base: Path) -> dict[str, Any]:
    kernel, initrd = base / "vmlinux", base / "initrd"
    shutil.copyfile(env.guest.kernel, kernel)
    shutil.copyfile(env.guest.initrd, initrd)
    for f in (kernel, initrd):
        f.chmod(0o644)
    client = await Client.connect()
    samples: dict[str, dict[str, list[int]]] = {k: {"ours": [], "libvirt": []} for k, *_ in FIGURES}

    async def lv_call(what: str, fn: Callable[[], Any]) -> int:
        try:
            return await asyncio.to_thread(timed, fn)
        except lv.libvirtError as e:
            raise Unavailable(f"libvirt {what} failed: {e}") from e

    try:
        # -- create -------------------------------------------------------------
        opts = guest_options(env.guest, hotplug_spares=4, qemu_extra=["-S"])

        async def ours_create(i: int) -> int:
            name = f"lc{i}"
            t0 = time.perf_counter_ns()
            await client.create(name, **opts)
            took = time.perf_counter_ns() - t0
            await client.call("TerminateMachine", "s", [name])
            return took

        async def libvirt_create(i: int) -> int:
            xml = domain_xml(f"lvc{i}", kernel, initrd, env.guest.cmdline, base / f"lvc{i}.console")
            holder: list[Any] = []
            took = await lv_call("createXML", lambda: holder.append(conn.createXML(xml, lv.VIR_DOMAIN_START_PAUSED)))
            await asyncio.to_thread(holder[0].destroy)
            return took

        await alternate(args, samples["create"], ours_create, libvirt_create)
        print("versus_libvirt: create done", flush=True)

        # -- attach / detach on booted guests ----------------------------------------
        machine = await client.create("la", **guest_options(env.guest, hotplug_spares=4))
        ours_console = Console(await client.prop(machine, "ConsoleLog"))
        lv_console = Console(base / "lva.console")
        try:
            dom = conn.createXML(domain_xml("lva", kernel, initrd, env.guest.cmdline, lv_console.path), 0)
        except lv.libvirtError as e:
            raise Unavailable(f"libvirt createXML of a booting domain failed: {e}") from e
        await asyncio.gather(
            ours_console.wait("VMSPAWN-GUEST-READY", 0, timeout=180, poll=0.1),
            lv_console.wait("VMSPAWN-GUEST-READY", 0, timeout=180, poll=0.1),
        )
        ours_disk = make_disk(env.workdir / "ours.raw")
        lv_disk = make_disk(base / "lv.raw")
        live = lv.VIR_DOMAIN_AFFECT_LIVE

        async def ours_pair(i: int) -> tuple[int, int]:
            mark = ours_console.mark()
            t0 = time.perf_counter_ns()
            drive_id, _ = await client.add_drive(machine, ours_disk)
            attach = time.perf_counter_ns() - t0
            m, _ = await ours_console.wait(ADDED, mark, poll=0.005)
            await asyncio.sleep(args.settle)
            mark = ours_console.mark()
            t0 = time.perf_counter_ns()
            await client.remove_drive(machine, drive_id)
            detach = time.perf_counter_ns() - t0
            await ours_console.wait(rf"VMSPAWN-BLOCK-REMOVE {m.group(1)}\s", mark, poll=0.005)
            return attach, detach

        async def libvirt_pair(i: int) -> tuple[int, int]:
            xml = disk_xml(lv_disk)
            mark = lv_console.mark()
            attach = await lv_call("attachDeviceFlags", lambda: dom.attachDeviceFlags(xml, live))
            m, _ = await lv_console.wait(ADDED, mark, poll=0.005)
            await asyncio.sleep(args.settle)
            mark = lv_console.mark()
            detach = await lv_call("detachDeviceFlags", lambda: dom.detachDeviceFlags(xml, live))
            await lv_console.wait(rf"VMSPAWN-BLOCK-REMOVE {m.group(1)}\s", mark, poll=0.005)
            if "<disk" in dom.XMLDesc(0):
                raise Unavailable("libvirt still lists the detached disk after the guest removed it")
            return attach, detach

        pairs: dict[str, list[tuple[int, int]]] = {"ours": [], "libvirt": []}

        async def ours_op(i: int) -> int:
            pairs["ours"].append(await ours_pair(i))
            return 0

        async def libvirt_op(i: int) -> int:
            pairs["libvirt"].append(await libvirt_pair(i))
            return 0

        await alternate(args, {"ours": [], "libvirt": []}, ours_op, libvirt_op)
        for side in ("ours", "libvirt"):
            counted = pairs[side][args.warmup :]
            samples["attach"][side] = [a for a, _ in counted]
            samples["detach"][side] = [d for _, d in counted]
        print("versus_libvirt: attach/detach done", flush=True)
    finally:
        await client.terminate_all()
        client.close()
    return {k: {side: ms(v) for side, v in s.items()} for k, s in samples.items()}


async def alternate(args: argparse.Namespace, samples: dict[str, list[int]], ours: Any, libvirt: Any) -> None:
    for i in range(args.warmup + args.reps):
        order = (("ours", ours), ("libvirt", libvirt)) if i % 2 == 0 else (("libvirt", libvirt), ("ours", ours))
        for side, op in order:
            await asyncio.sleep(args.settle)
            took = await op(i)
            if i >= args.warmup:
                samples[side].append(took)


async def run(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    base = env.workdir / "libvirt"
    extra: dict[str, Any] = {}
    try:
        lv, binding = import_libvirt()
        lv.registerErrorHandler(lambda ctx, err: None, None)
        with private_libvirtd(lv, base) as conn:
            extra = {"libvirt": libvirt_version(conn.getLibVersion()), "binding": binding}
            print(f"versus_libvirt: libvirtd {extra['libvirt']} up ({binding})", flush=True)
            figures = await measure(env, args, lv, conn, base)
    except Unavailable as e:
        why = str(e)
        print(f"versus_libvirt: libvirt n/a: {why}", flush=True)
        rows = [
            na_row(label, "ms", base_label, target, f"libvirt cannot run here: {why}")
            for _, label, base_label, target in FIGURES
        ]
        return document("versus_libvirt", rows, unavailable=why, **extra)
    rows = []
    for key, label, base_label, target in FIGURES:
        o, b = figures[key]["ours"], figures[key]["libvirt"]
        has_target = key != "detach"
        rows.append(
            row(
                label,
                "ms",
                o,
                b,
                base_label,
                target,
                o["median"] < b["median"] if has_target else None,
                f"{o['median'] - b['median']:+.1f} ms vs libvirt" + ("" if has_target else "; no target in the issue"),
                target_ratio=1.0 if has_target else None,
            )
        )
    return document(
        "versus_libvirt",
        rows,
        reps=args.reps,
        warmup_reps_not_counted=args.warmup,
        settle_s=args.settle,
        **extra,
    )


def report(r: dict[str, Any], out: Path) -> None:
    if "unavailable" in r:
        print(f"versus_libvirt: n/a ({r['duration_s']} s)")
    else:
        print(
            f"versus_libvirt: libvirt {r['libvirt']} ({r['binding']}); {r['reps']} reps per side "
            f"(+{r['warmup_reps_not_counted']} warm-up not counted), order alternating; {r['duration_s']} s in all"
        )
    print_rows(r["rows"])
    print(f"  figures written to {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=10, help="counted repetitions per side (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="leading repetitions not counted (default 1)")
    parser.add_argument("--settle", type=float, default=0.3, help="idle seconds before each timed call (default 0.3)")
    return bench_main("versus_libvirt", parser, run, report, default_timeout=400)


if __name__ == "__main__":
    sys.exit(main())
