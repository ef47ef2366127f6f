"""Celery settings, queues, routes and the beat schedule, derived from `workers.settings`.

`celery_settings(settings)` returns the dict that `workers.celery` loads into the app. The
topology is DESIGN §5:

- ``prevalence.write``: one list in Redis consumed by every master; any master takes a
  write or a query, which balances load for free.
- ``master.<name>``: work aimed at one master (created on demand, consumed by that master).
- ``prevalence.broadcast``: a fanout exchange; every master binds its own queue to it and
  receives the requests to sync and to snapshot (`prevalence.broadcast_sync`,
  `prevalence.broadcast_snapshot`). Over Redis a fanout is PUB/SUB: at-most-once per
  worker, and a worker that is down misses it (each master therefore also syncs at start).
  Each master answers a request by queueing its own `prevalence.sync` / `prevalence.snapshot`
  on ``master.<name>``, so that each has a task id, a row in Flower and a result of its own
  (all recipients of one broadcast share its task id, and Flower keys tasks by id).

The broadcast exchange must be declared by the *sender* on every publish (celery issue
#2638): Celery does not declare a `Broadcast` queue's exchange when it sends, and kombu's
Redis transport then routes by the (empty) binding table of a direct exchange, so the
message lands in a list that no worker reads. `BROADCAST_OPTIONS` carries the declaration
and is used by the routes, the beat entries and the client alike.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue
from kombu.common import Broadcast

from workers.settings import Settings

WRITE_QUEUE = "prevalence.write"
BROADCAST_NAME = "prevalence.broadcast"
MASTER_QUEUE_PREFIX = "master."

BROADCAST_EXCHANGE = Exchange(BROADCAST_NAME, type="fanout", durable=False)

#: Publish options for anything that must reach every master. No custom routing key:
#: a fanout ignores it, and kombu's Redis fanout channel naming must match the workers'.
BROADCAST_OPTIONS: dict[str, Any] = {
    "queue": BROADCAST_NAME,
    "exchange": BROADCAST_NAME,
    "declare": [BROADCAST_EXCHANGE],
}

#: Results are read by a waiting client within seconds; keep them an hour, not a day.
RESULT_EXPIRES_S = 3600


def master_queue(name: str) -> str:
    """Return the name of the queue that only master `name` consumes."""
    return f"{MASTER_QUEUE_PREFIX}{name}"


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The beat schedule: the one place that says what runs periodically and why.

    Both entries go to the broadcast exchange so that every master runs every tick: each
    master answers the request with a sync or snapshot task of its own, queued on
    ``master.<name>`` (`workers.master.tasks.broadcast_sync`). Both tasks are idempotent, so two beats running at once, a missed tick or a manual
    `prevalence sync` do no harm: a sync with nothing new reads the folder listings and
    returns, and a snapshot of an unchanged frontier is skipped or rewritten identically.
    """
    return {
        # Sync is "catch up to now": it moves the stable frontier, so its interval bounds
        # replication lag (a commit on one master is visible on another within about one
        # interval) and how long a transaction stays tentative. PREVALENCE_SYNC_INTERVAL.
        "prevalence-sync": {
            "task": "prevalence.broadcast_sync",
            "schedule": settings.sync_interval_s,
            "options": dict(BROADCAST_OPTIONS),
        },
        # A snapshot bounds recovery time (replay starts at the newest snapshot) and lets
        # journal segments be deleted (DESIGN invariant 7 waits for every member's snapshot
        # to cover a segment). Costs one serialisation of the whole state per master, hence
        # minutes rather than seconds. PREVALENCE_SNAPSHOT_INTERVAL.
        "prevalence-snapshot": {
            "task": "prevalence.broadcast_snapshot",
            "schedule": settings.snapshot_interval_s,
            "options": dict(BROADCAST_OPTIONS),
        },
    }


#: The Redis result backend that publishes a write's result only once it is durable
#: (`workers.master.results`); named in the backend URL as ``<class>+<redis url>``.
RESULT_BACKEND_CLASS = "workers.master.results:SettlingRedisBackend"


def result_backend_url(broker_url: str) -> str:
    """The result backend: the same Redis as the broker, through `RESULT_BACKEND_CLASS`
    (an in-memory cache for memory://, used by unit tests only)."""
    if broker_url.startswith("memory://"):
        return "cache+memory://"
    return f"{RESULT_BACKEND_CLASS}+{broker_url}"


def celery_settings(settings: Settings) -> dict[str, Any]:
    """Return the Celery configuration for `settings` (lower-case Celery 4+ names)."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": result_backend_url(settings.broker_url),
        "result_expires": RESULT_EXPIRES_S,
        # Broker outages are survivable: retry connecting at start and after a loss, for
        # ever (Celery's default gives up after 100 attempts and the worker exits; a master
        # holds its state and its lease and should simply wait for Redis to come back).
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {
            # An un-acked write (acks_late: its master died holding it) comes back after
            # this long (PREVALENCE_REDELIVERY_AFTER, default 1 h); workers scan for such
            # writes every tenth of it, at most every 10 s, with no further throttling
            # (kombu's default waits up to ten scans, ~100 s, on top of the timeout).
            "visibility_timeout": settings.redelivery_after_s,
            "unacked_restore_interval": min(10.0, settings.redelivery_after_s / 10),
            "unacked_restore_throttle": 1,
            # Fanout PUB/SUB channel names carry the db number (fanout_prefix), and must
            # NOT carry the routing key (fanout_patterns=False): with patterns on, a worker
            # subscribes to "<exchange>/<its queue's binding key>" (which Celery fills from
            # the default routing key) while beat publishes to "<exchange>" with no key,
            # and every broadcast is silently lost. A fanout ignores keys; so do we.
            "fanout_prefix": True,
            "fanout_patterns": False,
        },
        "redis_socket_connect_timeout": 5,
        # Data only, never pickle: nothing that arrives through Redis is executed.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        "task_queues": (
            Queue(WRITE_QUEUE, Exchange(WRITE_QUEUE, type="direct"), routing_key=WRITE_QUEUE),
            Broadcast(BROADCAST_NAME),
        ),
        "task_default_queue": WRITE_QUEUE,
        "task_default_exchange": WRITE_QUEUE,
        # master.<name> queues are created on demand by senders and by the master itself.
        "task_create_missing_queues": True,
        # Only the requests are broadcast. `prevalence.sync` and `prevalence.snapshot` go
        # to the queue their sender names (master.<name>); a route here would add the
        # fanout exchange to an aimed send and reach every master under one task id.
        "task_routes": {
            "prevalence.broadcast_sync": dict(BROADCAST_OPTIONS),
            "prevalence.broadcast_snapshot": dict(BROADCAST_OPTIONS),
        },
        # Writes: acknowledge after the task ran, so a write taken by a master that dies
        # before committing goes back to the queue; the request id makes the retry apply
        # once. One message at a time per master (solo pool: nothing runs in parallel).
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        # A worker reserves concurrency x multiplier messages. The solo pool runs one task
        # at a time whatever the concurrency says, but Celery still defaults concurrency to
        # the number of CPUs, so a solo master on 2 cores held a second write it could not
        # start while another master sat idle (Flower: "Prefetch Count 2"). One, so the
        # prefetch count is 1.
        "worker_concurrency": 1,
        # A solo worker cannot cancel the task in hand when the broker connection drops;
        # the task finishes, and its un-acked message comes back after the visibility
        # timeout, where the request id catches it.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Flower and `celery events` see every task, including each master's sync report.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "beat_schedule": beat_schedule(settings),
    }
