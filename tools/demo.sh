#!/usr/bin/env bash
# `make demo`: a private system bus, the daemon, a real VM booted under TCG
# through busctl, drives hotplugged and seen by the guest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
WORK=$(mktemp -d /tmp/vmspawnd-demo-XXXXXX)
chmod 755 "$WORK"
pids=()
cleanup() {
    # QEMU outlives the daemon by design: end the machine first.
    busctl --system call org.vmspawnd1 /org/vmspawnd1 org.vmspawnd1.Manager TerminateMachine s demo >/dev/null 2>&1 || true
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# The guest prints to a file; follow it until a line matches (bounded).
wait_console() {
    for _ in $(seq 600); do
        grep -q -E "$2" "$1" && return 0
        sleep 0.1
    done
    echo "guest never printed $2"; tail "$1"; exit 1
}

step "Building the tiny guest (Debian kernel + busybox initramfs)"
eval "$($PY tools/tinyguest.py)"
echo "kernel $KERNEL"

step "Starting a private system bus with dbus/org.vmspawnd1.conf"
coproc BUS { exec $PY tools/testbus.py "$WORK/bus"; }
pids+=("$BUS_PID")
read -r address <&"${BUS[0]}"
export DBUS_SYSTEM_BUS_ADDRESS=$address
echo "DBUS_SYSTEM_BUS_ADDRESS=$address"

step "Starting vmspawnd"
.venv/bin/vmspawnd --runtime-dir "$WORK/run" 2>"$WORK/daemon.log" &
pids+=("$!")
for _ in $(seq 100); do
    busctl --system status org.vmspawnd1 >/dev/null 2>&1 && break
    sleep 0.1
done
busctl --system tree org.vmspawnd1

nvme=()
for i in $(seq 0 19); do nvme+=(-device "nvme,serial=extra$i"); done
truncate -s 64M "$WORK/root.raw"

step "PlanMachine: 1 image + network + 10 spares, 20 extra nvme on pcie.0 (dry run)"
busctl --system call -- org.vmspawnd1 /org/vmspawnd1 org.vmspawnd1.Manager PlanMachine 'sa{sv}' demo 4 \
    image s "$WORK/root.raw" network s user hotplug_spares u 10 qemu_extra as 40 "${nvme[@]}" | head -c 600; echo ...

step "CreateMachine demo"
busctl --system call -- org.vmspawnd1 /org/vmspawnd1 org.vmspawnd1.Manager CreateMachine 'sa{sv}' demo 8 \
    kernel s "$KERNEL" initrd s "$INITRD" cmdline s "$CMDLINE" accel s tcg \
    image s "$WORK/root.raw" network s user hotplug_spares u 10 qemu_extra as 40 "${nvme[@]}"
M=/org/vmspawnd1/machine/demo
busctl --system get-property org.vmspawnd1 $M org.vmspawnd1.Machine State Leader PcieSlots FreeSparePorts
echo "Ports (id, pcie.0 addr, chassis, role, device):"
busctl --system --json=short get-property org.vmspawnd1 $M org.vmspawnd1.Machine Ports |
    $PY -c 'import json,sys; [print("  ", p["id"]["data"], p["addr"]["data"], p["chassis"]["data"], p["role"]["data"], p["device"]["data"]) for p in json.load(sys.stdin)["data"]]'
console=$(busctl --system get-property org.vmspawnd1 $M org.vmspawnd1.Machine ConsoleLog | cut -d'"' -f2)

step "What the guest sees at boot (its serial console)"
wait_console "$console" VMSPAWN-GUEST-READY >/dev/null
grep -E "VMSPAWN-(BLOCK|NVME-COUNT|GUEST-READY)" "$console"

step "Hotplug: AddDrive nvme and virtio-blk onto spare ports"
truncate -s 16M "$WORK/hot1.raw" "$WORK/hot2.raw"
busctl --system call org.vmspawnd1 $M org.vmspawnd1.Machine AddDrive 'sa{sv}' "$WORK/hot1.raw" 2 disk_type s nvme serial s hotnvme
busctl --system call org.vmspawnd1 $M org.vmspawnd1.Machine AddDrive 'sa{sv}' "$WORK/hot2.raw" 1 serial s hotblk
wait_console "$console" "BLOCK-ADD.*serial=hotblk" >/dev/null
grep VMSPAWN-BLOCK-ADD "$console"
busctl --system get-property org.vmspawnd1 $M org.vmspawnd1.Machine FreeSparePorts

step "RemoveDrive disk1 (waits for the guest to let go)"
busctl --system call org.vmspawnd1 $M org.vmspawnd1.Machine RemoveDrive s disk1
grep VMSPAWN-BLOCK-REMOVE "$console"
busctl --system get-property org.vmspawnd1 $M org.vmspawnd1.Machine FreeSparePorts

step "A bad request gets an error a person can act on"
busctl --system call org.vmspawnd1 /org/vmspawnd1 org.vmspawnd1.Manager CreateMachine 'sa{sv}' big 2 \
    kernel s "$KERNEL" hotplug_spares u 200 || true

step "TerminateMachine demo"
busctl --system call org.vmspawnd1 /org/vmspawnd1 org.vmspawnd1.Manager TerminateMachine s demo
busctl --system call org.vmspawnd1 /org/vmspawnd1 org.vmspawnd1.Manager ListMachines
echo "demo done"
