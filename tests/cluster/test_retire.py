"""Retiring a master (issue 9, "Also"): a retired master that still runs stops
acknowledging at once; the records of a retired master that was down commit at the next
sync of an idle cluster."""

from __future__ import annotations

import pytest

from workers.prevalence import errors, retire

from tests.support import FakeClock, open_member
from .helpers import assert_converged, sync_until_quiet


def test_a_running_master_retired_with_force_acknowledges_no_further_write(tmp_path):
    a = open_member(tmp_path, "alpha")
    a.execute("open_account", "acct", 100)
    b = open_member(tmp_path, "beta")
    sync_until_quiet([a, b])
    b.execute("deposit", "acct", 1)
    cut = retire(str(tmp_path), "beta", force=True)["cut"]
    # No sync in between: its very next write sees the retirement.
    with pytest.raises(errors.NotReady, match="beta.*retired"):
        b.execute("deposit", "acct", 5)
    with pytest.raises(errors.NotReady, match="retired"):
        b.execute_many([("deposit", ["acct", 5], "k")])
    assert b.seq == cut
    assert "retired" in b.status()["last_error"]
    for _ in range(3):                         # (a retired master never counts as joined)
        a.sync(); b.sync()
    assert a.query("balance", "acct") == 101 and b.query("balance", "acct") == 101
    assert a.status()["tentative"] == 0 and a.status()["cursors"]["beta"] == cut
    a.close()
    b.close()


def test_records_of_a_down_master_retired_before_its_peers_read_them_commit_at_the_next_sync(tmp_path):
    clock = FakeClock()
    a = open_member(tmp_path, "alpha", now_ms=clock)
    a.execute("open_account", "acct", 100)
    b = open_member(tmp_path, "beta", now_ms=clock)
    c = open_member(tmp_path, "gamma", now_ms=clock)
    sync_until_quiet([a, b, c])
    clock.ms += 10
    c.execute("deposit", "acct", 7)            # nobody has read it yet ...
    c.crash()                                  # ... and gamma goes down for good
    retire(str(tmp_path), "gamma", force=True)
    clock.ms += 10
    sync_until_quiet([a, b])                   # nobody writes any more: an idle cluster
    for m in (a, b):
        status = m.status()
        assert status["tentative"] == 0, status
        assert m.query("balance", "acct") == 107
    assert_converged(tmp_path, [a, b])
