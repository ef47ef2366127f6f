"""Each commit's journal sync is timed: reported to the master's observer (metrics), and
logged as a warning when slower than `writer.SLOW_SYNC_WARN_S` (as etcd does)."""

from __future__ import annotations

import logging

from tests.support import open_master
from workers.prevalence import writer


def test_every_commit_sync_is_reported_and_a_slow_one_is_logged(tmp_path, monkeypatch, caplog):
    m = open_master(tmp_path, fsync="always")
    seen = []
    m.on_sync = seen.append
    m.execute("open_account", "a", 1)
    assert len(seen) == 1 and seen[0] >= 0
    monkeypatch.setattr(writer, "SLOW_SYNC_WARN_S", -1.0)  # every sync is "slow" now
    with caplog.at_level(logging.WARNING, logger="prevalence.journal"):
        m.execute("deposit", "a", 1)
    assert len(seen) == 2
    assert any("syncing a commit took" in r.getMessage() for r in caplog.records)
    m.close()


def test_a_deferred_sync_is_timed_when_it_settles(tmp_path):
    m = open_master(tmp_path, fsync="always", deferred_sync=True)
    seen = []
    m.on_sync = seen.append
    m.execute("open_account", "a", 1)
    m.settle()
    assert len(seen) == 1
    m.close()
