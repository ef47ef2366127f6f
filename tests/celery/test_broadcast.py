"""Beat's broadcasts reach every master, every tick (celery issue #2638 regression)."""

from __future__ import annotations

import re

import pytest

from workers.localcluster import wait_until

pytestmark = pytest.mark.celery

TICKS_MIN = 6


def sent_sync_ids(beat_log: str) -> list[str]:
    # beat logs "<task> sent. id-><uuid>" at debug level for every entry it sends.
    return re.findall(r"prevalence\.sync sent\. id->([0-9a-f-]{36})", beat_log)


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
            gaps[name] = [t for t in ticks if f"prevalence.sync[{t}] succeeded" not in log]
        return {name: ids for name, ids in gaps.items() if ids}

    wait_until(lambda: not missing(), 30, "every master to run every tick",
               on_timeout=lambda: f"ticks not run: {missing()}")
