"""`prevalence backup` against real workers under load, and a restore from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.e2e.conftest import make_client
from tests.e2e.helpers import KeyedLoad, converge
from workers.local.cluster import wait_until

pytestmark = pytest.mark.celery


def test_a_backup_under_load_restores_into_a_fresh_folder_that_verifies_equal_to_it(
        cluster, client, make_cluster, tmp_path):
    load = KeyedLoad(client, list(cluster.masters)).start()
    try:
        wait_until(lambda: len(load.acknowledged) >= 40, 120, "the load to get going")
        acked_before = list(load.acknowledged)
        dest = tmp_path / "backup"
        done = subprocess.run([sys.executable, "-m", "workers.client.cli", "backup", str(dest), "--json"],
                              env=cluster.env(), capture_output=True, text=True, timeout=240,
                              cwd=str(cluster.run_dir))
        acked_during = len(load.acknowledged) - len(acked_before)
    finally:
        load.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads(done.stdout)
    assert set(manifest["cuts"]) == set(cluster.masters)
    assert "backup: verifying the copy" in done.stderr and "backup: backup complete" in done.stderr
    print(f"writes acknowledged while the backup ran: {acked_during}")
    # The source stops; a new cluster starts on a copy of the backup, same names.
    cluster.stop(stop_broker=False)
    restored = tmp_path / "restored"
    shutil.copytree(dest, restored)
    again = make_cluster(shared_dir=restored)
    again.start_masters()
    again.start_beat()
    view = converge(again)
    assert view["verify"]["digest"] == manifest["digest"]
    assert not view["verify"]["errors"]
    # Every write acknowledged before the backup began is there, once, on every master.
    restored_client = make_client(again)
    for master in again.masters:
        balances = restored_client.query("balances", master=master)
        missing = [a for a in acked_before if balances.get(a) != 1]
        assert not missing, (master, missing[:10])
