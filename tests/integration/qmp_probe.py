"""The tests' own QMP monitor on a machine (QEMU serves several monitors).

The daemon's view is checked against QEMU's own answers through it. The
socket is an abstract one named after the test's path (hashed: sun_path
is short): QEMU runs as an unprivileged uid of its own and may create
nothing in the test's directories.
"""

from __future__ import annotations

import array
import hashlib
import json
import re
import socket
from pathlib import Path
from typing import Any

from vmspawnd.cmdline import BOOT_FDSETS


def address(path: Path) -> str:
    """The abstract socket name standing for `path`."""
    return "vmspawnd-probe-" + hashlib.sha256(str(path).encode()).hexdigest()[:24]


def netdev_ids(info_network: str) -> set[str]:
    """The NIC and netdev ids in HMP's `info network` text."""
    return {m.group(1) for m in re.finditer(r"^[\s\\]*(\S+): index=", info_network, re.M)}


class Probe:
    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def extra(path: Path) -> list[str]:
        """qemu_extra for CreateMachine that adds this monitor."""
        return [
            "-chardev", f"socket,id=testprobe,path={address(path)},abstract=on,server=on,wait=off",
            "-mon", "chardev=testprobe,mode=control",
        ]  # fmt: skip

    def run(self, *commands: tuple[str, dict[str, Any]]) -> list[Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(f"\0{address(self.path)}")
            f = s.makefile("rw")
            json.loads(f.readline())
            results = []
            for cmd, args in [("qmp_capabilities", {}), *commands]:
                f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
                f.flush()
                while "return" not in (reply := json.loads(f.readline())) and "error" not in reply:
                    pass
                results.append(reply.get("return", reply.get("error")))
            return results[1:]

    def add_fd(self, fd: int, fdset: int) -> Any:
        """add-fd with `fd` sent along (SCM_RIGHTS): QEMU runs as a uid of
        its own and cannot open the test's files by name."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(f"\0{address(self.path)}")
            f = s.makefile("r")
            json.loads(f.readline())
            reply: dict[str, Any] = {}
            for cmd, args, fds in (("qmp_capabilities", {}, []), ("add-fd", {"fdset-id": fdset}, [fd])):
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                s.sendmsg([json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n"], rights)
                while "return" not in (reply := json.loads(f.readline())) and "error" not in reply:
                    pass
            return reply.get("return", reply.get("error"))

    def __call__(self, cmd: str, **args: Any) -> Any:
        return self.run((cmd, args))[0]

    def block_nodes(self) -> set[str]:
        return {n["node-name"] for n in self("query-named-block-nodes")}

    def fdsets(self) -> list[Any]:
        """The fdsets passed at run time (those of the command line left out)."""
        return [f for f in self("query-fdsets") if f["fdset-id"] < BOOT_FDSETS]

    def devices_on(self, port: str) -> list[str]:
        """qdev ids of the devices behind root port `port` (by its child bus)."""
        bus = f"/machine/peripheral/{port}/{port}"
        links = [c["name"] for c in self("qom-list", path=bus) if c["name"].startswith("child[")]
        return [str(self("qom-get", path=bus, property=link)).rpartition("/")[2] for link in links]

    def netdevs(self) -> set[str]:
        """Ids in QEMU's network list (HMP: QMP has no query for netdevs): NICs and netdevs alike."""
        return netdev_ids(self("human-monitor-command", **{"command-line": "info network"}))
