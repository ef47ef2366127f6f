"""Any schedule of writes, syncs, crashes, restarts and torn tails across 3-5 masters
converges to the reference order (invariants 3, 4 and 5), conserving money."""

import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from workers.prevalence import Rejected, journal
from workers.prevalence.cluster import folder, syncing
from workers.prevalence.errors import NotReady, TransactionFailed

from tests.support import FakeClock, nested_ledger, open_member
from .helpers import assert_converged, sync_until_quiet

ACCOUNTS = ["a", "b", "c"]
INITIAL = 100


class Cluster(RuleBasedStateMachine):
    @initialize(n=st.integers(min_value=3, max_value=5), chunk=st.sampled_from([3, 8, 200_000]),
                deferred=st.booleans(), nested=st.booleans())
    def start(self, n, chunk, deferred, nested):
        # deferred: every commit synced, the sync overlapped (as in a Celery worker) and
        # settled before the write counts as acknowledged.
        self.open_kw = {"fsync": "always", "deferred_sync": True} if deferred else {}
        # nested: the same ledger written as a user would, nested state changed in place,
        # refusals after mutating, no copy (tests.support.nested_ledger).
        if nested:
            self.open_kw["model"] = nested_ledger
        # Small rounds make a sync catch up in several of them (held-back records).
        self._chunk_was, syncing.SYNC_CHUNK_RECORDS = syncing.SYNC_CHUNK_RECORDS, chunk
        self.dir = tempfile.mkdtemp(prefix="pv-stateful-")
        self.clock = FakeClock()
        self.names = ["m0", "m1", "m2", "m3", "m4"][:n]
        self.frontiers = {}
        self.masters = {}
        first = open_member(self.dir, self.names[0], now_ms=self.clock, **self.open_kw)
        self.acked = {}   # rid -> (tx, args) acknowledged to a caller
        for acct in ACCOUNTS:
            first.execute("open_account", acct, INITIAL, rid=f"open-{acct}")
            self.acked[f"open-{acct}"] = ("open_account", [acct, INITIAL])
        self.masters[self.names[0]] = first
        for name in self.names[1:]:
            self.masters[name] = open_member(self.dir, name, now_ms=self.clock, **self.open_kw)
        sync_until_quiet(list(self.masters.values()))
        self.counter = 0
        self.acked_by = {}

    def teardown(self):
        for m in getattr(self, "masters", {}).values():
            if m is not None and not m.closed:
                m.close()
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)
        if hasattr(self, "_chunk_was"):
            syncing.SYNC_CHUNK_RECORDS = self._chunk_was

    def _alive(self, i):
        name = self.names[i % len(self.names)]
        return name, self.masters.get(name)

    @rule(i=st.integers(0, 4), src=st.sampled_from(ACCOUNTS), dst=st.sampled_from(ACCOUNTS),
          amount=st.integers(1, 150), kind=st.sampled_from(["transfer", "withdraw", "deposit"]),
          reuse=st.booleans())
    def write(self, i, src, dst, amount, kind, reuse):
        name, m = self._alive(i)
        if m is None:
            return
        self.counter += 1
        rid = f"r{self.counter}"
        args = {"transfer": [src, dst, amount], "withdraw": [src, amount], "deposit": [dst, amount]}[kind]
        if reuse and self.acked:
            # A client retrying a request (on any master): same id, same transaction.
            rid = sorted(self.acked)[self.counter % len(self.acked)]
            kind, args = self.acked[rid]
        try:
            m.execute(kind, *args, rid=rid)
        except (Rejected, TransactionFailed):
            pass
        except NotReady:
            return
        m.settle()
        self.acked.setdefault(rid, (kind, args))
        self.acked_by.setdefault(rid, name)


    @rule(i=st.integers(0, 4))
    def sync(self, i):
        name, m = self._alive(i)
        if m is not None:
            m.sync()

    @rule(ms=st.integers(-5, 50))
    def clock_moves(self, ms):
        self.clock.ms += ms  # wall clocks may step backwards a little

    @rule(i=st.integers(0, 4), torn=st.binary(min_size=0, max_size=20))
    def crash(self, i, torn):
        name, m = self._alive(i)
        if m is None:
            return
        m.crash()
        self.masters[name] = None
        segments = journal.list_segments(folder.journal_dir(self.dir, name))
        if torn and segments:
            with open(segments[-1][1], "ab") as f:  # a write the crash cut short
                f.write(torn[:10])

    @rule(i=st.integers(0, 4))
    def restart(self, i):
        name, m = self._alive(i)
        if m is None:
            self.masters[name] = open_member(self.dir, name, now_ms=self.clock, **self.open_kw)

    @precondition(lambda self: len(self.names) < 6)
    @rule()
    def newcomer_joins(self):
        # A new master joins mid-run, from the newest snapshot (or the initial state).
        name = f"m{len(self.names)}"
        self.names.append(name)
        self.masters[name] = open_member(self.dir, name, now_ms=self.clock, **self.open_kw)

    @invariant()
    def frontiers_never_move_backwards_and_nothing_arrives_below_them(self):
        for name, m in self.masters.items():
            if m is None:
                self.frontiers.pop(name, None)  # a restart recomputes from its snapshot
                continue
            seen, before = self.frontiers.get(name, (None, 0))
            if seen is m:  # the same live process (holding the object: ids are never reused)
                assert m.frontier >= before, f"{name}'s frontier moved backwards"
            self.frontiers[name] = (m, m.frontier)
            assert not any("ordering protocol" in (e or "") for e in m.status()["peer_errors"].values())

    @rule(i=st.integers(0, 4))
    def snapshot(self, i):
        name, m = self._alive(i)
        if m is not None:
            m.snapshot()

    @invariant()
    def live_masters_keep_every_write_they_acknowledged(self):
        # Through rebases, crashes and restarts, a master never forgets its own writes.
        for rid, name in self.acked_by.items():
            m = self.masters.get(name)
            if m is not None:
                assert m.outcome(rid) is not None, f"{name} forgot {rid}"

    @rule()
    def quiesce_and_check(self):
        for name in self.names:
            if self.masters[name] is None:
                self.masters[name] = open_member(self.dir, name, now_ms=self.clock, **self.open_kw)
        masters = list(self.masters.values())
        sync_until_quiet(masters, rounds_max=30)
        ref = assert_converged(self.dir, masters)
        assert not ref["errors"], ref["errors"]
        for m in masters:
            # Money is conserved by transfers; deposits and withdrawals are accounted for.
            expected = len(ACCOUNTS) * INITIAL
            for rid, (kind, args) in self.acked.items():
                out = m.outcome(rid)
                assert out is not None, f"{m.name} lost acknowledged request {rid}"
                assert out["committed"]
                if out["status"] == "ok":
                    expected += {"deposit": args[-1], "withdraw": -args[-1]}.get(kind, 0)
            assert m.query("total") == expected
        # Every acknowledged request id is in the history exactly once (when the history
        # still starts at seq 1: a restart starts a new segment, so collected segments
        # can move verify's base to a snapshot, whose request-id table holds the rest).
        if ref["base"] == "initial state":
            assert ref["total"] - ref["duplicates"] == len(self.acked), ref


Cluster.TestCase.settings = settings(max_examples=int(os.environ.get('PREVALENCE_STATEFUL_EXAMPLES', '60')), stateful_step_count=50, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
test_any_schedule_of_writes_syncs_and_crashes_converges_to_the_reference = Cluster.TestCase
