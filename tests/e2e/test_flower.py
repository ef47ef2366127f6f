"""Flower shows the masters and each sync's report (through task events)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from workers.local.cluster import wait_until

pytestmark = pytest.mark.celery


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)


def test_flower_lists_every_master_and_each_sync_report(make_cluster):
    cluster = make_cluster(env={"FLOWER_UNAUTHENTICATED_API": "true"})
    cluster.start_masters()
    url = cluster.start_flower()
    cluster.start_beat()
    # One committed write, so that every report from now on has a frontier (an idle new
    # cluster has none: its frontier is None until something is committed).
    from tests.e2e.conftest import make_client
    from tests.e2e.helpers import converge, open_accounts

    open_accounts(make_client(cluster), ["flower-a"], master="alpha")
    converge(cluster)

    def sync_reports() -> dict:
        # Each master's own sync is a task of its own: id "<beat tick id>.<master>".
        # The newest of each master's (the older ones may predate the first commit).
        tasks = _get(f"{url}/api/tasks?taskname=prevalence.sync&state=SUCCESS&limit=100&sort_by=-received")
        newest = sorted(tasks.items(), key=lambda item: item[1].get("succeeded") or 0)
        return {info["worker"].split("@")[0]: (task_id, info["result"]) for task_id, info in newest}

    reports = wait_until(lambda: set(sync_reports()) >= set(cluster.masters) and sync_reports(),
                         60, "a sync report from every master in Flower")
    for master, (task_id, result) in reports.items():
        assert task_id.endswith(f".{master}"), task_id
        assert f"'master': '{master}'" in result and "'frontier': '20" in result, result
    workers = _get(f"{url}/api/workers?refresh=1")
    assert {name.split("@")[0] for name in workers} >= set(cluster.masters)
