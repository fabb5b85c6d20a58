"""Graphics on a real QEMU: CreateMachine graphics=vnc|spice and OpenGraphics.

QEMU's VNC and SPICE servers listen on no port and no path: each client is
one end of a socketpair the daemon hands QEMU (getfd + add_client), the
other end the caller's. The RFB handshake runs far enough to read the
framebuffer's size, SPICE's link reply carries its magic.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Message, MessageType, Variant

from vmspawnd.bus import BUS_NAME, MACHINE_IFACE

from .harness import Client, blank_image, busctl, guest_options, image_options, qemu_pids, wait_console
from .qmp_probe import Probe
from .test_plan_truth import pcie0_slots

E = "org.vmspawnd1.Error."
RFB_VERSION = b"RFB 003.008\n"
# /proc/net/tcp's state of a listening socket.
TCP_LISTEN = "0A"
SPICE_MAGIC = b"REDQ"
SPICE_MAIN_CHANNEL = 1


async def open_graphics(client: Client, path: str, options: dict[str, Variant] | None = None) -> socket.socket:
    reply = await client.bus.call(
        Message(
            destination=BUS_NAME, path=path, interface=MACHINE_IFACE, member="OpenGraphics", signature="a{sv}",
            body=[options or {}],
        )
    )  # fmt: skip
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise DBusError(reply.error_name or "", reply.body[0] if reply.body else "")
    [fd] = reply.unix_fds
    sock = socket.socket(fileno=fd)
    sock.settimeout(30)
    return sock


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"the stream ended after {data!r}"
        data += chunk
    return data


def rfb_framebuffer(sock: socket.socket) -> tuple[int, int, str]:
    """RFB 3.8 up to ServerInit: (width, height, desktop name)."""
    assert read_exactly(sock, 12) == RFB_VERSION
    sock.sendall(RFB_VERSION)
    (count,) = read_exactly(sock, 1)
    # The daemon let the client in (skipauth): security type None only.
    assert read_exactly(sock, count) == b"\x01"
    sock.sendall(b"\x01")
    assert read_exactly(sock, 4) == b"\0\0\0\0"  # SecurityResult OK
    sock.sendall(b"\x01")  # ClientInit, shared
    width, height = struct.unpack(">HH", read_exactly(sock, 4))
    read_exactly(sock, 16)  # the pixel format
    (length,) = struct.unpack(">I", read_exactly(sock, 4))
    return width, height, read_exactly(sock, length).decode()


def spice_link(sock: socket.socket) -> tuple[int, int, int]:
    """A SpiceLinkMess for the main channel; (major, minor, error) of the server's reply."""
    mess = struct.pack("<IBBIII", 0, SPICE_MAIN_CHANNEL, 0, 0, 0, 18)
    sock.sendall(SPICE_MAGIC + struct.pack("<III", 2, 2, len(mess)) + mess)
    header = read_exactly(sock, 16)
    assert header[:4] == SPICE_MAGIC, header
    major, minor, size = struct.unpack("<III", header[4:])
    (error,) = struct.unpack("<I", read_exactly(sock, size)[:4])
    return major, minor, error


def qemu_fds(pid: int) -> set[str]:
    return {f.name for f in Path(f"/proc/{pid}/fd").iterdir()}


def tcp_listeners(pid: int) -> list[str]:
    """The TCP sockets (IPv4 and IPv6) process `pid` itself listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            if m := re.fullmatch(r"socket:\[(\d+)\]", str(fd.readlink())):
                inodes.add(m.group(1))
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_LISTEN and fields[9] in inodes:
                found.append(f"{table} {fields[1]}")
    return found


async def test_a_vnc_machine_serves_rfb_through_open_graphics_and_listens_nowhere(
    client: Client, guest: Any, tmp_path: Path
) -> None:
    monitor = tmp_path / "vnc.qmp"
    path = await client.create("vnc-vm", **guest_options(guest, graphics="vnc", qemu_extra=Probe.extra(monitor)))
    assert await client.prop(path, "Graphics") == "vnc"
    await wait_console(await client.prop(path, "ConsoleLog"), "VMSPAWN-GUEST-READY", timeout=150)
    leader = await client.prop(path, "Leader")
    fds = qemu_fds(leader)
    first, second = await open_graphics(client, path), await open_graphics(client, path)
    try:
        width, height, name = rfb_framebuffer(first)
        assert width > 0 and height > 0 and "vnc-vm" in name
        # Clients are independent: another one shares the display.
        assert rfb_framebuffer(second)[:2] == (width, height)
    finally:
        first.close()
        second.close()
    assert tcp_listeners(leader) == []
    # The display device is one more pcie.0 slot, and the plan says so.
    used, _ = await client.prop(path, "PcieSlots")
    assert used == len(pcie0_slots(Probe(monitor)))
    # QEMU lets go of a client's socket when the client does.
    deadline = time.monotonic() + 10
    while qemu_fds(leader) != fds:
        assert time.monotonic() < deadline, (fds, qemu_fds(leader))
        await asyncio.sleep(0.05)


async def test_a_spice_machine_answers_the_spice_link_protocol_and_listens_nowhere(
    client: Client, tmp_path: Path
) -> None:
    # SeaBIOS idling on a blank disk: the display is there, no guest needed.
    path = await client.create("spice-vm", **image_options(blank_image(tmp_path, "b.raw"), graphics="spice"))
    assert await client.prop(path, "Graphics") == "spice"
    sock = await open_graphics(client, path)
    try:
        assert spice_link(sock) == (2, 2, 0)
    finally:
        sock.close()
    assert tcp_listeners(await client.prop(path, "Leader")) == []


async def test_a_machine_without_graphics_has_none_to_open(client: Client, tmp_path: Path) -> None:
    path = await client.create("plain-vm", **image_options(blank_image(tmp_path, "b.raw")))
    assert await client.prop(path, "Graphics") == "none"
    with pytest.raises(DBusError) as e:
        await open_graphics(client, path)
    assert e.value.type == E + "NoGraphics" and "graphics=vnc" in e.value.text
    with pytest.raises(DBusError) as e:
        await open_graphics(client, path, {"protocol": Variant("s", "vnc")})
    assert e.value.type == E + "InvalidArgument"


async def test_a_kept_machine_keeps_its_graphics_and_a_stopped_one_is_not_running(
    client: Client, tmp_path: Path
) -> None:
    path = await client.create("kept-vnc", **image_options(blank_image(tmp_path, "b.raw"), graphics="vnc", keep=True))
    await client.call("PowerOff", "t", [1], path=path, interface=MACHINE_IFACE)
    assert await client.prop(path, "State") == "stopped"
    with pytest.raises(DBusError) as e:
        await open_graphics(client, path)
    assert e.value.type == E + "NotRunning" and "Start()" in e.value.text
    await client.call("Start", path=path, interface=MACHINE_IFACE)
    sock = await open_graphics(client, path)
    try:
        assert rfb_framebuffer(sock)[0] > 0
    finally:
        sock.close()


async def test_open_graphics_needs_the_right_to_manage_the_machine(client: Client, tmp_path: Path) -> None:
    path = await client.create("vnc-denied", **image_options(blank_image(tmp_path, "b.raw"), graphics="vnc"))
    # No polkit on this bus: a caller who is neither root nor the creator is refused.
    denied = busctl("call", BUS_NAME, path, MACHINE_IFACE, "OpenGraphics", "a{sv}", "0", check=False, as_user="nobody")
    assert denied.returncode != 0 and "may not manage this machine" in denied.stderr, denied


async def test_graphics_survive_a_daemon_restart(site: Any, site_client: Client, tmp_path: Path) -> None:
    client = site_client
    path = await client.create("vnc-again", **image_options(blank_image(tmp_path, "b.raw"), graphics="vnc"))
    leader = await client.prop(path, "Leader")
    # Re-attached from state.json: the same QEMU, still with its display.
    site.daemon.stop(signal.SIGKILL)
    site.daemon.start()
    assert (await client.prop(path, "Leader"), await client.prop(path, "Graphics")) == (leader, "vnc")
    sock = await open_graphics(client, path)
    try:
        assert rfb_framebuffer(sock)[0] > 0
    finally:
        sock.close()
    await client.call("TerminateMachine", "s", ["vnc-again"])
    assert qemu_pids(str(site.daemon.runtime_dir)) == []
