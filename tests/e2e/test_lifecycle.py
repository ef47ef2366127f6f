"""Master lifecycle through real workers: warm shutdown, restart, retirement."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.helpers import converge, open_accounts
from workers.local.cluster import wait_until

pytestmark = pytest.mark.celery

BATCH_ITEMS = 10_000
BATCHES = 4


def test_sigterm_finishes_the_task_in_hand_syncs_snapshots_and_releases_the_lease(
        cluster, client):
    open_accounts(client, ["w1"], master="alpha")
    items = [["deposit", ["w1", 1]] for _ in range(BATCH_ITEMS)]
    results = [client.app.send_task("prevalence.execute_many", args=[items],
                                    queue="master.alpha") for _ in range(BATCHES)]
    log = cluster.log_dir / "alpha.log"
    wait_until(lambda: f"execute_many[{results[0].id}] received" in log.read_text(), 60,
               "alpha to take the first batch")
    status = cluster.stop_process("alpha", signal.SIGTERM)
    assert status == 0
    text = log.read_text()
    assert "Warm shutdown" in text and "master alpha closed (warm shutdown)" in text
    assert list((cluster.shared_dir / "masters" / "alpha" / "snapshots").glob("*.snap"))
    # The lease was released: the same name starts again at once, and takes the batches
    # that were still queued.
    cluster.start_master("alpha")
    replies = [r.get(timeout=120, interval=0.01) for r in results]
    for reply in replies:
        assert [o["status"] for o in reply["outcomes"]] == ["ok"] * BATCH_ITEMS
    converge(cluster)
    for master in cluster.masters:
        assert client.query("balance", "w1", master=master) == BATCH_ITEMS * BATCHES


def test_a_retired_master_stops_counting_and_cannot_start_again(cluster, client):
    env = cluster.env()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workers.client.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120,
                              cwd=str(cluster.run_dir))

    open_accounts(client, ["t1"], master="gamma")
    done = cli("retire", "gamma")
    assert done.returncode == 2 and "refusing to retire a live master" in done.stderr
    assert cluster.stop_process("gamma") == 0
    done = cli("retire", "gamma")
    assert done.returncode == 0, done.stderr
    # The others stop waiting for gamma: writes commit and the two converge.
    client.execute("deposit", "t1", 5, master="alpha")
    view = converge(cluster)
    assert set(view["masters"]) == {"alpha", "beta"} and view["retired"] == ["gamma"]
    done = cli("status")
    assert done.returncode == 0 and "Retired (no longer counted): gamma" in done.stdout
    # gamma's name is gone for good: a worker under that name refuses to start.
    worker = subprocess.run(cluster.master_command("gamma"), env=cluster.env("gamma"),
                            capture_output=True, text=True, timeout=120,
                            cwd=str(cluster.run_dir))
    assert worker.returncode == os.EX_CONFIG and "is retired" in worker.stderr


@pytest.mark.parametrize("reserve", ["0", "64k"])
def test_the_journal_reservation_setting_reaches_the_worker(make_cluster, reserve):
    from tests.e2e.helpers import one_master
    from workers.prevalence import journal

    cluster, client = one_master(make_cluster, {"PREVALENCE_JOURNAL_RESERVE": reserve}, "r1")
    assert client.execute("deposit", "r1", 5, master="alpha") == 5
    [(_first, path)] = journal.list_segments(str(cluster.shared_dir / "masters" / "alpha" / "journal"))
    data = open(path, "rb").read()
    end = len(data) - journal.scan(data, path, 0, None, last_segment=True).zero_tail
    # "0": the segment ends with its last record; "64k": up to 64 KiB of zeros kept after
    # it (not the 256 KiB of the default).
    zeros = len(data) - end
    assert zeros == 0 if reserve == "0" else 64 * 1024 - end < zeros <= 64 * 1024, zeros


def test_status_names_a_master_killed_9_down_at_once_from_its_lease(cluster):
    import json

    from workers.client.monitor import read_status_documents

    converge(cluster)
    pid = cluster.processes["beta"].pid
    cluster.kill_master("beta")
    # Its last report is still in Redis and says ready (it keeps for a minute) ...
    assert read_status_documents(cluster.broker.url)["beta"]["state"] == "ready"
    # ... but its lease names a pid that is gone: status says so on its first look.
    done = subprocess.run([sys.executable, "-m", "workers.client.cli", "status", "--json"],
                          env=cluster.env(), capture_output=True, text=True, timeout=120,
                          cwd=str(cluster.run_dir))
    assert done.returncode == 3, done.stdout + done.stderr
    view = json.loads(done.stdout)
    assert view["masters"]["beta"]["state"] == "down"
    assert f"beta is down: its process (pid {pid} on host" in view["verdict"]
    assert view["masters"]["alpha"]["state"] == "ready"
