"""Faults under load: kill -9 of a master, FLUSHALL and a Redis restart, and start-up
refusals (wrong pool, a name already running)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.helpers import KeyedLoad, balances_everywhere, converge
from workers.local.cluster import wait_until

pytestmark = pytest.mark.celery


@pytest.mark.parametrize("kind", ["ledger", "nested"])
def test_kill_9_of_a_master_under_load_then_restart_loses_no_acknowledged_transaction(make_cluster, kind):
    # On the example ledger and on the nested one (`tests.support.nested_ledger`: changed in
    # place, refusing after mutating), whose writes and rebases go through the change log.
    from tests.e2e.conftest import make_client
    from tests.support import nested_ledger
    from workers.models.ledger import model as ledger

    nested = kind == "nested"
    cluster = make_cluster(env={"PREVALENCE_MODEL": "tests.support:nested_ledger"} if nested else {})
    cluster.start_masters()
    cluster.start_beat()
    client = make_client(cluster)
    load = KeyedLoad(client, list(cluster.masters), reply_timeout_s=5).start()
    wait_until(lambda: len(load.acknowledged) >= 20, 120, "20 acknowledged deposits")
    cluster.kill_master("beta")
    acknowledged_at_kill = len(load.acknowledged)
    wait_until(lambda: len(load.acknowledged) >= acknowledged_at_kill + 10, 120,
               "10 more acknowledged deposits while beta is down")
    # Restart at once: the lease of a dead process on this host is stale immediately.
    cluster.start_master("beta")
    restarted_at = len(load.acknowledged)
    wait_until(lambda: len(load.acknowledged) >= restarted_at + 10, 120,
               "10 more acknowledged deposits after the restart")
    load.stop()
    view = converge(cluster, nested_ledger if nested else ledger)
    assert view["verify"]["errors"] == {}
    balances = balances_everywhere(client, cluster.masters)
    for master, state in balances.items():
        load.check(state)
    assert balances["alpha"] == balances["beta"] == balances["gamma"]


def test_flushall_and_a_redis_restart_during_load_lose_nothing_committed(cluster, client, broker):
    import redis

    server = broker.server
    pids = {m: cluster.processes[m].pid for m in cluster.masters}
    load = KeyedLoad(client, list(cluster.masters), retry_until_ok=True,
                     reply_timeout_s=5).start()
    wait_until(lambda: len(load.acknowledged) >= 15, 120, "15 acknowledged deposits")
    redis.Redis.from_url(broker.url).flushall()
    flushed_at = len(load.acknowledged)
    wait_until(lambda: len(load.acknowledged) >= flushed_at + 15, 120,
               "15 more acknowledged deposits after FLUSHALL")
    server.restart()  # same port, empty: a Redis restart without persistence
    restarted_at = len(load.acknowledged)
    wait_until(lambda: len(load.acknowledged) >= restarted_at + 15, 180,
               "15 more acknowledged deposits after the Redis restart",
               on_timeout=lambda: f"client errors: {load.failures[-5:]}")
    load.stop()
    # The masters carried on, in the same processes: every one runs and reports again, and
    # none had to be restarted (kombu 5.7 used to kill a worker while closing the lost
    # connection: workers/kombu_fixes.py).
    view = converge(cluster)
    assert set(view["masters"]) == set(cluster.masters)
    assert all(cluster.processes[m].poll() is None for m in cluster.masters)
    assert pids == {m: cluster.processes[m].pid for m in cluster.masters}
    assert not cluster.restarts, f"restarted after the Redis outage: {cluster.restarts}"
    balances = balances_everywhere(client, cluster.masters)
    for state in balances.values():
        load.check(state)


def _worker(cluster, name: str, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-n",
               f"{name}-probe@%h", "-l", "info", "--without-mingle", "--without-gossip", *extra]
    return subprocess.run(command, env=cluster.env(name), capture_output=True, text=True,
                          timeout=120, cwd=str(cluster.run_dir))


def test_a_master_with_another_pool_refuses_to_start_and_says_why(make_cluster):
    cluster = make_cluster()
    done = _worker(cluster, "alpha", "-P", "threads", "-c", "2")
    assert done.returncode == os.EX_CONFIG, done.stderr[-2000:]
    assert "needs the solo pool" in done.stderr
    assert not (cluster.shared_dir / "masters" / "alpha").exists()


def test_a_second_process_for_a_running_master_refuses_to_start(cluster):
    done = _worker(cluster, "alpha", "-P", "solo")
    assert done.returncode == os.EX_TEMPFAIL, done.stderr[-2000:]
    assert "already running" in done.stderr
    assert cluster.processes["alpha"].poll() is None


def test_a_worker_without_a_master_name_refuses_to_start(make_cluster):
    cluster = make_cluster()
    env = cluster.env()
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "workers", "worker", "-P",
                           "solo", "--without-mingle"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=str(cluster.run_dir))
    assert done.returncode == os.EX_CONFIG
    assert "PREVALENCE_MASTER: not set" in done.stderr


def test_a_master_killed_holding_a_batch_applies_it_once_after_redelivery(make_cluster):
    """kill -9 of a master while it runs a batch of 10,000 writes (acks_late: the message
    is not acknowledged), restart: Redis delivers the batch again after
    PREVALENCE_REDELIVERY_AFTER, and each write applies once, whether the killed process
    had journaled the batch or not (its request ids answer the second delivery)."""
    from tests.e2e.conftest import make_client
    from tests.e2e.helpers import open_accounts

    cluster = make_cluster(masters=("alpha", "beta"), env={"PREVALENCE_REDELIVERY_AFTER": "5s"})
    cluster.start_masters()
    cluster.start_beat()
    client = make_client(cluster)
    open_accounts(client, ["k1"], master="alpha")
    items = [["deposit", ["k1", 1]] for _ in range(10_000)]
    log = cluster.log_dir / "alpha.log"
    pid = cluster.processes["alpha"].pid
    sent = 0
    # The batch must be in the worker when it dies: freeze the worker (SIGSTOP) as soon as it
    # has taken the batch, and kill it only if the batch's result is not out yet. A batch
    # that finished first (a fast machine) is sent again, as a new batch.
    for _attempt in range(5):
        result = client.app.send_task("prevalence.execute_many", args=[items], queue="master.alpha")
        sent += len(items)
        wait_until(lambda: f"execute_many[{result.id}] received" in log.read_text(), 60,
                   "alpha to take the batch", poll_s=0.002)
        os.kill(pid, signal.SIGSTOP)
        if not result.ready():
            break
        os.kill(pid, signal.SIGCONT)
    else:
        pytest.fail("alpha finished each of 5 batches before it could be stopped")
    cluster.kill_master("alpha")
    cluster.start_master("alpha")
    reply = result.get(timeout=120, interval=0.05)  # from the second delivery
    assert [o["status"] for o in reply["outcomes"]] == ["ok"] * len(items)
    view = converge(cluster)
    assert view["verify"]["errors"] == {} and view["verify"]["duplicates"] == 0, view["verify"]
    for master in cluster.masters:
        assert client.query("balance", "k1", master=master) == sent
    assert log.read_text().count(f"execute_many[{result.id}] received") == 2  # delivered again
