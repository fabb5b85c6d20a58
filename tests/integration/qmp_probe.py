"""The tests' own QMP monitor on a machine (QEMU serves several monitors).

The daemon's view is checked against QEMU's own answers through it.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class Probe:
    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def extra(path: Path) -> list[str]:
        """qemu_extra for CreateMachine that adds this monitor."""
        return ["-qmp", f"unix:{path},server=on,wait=off"]

    def run(self, *commands: tuple[str, dict[str, Any]]) -> list[Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.path))
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

    def __call__(self, cmd: str, **args: Any) -> Any:
        return self.run((cmd, args))[0]

    def block_nodes(self) -> set[str]:
        return {n["node-name"] for n in self("query-named-block-nodes")}

    def fdsets(self) -> list[Any]:
        return list(self("query-fdsets"))

    def devices_on(self, port: str) -> list[str]:
        """qdev ids of the devices behind root port `port` (by its child bus)."""
        bus = f"/machine/peripheral/{port}/{port}"
        links = [c["name"] for c in self("qom-list", path=bus) if c["name"].startswith("child[")]
        return [str(self("qom-get", path=bus, property=link)).rpartition("/")[2] for link in links]
