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

    def sync_reports() -> dict:
        tasks = _get(f"{url}/api/tasks?taskname=prevalence.sync&state=SUCCESS&limit=50")
        return {info["worker"].split("@")[0]: info["result"] for info in tasks.values()}

    reports = wait_until(lambda: set(sync_reports()) >= set(cluster.masters) and sync_reports(),
                         60, "a sync report from every master in Flower")
    for master, result in reports.items():
        assert f"'master': '{master}'" in result and "'frontier'" in result
    workers = _get(f"{url}/api/workers?refresh=1")
    assert {name.split("@")[0] for name in workers} >= set(cluster.masters)
