"""The result backend publishes a write's result only after its journal sync finished
(`workers.master.results`), and a worker whose deferred sync failed exits without answering.

The backend is exercised in-process against the session's Redis (Celery's own store path:
meta, GET of an earlier result, SET + PUBLISH); tests/e2e/test_overlap.py runs real workers.
"""

from __future__ import annotations

import logging

import pytest

from workers.master import runtime
from workers.master.results import SettlingRedisBackend


class _Master:
    """Stands in for `Master`: records each settle and what Redis held at that moment."""

    name = "alpha"

    def __init__(self, redis_client=None, key=None, fail=None):
        self.redis, self.key, self.fail = redis_client, key, fail
        self.calls: list = []

    def settle(self):
        self.calls.append(self.redis.exists(self.key) if self.redis is not None else None)
        if self.fail:
            raise self.fail


class _Runtime:
    def __init__(self, master):
        self.master, self.name = master, master.name


@pytest.fixture
def installed():
    """Install a stand-in master runtime for the test; uninstall after."""
    def install(master):
        runtime.install(_Runtime(master))
        return master
    yield install
    runtime.uninstall()


def _backend(broker):
    from celery import Celery

    from workers.celeryconfig import result_backend_url

    app = Celery("results-test", set_as_current=False)
    app.conf.update(result_backend=result_backend_url(broker.url), result_serializer="json",
                    result_accept_content=["json"])
    return app.backend


def test_a_result_is_written_and_published_only_after_the_master_settled(broker, installed):
    import redis

    backend = _backend(broker)
    assert isinstance(backend, SettlingRedisBackend)
    key = backend.get_key_for_task("task-1")
    client = redis.Redis.from_url(broker.url)
    pubsub = client.pubsub()
    pubsub.subscribe(key)
    pubsub.get_message(timeout=1)  # the subscription confirmation
    master = installed(_Master(client, key))
    backend.store_result("task-1", {"status": "ok", "value": 5}, "SUCCESS")
    # settle ran once, while the result was not in Redis yet; then it was stored and published.
    assert master.calls == [0]
    assert backend.get_task_meta("task-1")["result"] == {"status": "ok", "value": 5}
    message = pubsub.get_message(timeout=2)
    assert message and message["type"] == "message" and message["channel"] == key
    pubsub.close()


def test_the_postrun_hook_settles_before_celery_acknowledges(installed):
    from celery.signals import task_postrun

    master = installed(_Master())
    # Connected by importing workers.master.results (the backend's module), not by this test.
    task_postrun.send(sender=None, task_id="t", task=None, args=(), kwargs={}, retval=None,
                      state="SUCCESS")
    assert master.calls == [None]


def test_settle_without_a_master_does_nothing():
    assert runtime.get() is None
    runtime.settle()


def test_a_failed_sync_makes_the_worker_exit_at_once_saying_why(installed, monkeypatch, caplog):
    from workers.prevalence.errors import StorageError

    installed(_Master(fail=StorageError("syncing failed on /x/journal/0001.seg: EIO")))
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(runtime.os, "_exit", fake_exit)
    with caplog.at_level(logging.CRITICAL, logger="workers.master.runtime"), pytest.raises(SystemExit):
        runtime.settle()
    assert exits == [runtime.EXIT_SYNC_FAILED]
    [record] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "EIO" in record.getMessage() and "without answering or acknowledging" in record.getMessage()
