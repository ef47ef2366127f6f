"""Writes, queries and requests through real Celery workers: convergence, idempotence,
two beats, and refusals that journal nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from tests.e2e.helpers import KeyedLoad, balances_everywhere, converge, open_accounts
from workers.client import RequestRefused
from workers.prevalence import verify

pytestmark = pytest.mark.celery


def test_writes_via_shared_queue_and_aimed_at_each_master_converge(cluster, client):
    accounts = [f"acct-{i}" for i in range(6)]
    open_accounts(client, accounts, master="alpha")
    converge(cluster)
    # Shared queue: whichever master is free; sent all at once so that all three take some.
    results = [client.app.send_task("prevalence.execute", args=["deposit", [accounts[i % 6], 1]])
               for i in range(60)]
    shared = [r.get(timeout=60, interval=0.02) for r in results]
    assert all(o["status"] == "ok" for o in shared), shared
    takers = {o["master"] for o in shared}
    # Aimed: ten deposits of 10 on each master's own queue.
    for master in cluster.masters:
        for i in range(10):
            outcome = client.execute_outcome("deposit", accounts[i % 6], 10, master=master)
            assert outcome["status"] == "ok" and outcome["master"] == master

    view = converge(cluster)
    digests = {doc["digest"] for doc in view["masters"].values()}
    report = view["verify"]
    assert digests == {report["digest"]}
    assert report["total"] == len(accounts) + 60 + 30 and report["duplicates"] == 0
    expected_total = 60 * 1 + 30 * 10
    assert all(b == expected_total for b in
               (sum(v.values()) for v in balances_everywhere(client, cluster.masters).values()))
    assert len(takers) >= 1


def test_a_nested_model_with_refusals_after_mutating_converges_through_real_workers(make_cluster):
    # The ledger as a user writes it (nested state changed in place, refusals after
    # mutating, no copy): concurrent writes on every master rebase through the change log.
    from tests.e2e.conftest import make_client
    from tests.support import nested_ledger

    cluster = make_cluster(env={"PREVALENCE_MODEL": "tests.support:nested_ledger"})
    cluster.start_masters()
    cluster.start_beat()
    client = make_client(cluster)
    accounts = ["n0", "n1", "n2"]
    for a in accounts:
        client.execute("open_account", a, 50, master="alpha")
    converge(cluster, nested_ledger)
    sends = []
    for i in range(90):
        kind = ("withdraw", [accounts[i % 3], 7]) if i % 3 else ("transfer", [accounts[i % 3], accounts[(i + 1) % 3], 9])
        sends.append(client.app.send_task("prevalence.execute", args=list(kind), queue=f"master.{cluster.masters[i % 3]}"))
    outcomes = [r.get(timeout=60, interval=0.02) for r in sends]
    assert {o["status"] for o in outcomes} <= {"ok", "rejected"}
    view = converge(cluster, nested_ledger)
    assert {doc["digest"] for doc in view["masters"].values()} == {view["verify"]["digest"]}
    totals = {m: client.query("total", master=m) for m in cluster.masters}
    assert len(set(totals.values())) == 1 and 0 <= totals["alpha"] < 150, totals
    # Balances never went below zero in the committed order, on any master.
    for m in cluster.masters:
        assert all(client.query("balance", a, master=m) >= 0 for a in accounts)


def _runs(cluster, master: str, task_id: str) -> int:
    """How many times `master` ran the task with this id (from its log)."""
    log = (cluster.log_dir / f"{master}.log").read_text()
    return log.count(f"[{task_id}] succeeded")


def test_a_redelivered_execute_applies_once(cluster, client):
    from workers.local.cluster import wait_until

    open_accounts(client, ["r1"], master="alpha")
    converge(cluster)
    # The same message (same task id) twice to one master, as a redelivery after a crash
    # would be, then once more to another master after a sync.
    task_id = str(uuid.uuid4())
    for master in ("alpha", "alpha", "beta"):
        client.app.send_task("prevalence.execute", args=["deposit", ["r1", 7]],
                             queue=f"master.{master}", task_id=task_id)
    wait_until(lambda: _runs(cluster, "alpha", task_id) == 2 and _runs(cluster, "beta", task_id) == 1,
               60, "both masters to run the redelivered task")
    log = (cluster.log_dir / "alpha.log").read_text()
    assert "'duplicate': True" in log
    # A redelivered batch: same task id twice, each item applied once.
    batch_id = str(uuid.uuid4())
    for _ in range(2):
        client.app.send_task("prevalence.execute_many",
                             args=[[["deposit", ["r1", 1]], ["deposit", ["r1", 1]]]],
                             queue="master.gamma", task_id=batch_id)
    wait_until(lambda: _runs(cluster, "gamma", batch_id) == 2, 60, "the batch to run twice")
    view = converge(cluster)
    for master in cluster.masters:
        assert client.query("balance", "r1", master=master) == 7 + 2
    # Journaled: the open, alpha's deposit (its redelivery was answered from the record)
    # and beta's copy (same request id: skipped in the reference order), the batch once.
    assert view["verify"]["duplicates"] == 1, view["verify"]


def test_two_beats_at_once_still_converge_and_apply_nothing_twice(cluster, client):
    cluster.start_beat("beat2")
    load = KeyedLoad(client, list(cluster.masters)).start()
    from workers.local.cluster import wait_until

    wait_until(lambda: len(load.acknowledged) >= 40, 120, "40 acknowledged deposits")
    load.stop()
    view = converge(cluster)
    balances = balances_everywhere(client, cluster.masters)
    assert len({json.dumps(b, sort_keys=True) for b in balances.values()}) == 1
    load.check(balances["alpha"])
    assert view["verify"]["duplicates"] == 0
    for name in ("beat", "beat2"):
        assert "(prevalence.broadcast_sync)" in (cluster.log_dir / f"{name}.log").read_text()


def _journal_state(cluster) -> tuple:
    report = verify(str(cluster.shared_dir), __import__("workers.models.ledger",
                                                        fromlist=["model"]).model)
    return report["digest"], report["total"]


def test_bad_input_via_tasks_is_refused_clearly_and_journals_nothing(cluster, client):
    open_accounts(client, ["b1"], master="alpha")
    before = _journal_state(cluster)
    cases = [
        (("nosuch", "b1", 1), "UnknownTransaction", "no transaction 'nosuch'"),
        (("deposit", "b1"), "BadArguments", "missing a required argument"),
        (("deposit", "b1", 1, 2), "BadArguments", "too many"),
        (("deposit", "b1", 2 ** 70), "BadArguments", "cannot be encoded"),
    ]
    for args, error_type, text in cases:
        for master in (None, "beta"):
            outcome = client.execute_outcome(*args, master=master)
            assert outcome["status"] == "error", outcome
            assert outcome["error_type"] == error_type, outcome
            assert text in outcome["error"], outcome
    with pytest.raises(RequestRefused, match="cannot be encoded as JSON"):
        client.execute("deposit", "b1", {1, 2})
    # A malformed request, and a batch with one bad item: refused as a whole.
    reply = client.app.send_task("prevalence.execute", args=[42, "not-a-list"],
                                 queue="master.alpha").get(timeout=30)
    assert reply["error_type"] == "BadRequest" and "non-empty string" in reply["error"]
    with pytest.raises(RequestRefused, match="no transaction 'nosuch'"):
        client.execute_many([("deposit", ["b1", 1]), ("nosuch", [])], master="gamma")
    # Queries: unknown name and wrong arity are clear errors too.
    assert client.query_outcome("nosuch")["error_type"] == "UnknownQuery"
    assert client.query_outcome("balance")["error_type"] == "BadArguments"
    assert _journal_state(cluster) == before


def test_bad_input_via_the_cli_exits_non_zero_with_a_clear_message(cluster, client):
    open_accounts(client, ["c1"], master="alpha")
    before = _journal_state(cluster)
    env = cluster.env()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workers.client.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120,
                              cwd=str(cluster.run_dir))

    cases = [
        (("tx", "nosuch", "c1", "1"), 2, "no transaction 'nosuch'"),
        (("tx", "deposit", "c1"), 2, "missing a required argument"),
        (("tx", "deposit", "c1", "1180591620717411303424"), 2, "cannot be encoded"),
        (("tx", "deposit", "c1", "[1,"), 2, "looks like JSON but is not"),
        (("query", "nosuch"), 2, "no query 'nosuch'"),
        (("query", "balanse", "c1"), 2, "error (UnknownQuery): "),
        (("query", "balance", "nosuch"), 1, "rejected: no account 'nosuch'"),
        (("tx", "deposit", "c1", "1", "--master", "nosuch"), 2, "no master named 'nosuch'"),
    ]
    for args, status, text in cases:
        done = cli(*args)
        assert done.returncode == status, (args, done.stdout, done.stderr)
        assert text in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert _journal_state(cluster) == before
    # A refusal by the model is not bad input: exit 1, and its outcome is recorded.
    done = cli("tx", "deposit", "c1", "1", "--master", "beta", "--strings")
    assert done.returncode == 1 and "positive integer" in done.stderr, done.stderr
    # And a good one, with JSON output.
    done = cli("tx", "deposit", "c1", "5", "--master", "gamma", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["value"] == 5
