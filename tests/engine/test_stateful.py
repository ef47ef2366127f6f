"""A Hypothesis state machine over one master: any mix of writes, batches, snapshots,
syncs (which collect covered segments), clean restarts and crashes keeps the state
exactly as the acknowledged writes left it, and equal to `verify`'s offline replay."""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from workers.models.ledger import model as ledger
from workers.prevalence import verify
from workers.prevalence.errors import Rejected

from tests.support import open_master
from .helpers import segments

ACCOUNTS = ["a", "b", "c"]
account = st.sampled_from(ACCOUNTS)
rid = st.none() | st.sampled_from([f"req-{i}" for i in range(8)])
op = st.one_of(
    st.tuples(st.just("open_account"), st.tuples(account, st.integers(0, 50))),
    st.tuples(st.just("deposit"), st.tuples(account, st.integers(1, 30))),
    st.tuples(st.just("withdraw"), st.tuples(account, st.integers(1, 60))),
    st.tuples(st.just("transfer"), st.tuples(account, account, st.integers(1, 60))),
)


class OneMaster(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.shared = tempfile.mkdtemp(prefix="stateful-")
        self.kw = dict(fsync="never", segment_bytes_max=220, gc_grace_s=0, snapshots_kept=2)
        self.m = open_master(self.shared, **self.kw)
        self.expected = (self.m.digest(), self.m.seq, self.m.query("balances"))

    def _record(self):
        self.expected = (self.m.digest(), self.m.seq, self.m.query("balances"))

    @rule(o=op, r=rid)
    def execute(self, o, r):
        tx, args = o
        try:
            self.m.execute(tx, *args, rid=r)
        except Rejected:
            pass
        self._record()

    @rule(batch=st.lists(st.tuples(op, rid), min_size=1, max_size=5))
    def execute_many(self, batch):
        self.m.execute_many([(tx, list(args), r) for (tx, args), r in batch])
        self._record()

    @rule()
    def snapshot(self):
        self.m.snapshot()

    @rule()
    def sync(self):
        self.m.sync()

    @rule()
    def restart(self):
        self.m.close()
        self.m = open_master(self.shared, **self.kw)

    @rule()
    def crash(self):
        self.m.crash()  # as kill -9: nothing flushed, lease left behind
        self.m = open_master(self.shared, **self.kw)

    @invariant()
    def state_is_what_the_acknowledged_writes_made(self):
        assert (self.m.digest(), self.m.seq, self.m.query("balances")) == self.expected

    @precondition(lambda self: self.m.seq % 4 == 0)
    @invariant()
    def offline_replay_agrees(self):
        self.m.writer.flush()
        ref = verify(self.shared, ledger)
        assert ref["errors"] == {}, ref["errors"]
        assert ref["digest"] == self.expected[0]

    def teardown(self):
        try:
            self.m.close()
            assert segments(self.shared)  # never collected down to nothing
        finally:
            shutil.rmtree(self.shared, ignore_errors=True)


OneMaster.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
test_one_master_keeps_every_acknowledged_write_through_snapshots_gc_restarts_and_crashes = OneMaster.TestCase
