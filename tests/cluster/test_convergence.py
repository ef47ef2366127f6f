"""Scenarios where the Lisp original diverged or lost data, and ordering edge cases. Each also
runs with every master behind a faultfs host of its own (marker `faultfs`, tests/faultfs)."""

import pytest

from workers.prevalence import Rejected
from workers.prevalence.errors import NotReady

from tests.support import FakeClock, open_member
from .helpers import assert_converged, sync_until_quiet

pytestmark = pytest.mark.faultfs


def make_pair(tmp_path, clock=None):
    kw = {"now_ms": clock} if clock else {}
    a = open_member(tmp_path, "alpha", **kw)
    a.execute("open_account", "acct", 100, rid="open")
    b = open_member(tmp_path, "beta", **kw)
    sync_until_quiet([a, b])
    assert b.joined and b.query("balance", "acct") == 100
    return a, b


def test_two_withdrawals_that_overdraw_together_agree_on_which_was_refused(tmp_path):
    clock = FakeClock()
    a, b = make_pair(tmp_path, clock)
    clock.ms += 10
    # Both pass tentatively: each master sees 100.
    assert a.execute("withdraw", "acct", 80, rid="w80") == 20
    clock.ms += 1
    assert b.execute("withdraw", "acct", 50, rid="w50") == 50
    sync_until_quiet([a, b])
    ref = assert_converged(tmp_path, [a, b])
    # In key order alpha's withdrawal came first: it stands, beta's is refused everywhere.
    for m in (a, b):
        assert m.query("balance", "acct") == 20
        assert m.outcome("w80")["status"] == "ok" and m.outcome("w80")["committed"]
        assert m.outcome("w50")["status"] == "rejected"
    assert b.outcomes_changed == 1
    assert ref["records"] == {"alpha": 2, "beta": 1}


def test_syncs_in_the_same_millisecond_lose_nothing(tmp_path):
    clock = FakeClock()
    a, b = make_pair(tmp_path, clock)
    for i in range(50):
        a.execute("deposit", "acct", 1)
        b.execute("deposit", "acct", 1)
        a.sync(); a.sync(); b.sync(); b.sync()   # clock never moves: same millisecond
    sync_until_quiet([a, b])
    assert_converged(tmp_path, [a, b])
    assert a.query("balance", "acct") == 200


def test_same_request_id_on_two_masters_takes_effect_once(tmp_path):
    a, b = make_pair(tmp_path)
    a.execute("deposit", "acct", 10, rid="pay-1")
    b.execute("deposit", "acct", 10, rid="pay-1")
    sync_until_quiet([a, b])
    assert_converged(tmp_path, [a, b])
    assert a.query("balance", "acct") == 110
    assert a.outcome("pay-1") == b.outcome("pay-1")
    # Asked again after sync: answered from the record, nothing journaled.
    seq = b.seq
    assert b.execute("deposit", "acct", 10, rid="pay-1") == a.outcome("pay-1")["value"]
    assert b.seq == seq


def test_idle_cluster_goes_quiet_and_writes_nothing(tmp_path):
    a, b = make_pair(tmp_path)
    c = open_member(tmp_path, "gamma")
    sync_until_quiet([a, b, c])
    a.execute("deposit", "acct", 1)
    rounds = sync_until_quiet([a, b, c])
    assert rounds <= 4
    seqs = [m.seq for m in (a, b, c)]
    for _ in range(3):
        for m in (a, b, c):
            r = m.sync()
            assert not r["ticked"] and not any(r["applied"].values())
    assert [m.seq for m in (a, b, c)] == seqs
    assert_converged(tmp_path, [a, b, c])


def test_joiner_takes_no_writes_until_every_member_counts_it(tmp_path):
    a = open_member(tmp_path, "alpha")
    a.execute("open_account", "x", 5)
    b = open_member(tmp_path, "beta")
    assert not b.joined
    with pytest.raises(NotReady, match="alpha"):
        b.execute("deposit", "x", 1)
    b.sync()
    assert not b.joined  # alpha has not synced yet
    a.sync()
    b.sync()
    assert b.joined
    b.execute("deposit", "x", 1)
    sync_until_quiet([a, b])
    assert_converged(tmp_path, [a, b])


def test_joiner_never_writes_at_or_below_a_committed_frontier(tmp_path):
    """DESIGN §3's six-step counterexample for a joiner that writes at once."""
    clock = FakeClock()
    a = open_member(tmp_path, "alpha", now_ms=clock)
    b = open_member(tmp_path, "beta", now_ms=clock)
    sync_until_quiet([a, b])
    clock.ms += 5
    a.execute("open_account", "r", 1)        # A writes r
    b.sync()                                  # B reads it and ticks
    a.snapshot()                              # A's view has not read B's tick
    clock.ms -= 3                             # C's wall clock lags
    c = open_member(tmp_path, "gamma", now_ms=clock)
    a.sync()                                  # A reads B's tick: frontier moves
    frontier_a = a.frontier
    with pytest.raises(NotReady):
        c.execute("deposit", "r", 1)          # C may not write yet
    for _ in range(3):
        for m in (a, b, c):
            m.sync()
    assert c.joined
    c.execute("deposit", "r", 1)
    assert c.own_horizon > frontier_a
    sync_until_quiet([a, b, c])
    for m in (a, b, c):
        assert not m.status()["peer_errors"], m.status()
    assert_converged(tmp_path, [a, b, c])


def test_down_member_holds_the_frontier_until_retired(tmp_path):
    from workers.prevalence import retire
    a, b = make_pair(tmp_path)
    c = open_member(tmp_path, "gamma")
    sync_until_quiet([a, b, c])
    c.execute("deposit", "acct", 7)
    sync_until_quiet([a, b, c])
    c.close()                                 # gamma goes down for good
    a.execute("deposit", "acct", 1)
    for _ in range(3):
        a.sync(); b.sync()
    assert a.status()["tentative"] == 1       # held: gamma has not ticked past it
    retire(str(tmp_path), "gamma")
    sync_until_quiet([a, b])
    assert a.status()["tentative"] == 0 and b.status()["tentative"] == 0
    assert_converged(tmp_path, [a, b])
    with pytest.raises(Exception, match="retired"):
        open_member(tmp_path, "gamma")


@pytest.mark.ledger_only  # declares a transaction on the flat ledger
def test_record_naming_an_unknown_transaction_stops_that_peer_until_code_knows_it(tmp_path):
    from workers.models.ledger import model
    a, b = make_pair(tmp_path)

    def bonus(root, ctx, account_id, amount):
        root["accounts"][account_id] += amount

    model.transaction(bonus)
    try:
        a.execute("bonus", "acct", 3)
        a.execute("deposit", "acct", 1)
    finally:
        del model.transactions["bonus"]
    r = b.sync()
    assert "bonus" in r["errors"]["alpha"] and b.query("balance", "acct") == 100
    r = b.sync()
    assert "bonus" in r["errors"]["alpha"]
    model.transaction(bonus)                  # the new code is deployed
    try:
        sync_until_quiet([a, b])
        assert b.query("balance", "acct") == 104
        assert_converged(tmp_path, [a, b])
    finally:
        del model.transactions["bonus"]


def test_peer_whose_clock_runs_far_ahead_is_held_and_reported_not_followed(tmp_path):
    slow, fast = FakeClock(), FakeClock()
    a = open_member(tmp_path, "alpha", now_ms=slow, drift_max_ms=1000)
    a.execute("open_account", "acct", 100)
    b = open_member(tmp_path, "beta", now_ms=fast, drift_max_ms=1000)
    sync_until_quiet([a, b])
    fast.ms += 60_000                         # beta's clock jumps a minute ahead
    b.execute("deposit", "acct", 5)
    r = a.sync()
    assert "ahead" in r["held"]["beta"] and a.query("balance", "acct") == 100
    assert "beta" in a.status()["held"]
    assert a.clock.last < (fast.ms << 16)     # alpha's clock did not follow
    slow.ms += 60_000                         # real time catches up
    sync_until_quiet([a, b])
    assert a.query("balance", "acct") == 105
    assert_converged(tmp_path, [a, b])


@pytest.mark.ledger_only  # declares a transaction on the flat ledger
def test_a_refused_transaction_that_mutated_first_leaves_no_trace_on_any_master(tmp_path):
    from workers.models.ledger import model

    def sloppy_withdraw(root, ctx, account_id, amount):
        root["accounts"][account_id] -= amount          # mutates ...
        if root["accounts"][account_id] < 0:
            raise Rejected("overdrawn")                  # ... then refuses

    model.transaction(sloppy_withdraw)
    try:
        clock = FakeClock()
        a, b = make_pair(tmp_path, clock)
        a.execute("open_account", "x", 5)
        sync_until_quiet([a, b])
        with pytest.raises(Rejected):
            a.execute("sloppy_withdraw", "x", 10)
        b.execute("deposit", "x", 1)  # concurrent: alpha's refusal is rebased on beta's deposit
        clock.ms += 1
        sync_until_quiet([a, b])
        assert a.query("balance", "x") == b.query("balance", "x") == 6
        assert_converged(tmp_path, [a, b])
        a.close()
        b.close()
    finally:
        del model.transactions["sloppy_withdraw"]


def test_a_long_backlog_is_caught_up_in_bounded_rounds_without_rebasing(tmp_path, monkeypatch):
    from workers.prevalence.cluster import syncing
    clock = FakeClock()
    a, b = make_pair(tmp_path, clock)
    c = open_member(tmp_path, "gamma", now_ms=clock)
    sync_until_quiet([a, b, c])
    c.close()  # gamma is down while alpha and beta write, interleaved in time
    for i in range(120):
        clock.ms += 1
        (a if i % 3 else b).execute("deposit", "acct", 1, rid=f"d{i}")
    sync_until_quiet([a, b])
    monkeypatch.setattr(syncing, "SYNC_CHUNK_RECORDS", 10)
    rounds = []  # per round of peers' records: (count, lowest key, highest key)
    real_ingest = syncing.Syncing._ingest

    def spy(self, new, *args, **kwargs):
        keys = sorted(r.key for m, recs in new.items() if m != "gamma" for r in recs)
        if keys:
            rounds.append((len(keys), keys[0], keys[-1]))
        return real_ingest(self, new, *args, **kwargs)

    monkeypatch.setattr(syncing.Syncing, "_ingest", spy)
    c = open_member(tmp_path, "gamma", now_ms=clock)  # recovery ends with one sync
    assert len(rounds) >= 12 and max(n for n, _lo, _hi in rounds) <= 10, rounds  # 5 per peer
    # Each round is the next stretch of the key order: chunking never makes a rebase.
    assert all(prev[2] < cur[1] for prev, cur in zip(rounds, rounds[1:])), rounds
    assert c.query("balance", "acct") == 220
    monkeypatch.undo()
    sync_until_quiet([a, b, c])
    assert_converged(tmp_path, [a, b, c])


def _three_masters_syncing_in_rounds_of_3(tmp_path, monkeypatch):
    """m0 (accounts a, b, c at 100), m1 and m2, in step; syncs read 3 records per round."""
    from workers.prevalence.cluster import syncing
    monkeypatch.setattr(syncing, "SYNC_CHUNK_RECORDS", 3)
    clock = FakeClock()
    m0 = open_member(tmp_path, "m0", now_ms=clock)
    for acct in "abc":
        m0.execute("open_account", acct, 100, rid=f"open-{acct}")
    ms = [m0, open_member(tmp_path, "m1", now_ms=clock), open_member(tmp_path, "m2", now_ms=clock)]
    sync_until_quiet(ms)
    return clock, ms


def test_a_tick_committed_after_a_batch_applied_once_does_not_lower_the_committed_cursor(tmp_path, monkeypatch):
    # Found by the stateful test: m2 applied m1's record seq 2 straight to its committed
    # state while m1's tick seq 1 was still tentative; committing that tick later set the
    # cursor of m1 back to 1, so m2's snapshot claimed frontier 6 without m1's seq 2 and a
    # master joining from it read that record below its frontier.
    clock, ms = _three_masters_syncing_in_rounds_of_3(tmp_path, monkeypatch)
    for i, m in enumerate([ms[0], ms[0], ms[1]]):
        with pytest.raises(Rejected):
            m.execute("transfer", "a", "a", 1, rid=f"w{i}")
    sync_until_quiet(ms, rounds_max=30)
    m2 = ms[2]
    for name in ("m0", "m1"):
        applied = [r for r in m2.replica.tentative if r.master == name]
        expected = applied[0].seq - 1 if applied else m2.peers[name].reader.last_seq
        assert m2.replica.cursors[name] == expected
    m2.snapshot()
    ms.append(open_member(tmp_path, "m3", now_ms=clock))  # joins from m2's snapshot
    sync_until_quiet(ms, rounds_max=30)
    assert_converged(tmp_path, ms)


def test_a_joiner_catching_up_in_rounds_keeps_its_frontier_below_uncounted_peers(tmp_path, monkeypatch):
    # Found by the stateful test: a joiner that committed between rounds counted nobody
    # yet, moved its frontier past m1's last record, then acknowledged m1 there; m1's next
    # record then arrived below that frontier.
    clock, ms = _three_masters_syncing_in_rounds_of_3(tmp_path, monkeypatch)
    with pytest.raises(Rejected):
        ms[0].execute("transfer", "a", "a", 1, rid="w0")
    ms.append(open_member(tmp_path, "m3", now_ms=clock))
    with pytest.raises(Rejected):
        ms[1].execute("transfer", "a", "a", 1, rid="w1")
    sync_until_quiet(ms, rounds_max=30)
    assert_converged(tmp_path, ms)


@pytest.mark.ledger_only  # its own model
def test_a_model_that_opts_out_of_change_tracking_converges_with_the_copying_fallback(tmp_path):
    from workers.prevalence import Model
    tags = Model("tags", lambda: {"tags": set(), "order": []}, tracking=False,
                 copy=lambda root: {"tags": set(root["tags"]), "order": list(root["order"])})

    @tags.transaction
    def tag(root, ctx, t):
        root["tags"].add(t)  # a set: the change log could not hold it
        root["order"].append(t if len(root["order"]) % 2 else t.upper())  # not commutative

    clock = FakeClock()
    a = open_member(tmp_path, "alpha", model=tags, now_ms=clock)
    b = open_member(tmp_path, "beta", model=tags, now_ms=clock)
    sync_until_quiet([a, b])
    for i in range(5):
        a.execute("tag", f"a{i}")
        b.execute("tag", f"b{i}")  # concurrent: every sync rebases by copy
        clock.ms += 1
        a.sync()
        b.sync()
    sync_until_quiet([a, b])
    assert a.rebases + b.rebases > 0
    assert a.digest() == b.digest()
    assert a.replica.state["order"] == b.replica.state["order"]
    a.close()
    b.close()


def test_records_a_sync_commits_at_once_never_join_the_window(tmp_path, monkeypatch):
    # Read to the end, with every member's horizon past them: they are committed as they
    # are applied (no undo entries kept, no window), and the frontier passes them.
    from workers.prevalence import replica as replica_module
    clock = FakeClock()
    a, b = make_pair(tmp_path, clock)
    clock.ms += 5
    assert b.execute("deposit", "acct", 7, rid="own") == 107  # tentative on beta: committed first
    clock.ms += 5
    for i in range(40):
        clock.ms += 1
        a.execute("deposit", "acct", 1, rid=f"d{i}")
    at_once = []
    real = replica_module.Replica.apply_committed

    def spy(self, recs):
        at_once.extend(r.rid for r in recs)
        return real(self, recs)

    monkeypatch.setattr(replica_module.Replica, "apply_committed", spy)
    a.sync()  # alpha reads beta's deposit: it orders before alpha's, so alpha rebases
    b.sync()
    assert at_once == [f"d{i}" for i in range(40)]
    assert b.replica.tentative_real() == 0 and len(b.replica.log) == 0 and b.frontier >= a.own_horizon
    assert b.outcome("own")["committed"] and b.outcome("d39")["committed"]
    assert b.query("balance", "acct") == 147
    assert b.replica.cursors["alpha"] == a.seq
    monkeypatch.undo()
    sync_until_quiet([a, b])
    assert_converged(tmp_path, [a, b])
