"""The Celery configuration every side shares: broadcast routing, late acknowledgement,
the result backend, the beat schedule."""

from __future__ import annotations

from workers.celeryconfig import BROADCAST_OPTIONS, celery_settings
from workers.settings import load_settings


def settings(**env):
    return load_settings(env, use_env_file=False)


def test_broadcasts_declare_the_fanout_exchange_at_send_time():
    conf = celery_settings(settings())
    [exchange] = BROADCAST_OPTIONS["declare"]
    assert exchange.name == "prevalence.broadcast" and exchange.type == "fanout"
    assert "routing_key" not in BROADCAST_OPTIONS
    for entry in conf["beat_schedule"].values():
        assert entry["options"]["declare"] == [exchange]
    for task in ("prevalence.broadcast_sync", "prevalence.broadcast_snapshot"):
        assert conf["task_routes"][task]["declare"] == [exchange]
    # Beat broadcasts the requests; each master then queues its own sync and snapshot.
    assert {entry["task"] for entry in conf["beat_schedule"].values()} == {
        "prevalence.broadcast_sync", "prevalence.broadcast_snapshot"}
    # An aimed sync or snapshot must not be routed to the fanout (one task id for all).
    assert "prevalence.sync" not in conf["task_routes"]
    assert "prevalence.snapshot" not in conf["task_routes"]
    # The Redis fanout topic must not depend on routing keys (see celeryconfig).
    assert conf["broker_transport_options"]["fanout_patterns"] is False


def test_writes_are_acknowledged_late_one_at_a_time_and_events_are_on():
    conf = celery_settings(settings())
    assert conf["task_acks_late"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    # Celery reserves concurrency x multiplier messages, and its default concurrency is
    # the CPU count even for the solo pool: one, so that a master reserves one message.
    assert conf["worker_concurrency"] * conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_send_task_events"] is True
    assert conf["result_backend"] == f"workers.master.results:SettlingRedisBackend+{conf['broker_url']}"
    assert conf["accept_content"] == ["json"]


def test_beat_intervals_come_from_the_environment():
    conf = celery_settings(settings(PREVALENCE_SYNC_INTERVAL="250ms",
                                    PREVALENCE_SNAPSHOT_INTERVAL="2m"))
    assert conf["beat_schedule"]["prevalence-sync"]["schedule"] == 0.25
    assert conf["beat_schedule"]["prevalence-snapshot"]["schedule"] == 120.0
