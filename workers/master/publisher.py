"""The status publisher of a master worker: its status document to Redis after every sync.

Best effort: a failure is logged once and retried at the next sync, never raised (monitoring
must not break a master). The key, TTL and JSON form are in `workers.status`.
"""

from __future__ import annotations

import logging
from typing import Any

from workers.status import OUTCOME_TTL_S, outcome_key, redis_client, status_key, to_json

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

    def publish_outcomes(self, documents: list[dict[str, Any]]) -> bool:
        """Store committed outcomes (``rid`` in each) under their keys, in one round trip.
        Returns True on success; a failure is logged once and never raised: a waiting
        client then asks the master itself."""
        if not documents:
            return True
        try:
            if self._client is None:
                self._client = redis_client(self.url)
            pipe = self._client.pipeline(transaction=False)
            ttl_ms = int(OUTCOME_TTL_S * 1000)
            for doc in documents:
                pipe.set(outcome_key(doc["rid"]), to_json(doc), px=ttl_ms)
            pipe.execute()
        except Exception as exc:  # monitoring-grade data: never break a master
            if not self._failing:
                logger.warning("prevalence: cannot publish %d committed outcome(s) of %s to Redis "
                               "(%s: %s); clients waiting on them will ask the master", len(documents),
                               self.master, type(exc).__name__, exc)
            self._failing = True
            self._client = None
            return False
        return True
