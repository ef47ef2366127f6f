"""Fixtures of the Celery tier: a private Redis for the session, a local cluster per test.

The broker is a private ``redis-server`` on a free loopback port; without the binary the
tests fall back to the embedded fakeredis server and say so plainly. Each test gets its
own Redis database number (queues, fanout channels and status keys do not leak between
tests), its own shared folder, three masters (real `celery worker -P solo` subprocesses)
and one beat syncing every 0.5 s. Every wait polls with a deadline; nothing sleeps and
hopes. PREVALENCE_TEST_BROKER=embedded forces the fakeredis fallback.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys

import pytest

from workers.localcluster import Broker, LocalCluster, start_broker

_databases = itertools.cycle(range(1, 16))
EMBEDDED_NOTE = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    note = config.stash.get(EMBEDDED_NOTE, None)
    if note:
        terminalreporter.write_line(note, yellow=True, bold=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory, request):
    # PREVALENCE_TEST_BROKER=embedded forces the fallback (to check it still works).
    kind = os.environ.get("PREVALENCE_TEST_BROKER") or (
        "redis-server" if shutil.which("redis-server") else "embedded")
    broker = start_broker(tmp_path_factory.mktemp("redis"), prefer=kind)
    if kind == "embedded":
        request.config.stash[EMBEDDED_NOTE] = (
            "NOTE: the Celery tier ran against the embedded fakeredis server, not a real "
            "Redis" + ("" if shutil.which("redis-server") else " (redis-server not found)")
            + ".")
    yield broker
    broker.stop()


@pytest.fixture
def broker(redis_server):
    """The session's Redis, on a database of this test's own."""
    import redis

    base = redis_server.url.rsplit("/", 1)[0]
    db = next(_databases)
    scoped = Broker(f"{base}/{db}", redis_server.kind, None, None, None)
    # Databases are reused after fifteen tests: start from an empty one, so no queued
    # message or status document of an earlier test leaks into this one.
    redis.Redis.from_url(scoped.url).flushdb()
    scoped.server = redis_server  # type: ignore[attr-defined]
    return scoped


def dump_logs(cluster: LocalCluster) -> str:
    from workers.localcluster import tail

    return "\n".join(tail(path, 20) for path in sorted(cluster.log_dir.glob("*.log")))


@pytest.fixture
def make_cluster(tmp_path, broker, request):
    """Factory: a LocalCluster on this test's folder and database (stopped at teardown)."""
    clusters: list[LocalCluster] = []

    def make(**kwargs) -> LocalCluster:
        kwargs.setdefault("sync_interval", "0.5s")
        kwargs.setdefault("snapshot_interval", "5s")
        cluster = LocalCluster(tmp_path / f"cluster{len(clusters)}", broker, **kwargs)
        clusters.append(cluster)
        return cluster

    yield make
    failed = getattr(request.node, "rep_call", None)
    for cluster in clusters:
        cluster.stop(stop_broker=False)
        if failed is not None and failed.failed:
            print(dump_logs(cluster), file=sys.stderr)


@pytest.fixture
def cluster(make_cluster):
    """Three masters and one beat, all consuming; the client environment set."""
    cluster = make_cluster()
    cluster.start_masters()
    cluster.start_beat()
    return cluster


@pytest.fixture
def client(cluster, monkeypatch):
    """A `workers.client.Client` on a Celery app configured for `cluster`."""
    return make_client(cluster)


def make_client(cluster: LocalCluster):
    from celery import Celery

    from config.celeryconfig import celery_settings
    from config.settings import load_settings
    from workers.client import Client

    env = {k: v for k, v in cluster.env().items() if k.startswith(("PREVALENCE_", "CELERY_"))}
    settings = load_settings(env, use_env_file=False)
    app = Celery("prevalence-test-client", set_as_current=False)
    app.conf.update(celery_settings(settings))
    return Client(app, timeout_s=30)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
