#!/usr/bin/env python3
"""Find how many hotplug ports q35 really gives: boot the tiny guest on raw
QEMU with R root ports, each holding a PCIe switch of K downstream ports, then
hotplug a virtio-blk disk on the very last downstream port and wait for the
guest to report it (VMSPAWN-BLOCK-ADD).

    python3 tools/portlimit.py ROOTS PORTS_PER_SWITCH [--timeout S]

Prints one line: roots, ports, buses, boot seconds, hotplug seconds, verdict.
Variants (README "How many hotplug ports" lists what they showed):
--implicit transitional|modern adds vmspawnd's three implicit virtio devices
on pcie.0 (as QEMU makes them, or without their legacy IO BAR),
--implicit-props ',vectors=0' gives them no MSI-X, --disks N hotplugs N
disks from the last port back, --sizes 31,30,... gives each switch its own
number of ports, --append loglevel=7 shows the guest kernel's
reasons (e.g. "virtio_blk: probe of virtio3 failed with error -28"), --qemu
passes more QEMU arguments one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tinyguest

# pcie.0 slots for root ports: 0x10..0x1e first, then down from 0x0f.
SLOTS = [*range(0x10, 0x1F), *range(0x0F, 0x00, -1)]
# Hotplug on the first port instead of the last (VMSPAWN_PORTLIMIT_FIRST=1).
FIRST = os.environ.get("VMSPAWN_PORTLIMIT_FIRST") == "1"
# Downstream ports with slot=chassis, as vmspawnd gives them (VMSPAWN_PORTLIMIT_SLOTS=1).
SLOT_IS_CHASSIS = os.environ.get("VMSPAWN_PORTLIMIT_SLOTS") == "1"


def switch_argv(roots: int, per_switch: int, rp_props: str = "", sizes: tuple[int, ...] = ()) -> list[str]:
    """Root ports packed 8 per slot, a switch behind each (none if per_switch is 0);
    `sizes` gives each switch its own number of ports instead."""
    argv: list[str] = []
    chassis = 0
    for r in range(roots):
        per_switch = sizes[r] if sizes else per_switch
        chassis += 1
        slot, fn = SLOTS[r // 8], r % 8
        mf = ",multifunction=on" if fn == 0 else ""
        argv += [
            "-device",
            f"pcie-root-port,id=rp{r},bus=pcie.0,addr=0x{slot:x}.{fn}{mf},chassis={chassis},slot={chassis}{rp_props}",
        ]
        if not per_switch:
            continue
        argv += ["-device", f"x3130-upstream,id=up{r},bus=rp{r},addr=0"]
        for d in range(per_switch):
            chassis += 1
            slot = chassis if SLOT_IS_CHASSIS else 0
            argv += [
                "-device",
                f"xio3130-downstream,id=dp{r}.{d},bus=up{r},addr=0x{d:x},chassis={chassis},slot={slot}",
            ]
    return argv


# The implicit devices vmspawnd adds on pcie.0, as --implicit variants.
IMPLICIT = ("virtio-rng-pci", "virtio-balloon-pci", "virtio-serial-pci")


def implicit_argv(how: str, more: str = "") -> list[str]:
    """none, transitional (vmspawnd's today: legacy IO BAR), modern (disable-legacy=on); `more` props."""
    if how == "none":
        return []
    props = ",disable-legacy=on" if how == "modern" else ""
    argv = []
    for i, d in enumerate(IMPLICIT):
        # virtio-balloon-pci has no vectors= (it never uses MSI-X).
        own = "" if d == "virtio-balloon-pci" and "vectors" in more else more
        argv += ["-device", f"{d},id=implicit{i},bus=pcie.0,addr=0x{i + 1:x}{props}{own}"]
    return argv


def read(console: Path) -> str:
    return console.read_text(errors="replace")


async def more_disks(qmp: QMPClient, console: Path, disk: Path, roots: int, per_switch: int, n: int) -> int:
    """Hotplug n more disks on the ports before the last one; how many the guest sees
    (it stops at the first one the guest's driver refuses, or that is not seen in 20 s)."""
    for k in range(1, n + 1):
        port = f"dp{roots - 1 - k // per_switch}.{per_switch - 1 - k % per_switch}"
        file = disk.with_name(f"disk{k}.raw")
        file.write_bytes(b"\0" * 1024 * 1024)
        await qmp.execute(
            "blockdev-add", {"driver": "raw", "node-name": f"n{k}", "file": {"driver": "file", "filename": str(file)}}
        )
        mark = len(read(console))
        await qmp.execute(
            "device_add",
            {"driver": "virtio-blk-pci", "id": f"d{k}", "drive": f"n{k}", "bus": port, "serial": f"MORE{k}"},
        )
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            text = read(console)[mark:]
            if f"serial=MORE{k}" in text:
                break
            if "failed with error" in text:
                return k - 1
            await asyncio.sleep(0.05)
        else:
            return k - 1
    return n


async def probe(
    roots: int,
    per_switch: int,
    timeout: float,
    keep: Path | None = None,
    *,
    rp_props: str = "",
    implicit: str = "none",
    implicit_props: str = "",
    dev_props: dict[str, object] | None = None,
    disks: int = 1,
    append: str = "",
    extra: tuple[str, ...] = (),
    sizes: tuple[int, ...] = (),
) -> str:
    dev_props = dev_props or {}
    guest = tinyguest.build(tinyguest.default_cache_dir())
    with tempfile.TemporaryDirectory() as tmp:
        console = keep or Path(tmp) / "console.log"
        disk = Path(tmp) / "disk.raw"
        disk.write_bytes(b"\0" * 1024 * 1024)
        a, b = socket.socketpair()
        argv = [
            "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "256M", "-nodefaults", "-display", "none",
            "-chardev", f"socket,id=qmp,fd={b.fileno()}", "-mon", "chardev=qmp,mode=control",
            "-chardev", f"file,id=console,path={console}", "-serial", "chardev:console",
            *switch_argv(roots, per_switch, rp_props, sizes), *implicit_argv(implicit, implicit_props), *extra,
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", f"{guest.cmdline} {append}",
        ]  # fmt: skip
        start = time.monotonic()
        # Popen, not asyncio's: QEMU must get the QMP socket end as it is.
        proc = subprocess.Popen(argv, pass_fds=(b.fileno(),))  # noqa: ASYNC220
        b.close()
        qmp = QMPClient("portlimit")
        await qmp.connect(a)
        buses = roots * (per_switch + 2) if per_switch else roots
        ports = roots * per_switch or roots
        if sizes:
            # The last switch's size decides the last port (and more_disks' walk back).
            buses, ports, per_switch = sum(k + 2 for k in sizes), sum(sizes), sizes[-1]
        verdict = "no-boot"
        boot = plug = float("nan")
        try:
            while time.monotonic() - start < timeout:
                if "VMSPAWN-GUEST-READY" in console.read_text(errors="replace"):
                    boot = time.monotonic() - start
                    break
                await asyncio.sleep(0.1)
            else:
                return f"roots={roots} ports={ports} buses={buses} boot=timeout verdict={verdict}"
            last = f"dp{roots - 1}.{per_switch - 1}" if per_switch else f"rp{roots - 1}"
            if FIRST:
                last = "dp0.0" if per_switch else "rp0"
            await qmp.execute(
                "blockdev-add", {"driver": "raw", "node-name": "n", "file": {"driver": "file", "filename": str(disk)}}
            )
            t0 = time.monotonic()
            await qmp.execute(
                "device_add",
                {"driver": "virtio-blk-pci", "id": "d", "drive": "n", "bus": last, "serial": "LAST", **dev_props},
            )
            verdict = "no-hotplug"
            while time.monotonic() - t0 < timeout:
                if "serial=LAST" in console.read_text(errors="replace"):
                    plug = time.monotonic() - t0
                    verdict = "ok"
                    break
                await asyncio.sleep(0.05)
            if verdict == "ok" and disks > 1:
                seen = 1 + await more_disks(qmp, console, disk, roots, per_switch, disks - 1)
                verdict = f"ok disks_seen={seen}/{disks}"
        finally:
            proc.kill()
            proc.wait()
            await qmp.disconnect()
        return f"roots={roots} ports={ports} buses={buses} boot={boot:.1f}s hotplug={plug:.2f}s verdict={verdict}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("roots", type=int)
    ap.add_argument("per_switch", type=int)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--console", type=Path, help="keep the guest's console log here")
    ap.add_argument("--rp", default="", help="extra root-port properties, e.g. ',io-reserve=0'")
    ap.add_argument("--implicit", choices=("none", "transitional", "modern"), default="none")
    ap.add_argument("--implicit-props", default="", help="more props for them, e.g. ',vectors=0'")
    ap.add_argument("--dev-props", default="{}", help="JSON props for the hotplugged disk, e.g. '{\"vectors\": 0}'")
    ap.add_argument("--sizes", default="", help="ports per switch, e.g. 31,30,30,30,30,30 (ROOTS must match)")
    ap.add_argument("--disks", type=int, default=1, help="hotplug this many disks, from the last port back")
    ap.add_argument("--append", default="", help="more kernel command line, e.g. loglevel=7")
    ap.add_argument("--qemu", action="append", default=[], help="one more QEMU argument (repeatable)")
    args = ap.parse_args()
    result = probe(
        args.roots, args.per_switch, args.timeout, args.console,
        rp_props=args.rp, implicit=args.implicit, implicit_props=args.implicit_props,
        dev_props=json.loads(args.dev_props), disks=args.disks, append=args.append, extra=tuple(args.qemu),
        sizes=tuple(int(k) for k in args.sizes.split(",") if k),
    )  # fmt: skip
    print(asyncio.run(result), f"implicit={args.implicit}{args.implicit_props} rp={args.rp!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
