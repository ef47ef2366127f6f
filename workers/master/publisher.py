"""The status publisher of a master worker: its status document to Redis after every sync.

Best effort: a failure is logged once and retried at the next sync, never raised (monitoring
must not break a master). The key, TTL and JSON form are in `workers.status`.
"""

from __future__ import annotations

import logging
from typing import Any

from workers.status import redis_client, status_key, to_json

logger = logging.getLogger(__name__)


class StatusPublisher:
    """Writes one master's status document to Redis; failures are logged, never raised."""

    def __init__(self, url: str, master: str, ttl_s: float) -> None:
        self.url = url
        self.master = master
        self.ttl_s = ttl_s
        self._client: Any = None
        self._failing = False

    def publish(self, document: dict[str, Any]) -> bool:
        """Store `document` under the master's key with the TTL. Returns True on success."""
        try:
            if self._client is None:
                self._client = redis_client(self.url)
            self._client.set(status_key(self.master), to_json(document),
                             px=int(self.ttl_s * 1000))
        except Exception as exc:  # monitoring must never break a master; log and go on
            if not self._failing:
                logger.warning("prevalence: cannot publish status of %s to Redis (%s: %s); "
                               "will keep trying at each sync", self.master,
                               type(exc).__name__, exc)
            self._failing = True
            self._client = None
            return False
        if self._failing:
            logger.info("prevalence: status of %s published to Redis again", self.master)
        self._failing = False
        return True
