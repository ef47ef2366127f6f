"""Real master workers overlap a write's journal sync with Celery's own work on the task
(`workers.master.results`) unless told not to, and lose no acknowledged write either way."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import make_client
from tests.e2e.helpers import one_master

pytestmark = pytest.mark.celery


@pytest.mark.parametrize("overlap", ["on", "off"])
def test_workers_overlap_the_sync_unless_told_not_to_and_writes_survive_either_way(make_cluster, overlap):
    cluster, client = one_master(make_cluster, {"PREVALENCE_SYNC_OVERLAP": overlap}, "o1")
    for _ in range(20):
        client.execute("deposit", "o1", 1, master="alpha")
    assert client.status("alpha")["sync_overlap"] is (overlap == "on")
    # Killed at once: what every acknowledged write needs is on disk, settled or not.
    cluster.kill_master("alpha")
    cluster.start_master("alpha")
    assert make_client(cluster).query("balance", "o1", master="alpha") == 20
