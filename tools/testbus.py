"""A private system-style dbus-daemon built from the project's own policy file.

Used by the tests and `make demo`: `python3 tools/testbus.py DIR [--polkit]`
starts one in the foreground and prints its address.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "dbus" / "org.vmspawnd1.conf"
POLKIT_POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")

# The default policy of Debian's system.conf: nobody owns or calls anything
# unless a policy file included below allows it.
CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  {includes}
</busconfig>
"""


def write_config(directory: Path, extra_policies: tuple[Path, ...] = ()) -> tuple[Path, str]:
    """(config file, bus address) for a bus whose socket lives in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    # Other users (the tests' `nobody` clients) must reach the socket.
    directory.chmod(0o755)
    socket = directory / "system_bus_socket"
    includes = "\n  ".join(f"<include>{p}</include>" for p in (POLICY, *extra_policies))
    config = directory / "bus.conf"
    config.write_text(CONFIG.format(socket=socket, includes=includes))
    return config, f"unix:path={socket}"


def start(directory: Path, extra_policies: tuple[Path, ...] = ()) -> tuple[subprocess.Popen[bytes], str]:
    """Start the bus; returns once it listens (it prints its address then)."""
    config, address = write_config(directory, extra_policies)
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    if not proc.stdout.readline():
        raise RuntimeError(f"dbus-daemon did not start with {config}")
    return proc, address


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--polkit", action="store_true", help="also include polkit's own bus policy")
    args = parser.parse_args()
    proc, address = start(args.directory, (POLKIT_POLICY,) if args.polkit else ())
    # Our own end is the bus's end: SIGTERM or Ctrl-C stop dbus-daemon too.
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    print(address, flush=True)
    try:
        sys.exit(proc.wait())
    except KeyboardInterrupt:
        proc.terminate()
        sys.exit(proc.wait())


if __name__ == "__main__":
    main()
