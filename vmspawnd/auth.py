"""Who may do what: root everything, a creator its own machine, else polkit.

Reading properties and listing are open to all and never come here.
"""

from __future__ import annotations

import enum
import logging

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .errors import AccessDenied

log = logging.getLogger(__name__)

POLKIT = "org.freedesktop.PolicyKit1"


class Action(enum.StrEnum):
    CREATE = "org.vmspawnd1.create-machine"
    MANAGE = "org.vmspawnd1.manage-machine"


def decided_without_polkit(uid: int, owner_uid: int | None) -> bool:
    """True if the rule alone allows it: root, or the machine's creator."""
    return uid == 0 or (owner_uid is not None and uid == owner_uid)


async def polkit_allows(bus: MessageBus, sender: str, action: Action, interactive: bool) -> bool:
    """Ask polkit; False when polkit is not on the bus (never hang on it)."""
    reply = await bus.call(
        Message(
            destination=POLKIT,
            path="/org/freedesktop/PolicyKit1/Authority",
            interface="org.freedesktop.PolicyKit1.Authority",
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[
                ["system-bus-name", {"name": Variant("s", sender)}],
                str(action),
                {},
                1 if interactive else 0,
                "",
            ],
            # Never start polkit through bus activation on our behalf.
            flags=0,
        )
    )
    if reply is None:
        return False
    if reply.message_type is MessageType.ERROR:
        log.info("polkit not usable for %s (%s): denying", action, reply.error_name)
        return False
    allowed, _challenge, _details = reply.body[0]
    return bool(allowed)


async def authorize(
    bus: MessageBus, sender: str, uid: int, action: Action, owner_uid: int | None, interactive: bool
) -> None:
    if decided_without_polkit(uid, owner_uid):
        return
    try:
        if await polkit_allows(bus, sender, action, interactive):
            return
    except DBusError as e:
        log.info("polkit check failed: %s", e)
    what = "create machines" if action is Action.CREATE else "manage this machine"
    raise AccessDenied(
        f"uid {uid} may not {what}: only root and a machine's creator may, unless polkit allows "
        f"action {action} (see the polkit rules for org.vmspawnd1)"
    )
