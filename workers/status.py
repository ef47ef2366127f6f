"""What a master publishes to Redis, and where: its status document after every sync, and
the committed outcomes of its own requests.

The one contract between the master that publishes (`workers.master.publisher`) and the
clients and operators' tools that read (`workers.client`). Redis holds nothing that
matters (DESIGN invariant 6): status keys come back at the next sync; a flushed outcome
key only makes a waiting client ask the master itself (the ``prevalence.outcome`` task).
"""

from __future__ import annotations

import json
from typing import Any

STATUS_KEY_PREFIX = "prevalence:status:"
#: Never keep a status document less than this long, whatever the sync interval.
STATUS_TTL_S_MIN = 60.0
#: Redis calls from a master are best-effort monitoring: they must not stall a task.
REDIS_TIMEOUT_S = 2.0


OUTCOME_KEY_PREFIX = "prevalence:outcome:"
#: How long a committed outcome waits in Redis for a client to read it (seconds).
OUTCOME_TTL_S = 3600.0


def outcome_key(rid: str) -> str:
    """The Redis key of the committed outcome of request `rid`."""
    return f"{OUTCOME_KEY_PREFIX}{rid}"


def status_key(master: str) -> str:
    """The Redis key of `master`'s status document."""
    return f"{STATUS_KEY_PREFIX}{master}"


def status_ttl_s(sync_interval_s: float) -> float:
    """TTL of a status document: ten sync intervals, and at least a minute.

    A master that stops syncing (down, or stuck in a long task) keeps its last document
    for that long, with its age shown, and then disappears from Redis.
    """
    return max(STATUS_TTL_S_MIN, 10.0 * sync_interval_s)


def redis_client(url: str) -> Any:
    """A redis-py client for `url` with short timeouts, for monitoring only."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S,
                                socket_connect_timeout=REDIS_TIMEOUT_S)


def to_json(document: Any) -> str:
    """Serialise a status document; values JSON cannot hold become their str()."""
    return json.dumps(document, default=str, sort_keys=True)
