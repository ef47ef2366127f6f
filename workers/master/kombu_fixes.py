"""A guard around one kombu bug that kills a worker when Redis restarts.

kombu 5.7's Redis transport, closing a channel after the broker connection was lost,
gives the un-acknowledged message back through a new Redis client; but by then the
channel's transport has been detached from its connection (``transport.client`` is
None), so building that client raises ``AttributeError: 'NoneType' object has no
attribute 'hostname'``. The worker's consumer does not expect it ("Unrecoverable error")
and the worker exits, so a master restarts and recovers for nothing.

`install()` (called by the master worker at start) makes ``QoS.restore_unacked`` skip
that one case with a warning. Nothing is lost by skipping it: the broker itself is gone,
so nothing could be restored through it, and a message that is still in Redis comes back
after the visibility timeout (`PREVALENCE_REDELIVERY_AFTER`, `workers.settings`); a write carries
its request id, so a second delivery applies once. Every other case runs kombu's own code.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("workers.master.kombu_fixes")

_installed = False


def install() -> bool:
    """Wrap kombu's Redis ``QoS.restore_unacked`` once; False if kombu has no such thing."""
    global _installed
    if _installed:
        return True
    try:
        from kombu.transport import redis as kombu_redis
    except ImportError:  # pragma: no cover - redis is a dependency
        return False
    original = getattr(getattr(kombu_redis, "QoS", None), "restore_unacked", None)
    if original is None:
        return False

    def restore_unacked(self: Any, client: Any = None) -> Any:
        if client is None and _detached(self):
            logger.warning("prevalence: the broker connection is gone; %d un-acknowledged "
                           "message(s) come back after the visibility timeout instead "
                           "(kombu cannot restore them through a closed connection)",
                           len(getattr(self, "_delivered", ()) or ()))
            return None
        return original(self, client)

    restore_unacked.__wrapped__ = original  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked
    _installed = True
    return True


def _detached(qos: Any) -> bool:
    """True when the QoS's channel can no longer build a Redis client (see module doc)."""
    channel = getattr(qos, "channel", None)
    transport = getattr(channel, "connection", None)
    return transport is None or getattr(transport, "client", None) is None
