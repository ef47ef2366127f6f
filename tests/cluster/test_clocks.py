"""Wrong wall clocks (issue 9, item 12): a master whose clock disagrees with the shared
folder's refuses writes and says so, and holds back nobody's commits.

Every master gets the same injected shared-folder clock (`share_now_ms`), the file
server's time; the wall clock of one of them is wrong.
"""

from __future__ import annotations

import os

import pytest

from workers.prevalence import errors
from workers.prevalence.cluster import shareclock
from workers.prevalence.cluster.lease import Lease

from tests.support import FakeClock, open_member
from .helpers import assert_converged, sync_until_quiet

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def _three(tmp_path, share, gamma_wall):
    a = open_member(tmp_path, "alpha", now_ms=share, share_now_ms=share)
    a.execute("open_account", "acct", 100)
    b = open_member(tmp_path, "beta", now_ms=share, share_now_ms=share)
    c = open_member(tmp_path, "gamma", now_ms=gamma_wall, share_now_ms=share)
    sync_until_quiet([a, b, c])
    return a, b, c


def _rounds(masters, clocks, n=4):
    """n rounds of syncs, a second of real time between them."""
    for _ in range(n):
        for m in masters:
            m.sync()
        for clock in clocks:
            clock.ms += 1000


def test_a_master_an_hour_behind_refuses_writes_and_holds_back_nobody(tmp_path):
    share = FakeClock()
    behind = FakeClock(share.ms - HOUR_MS)
    a, b, c = _three(tmp_path, share, behind)
    share.ms += 1000; behind.ms += 1000
    a.execute("deposit", "acct", 5)
    b.execute("deposit", "acct", 7)
    _rounds([a, b, c], [share, behind])
    # The others' writes commit: gamma reads them (timed by the folder's clock) and ticks.
    for m in (a, b):
        assert m.status()["tentative"] == 0, m.status()
    assert c.query("balance", "acct") == 112
    # gamma blames nobody else, and says what is wrong with itself.
    status = c.status()
    assert status["held"] == {}, status["held"]
    assert status["clock_skew_ms"] == -HOUR_MS
    assert "gamma" in status["last_error"] and "3600 s behind the shared folder's clock" in status["last_error"]
    with pytest.raises(errors.ClockSkew, match="behind the shared folder's clock"):
        c.execute("deposit", "acct", 1)
    with pytest.raises(errors.ClockSkew):
        c.execute_many([("deposit", ["acct", 1], "k1")])
    assert c.seq == c.status()["cursors"]["gamma"] and a.status()["lag"]["gamma"] == 0
    # The host's clock is corrected: gamma takes writes again and stops reporting it.
    behind.ms = share.ms
    c.sync()
    assert c.status()["last_error"] is None and c.status()["clock_skew_ms"] == 0
    c.execute("deposit", "acct", 1)
    sync_until_quiet([a, b, c])
    assert_converged(tmp_path, [a, b, c])
    assert a.query("balance", "acct") == 113


def test_a_master_a_day_ahead_then_corrected_never_writes_in_the_future_nor_stalls_the_others(tmp_path):
    share = FakeClock()
    wall = FakeClock(share.ms)
    a, b, c = _three(tmp_path, share, wall)
    wall.ms += DAY_MS                          # gamma's clock jumps a day ahead
    with pytest.raises(errors.ClockSkew, match="86400 s ahead of the shared folder's clock"):
        c.execute("deposit", "acct", 1)
    a.execute("deposit", "acct", 5)
    _rounds([a, b, c], [share, wall])
    assert a.status()["tentative"] == 0 and b.status()["tentative"] == 0
    assert a.status()["held"] == {} and b.status()["held"] == {}
    # Nothing gamma wrote (its ticks included) is stamped in its wrong future.
    assert c.clock.last < (share.ms + 60_000) << 16
    assert "ahead of the shared folder's clock" in c.status()["last_error"]
    wall.ms = share.ms                         # corrected
    c.execute("deposit", "acct", 1)
    sync_until_quiet([a, b, c])
    assert_converged(tmp_path, [a, b, c])
    assert b.query("balance", "acct") == 106


def test_records_already_stamped_far_ahead_are_held_without_holding_back_the_frontier(tmp_path):
    # A peer that does not check its clock (no reference: an older release) wrote records
    # a minute ahead. They wait until time catches up; the others' commits do not.
    slow, fast = FakeClock(), FakeClock()
    a = open_member(tmp_path, "alpha", now_ms=slow, drift_max_ms=1000)
    a.execute("open_account", "acct", 100)
    b = open_member(tmp_path, "beta", now_ms=fast, drift_max_ms=1000)
    sync_until_quiet([a, b])
    fast.ms += 60_000
    b.execute("deposit", "acct", 5)
    slow.ms += 10
    a.execute("deposit", "acct", 1)
    for _ in range(3):
        a.sync(); b.sync()
    status = a.status()
    assert "seq" in status["held"]["beta"] and status["tentative"] == 0
    assert a.outcome("alpha:2")["committed"]
    assert a.query("balance", "acct") == 101
    slow.ms += 60_000
    sync_until_quiet([a, b])
    assert_converged(tmp_path, [a, b])


def test_the_shared_folder_clock_is_read_from_the_stamp_of_the_lease_just_written(tmp_path, monkeypatch):
    mono = FakeClock(5_000)
    monkeypatch.setattr("workers.prevalence.cluster.lease.monotonic_s", lambda: mono.ms / 1000)
    clock = shareclock.ShareClock()
    assert clock() is None                     # nothing measured yet: no opinion
    os.makedirs(tmp_path / "masters" / "alpha")
    lease = Lease(str(tmp_path), "alpha")
    lease.on_written = clock.measured
    lease._write()
    stamp_ms = os.stat(lease.path).st_mtime_ns // 1_000_000
    assert clock() == stamp_ms
    mono.ms += 2_500                           # it follows the monotonic clock, not the wall clock
    assert clock() == stamp_ms + 2_500


def test_a_master_on_the_real_clock_checks_it_against_the_shared_folder(tmp_path):
    m = open_member(tmp_path, "alpha")
    try:
        status = m.status()
        assert status["clock_reference"] == "shared folder" and status["clock_skew_ms"] == 0
        assert m.clock._reference_ms() is not None   # measured when the lease was claimed
        m.execute("open_account", "acct", 1)
    finally:
        m.close()


def test_prevalence_status_names_the_master_whose_clock_is_wrong_from_redis_and_from_the_folder(tmp_path):
    from workers.client.monitor import evaluate
    from workers.prevalence import read_all_progress
    share = FakeClock()
    behind = FakeClock(share.ms - HOUR_MS)
    a, b, c = _three(tmp_path, share, behind)
    _rounds([a, b, c], [share, behind])
    statuses = {m.name: m.status() for m in (a, b, c)}            # what workers publish to Redis
    progress = read_all_progress(str(tmp_path))                     # what it reads when Redis is down
    for docs in (statuses, progress):
        converged, reasons = evaluate(docs)
        assert not converged
        blamed = [r for r in reasons if "clock" in r]
        assert len(blamed) == 1 and blamed[0].startswith("gamma reports an error: the wall clock of master "
                                                         "'gamma' is 3600 s behind"), reasons
