#!/usr/bin/env python3
"""Build a tiny Linux guest (kernel + initramfs) for vmspawnd's QEMU tests.

Inputs come from Debian packages: ``linux-image-amd64`` (``/boot/vmlinuz-*``
plus ``/lib/modules/<ver>``) and ``busybox-static`` (``/bin/busybox``).  The
result lives in a cache dir and is rebuilt only when its inputs change.

The guest speaks a line protocol on its serial console (ttyS0)::

    VMSPAWN-PCI <bdf> <vendor>:<device> class=<class>   # one per PCI function
    VMSPAWN-BLOCK <name> serial=<serial>                # one per disk at boot
    VMSPAWN-NVME-COUNT <n>                              # nvme controllers
    VMSPAWN-MOUNT <tag> files=<names>                   # tinyguest.mount=TAG shares
    VMSPAWN-RUN <tag> rc=<status>                       # tinyguest.run=TAG: ran TAG's run.sh
    VMSPAWN-GUEST-READY                                 # boot snapshot done
    VMSPAWN-BLOCK-ADD <name> serial=<serial>            # hotplugged disk
    VMSPAWN-BLOCK-REMOVE <name>                         # unplugged disk
    VMSPAWN-SHARE-MOUNT <tag> hello=<line>              # hotplugged share mounted
    VMSPAWN-SHARE-UMOUNT <tag>                          # ...and unmounted again
    VMSPAWN-NET <name> mac=<mac>                        # one per interface at boot (not lo)
    VMSPAWN-NET-ADD <name> mac=<mac>                    # hotplugged interface
    VMSPAWN-NET-REMOVE <name> mac=<mac>                 # unplugged interface
    VMSPAWN-MEDIA <name> size=<bytes> head=<text>       # a cdrom's medium changed (size=0: none)
    VMSPAWN-POWEROFF                                    # ACPI power button
    VMSPAWN-AGENT <port>                                # qemu-ga holds the guest agent's port
    VMSPAWN-TICK <uptime>                               # tinyguest.tick: every 0.5 s

PCI ids and class are lower-case hex without ``0x`` (``1af4:1042``,
``class=010802``); ``<bdf>`` is the sysfs name (``0000:01:00.0``).
``<mac>`` is lower-case, colon separated. ``<text>`` is the medium's first
16 bytes, printable ASCII only (a test writes a label there).
``<serial>`` is the rest of the line, trimmed, and may be empty or contain
spaces (SCSI devices without a unit serial report their model instead).
Lines come in that order: the boot snapshot (PCI, BLOCK, NVME-COUNT), then
READY, then hotplug/poweroff events.  A disk appearing while the snapshot is
taken may be reported both as BLOCK and BLOCK-ADD, so treat BLOCK-ADD as
idempotent.  A hotplugged virtiofs share is mounted on /hot/TAG for each
``tinyguest.hotmount=TAG`` on the kernel command line (Linux 6.1 does not
tell a device's tag, so the guest tries the tags it was given); the guest
reports the first line of the share's ``hello`` file, and unmounts the share
once a file named ``unmount`` appears in it (the host's way to tell it).
With a virtio-serial port named ``org.qemu.guest_agent.0`` (vmspawnd's
``guest_agent``) the guest runs qemu-ga on it, in the background (boot
does not wait), and reports AGENT once qemu-ga has the port open; root's
password lives in /etc/shadow (``*`` at boot), which the guest's chpasswd
(a busybox script: busybox-static has none) rewrites for qemu-ga's
guest-set-user-password. ``tinyguest.noagent`` on the kernel command line
leaves the port without an agent (a guest that answers nothing).
Add ``tinyguest.shell`` to the kernel command line for an
interactive shell on the console (prompts mix with the lines), and
``tinyguest.tick`` for a TICK line with the guest's uptime twice a second.

CLI: ``python3 tools/tinyguest.py [--cache DIR]`` prints ``KERNEL=``,
``INITRD=`` and ``CMDLINE=`` lines that a shell can ``eval``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CMDLINE", "Guest", "build", "default_cache_dir", "find_kernel"]

BUSYBOX = Path("/bin/busybox")
# From Debian's qemu-guest-agent, with the libraries ldd names.
QEMU_GA = Path("/usr/sbin/qemu-ga")
MODULES_ROOT = Path("/lib/modules")

# Kernel command line.  Beyond the required bits, every extra flag removes a
# probe/calibration that is slow or pointless under TCG:
#   tsc=reliable / no_timer_check  skip TSC watchdog and the IO-APIC timer check
#   8250.nr_uarts=1                 probe only ttyS0 instead of 4 legacy ports
#   random.trust_cpu=on             do not wait for entropy
#   i8042.noaux                     skip the slow PS/2 mouse probe (no AUX port)
#   mitigations=off                 throwaway test VM: no speculation hardening
#   cryptomgr.notests               skip crypto self-tests (~0.5 s under TCG)
#   initcall_blacklist=...          two built-in self-test/tracing initcalls
#                                   that cost ~0.3 s and that nothing here uses
#   rodata=off                      skip the read-only remap + W+X audit
#   init_on_alloc=0                 do not zero every allocated page
#   (module parameters live in /etc/modprobe.d instead: see MODULE_ARGS)
# `quiet` keeps console_loglevel at 4, so kernel warnings still reach the log;
# the VMSPAWN lines are written to /dev/console by userspace and never depend
# on printk levels.
CMDLINE = (
    "console=ttyS0 rdinit=/init panic=-1 quiet"
    " tsc=reliable no_timer_check 8250.nr_uarts=1 random.trust_cpu=on"
    " i8042.noaux mitigations=off cryptomgr.notests rodata=off init_on_alloc=0"
    " initcall_blacklist=init_kprobe_trace,crypto_kdf108_init"
)

# Modules we want, in load-preference order (nvme first: its controller
# reset runs asynchronously, so starting it early overlaps with the rest).
WANTED_MODULES = (
    # crc-t10dif / crc64-rocksoft (pulled in by sd_mod and nvme_core) look up
    # their crypto backend via request_module(), which /init disables, so
    # ship the generic implementations and load them first.
    "crct10dif_generic",
    "crc64_rocksoft_generic",
    "nvme_core",
    "nvme",
    "virtio_pci",
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_blk",
    "scsi_mod",
    "sd_mod",
    "sr_mod",
    "virtio_scsi",
    "virtio_net",
    "virtio_rng",
    "virtio_balloon",
    "virtio_console",
    "vmw_vsock_virtio_transport",
    "button",
    "evdev",
    "fuse",
    "virtiofs",
)

# Module parameters, written to /etc/modprobe.d (busybox modprobe does not
# read "mod.param=" from the kernel command line).
MODULE_ARGS = {
    # Synchronous scan: SCSI disks present at boot exist once modprobe returns.
    "scsi_mod": "scan=sync",
    # Each QEMU nvme device is its own subsystem, so native multipath buys
    # nothing and would name disks after the subsystem, not the controller.
    "nvme_core": "multipath=N",
}

# Bump to force re-extraction of cached vmlinux files (the initramfs is keyed
# on this file's hash instead, so editing /init never re-extracts the kernel).
_KERNEL_FORMAT = 1
# Cache entries not used for this long are removed by build().
_PRUNE_AFTER_S = 7 * 24 * 3600

# PID 1.  Kept trivial so that it cannot fail: any error in the real init
# script (e.g. a failed redirection, which makes a non-interactive shell
# exit) ends only that child, never PID 1, so the kernel never panics.
_INIT = r"""#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
/bin/sh /etc/tinyguest-init.sh
rc=$?
# The script normally ends after READY (its watchers run in the background).
[ $rc = 0 ] || echo "tinyguest: init script failed ($rc)" > /dev/console
# Sleeping in a loop also reaps orphans reparented to PID 1.
while :; do sleep 3600; done
"""

_MAIN = r"""#!/bin/sh
# tinyguest main init script, run by /init (PID 1).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
# The kernel's own request_module() calls could only find our handful of
# modules and each costs a fork+exec; an empty path makes them fail fast.
echo > /proc/sys/kernel/modprobe
. /etc/tinyguest.sh

# One process loads every module (each fork+exec costs ~10 ms under TCG).
# The list is already in dependency order; modprobe also honours the
# generated modules.dep and the options in /etc/modprobe.d.
modprobe -a @MODULES@

# Hotplug notifications.  Debian's kernel has no CONFIG_UEVENT_HELPER, so
# /proc/sys/kernel/hotplug is usually absent: fall back to busybox `uevent`,
# which listens on netlink and runs the helper once per event, in order.
if [ -w /proc/sys/kernel/hotplug ]; then
    echo /sbin/hotplug > /proc/sys/kernel/hotplug
    : > /run/uevent-alive
else
    # busybox uevent exits on a netlink overrun (ENOBUFS): restart it so a
    # burst of events costs at most those events, not all later ones.
    (
        while :; do
            uevent /sbin/hotplug
            echo "tinyguest: uevent listener exited, restarting"
            usleep 100000
        done
    ) &
fi

# Wait (bounded, ~5 s) until
# - the uevent listener has seen a synthetic event we send (so its netlink
#   socket is open and no hotplug after READY can be missed),
# - every nvme PCI function has a live controller with a namespace (nvme
#   probes asynchronously), every SCSI disk/cdrom has its block device
#   (sd/sr probe asynchronously),
# - and the PCI/block/nvme listing is unchanged over two more polls.
prev= stable=0 i=0
while [ $i -lt 400 ]; do
    busy=0 want=0 have=0
    if [ ! -e /run/uevent-alive ]; then
        busy=1
        [ $((i % 4)) = 0 ] && echo change > /sys/devices/virtual/mem/null/uevent
    fi
    for d in /sys/bus/pci/devices/*; do
        read -r c < "$d/class"
        [ "$c" = 0x010802 ] && want=$((want + 1))
    done
    for c in /sys/class/nvme/*; do
        [ -e "$c" ] || continue
        have=$((have + 1))
        read -r st < "$c/state"
        set -- "$c"/nvme*n*
        [ "$st" = live ] && [ -e "$1" ] || busy=1
    done
    [ $have -lt $want ] && busy=1
    for d in /sys/bus/scsi/devices/*:*; do
        [ -e "$d/type" ] || continue
        read -r t < "$d/type"
        case $t in 0|5) [ -e "$d/block" ] || busy=1 ;; esac
    done
    set -- /sys/bus/pci/devices/* /sys/block/* /sys/class/nvme/* /sys/class/net/*
    cur="$*"
    if [ $busy = 0 ] && [ "$cur" = "$prev" ]; then
        stable=$((stable + 1))
        [ $stable -ge 2 ] && break
    else
        stable=0
    fi
    prev=$cur
    usleep 10000
    i=$((i + 1))
done

# Arm the power-button watcher before READY: evdev only queues events for
# readers that already have the device open, so open it here synchronously.
fd=3
for e in /sys/class/input/event*; do
    [ -e "$e/device/name" ] || continue
    read -r nm < "$e/device/name"
    [ "$nm" = "Power Button" ] || continue
    [ $fd -le 9 ] || break
    [ -c "/dev/input/${e##*/}" ] || continue
    eval "exec $fd</dev/input/${e##*/}"
    (
        # One input_event is 24 bytes on x86_64; any event means a press.
        dd bs=24 count=1 of=/dev/null 2>/dev/null <&$fd
        mkdir /run/poweroff 2>/dev/null || exit 0
        echo VMSPAWN-POWEROFF
        sync
        poweroff -f
    ) &
    eval "exec $fd<&-"
    fd=$((fd + 1))
done

# The guest agent's port, if it was named before the listener ran (later
# names come as events to the hotplug helper).
for p in /sys/class/virtio-ports/*; do
    [ -e "$p" ] && agent_port "${p##*/}"
done

# From here on the hotplug helper reports; events racing with the snapshot
# below may show up both as BLOCK and BLOCK-ADD (consumers must dedupe).
: > /run/vmspawn-ready
for d in /sys/bus/pci/devices/*; do
    read -r v < "$d/vendor"; read -r p < "$d/device"; read -r c < "$d/class"
    echo "VMSPAWN-PCI ${d##*/} ${v#0x}:${p#0x} class=${c#0x}"
done
for d in /sys/block/*; do
    n=${d##*/}
    case $n in ram*|loop*|\*) continue ;; esac
    echo "VMSPAWN-BLOCK $n serial=$(serial_of "$n")"
done
set -- /sys/class/nvme/*
[ -e "$1" ] || set --
echo "VMSPAWN-NVME-COUNT $#"
for d in /sys/class/net/*; do
    n=${d##*/}
    [ "$n" = lo ] && continue
    read -r mac < "$d/address"
    echo "$mac" > "/run/net-$n"
    echo "VMSPAWN-NET $n mac=$mac"
done
# cdroms: the kernel polls for a media change only when asked to.
for d in /sys/block/sr*; do
    [ -e "$d/events_poll_msecs" ] && echo 250 > "$d/events_poll_msecs"
done
# virtiofs shares named on the kernel command line: tinyguest.mount=TAG
for arg in $(cat /proc/cmdline); do
    case $arg in tinyguest.mount=*) ;; *) continue ;; esac
    tag=${arg#tinyguest.mount=}
    mkdir -p "/mnt/$tag"
    if mount -t virtiofs "$tag" "/mnt/$tag"; then
        echo "VMSPAWN-MOUNT $tag files=$(ls "/mnt/$tag" | tr '\n' ' ')"
    else
        echo "VMSPAWN-MOUNT-FAILED $tag"
    fi
done
# Commands from a mounted share, as root: tinyguest.run=TAG runs /mnt/TAG/run.sh
for arg in $(cat /proc/cmdline); do
    case $arg in tinyguest.run=*) ;; *) continue ;; esac
    tag=${arg#tinyguest.run=}
    sh "/mnt/$tag/run.sh"
    echo "VMSPAWN-RUN $tag rc=$?"
done
echo VMSPAWN-GUEST-READY

if grep -q tinyguest.tick /proc/cmdline; then
    # The guest's clock, twice a second: a paused machine's stops.
    (while :; do read -r up _ < /proc/uptime; echo "VMSPAWN-TICK $up"; usleep 500000; done) &
fi

if grep -q tinyguest.shell /proc/cmdline; then
    # Debug aid: interactive shell on the console (prompts may interleave
    # with VMSPAWN lines, hence opt-in).
    while :; do setsid cttyhack sh; sleep 1; done
fi
"""

_HOTPLUG = r"""#!/bin/sh
# Run once per kernel uevent (by busybox `uevent` or the kernel helper).
# The kernel helper passes only the uevent variables, so set PATH ourselves.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
if [ "$DEVPATH" = /devices/virtual/mem/null ]; then
    : > /run/uevent-alive
    exit 0
fi
# A port's name comes after the port (a change event): the agent may start any time.
if [ "$SUBSYSTEM" = virtio-ports ]; then
    . /etc/tinyguest.sh
    agent_port "${DEVPATH##*/}"
    exit 0
fi
[ -e /run/vmspawn-ready ] || exit 0
if [ "$SUBSYSTEM" = virtio ] && [ "$ACTION" = bind ] && [ "$DRIVER" = virtiofs ]; then
    . /etc/tinyguest.sh
    hot_share > /dev/console 2>&1
    exit 0
fi
if [ "$SUBSYSTEM" = net ]; then
    n=${INTERFACE:-${DEVPATH##*/}}
    [ "$n" = lo ] && exit 0
    case $ACTION in
    add)
        read -r mac < "/sys/class/net/$n/address"
        # Kept for the remove event: sysfs is gone by then.
        echo "$mac" > "/run/net-$n"
        echo "VMSPAWN-NET-ADD $n mac=$mac" > /dev/console
        ;;
    remove)
        mac=
        [ -r "/run/net-$n" ] && read -r mac < "/run/net-$n"
        rm -f "/run/net-$n"
        echo "VMSPAWN-NET-REMOVE $n mac=$mac" > /dev/console
        ;;
    esac
    exit 0
fi
[ "$SUBSYSTEM" = block ] && [ "$DEVTYPE" = disk ] || exit 0
n=${DEVNAME:-${DEVPATH##*/}}
n=${n##*/}
case $n in ram*|loop*) exit 0 ;; esac
case $ACTION in
add)
    . /etc/tinyguest.sh
    case $n in sr*) echo 250 > "/sys/block/$n/events_poll_msecs" ;; esac
    echo "VMSPAWN-BLOCK-ADD $n serial=$(serial_of "$n")" > /dev/console
    ;;
change)
    [ "$DISK_MEDIA_CHANGE" = 1 ] || exit 0
    # Reading the medium makes the kernel look at its new size; no medium, no read.
    if dd if="/dev/$n" of="/run/medium-$n" bs=2048 count=1 2>/dev/null; then
        head=$(head -c 16 "/run/medium-$n" | tr -d '\000-\037\177-\377')
        read -r sectors < "/sys/block/$n/size"
    else
        head= sectors=0
    fi
    rm -f "/run/medium-$n"
    echo "VMSPAWN-MEDIA $n size=$((sectors * 512)) head=$head" > /dev/console
    ;;
remove)
    echo "VMSPAWN-BLOCK-REMOVE $n" > /dev/console
    ;;
esac
exit 0
"""

# qemu-ga's guest-set-user-password runs chpasswd ("user:password" lines on
# stdin, -e: the password is a crypt(3) hash already): busybox-static has
# mkpasswd but no chpasswd, so this one writes /etc/shadow itself.
_CHPASSWD = r"""#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
crypted=
[ "$1" = -e ] && crypted=1
while IFS= read -r line; do
    user=${line%%:*} pass=${line#*:}
    if [ -z "$crypted" ]; then
        pass=$(printf '%s\n' "$pass" | mkpasswd -m sha512 -P 0) || exit 1
    fi
    # From the environment: awk -v would interpret backslashes.
    if ! u=$user p=$pass awk -F: -v OFS=: '$1 == ENVIRON["u"] { $2 = ENVIRON["p"]; found = 1 } { print }
            END { exit !found }' /etc/shadow > /etc/shadow.new; then
        rm -f /etc/shadow.new
        echo "chpasswd: no user $user in /etc/shadow" >&2
        exit 1
    fi
    chmod 600 /etc/shadow.new
    mv /etc/shadow.new /etc/shadow
done
"""

_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
_GROUP = "root:x:0:\n"
# No password: nothing logs in until one is set.
_SHADOW = "root:*:19000:0:99999:7:::\n"

_LIB = r"""# Shared by /init and /sbin/hotplug.
# serial_of NAME: print the serial of /sys/block/NAME (may be empty).
serial_of() {
    d=/sys/block/$1 s=
    if [ -r "$d/device/serial" ]; then
        read -r s < "$d/device/serial"      # nvme (controller attribute)
    elif [ -r "$d/serial" ]; then
        read -r s < "$d/serial"             # virtio-blk
    elif [ -r "$d/device/vpd_pg80" ]; then
        # SCSI unit serial VPD page: 4 header bytes, then the serial.
        # (busybox tr -c with [:print:] is broken, hence explicit ranges.)
        s=$(tail -c +5 "$d/device/vpd_pg80" | tr -d '\000-\037\177-\377')
    elif [ -r "$d/device/model" ]; then
        read -r s < "$d/device/model"
    fi
    # `read` trims the surrounding whitespace.
    read -r s <<EOF
$s
EOF
    echo "$s"
}

# agent_port VPORT: if /dev/VPORT is the guest agent's port, start qemu-ga
# on it (once), in the background, and report AGENT once it holds the port.
agent_port() {
    n=
    [ -r "/sys/class/virtio-ports/$1/name" ] && read -r n < "/sys/class/virtio-ports/$1/name"
    [ "$n" = org.qemu.guest_agent.0 ] || return 0
    grep -q tinyguest.noagent /proc/cmdline && return 0
    mkdir /run/agent 2>/dev/null || return 0
    (
        qemu-ga -m virtio-serial -p "/dev/$1" -t /run/agent -f /run/agent/qemu-ga.pid \
            </dev/null >/run/agent/qemu-ga.log 2>&1 &
        pid=$! i=0
        while [ $i -lt 1000 ]; do
            if ls -l "/proc/$pid/fd" 2>/dev/null | grep -q "/dev/$1"; then
                echo "VMSPAWN-AGENT $1" > /dev/console
                exit 0
            fi
            [ -d "/proc/$pid" ] || break
            usleep 10000
            i=$((i + 1))
        done
        echo "VMSPAWN-AGENT-FAILED $1 $(tail -n 3 /run/agent/qemu-ga.log | tr '\n' ' ')" > /dev/console
    ) &
}

# hot_share: a virtiofs device was bound; mount each tinyguest.hotmount=TAG
# not mounted yet (only the new device's tag succeeds), report its hello
# file, and unmount it once the host creates "unmount" in it.
hot_share() {
    for arg in $(cat /proc/cmdline); do
        case $arg in tinyguest.hotmount=*) ;; *) continue ;; esac
        tag=${arg#tinyguest.hotmount=}
        grep -q " /hot/$tag " /proc/mounts && continue
        mkdir -p "/hot/$tag"
        mount -t virtiofs "$tag" "/hot/$tag" 2>/dev/null || continue
        line=
        [ -r "/hot/$tag/hello" ] && read -r line < "/hot/$tag/hello"
        echo "VMSPAWN-SHARE-MOUNT $tag hello=$line"
        (
            while [ ! -e "/hot/$tag/unmount" ]; do usleep 100000; done
            umount "/hot/$tag" && echo "VMSPAWN-SHARE-UMOUNT $tag"
        ) &
    done
}
"""


@dataclass(frozen=True)
class Guest:
    """A bootable guest: pass to QEMU as -kernel/-initrd/-append."""

    kernel: Path
    initrd: Path
    cmdline: str


def _version_key(ver: str) -> list[tuple[int, str]]:
    # Natural sort so that 6.1.0-10 sorts after 6.1.0-9.
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", ver)]


def find_kernel() -> Path:
    """Return the newest /boot/vmlinuz-* that has a matching modules dir."""
    candidates = []
    for path in Path("/boot").glob("vmlinuz-*"):
        ver = path.name.removeprefix("vmlinuz-")
        if (MODULES_ROOT / ver / "modules.dep").is_file():
            candidates.append((_version_key(ver), path))
    if not candidates:
        raise RuntimeError(
            "no usable kernel: need /boot/vmlinuz-<ver> and "
            "/lib/modules/<ver>/modules.dep (hint: apt-get install linux-image-amd64)"
        )
    return max(candidates)[1]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmspawnd-guest"


# --------------------------------------------------------------------------
# Kernel: bzImage -> ELF vmlinux
#
# QEMU boots an ELF vmlinux with a PVH entry note directly (no real-mode
# setup, no in-guest xz decompression).  Verified with QEMU 7.2 + Debian's
# 6.1 kernel (CONFIG_PVH=y): READY in ~3.5-4.5 s vs ~12-14 s for the bzImage
# under TCG.  If no ELF with a PVH note can be extracted (another kernel
# build), build() falls back to booting the bzImage itself, which is slower
# but always works.
# --------------------------------------------------------------------------

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b\x08"


_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the note QEMU looks for to boot via PVH


def _pvh_bootable(data: bytes) -> bool:
    """True if data is a complete 64-bit ELF carrying a PVH entry note.

    Completeness (every segment inside the file) guards against truncated
    output from a decompressor that stopped early.
    """
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    if phnum == 0 or phoff + phentsize * phnum > len(data):
        return False
    pvh = False
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_offset + p_filesz > len(data):
            return False
        if p_type == _PT_NOTE:
            pvh = pvh or _has_pvh_note(data[p_offset : p_offset + p_filesz])
    return pvh


def _has_pvh_note(notes: bytes) -> bool:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name = notes[pos + 12 : pos + 12 + namesz]
        if name == b"Xen\0" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _decompress(kind: str, blob: bytes) -> bytes | None:
    try:
        if kind == "xz":
            # The decompressor stops at the end of the stream and ignores
            # whatever follows (the bzImage appends the size and more).
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)
        if kind == "gzip":
            return zlib.decompressobj(wbits=31).decompress(blob)
        if kind == "zstd":
            # Python 3.11 has no zstd module.  Trailing bytes make zstd exit
            # non-zero after writing the frame, so judge the output instead.
            proc = subprocess.run(["zstd", "-dcq"], input=blob, capture_output=True, check=False)
            return proc.stdout
    except (lzma.LZMAError, zlib.error, OSError):
        return None
    return None


def _payload_candidates(image: bytes) -> Iterator[tuple[int, str]]:
    # Start at the protected-mode part; the compressed payload lives there.
    start = 0
    if image[0x202:0x206] == b"HdrS":
        start = ((image[0x1F1] or 4) + 1) * 512
    hits: list[tuple[int, str]] = []
    for magic, kind in ((_XZ_MAGIC, "xz"), (_ZSTD_MAGIC, "zstd"), (_GZIP_MAGIC, "gzip")):
        pos = image.find(magic, start)
        while pos >= 0:
            hits.append((pos, kind))
            pos = image.find(magic, pos + 1)
    yield from sorted(hits)


def extract_vmlinux(bzimage: Path) -> bytes:
    """Return the PVH-bootable ELF vmlinux inside a bzImage (RuntimeError if none)."""
    image = bzimage.read_bytes()
    for pos, kind in _payload_candidates(image):
        out = _decompress(kind, image[pos:])
        if out is not None and out[:4] == b"\x7fELF":
            if _pvh_bootable(out):
                return out
            break  # the first ELF is the kernel; without a PVH note it is useless
    raise RuntimeError(f"{bzimage}: no xz/zstd/gzip payload decompresses to a PVH-bootable ELF vmlinux")


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------

_KO_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in _KO_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    # modprobe treats '-' and '_' as equivalent; so do we.
    return base.replace("-", "_")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


@dataclass(frozen=True)
class Module:
    name: str  # normalised: '-' replaced by '_'
    path: Path  # on the host, possibly compressed
    deps: tuple[str, ...]  # all modules it needs (transitively), in load order


def resolve_modules(moddir: Path, wanted: Iterable[str]) -> list[Module]:
    """Wanted modules plus their dependencies, in load order.

    Built-in and absent modules are skipped silently.
    """
    deps: dict[str, list[str]] = {}
    paths: dict[str, Path] = {}
    for line in _read_lines(moddir / "modules.dep"):
        target, _, rest = line.partition(":")
        name = _modname(target)
        paths[name] = moddir / target
        deps[name] = [_modname(d) for d in rest.split()]
    builtin = {_modname(line) for line in _read_lines(moddir / "modules.builtin") if line}

    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        # Depth-first: dependencies are emitted before their users.
        if name in seen or name in builtin or name not in paths:
            return
        seen.add(name)
        for dep in deps[name]:
            visit(dep)
        order.append(name)

    for want in wanted:
        visit(want.replace("-", "_"))
    # depmod already lists the full transitive closure for each module.
    index = {name: i for i, name in enumerate(order)}
    return [
        Module(name, paths[name], tuple(sorted((d for d in deps[name] if d in index), key=index.__getitem__)))
        for name in order
    ]


_SIG_MAGIC = b"~Module signature appended~\n"


def _strip_signature(ko: bytes) -> bytes:
    # Checking the appended RSA signature costs ~10 ms per module under TCG.
    # The guest has no Secure Boot / lockdown and no module.sig_enforce, so
    # an unsigned module just taints the kernel (a log line at notice level).
    # Trailer layout: <sig> <struct module_signature, 12 bytes> <magic>;
    # the signature length is the big-endian u32 at the end of the struct.
    if not ko.endswith(_SIG_MAGIC):
        return ko
    end = len(ko) - len(_SIG_MAGIC)
    (sig_len,) = struct.unpack_from(">I", ko, end - 4)
    start = end - 12 - sig_len
    return ko[:start] if start > 0 else ko


def _module_bytes(path: Path) -> bytes:
    # busybox modprobe/insmod only load plain ELF, so decompress here.
    name = path.name
    if name.endswith(".ko.xz"):
        data = lzma.decompress(path.read_bytes())
    elif name.endswith(".ko.gz"):
        data = gzip.decompress(path.read_bytes())
    elif name.endswith(".ko.zst"):
        data = subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=True).stdout
    else:
        data = path.read_bytes()
    return _strip_signature(data)


# --------------------------------------------------------------------------
# initramfs (newc cpio, uncompressed: the guest would only burn TCG cycles
# decompressing it, and it is only a few MB)
# --------------------------------------------------------------------------


class _Cpio:
    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        namez = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            1 if not stat.S_ISDIR(mode) else 2,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(namez),
            0,
        )
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts += [hdr, namez, b"\0" * (-(len(hdr) + len(namez)) % 4)]
        self._parts += [data, b"\0" * (-len(data) % 4)]

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _check_static(busybox: Path) -> None:
    # A dynamically linked busybox (package "busybox") cannot run in an
    # initramfs without libc; catch that here instead of as a guest panic.
    head = busybox.read_bytes()[:4096]
    if head[:4] != b"\x7fELF" or head[4] != 2:
        raise RuntimeError(f"{busybox} is not a 64-bit ELF binary")
    (phoff,) = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 <= len(head) and struct.unpack_from("<I", head, off)[0] == 3:  # PT_INTERP
            raise RuntimeError(f"{busybox} is dynamically linked (hint: apt-get install busybox-static)")


def agent_files(qemu_ga: Path = QEMU_GA) -> dict[str, Path]:
    """qemu-ga and the libraries it loads (ldd's list): path in the guest -> file on the host."""
    if not qemu_ga.is_file():
        raise RuntimeError(f"{qemu_ga} missing (hint: apt-get install qemu-guest-agent)")
    out = subprocess.run(["ldd", str(qemu_ga)], capture_output=True, text=True, check=True).stdout
    files = {str(qemu_ga).lstrip("/"): qemu_ga}
    for line in out.splitlines():
        # "libglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        words = line.split()
        path = words[2] if len(words) >= 3 and words[1] == "=>" else words[0] if words else ""
        if path.startswith("/"):
            files[path.lstrip("/")] = Path(path)
    return files


def _parents(paths: Iterable[str]) -> list[str]:
    """Every directory above `paths`, parents first."""
    dirs = {str(parent) for p in paths for parent in Path(p).parents if str(parent) != "."}
    return sorted(dirs, key=lambda d: (d.count("/"), d))


def build_initramfs(kver: str, busybox: Path = BUSYBOX, agent: dict[str, Path] | None = None) -> bytes:
    if not busybox.is_file():
        raise RuntimeError(f"{busybox} missing (hint: apt-get install busybox-static)")
    _check_static(busybox)
    agent = agent_files() if agent is None else agent
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    modules = resolve_modules(MODULES_ROOT / kver, WANTED_MODULES)

    mdir = f"lib/modules/{kver}"
    cpio = _Cpio()
    base = (
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc",
        "lib",
        "lib/modules",
        mdir,
        "etc/modprobe.d",
        "root",
    )
    for d in (*base, *(d for d in _parents(agent) if d not in base)):
        cpio.dir(d)
    # init's stdio is opened before devtmpfs is mounted, so ship the node.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in applets:
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")

    depfile = []
    for mod in modules:
        cpio.file(f"{mdir}/{mod.name}.ko", _module_bytes(mod.path))
        # busybox modprobe loads the listed deps last to first (as depmod
        # writes them), so list them in reverse load order.
        depfile.append(f"{mod.name}.ko:" + "".join(f" {d}.ko" for d in reversed(mod.deps)) + "\n")
    cpio.file(f"{mdir}/modules.dep", "".join(depfile).encode())
    options = "".join(f"options {name} {args}\n" for name, args in MODULE_ARGS.items())
    cpio.file("etc/modprobe.d/tinyguest.conf", options.encode())
    cpio.file("init", _INIT.encode(), 0o755)
    names = " ".join(mod.name for mod in modules)
    main = _MAIN.replace("modprobe -a @MODULES@", f"modprobe -a {names}" if modules else ":")
    cpio.file("etc/tinyguest-init.sh", main.encode(), 0o755)
    cpio.file("sbin/hotplug", _HOTPLUG.encode(), 0o755)
    cpio.file("etc/tinyguest.sh", _LIB.encode())
    for guest_path, host_path in agent.items():
        cpio.file(guest_path, host_path.read_bytes(), 0o755)
    cpio.file("usr/sbin/chpasswd", _CHPASSWD.encode(), 0o755)
    cpio.file("etc/passwd", _PASSWD.encode())
    cpio.file("etc/group", _GROUP.encode())
    cpio.file("etc/shadow", _SHADOW.encode(), 0o600)
    return cpio.finish()


# --------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------


def _stat_id(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _publish(cache_dir: Path, final: Path, files: dict[str, bytes]) -> None:
    """Atomically create directory `final` holding `files`.

    Built in a temp dir and renamed, so a present entry is always complete
    and concurrent builders (parallel test runs) cannot corrupt each other.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from others
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # Lost the race to another builder; theirs is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(cache_dir: Path, keep: set[Path]) -> None:
    # Old entries accumulate as the kernel or this script change; drop those
    # unused for a week (entries in use are touched on every build()).
    cutoff = time.time() - _PRUNE_AFTER_S
    for entry in cache_dir.iterdir():
        # Only our own names: --cache might point at a shared directory.
        if not entry.name.startswith(("kernel-", "initrd-", ".tmp-")):
            continue
        try:
            if entry not in keep and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def build(cache_dir: Path) -> Guest:
    """Build (or reuse from cache_dir) the guest for the newest kernel."""
    bzimage = find_kernel()
    cache_dir = cache_dir.absolute()  # QEMU may run from another cwd
    kver = bzimage.name.removeprefix("vmlinuz-")
    cache_dir.mkdir(parents=True, exist_ok=True)

    kdir = cache_dir / f"kernel-{kver}-{_digest(str(_KERNEL_FORMAT), _stat_id(bzimage))}"
    if not kdir.is_dir():
        try:
            kfile = {"vmlinux": extract_vmlinux(bzimage)}
        except RuntimeError:
            # Slow path, but any x86 bzImage boots (see "Kernel" above).
            kfile = {"bzImage": bzimage.read_bytes()}
        _publish(cache_dir, kdir, kfile)
    kernel = kdir / "vmlinux"
    if not kernel.is_file():
        kernel = kdir / "bzImage"

    script_hash = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    moddir = MODULES_ROOT / kver
    agent = agent_files()
    inputs = [_stat_id(BUSYBOX), _stat_id(moddir / "modules.dep"), *(_stat_id(p) for p in agent.values())]
    idir = cache_dir / f"initrd-{kver}-{_digest(script_hash, *inputs)}"
    if not idir.is_dir():
        _publish(cache_dir, idir, {"initrd.cpio": build_initramfs(kver, agent=agent)})

    try:
        for entry in (kdir, idir):
            os.utime(entry)  # mark as in use for _prune
        _prune(cache_dir, {kdir, idir})
    except OSError:
        pass  # e.g. a read-only shared cache: housekeeping is optional
    return Guest(kernel=kernel, initrd=idir / "initrd.cpio", cmdline=CMDLINE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache directory (default: $XDG_CACHE_HOME/vmspawnd-guest or ~/.cache/vmspawnd-guest)",
    )
    args = parser.parse_args(argv)
    try:
        guest = build(args.cache or default_cache_dir())
    except RuntimeError as exc:
        print(f"tinyguest: {exc}", file=sys.stderr)
        return 1
    print(f"KERNEL={shlex.quote(str(guest.kernel))}")
    print(f"INITRD={shlex.quote(str(guest.initrd))}")
    print(f"CMDLINE={shlex.quote(guest.cmdline)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
