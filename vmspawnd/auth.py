"""Who may do what: root everything, a creator its own machine, else polkit.

Reading properties and listing are open to all and never come here.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .errors import AccessDenied

log = logging.getLogger(__name__)

POLKIT = "org.freedesktop.PolicyKit1"
# CheckAuthorization flags.
ALLOW_USER_INTERACTION = 1
# sd-bus's default method timeout; with interaction allowed an agent may be
# asking a person for a password, so that one waits longer.
TIMEOUT = 25.0
INTERACTIVE_TIMEOUT = 300.0


class Action(enum.StrEnum):
    CREATE = "org.vmspawnd1.create-machine"
    MANAGE = "org.vmspawnd1.manage-machine"
    # More than managing: it hands out a login to the guest (its own action, auth_admin each time).
    SET_PASSWORD = "org.vmspawnd1.set-user-password"


# What each action lets a caller do, for AccessDenied's message.
WHAT = {
    Action.CREATE: "create machines",
    Action.MANAGE: "manage this machine",
    Action.SET_PASSWORD: "set a password in this machine's guest",
}


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    # polkit would allow it after authentication (an agent, interaction allowed).
    challenge: bool = False
    # Why polkit did not answer, when it did not.
    unavailable: str = ""


def decided_without_polkit(uid: int, owner_uid: int | None) -> bool:
    """True if the rule alone allows it: root, or the machine's creator."""
    return uid == 0 or (owner_uid is not None and uid == owner_uid)


def details(machine: str | None, owner_uid: int | None) -> dict[str, str]:
    """What polkit rules see through action.lookup(): the machine and its owner."""
    out = {}
    if machine is not None:
        out["machine"] = machine
    if owner_uid is not None:
        out["owner_uid"] = str(owner_uid)
    return out


async def polkit_check(
    bus: MessageBus, sender: str, action: Action, interactive: bool, details: dict[str, str] | None = None
) -> Verdict:
    """Ask polkit about `sender` (a unique bus name, alive while we ask).

    Denies, never hangs, when polkit is not there: with no polkit on the bus
    the bus daemon answers ServiceUnknown at once; a polkit that does not
    answer is given up on after a timeout. On a system bus polkit is
    bus-activatable, so the call may start it, as any polkit client does.
    """
    call = bus.call(
        Message(
            destination=POLKIT,
            path="/org/freedesktop/PolicyKit1/Authority",
            interface="org.freedesktop.PolicyKit1.Authority",
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[
                ["system-bus-name", {"name": Variant("s", sender)}],
                str(action),
                details or {},
                ALLOW_USER_INTERACTION if interactive else 0,
                "",
            ],
        )
    )
    try:
        reply = await asyncio.wait_for(call, INTERACTIVE_TIMEOUT if interactive else TIMEOUT)
    except TimeoutError:
        return Verdict(False, unavailable="polkit did not answer in time")
    except (DBusError, EOFError, OSError) as e:
        return Verdict(False, unavailable=f"polkit call failed: {e}")
    if reply is None:
        return Verdict(False, unavailable="no reply from polkit")
    if reply.message_type is MessageType.ERROR:
        return Verdict(False, unavailable=f"{reply.error_name}: {reply.body[0] if reply.body else ''}")
    allowed, challenge, _details = reply.body[0]
    return Verdict(bool(allowed), challenge=bool(challenge))


async def authorize(
    bus: MessageBus,
    sender: str,
    uid: int,
    action: Action,
    owner_uid: int | None,
    interactive: bool,
    machine: str | None = None,
) -> None:
    if decided_without_polkit(uid, owner_uid):
        return
    verdict = await polkit_check(bus, sender, action, interactive, details(machine, owner_uid))
    if verdict.allowed:
        log.info("polkit allows uid %d (%s): %s", uid, sender, action)
        return
    if verdict.unavailable:
        log.info("polkit not usable for %s by uid %d (%s): denying", action, uid, verdict.unavailable)
    else:
        log.info("polkit denies uid %d (%s): %s", uid, sender, action)
    what = WHAT[action]
    hint = (
        "; polkit would allow it after authentication: call with interactive authorization allowed"
        " (gdbus call --interactive; busctl allows it by default) and a polkit agent running"
        if verdict.challenge and not interactive
        else ""
    )
    raise AccessDenied(
        f"uid {uid} may not {what}: only root and a machine's creator may, unless polkit allows "
        f"action {action} (see the polkit rules for org.vmspawnd1){hint}"
    )
