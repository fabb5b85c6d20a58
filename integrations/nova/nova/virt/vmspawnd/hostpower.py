"""Reboot or power off this compute host through systemd-logind (Nova's host power actions).

An admin's `os-hosts` power action reaches the driver of the host itself.
vmspawnd has no say in it (it serves machines, not the host): the host's own
logind does it, as `systemctl reboot` asks it, with polkit deciding for a
nova-compute that is not root (org.freedesktop.login1.reboot and .power-off).
logind answers once the reboot or power-off job is queued. Nothing here
imports Nova.
"""

from __future__ import annotations

from jeepney import DBusAddress, MessageType, new_method_call
from jeepney.io.blocking import open_dbus_connection

LOGIN1 = DBusAddress("/org/freedesktop/login1", "org.freedesktop.login1", "org.freedesktop.login1.Manager")
# Nova's action -> logind's method; "startup" has none: a running host is up,
# and a host that is off runs no nova-compute to ask (its BMC powers it on).
METHODS = {"reboot": "Reboot", "shutdown": "PowerOff"}


class HostPowerError(Exception):
    """logind refused or could not be reached; `name` is the D-Bus error name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def power_action(address: str, action: str, timeout: float) -> None:
    """`action` (a key of METHODS) through logind on the bus at `address` (or "SYSTEM")."""
    # interactive=false: nova-compute has nobody to ask for a password.
    message = new_method_call(LOGIN1, METHODS[action], "b", (False,))
    try:
        with open_dbus_connection(address, auth_timeout=timeout) as conn:
            reply = conn.send_and_get_reply(message, timeout=timeout)
    except (OSError, TimeoutError) as e:
        raise HostPowerError("Unreachable", f"systemd-logind on {address}: {e}") from e
    if reply.header.message_type is MessageType.error:
        raise HostPowerError(reply.header.fields.get(4, ""), reply.body[0] if reply.body else "")
