"""Followers: read-only replicas in any process, never members (issue: in-process reads)."""

from __future__ import annotations

import os

import pytest

from tests.support import FakeClock, open_member
from workers.prevalence import Follower, verify

from .helpers import assert_converged, sync_until_quiet


def _folder_state(shared) -> dict:
    """Every file under the share with its size and mtime: what a writer would change."""
    out = {}
    for root, _dirs, files in os.walk(shared):
        for name in files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[path] = (st.st_size, st.st_mtime_ns)
    return out


def _three(tmp_path, clock):
    ms = [open_member(tmp_path, n, now_ms=clock) for n in ("alpha", "beta", "gamma")]
    sync_until_quiet(ms)
    ms[0].execute_many([("open_account", [a, 100], f"open-{a}") for a in ("a", "b", "c")])
    sync_until_quiet(ms)
    return ms


@pytest.mark.parametrize("view", ["committed", "latest"])
def test_a_follower_under_a_writing_cluster_converges_to_the_committed_digest(tmp_path, view):
    clock = FakeClock()
    ms = _three(tmp_path, clock)
    f = Follower.open(ms[0].model, str(tmp_path), view=view)
    for step in range(12):
        for i, m in enumerate(ms):  # concurrent, conflicting writes on every master
            m.execute("transfer", "abc"[(step + i) % 3], "abc"[(step + i + 1) % 3], 30)
        clock.ms += 1
        ms[step % 3].sync()
        f.sync()
        # Never past what every member has committed: nothing it shows can still change.
        assert f.replica.frontier <= min(m.frontier for m in ms)
    sync_until_quiet(ms)
    ref = assert_converged(tmp_path, ms)
    f.sync()
    assert f.digest() == ref["digest"]
    assert f.query("total") == 300
    f.close()
    for m in ms:
        m.close()


def test_a_follower_writes_nothing_and_is_never_a_member(tmp_path):
    clock = FakeClock()
    ms = _three(tmp_path, clock)
    before = _folder_state(tmp_path)
    f = Follower.open(ms[0].model, str(tmp_path))
    f.sync()
    assert _folder_state(tmp_path) == before
    ms[1].execute("deposit", "a", 5)
    sync_until_quiet(ms)  # the members commit without waiting for the follower
    assert ms[0].status()["tentative"] == 0 and "follower" not in ms[0].status()["cursors"]
    f.close()
    for m in ms:
        m.close()


def test_a_follower_that_fell_behind_garbage_collection_reloads_from_a_snapshot(tmp_path):
    clock = FakeClock()
    ms = [open_member(tmp_path, n, now_ms=clock, segment_bytes_max=300) for n in ("alpha", "beta")]
    sync_until_quiet(ms)
    ms[0].execute("open_account", "a", 0)
    sync_until_quiet(ms)
    f = Follower.open(ms[0].model, str(tmp_path))
    for _ in range(40):  # many segments, snapshots, collected while the follower sleeps
        ms[0].execute("deposit", "a", 1)
        ms[1].execute("deposit", "a", 1)
        clock.ms += 1
        sync_until_quiet(ms)
        for m in ms:
            m.snapshot()
    report = f.sync()
    assert report["reloaded"] and f.reloads >= 1
    sync_until_quiet(ms)
    f.sync()
    assert f.query("balance", "a") == 80
    assert f.digest() == verify(str(tmp_path), ms[0].model)["digest"]
    f.close()
    for m in ms:
        m.close()


@pytest.mark.parametrize("view", ["committed", "latest"])
def test_read_your_writes_waits_for_the_record_of_the_answer(tmp_path, view):
    clock = FakeClock()
    ms = _three(tmp_path, clock)
    f = Follower.open(ms[0].model, str(tmp_path), view=view)
    [out] = ms[2].execute_many([("deposit", ["b", 7], "ryw-1")])
    token = out["record"]
    assert f.applied_seq("gamma") < int(token.split(":")[1])
    if view == "committed":
        assert not f.wait_for(token, timeout_s=0.05)  # not committed while nobody syncs
        sync_until_quiet(ms)
    assert f.wait_for(token, timeout_s=5)
    assert f.query("balance", "b") == 107  # the write is in the state it reads
    f.close()
    for m in ms:
        m.close()


def test_a_follower_thread_follows_in_the_background(tmp_path):
    clock = FakeClock()
    ms = _three(tmp_path, clock)
    f = Follower.open(ms[0].model, str(tmp_path), follow_interval_s=0.01)
    [out] = ms[0].execute_many([("deposit", ["c", 1], "bg-1")])
    sync_until_quiet(ms)
    assert f.wait_for(out["record"], timeout_s=10)
    assert f.query("balance", "c") == 101
    f.close()
    for m in ms:
        m.close()


def test_a_query_that_ran_while_a_batch_was_applied_runs_again(tmp_path, monkeypatch):
    """Queries take no lock: one whose reads straddle an applied batch is not answered
    from two states (a transfer seen half done), it runs again under the lock."""
    clock = FakeClock()
    ms = _three(tmp_path, clock)
    f = Follower.open(ms[0].model, str(tmp_path), view="latest")
    balance = f.model.queries["balance"]
    ms[0].execute("transfer", "a", "b", 30)
    runs = []

    def pair(root):
        first = balance(root, "a")
        if not runs:
            f.sync()  # as the follow thread would, between the query's two reads
        runs.append(first)
        return first, balance(root, "b")

    monkeypatch.setitem(f.model.queries, "pair", pair)
    assert f.query("pair") == (70, 130)
    assert runs == [100, 70]  # the first run saw the old state, and did not count
    assert f.query("pair") == (70, 130) and runs == [100, 70, 70]  # quiet: one run
    f.close()
    for m in ms:
        m.close()


def test_a_bad_token_or_view_is_refused_clearly(tmp_path):
    clock = FakeClock()
    ms = _three(tmp_path, clock)
    with pytest.raises(ValueError, match="view must be"):
        Follower.open(ms[0].model, str(tmp_path), view="fresh")
    f = Follower.open(ms[0].model, str(tmp_path))
    with pytest.raises(ValueError, match="master:seq"):
        f.wait_for("nonsense")
    f.close()
    for m in ms:
        m.close()
