"""Tentative and committed answers through real workers: conflicting writes on two
masters, the committed wait (Python client and CLI) across a master restart and a Redis
flush, and key affinity with fail-over."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import redis

from tests.e2e.conftest import make_client
from tests.e2e.helpers import converge, open_accounts
from workers.local.cluster import wait_until

pytestmark = pytest.mark.celery


def _conflicting_withdrawals(cluster, client, account: str):
    """Balance 100; withdraw 80 on alpha and on beta at once. Returns both answers."""
    client.execute("open_account", account, 100, master="alpha")
    converge(cluster)
    sent = [client.app.send_task("prevalence.execute", args=["withdraw", [account, 80], f"{account}-{m}"],
                                 queue=f"master.{m}") for m in ("alpha", "beta")]
    return [r.get(timeout=60, interval=0.02) for r in sent]


def test_two_conflicting_withdrawals_commit_to_exactly_one_ok_and_one_rejected(cluster, client):
    answers = _conflicting_withdrawals(cluster, client, "ww1")
    for a in answers:
        assert "committed" in a and a["committed"] is False  # three members: never final at once
    changed = []
    finals = [client.wait_committed(a, 60) for a in answers]
    for a, f in zip(answers, finals):
        assert f["committed"] is True and f["rid"] == a["rid"]
        if a["status"] != f["status"]:
            changed.append(a["rid"])
    assert sorted(f["status"] for f in finals) == ["ok", "rejected"], finals
    view = converge(cluster)
    assert client.query("balance", "ww1", master="gamma") == 20
    # Exactly what the reference order implies: the one that orders first passed.
    assert view["verify"]["duplicates"] == 0
    # When both first answers were ok, the committed order reversed one: it is counted.
    if all(a["status"] == "ok" for a in answers):
        assert len(changed) == 1
        counted = sum(doc.get("outcomes_changed", 0) for doc in view["masters"].values())
        assert counted >= 1


def test_the_cli_waits_for_the_committed_outcome_and_its_exit_status_follows_it(cluster, client):
    client.execute("open_account", "ww2", 100, master="alpha")
    converge(cluster)
    env = cluster.env()

    def tx(master: str, key: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "workers.client.cli", "tx", "withdraw", "ww2", "80",
                                 "--master", master, "--key", key, "--wait", "committed", "--timeout", "60"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=str(cluster.run_dir))

    procs = [tx("alpha", "cli-a"), tx("beta", "cli-b")]
    codes = sorted(p.wait(timeout=120) for p in procs)
    assert codes == [0, 1], [p.stderr.read() for p in procs]
    # `outcome KEY` tells the same final outcomes afterwards, from any master.
    for key in ("cli-a", "cli-b"):
        done = subprocess.run([sys.executable, "-m", "workers.client.cli", "outcome", key, "--wait",
                               "--json"], env=env, capture_output=True, text=True, timeout=120,
                              cwd=str(cluster.run_dir))
        assert done.returncode in (0, 1), done.stderr
        assert '"committed": true' in done.stdout


def test_a_tentative_answer_says_so_in_the_cli(cluster, client):
    client.execute("open_account", "ww3", 5, master="alpha")
    converge(cluster)
    done = subprocess.run([sys.executable, "-m", "workers.client.cli", "tx", "deposit", "ww3", "1",
                           "--master", "beta", "--key", "tent-1"], env=cluster.env(),
                          capture_output=True, text=True, timeout=120, cwd=str(cluster.run_dir))
    assert done.returncode == 0, done.stderr
    assert "TENTATIVE" in done.stdout and "prevalence outcome tent-1 --wait" in done.stdout


def test_the_committed_wait_survives_a_master_restart_and_a_redis_flush(cluster, client, broker):
    client.execute("open_account", "ww4", 10, master="alpha")
    converge(cluster)
    answer = client.execute_outcome("deposit", "ww4", 5, master="alpha", key="survive-1")
    assert answer["status"] == "ok"
    # The master that answered dies before anything about it was published, and Redis
    # loses every key: the wait asks the restarted master itself.
    cluster.kill_master("alpha")
    redis.Redis.from_url(broker.url).flushall()
    cluster.start_master("alpha")
    final = client.wait_committed(answer, 90)
    assert final["committed"] is True and final["status"] == "ok" and final["value"] == 15


def test_route_key_keeps_one_key_on_one_master_and_fails_over_when_it_dies(cluster, client):
    wait_until(lambda: len(client.members_up()) == 3, 60, "three masters reported up")
    keys = [f"acct-{uuid.uuid4().hex[:6]}" for _ in range(12)]
    routes = {k: client.route(k) for k in keys}
    assert len(set(routes.values())) > 1  # keys spread over masters
    assert all(client.route(k) == routes[k] for k in keys)  # stable
    open_accounts(client, keys, master="alpha")
    converge(cluster)
    victim = routes[keys[0]]
    for _ in range(5):
        out = client.execute_outcome("deposit", keys[0], 1, master=client.route(keys[0]))
        assert out["master"] == victim
    cluster.kill_master(victim)
    fresh = make_client(cluster)
    wait_until(lambda: victim not in fresh.members_up(), 60, f"{victim} no longer reported up",
               on_timeout=lambda: f"up: {fresh.members_up()}")
    moved = fresh.route(keys[0])
    assert moved != victim
    # Only the dead master's keys moved (rendezvous hashing).
    assert all(fresh.route(k) == r for k, r in routes.items() if r != victim)
    assert fresh.execute("deposit", keys[0], 1, route_key=keys[0]) == 6
