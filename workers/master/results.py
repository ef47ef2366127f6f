"""The result backend of the Celery tier: Redis, plus one rule: a master's commit is
durable before its result is published or its message acknowledged.

A master opened with ``deferred_sync`` returns from `execute` while the kernel syncs the
journal (`workers.prevalence.durable.AsyncDataSync`). Celery then spends a few hundred
microseconds of its own on the task (result meta, JSON, a GET of any earlier result) before
it writes and publishes the result. `SettlingRedisBackend._set_with_state`, the one call
that writes a task's result, first waits for the sync (`runtime.settle`), so the sync runs
in that time instead of before it. `settle_after_task`, connected to ``task_postrun`` here,
does the same for a task whose result is not stored: Celery acknowledges an
``acks_late`` message only after that signal.

If the sync failed, the worker process exits at once (`runtime.settle`): no result, no
acknowledgement; the broker gives the message to a master again and the restarted master
recovers from what is on disk, where the request id makes the retry apply once.

`workers.celeryconfig.result_backend_url` names this class for ``redis://``, ``rediss://``
and ``redis+socket://``. Clients, beat and Flower load it too; outside a master worker
it is the plain Redis backend.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend
from celery.signals import task_postrun

from workers.master import runtime


class SettlingRedisBackend(RedisBackend):
    """Celery's Redis result backend that waits for the master's pending journal sync
    before it writes (and publishes) a result."""

    def _set_with_state(self, key: Any, value: Any, state: str) -> Any:
        runtime.settle()
        return super()._set_with_state(key, value, state)


def settle_after_task(**_: Any) -> None:
    """``task_postrun`` handler: the commit is durable before the message is acknowledged."""
    runtime.settle()


# Wherever this backend is loaded; a no-op in a process that runs no master (or nothing pending).
task_postrun.connect(settle_after_task, weak=False, dispatch_uid="prevalence-settle")
