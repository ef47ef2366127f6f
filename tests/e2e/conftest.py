"""Fixtures of the end-to-end tier: a local cluster per test, on the test's own Redis database
(the `broker` fixture of tests/conftest.py).

Each test gets its own shared folder, three masters (real `celery worker -P solo`
subprocesses) and one beat syncing every 0.5 s. Every wait polls with a deadline; nothing
sleeps and hopes. A failed test prints the tail of every process's log.
"""

from __future__ import annotations

import sys

import pytest

from workers.local.cluster import LocalCluster

def dump_logs(cluster: LocalCluster) -> str:
    from workers.local.cluster import tail

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

    from workers.celeryconfig import celery_settings
    from workers.settings import load_settings
    from workers.client import Client

    env = {k: v for k, v in cluster.env().items() if k.startswith(("PREVALENCE_", "CELERY_"))}
    settings = load_settings(env, use_env_file=False)
    app = Celery("prevalence-test-client", set_as_current=False)
    app.conf.update(celery_settings(settings))
    return Client(app, timeout_s=30)
