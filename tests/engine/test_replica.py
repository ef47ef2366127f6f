"""The replica alone (no I/O), change-tracked and the copying fallback: random records from three masters arrive in random orders,
the frontier moves when it legally can, and after every step

* the live state equals a from-scratch replay of every applied record in key order, and
* the committed state (the window undone, `Replica.with_committed`) equals a from-scratch
  replay of the committed records (hlc at or below the frontier) in key order,

for a nested model whose transactions do not commute, refuse half way and raise.
"""

from __future__ import annotations

import bisect

import msgspec
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from workers.prevalence import Model, Rejected, tracked
from workers.prevalence.codec import Record
from workers.prevalence.model import Context
from workers.prevalence.replica import replica_for

_encoder = msgspec.msgpack.Encoder()  # keeps dict order: order is part of the state

shop = Model("replica-shop", lambda: {"users": {}, "log": []}, request_ids_kept_s=None)


@shop.transaction
def put(root, ctx, uid, n):
    """Create or reset a user (dict order moves on delete + put)."""
    root["users"][uid] = {"n": n, "orders": [], "tags": ["t"]}


@shop.transaction
def drop(root, ctx, uid):
    if uid not in root["users"]:
        raise Rejected("no such user")
    del root["users"][uid]


@shop.transaction
def order(root, ctx, uid, qty):
    """Not commutative: a later order sees the earlier ones, and the refusal depends on them."""
    user = root["users"].get(uid)
    if user is None:
        raise Rejected("no such user")
    user["orders"].append({"qty": qty, "seen": len(user["orders"])})
    user["n"] -= qty
    if user["n"] < 0:
        raise Rejected("overdrawn")  # after mutating: must leave no trace
    root["log"].append(uid)


@shop.transaction
def shuffle(root, ctx, uid):
    user = root["users"].get(uid)
    if user is None:
        return None
    user["orders"].sort(key=lambda o: (-o["qty"], o["seen"]))
    user["tags"].insert(0, str(ctx.random.randrange(10)))
    if len(user["tags"]) > 3:
        user["tags"].pop(1)
    return len(user["orders"])


@shop.transaction
def boom(root, ctx, uid):
    root["users"].setdefault(uid, {"n": 0, "orders": [], "tags": []})["n"] += 1
    raise ValueError("half way")


# The same transactions on a model that opts out of change tracking: the copying replica
# (a committed copy, rebase by copy; a refusal after mutating leaves its change behind).
shop_plain = Model("replica-shop", lambda: {"users": {}, "log": []}, request_ids_kept_s=None, tracking=False)
for _name, _fn in shop.transactions.items():
    shop_plain.transaction(_fn, name=_name)

UIDS = ("a", "b", "c")
CALLS = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(UIDS), st.integers(0, 5)),
    st.tuples(st.just("drop"), st.sampled_from(UIDS)),
    st.tuples(st.just("order"), st.sampled_from(UIDS), st.integers(1, 3)),
    st.tuples(st.just("shuffle"), st.sampled_from(UIDS)),
    st.tuples(st.just("boom"), st.sampled_from(UIDS)),
)
PEERS = ("p1", "p2")
ME = "me"


def replay(model, records) -> bytes:
    """From scratch: every record in key order on a fresh state."""
    state, dedup, log = model.new_state(), {}, tracked.UndoLog()
    for rec in sorted(records, key=Record.key.fget):
        if rec.tx:
            model.apply(state, dedup, rec, Context(), log)
    return _encoder.encode((state, dedup))


class ReplicaMachine(RuleBasedStateMachine):
    @initialize(journals=st.fixed_dictionaries({p: st.lists(st.tuples(st.integers(1, 4), CALLS), max_size=8)
                                                for p in PEERS}), check=st.booleans(), tracking=st.booleans())
    def setup(self, journals, check, tracking):
        self.model = shop if tracking else shop_plain
        self.replica = replica_for(self.model, check=check)
        self.replica.reset(self.model.root_factory(), {}, 0, {})
        self.replica.become_multi()
        # Each peer's journal: hlc strictly increasing (gaps drawn), seq gap-free.
        self.journals = {}
        for p, entries in journals.items():
            hlc, recs = 0, []
            for seq, (gap, (tx, *args)) in enumerate(entries, 1):
                hlc += gap
                # Request ids from a small pool: duplicates across masters, first in key order wins.
                recs.append(Record(p, seq, hlc, f"r{seq % 4}" if seq % 2 else "", tx, tuple(args)))
            self.journals[p] = recs
        self.read = {p: 0 for p in PEERS}  # records of each peer read so far
        self.clock = 0                     # our hlc: past every record applied
        self.own_seq = 0
        self.applied: list[Record] = []

    def _last_read_hlc(self, p):
        return self.journals[p][self.read[p] - 1].hlc if self.read[p] else 0

    @rule(data=st.data())
    def ingest(self, data):
        """Read the next few records of some peers (a sync), in key order."""
        new = self._read_some(data)
        if new:
            self.clock = max(self.clock, new[-1].hlc)
            self.replica.ingest(new)
            self.applied += new

    @rule(data=st.data())
    def ingest_committing_at_once(self, data):
        """A sync's read whose records after the window and below the frontier it may
        reach commit at once (`Syncing._ingest`): commit there, `apply_committed` those,
        ingest the rest."""
        new = self._read_some(data)
        if not new:
            return
        self.clock = max(self.clock, new[-1].hlc)
        tentative = self.replica.tentative
        bound = self._legal_frontier()
        n = bisect.bisect_right(new, bound, key=lambda r: r.hlc)
        if n and bound > self.replica.frontier and (not tentative or new[0].key > tentative[-1].key):
            self.replica.commit(bound)
            self.replica.apply_committed(new[:n])
            self.applied += new[:n]
            new = new[n:]
        if new:
            self.replica.ingest(new)
            self.applied += new

    def _read_some(self, data) -> list:
        """The next few records of some peers, in key order (marked read)."""
        new = []
        for p in PEERS:
            left = len(self.journals[p]) - self.read[p]
            n = data.draw(st.integers(0, min(3, left)))
            new += self.journals[p][self.read[p]:self.read[p] + n]
            self.read[p] += n
        new.sort(key=Record.key.fget)
        return new

    def _legal_frontier(self):
        """The highest frontier no record still unread can order below."""
        return min([self.clock] + [self._last_read_hlc(p) if self.read[p] < len(self.journals[p]) else self.clock
                                   for p in PEERS])

    @rule(call=CALLS, rid=st.booleans())
    def write_own(self, call, rid):
        self.clock += 1
        self.own_seq += 1
        tx, *args = call
        rec = Record(ME, self.own_seq, self.clock, f"r{self.own_seq % 4}" if rid else "", tx, tuple(args))
        self.replica.apply_own(rec)
        self.applied.append(rec)

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def commit(self, data):
        """The frontier may move to any point no record still unread can order below."""
        legal = self._legal_frontier()
        if legal > self.replica.frontier:
            self.replica.commit(data.draw(st.integers(self.replica.frontier, legal)))

    @invariant()
    def live_state_is_the_replay_of_everything_applied(self):
        if not hasattr(self, "replica"):
            return
        assert _encoder.encode((self.replica.state, self.replica.dedup)) == replay(self.model, self.applied)

    @invariant()
    def committed_state_is_the_replay_of_the_committed_records(self):
        if not hasattr(self, "replica"):
            return
        f = self.replica.frontier
        committed = [r for r in self.applied if r.hlc <= f]
        got = self.replica.with_committed(lambda state, dedup: _encoder.encode((state, dedup)))
        assert got == replay(self.model, committed)
        assert sorted(r.key for r in self.replica.tentative) == sorted(r.key for r in self.applied if r.hlc > f)

    @invariant()
    def a_copying_replica_keeps_no_undo_entries(self):
        # Its rebases copy the committed state: undo entries would only pile up (a
        # regression once let its ingest bypass the `_apply` that forgets them).
        if hasattr(self, "replica") and not self.model.tracking:
            assert len(self.replica.log) == 0


ReplicaMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_replica_matches_a_from_scratch_replay_after_every_step = ReplicaMachine.TestCase
