"""Turn the daemon's exceptions into org.vmspawnd1.Error.* replies."""

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from dbus_fast import DBusError

from ..errors import VmspawndError
from . import ERROR_PREFIX

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def replies_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Every VmspawndError becomes its D-Bus error; a bug is logged, not leaked."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except VmspawndError as e:
            raise DBusError(ERROR_PREFIX + e.error_name(), str(e)) from e
        except DBusError:
            raise
        except Exception as e:
            log.exception("internal error in %s", fn.__name__)
            raise DBusError(
                "org.freedesktop.DBus.Error.Failed", f"internal error ({type(e).__name__}); see the daemon's log"
            ) from e

    return wrapper
