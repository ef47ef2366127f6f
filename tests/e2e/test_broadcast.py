"""Beat's broadcasts reach every master, every tick (celery issue #2638 regression)."""

from __future__ import annotations

import re

import pytest

from workers.local.cluster import wait_until

pytestmark = pytest.mark.celery

TICKS_MIN = 6


def sent_sync_ids(beat_log: str) -> list[str]:
    # beat logs "<task> sent. id-><uuid>" at debug level for every entry it sends.
    return re.findall(r"prevalence\.broadcast_sync sent\. id->([0-9a-f-]{36})", beat_log)


def test_every_master_runs_every_beat_tick(make_cluster):
    cluster = make_cluster()
    cluster.start_masters()
    cluster.start_beat(loglevel="debug")
    beat_log = cluster.log_dir / "beat.log"
    wait_until(lambda: len(sent_sync_ids(beat_log.read_text())) >= TICKS_MIN, 60,
               f"{TICKS_MIN} sync ticks from beat")
    cluster.stop_process("beat")
    ticks = sent_sync_ids(beat_log.read_text())
    assert len(ticks) >= TICKS_MIN

    def missing() -> dict[str, list[str]]:
        gaps = {}
        for name in cluster.masters:
            log = (cluster.log_dir / f"{name}.log").read_text()
            # Each master answers the tick's request and queues its own sync, whose id
            # is the request's plus its name (or skips it while its last one is queued).
            gaps[name] = [t for t in ticks if f"prevalence.broadcast_sync[{t}] succeeded" not in log]
        return {name: ids for name, ids in gaps.items() if ids}

    wait_until(lambda: not missing(), 30, "every master to run every tick",
               on_timeout=lambda: f"ticks not run: {missing()}")

    # Every sync a master queued for itself ran, under its own task id.
    def own_syncs_not_run() -> dict[str, list[str]]:
        gaps = {}
        for name in cluster.masters:
            log = (cluster.log_dir / f"{name}.log").read_text()
            queued = re.findall(rf"'queued': '([0-9a-f-]{{36}}\.{re.escape(name)})'", log)
            assert queued, f"{name} queued no sync of its own"
            gaps[name] = [i for i in queued if f"prevalence.sync[{i}] succeeded" not in log]
        return {name: ids for name, ids in gaps.items() if ids}

    wait_until(lambda: not own_syncs_not_run(), 30, "every queued sync to run",
               on_timeout=lambda: f"queued syncs not run: {own_syncs_not_run()}")


def test_a_manual_sync_and_snapshot_broadcast_reach_every_master(make_cluster):
    from tests.e2e.conftest import make_client
    from workers.client.monitor import read_status_documents

    cluster = make_cluster()
    cluster.start_masters()  # no beat: only our broadcasts make them sync
    client = make_client(cluster)

    def syncs() -> dict[str, int]:
        docs = read_status_documents(cluster.broker.url)
        return {name: docs[name]["syncs"] for name in cluster.masters if name in docs}

    before = syncs()
    assert client.sync() is None  # a broadcast has no reply
    wait_until(lambda: all(syncs().get(m, 0) > before.get(m, 0) for m in cluster.masters),
               30, "every master to run the broadcast sync",
               on_timeout=lambda: f"syncs before {before}, now {syncs()}")
    assert client.snapshot() is None
    wait_until(lambda: all(list((cluster.shared_dir / "masters" / m / "snapshots").glob("*.snap"))
                           for m in cluster.masters), 30, "every master to snapshot")
    report = client.sync(master="beta")
    assert report["master"] == "beta" and "applied" in report
