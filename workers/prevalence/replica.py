"""The replica: one master's in-memory copy of the state, and the tentative window over it.

No I/O. The master reads journals and decides where the frontier is; the replica applies
records and keeps the state equal to

    committed state (every record at or below the frontier, in key order)
    + the tentative records (above it), applied in key order.

One copy. Each record is applied once, inside a record of the undo log (`tracked`), and
the log keeps the entries of the tentative records only:

* **own record** (this master's new write): it orders after everything applied (the
  clock has observed every record read), so it is applied at the end of the window.
* **ingest** (records read from peers, in key order): when they all order after the
  window, they are applied at its end (fast path). Otherwise **rebase**: undo the window
  back to the first tentative record that orders after the earliest new one, newest
  first, then apply that suffix and the new records merged in key order. The cost is the
  part of the window that moved, never the size of the state.
* **commit** (the frontier moved): the records at or below it leave the window; their
  undo entries are forgotten.
* **committed view** (snapshots): undo the whole window, look at the committed state,
  apply the window again.

With one member (`multi` false) every record commits as it is applied: the log only ever
holds the record being applied (a transaction that raises is undone: atomic).

Check mode (`check=True`): every record is applied, undone and applied again, and the
state compared byte for byte each time: an undo that does not restore the state names the
transaction that changed it behind the log's back, and a second application that differs
names a non-deterministic transaction.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Iterable

import msgspec

from . import codec, tracked
from .codec import Record
from .errors import InvariantViolation, check
from .model import OUTCOME_KINDS, Context, Model

#: Called once per rebase with the (record, outcome) pairs of every record of `watch` it
#: applied again, in key order (one call, not one per record: a rebase of 10,000 own
#: records spent a quarter of its time in the per-record calls).
OutcomeHook = Callable[[list], None]

_check_encoder = msgspec.msgpack.Encoder()  # keeps dict order: order is part of the state


def _hlc(rec: Record) -> int:
    return rec.hlc


class Replica:
    """One master's state and tentative window (module docstring)."""

    #: Whether each record's undo entries are dropped once it is applied (`CopyingReplica`:
    #: it restores by copying, never by undoing).
    FORGETS = False

    def __init__(self, model: Model, *, check: bool = False) -> None:
        self.model = model
        self.check = check
        self.state: Any = None
        self.dedup: dict = {}
        self.log = tracked.UndoLog()
        self.tentative: list[Record] = []  # applied, above the frontier, in key order (ticks too)
        self._marks: list[int] = []        # undo-log position before each tentative record
        self.frontier = 0
        self.cursors: dict[str, int] = {}  # per master, the last seq committed here
        self.multi = False                 # records wait for the frontier (more than one member)
        self.version = 0                   # bumps at every change of the state
        self.rebases = 0
        self.undone = 0                    # undo entries undone by rebases (for status)
        self._ctx = Context()

    # -- base ----------------------------------------------------------------------------

    def reset(self, state: Any, dedup: dict, frontier: int, cursors: dict[str, int]) -> None:
        """Start from a base (a snapshot's committed state, or the initial state)."""
        with codec.gc_paused():
            self.state = self.model.new_state(state)
        self.dedup = dedup
        self.frontier = frontier
        self.cursors = cursors
        self.tentative, self._marks = [], []
        self.log = tracked.UndoLog()
        self.multi = False
        self.version += 1

    def become_multi(self) -> None:
        """Another member appeared: from now on records commit only below the frontier."""
        check(not self.tentative, "replica became multi-member with tentative records")
        self.multi = True

    # -- applying --------------------------------------------------------------------------

    def _apply(self, rec: Record) -> dict:
        if self.check:
            return self._apply_checked(rec)
        out = self.model.apply(self.state, self.dedup, rec, self._ctx, self.log)
        if self.FORGETS:
            self.log.forget_before(self.log.mark())
        return out

    def _apply_checked(self, rec: Record) -> dict:
        before = self._bytes()
        mark = self.log.mark()
        out = self.model.apply(self.state, self.dedup, rec, self._ctx, self.log)
        after = self._bytes()
        self.log.undo_to(mark)
        if self._bytes() != before:
            raise InvariantViolation(
                f"transaction {rec.tx!r} ({rec.record_id}) changed the state in a way the undo log did "
                "not see (a write through dict.__setitem__/list.append called on the class, heapq, a C "
                "extension, or a container shared with something outside the state): undoing it did "
                "not restore the state")
        again = self.model.apply(self.state, self.dedup, rec, self._ctx, self.log)
        if self._bytes() != after or (again["status"], again["error"]) != (out["status"], out["error"]):
            raise InvariantViolation(
                f"transaction {rec.tx!r} ({rec.record_id}) is not deterministic: applied twice to the same "
                "state it gave different results (use ctx.now and ctx.random, never the wall clock, "
                "random, or anything outside the state and the arguments)")
        return again

    def _bytes(self) -> bytes:
        # The model's state only: the request-id table is the engine's own, changed through
        # `tracked.dict_set` alone, and would make each check cost the table's size.
        return _check_encoder.encode(self.state)

    def apply_own(self, rec: Record) -> dict:
        """Apply this master's new record (it orders after everything applied).

        Alone, it commits at once: the frontier moves to it (as `advance_alone`); otherwise it
        joins the tentative window.
        """
        if not self.multi:
            log = self.log
            if not rec.tx:
                out = _TICK_OUTCOME
            elif self.check:
                out = self._apply_checked(rec)
            else:
                out = self.model.apply(self.state, self.dedup, rec, self._ctx, log)
            if len(log):  # committed: nothing will undo it
                log.forget_before(log.mark())
            self.cursors[rec.master] = rec.seq
            if rec.hlc > self.frontier:
                self.frontier = rec.hlc
            self.version += 1
            return out
        tentative = self.tentative
        # The message is built only when the check fails (not through `check`, which would
        # format it on every own write).
        if tentative and not rec.key > tentative[-1].key:
            raise InvariantViolation(f"own record {rec.record_id} orders before the tentative record "
                                     f"{tentative[-1].record_id}")
        self.version += 1
        self._marks.append(self.log.mark())
        tentative.append(rec)
        return self._apply(rec) if rec.tx else _TICK_OUTCOME

    def advance_alone(self, hlc: int) -> None:
        """Sole member: the frontier is this master's own clock (everything is committed)."""
        if self.multi or self.tentative:  # `check` inlined: this runs on every lone commit
            raise InvariantViolation("advance_alone on a replica with other members")
        if hlc > self.frontier:
            self.frontier = hlc

    def apply_own_many(self, recs: list[Record]) -> list[dict]:
        """`apply_own` for a batch, in order."""
        with codec.gc_paused():
            if self.multi or self.check or not recs:
                return [self.apply_own(rec) for rec in recs]
            # Alone: each record commits as it is applied (`apply_own`), in one loop (in C:
            # a record with a request id takes the model's full `apply`).
            apply, state, dedup, ctx, log = self.model.apply, self.state, self.dedup, self._ctx, self.log
            last = recs[-1]
            outs = [out for _rec, out in tracked.apply_records(
                log, recs, self.model.transactions, state, ctx, lambda rec: apply(state, dedup, rec, ctx, log),
                last.master, None, None, True, OUTCOME_KINDS)]  # watch, marks, tentative, forget
            if len(outs) != len(recs):  # ticks have no outcome from the loop
                each = iter(outs)
                outs = [next(each) if rec.tx else _TICK_OUTCOME for rec in recs]
            self.cursors[last.master] = last.seq
            self.version += 1
            return outs

    def apply_committed(self, recs: list[Record]) -> None:
        """Apply records (key order) that the frontier has already passed: the caller moved
        it there with `commit`, which emptied the window (the records order after all of
        it). They never join the window, and each record's undo entries are dropped as soon
        as it is applied: a sync whose records commit at once skips keeping them.
        """
        if not recs:
            return
        check(not self.tentative and not len(self.log) and recs[-1].hlc <= self.frontier,
              "apply_committed needs an empty window and records at or below the frontier")
        self.version += 1
        log = self.log
        with codec.gc_paused():
            if self.check:
                for rec in recs:
                    if rec.tx:
                        self._apply_checked(rec)
                        log.forget_before(log.mark())
            else:
                self.model.replay(self.state, self.dedup, recs, self._ctx, log)
        self._advance_cursors(recs)

    def ingest(self, incoming: list[Record], *, watch: str | None = None,
               on_outcome: OutcomeHook | None = None) -> bool:
        """Apply records read from peers, given in key order. Returns True if it rebased.

        `on_outcome(pairs)` is called once with the (record, outcome) of every record of
        master `watch` that a rebase applied again (its outcome may have changed).
        """
        if not incoming:
            return False
        self.version += 1
        with codec.gc_paused():
            if not self.multi:
                # Sole member (or recovering one): everything read commits in order at once.
                self.model.replay(self.state, self.dedup, incoming, self._ctx, self.log)
                self._advance_cursors(incoming)
                return False
            tentative = self.tentative
            first = incoming[0].key
            if not tentative or first > tentative[-1].key:
                self._extend(incoming)  # fast path
                return False
            # Rebase: undo back to the first tentative record ordering after the first new
            # one, then apply that suffix and the new records merged in key order.
            i = bisect.bisect_right(tentative, first, key=Record.key.fget)
            self.undone += self.log.undo_to(self._marks[i])
            moved = tentative[i:]
            del tentative[i:], self._marks[i:]
            merged = moved + incoming
            merged.sort(key=Record.key.fget)
            self._extend(merged, watch=watch, on_outcome=on_outcome)
            self.rebases += 1
            return True

    def _extend(self, recs: Iterable[Record], *, watch: str | None = None,
                on_outcome: OutcomeHook | None = None) -> None:
        tentative, marks, log = self.tentative, self._marks, self.log
        if self.check:
            again: list = []
            for rec in recs:
                marks.append(log.mark())
                tentative.append(rec)
                if rec.tx:
                    out = self._apply(rec)
                    if on_outcome is not None and rec.master == watch:
                        again.append((rec, out))
        else:
            # The loop in C: a record with a request id takes the model's full `apply`; one
            # of `watch` gets its outcome built in the loop; the others run without one.
            model_apply, state, dedup, ctx = self.model.apply, self.state, self.dedup, self._ctx
            again = tracked.apply_records(
                log, recs, self.model.transactions, state, ctx,
                lambda rec: model_apply(state, dedup, rec, ctx, log),
                watch if on_outcome is not None else None, marks, tentative, self.FORGETS, OUTCOME_KINDS)
        if again and on_outcome is not None:
            on_outcome(again)

    def commit(self, frontier: int) -> list[Record]:
        """The frontier moved to `frontier`: records at or below it are committed.

        Returns the records (ticks included) that left the window, in key order.
        """
        check(frontier >= self.frontier, f"frontier would move backwards: {self.frontier} -> {frontier}")
        self.frontier = frontier
        tentative = self.tentative
        n = bisect.bisect_right(tentative, frontier, key=_hlc)
        done = tentative[:n]
        if n:
            self._advance_cursors(done)
            self.log.forget_before(self._marks[n] if n < len(self._marks) else self.log.mark())
            del tentative[:n], self._marks[:n]
        return done

    def _advance_cursors(self, recs: list[Record]) -> None:
        """Committed cursors move to the last seq of each master in `recs` (key order),
        never back (a late tick)."""
        # A master's seq and hlc only increase together (the reader checks), so its last
        # record in key order holds its highest seq: one comprehension, not a loop of gets.
        cursors = self.cursors
        for m, seq in {rec.master: rec.seq for rec in recs}.items():
            if seq > cursors.get(m, 0):
                cursors[m] = seq

    def tentative_real(self) -> int:
        """Tentative records that are not ticks."""
        return sum(1 for r in self.tentative if r.tx)

    # -- looking at the committed state --------------------------------------------------------

    def with_committed(self, fn: Callable[[Any, dict], Any]) -> Any:
        """Call ``fn(state, dedup)`` on the committed state and return its result.

        The window is undone for the call and applied again after it (same records, same
        order: the same state). `fn` must not keep references into the state.
        """
        if not self.tentative:
            return fn(self.state, self.dedup)
        window = self.tentative
        self.log.undo_to(self._marks[0])
        self.tentative, self._marks = [], []
        try:
            return fn(self.state, self.dedup)
        finally:
            with codec.gc_paused():
                self._extend(window)


class CopyingReplica(Replica):
    """The fallback for a model that opts out of change tracking (``tracking=False``).

    It keeps a second, committed copy of the state: a record is applied to the live state
    and again to the committed copy when it commits, and a rebase restores the live state
    by copying the committed one and applying the whole window again (cost: the size of
    the state). The undo log only ever holds the record being applied.
    """

    FORGETS = True

    def __init__(self, model: Model, *, check: bool = False) -> None:
        super().__init__(model, check=False)  # check mode needs the undo log
        self.committed_state: Any = None
        self.committed_dedup: dict = {}

    def reset(self, state: Any, dedup: dict, frontier: int, cursors: dict[str, int]) -> None:
        super().reset(state, dedup, frontier, cursors)
        self.committed_state, self.committed_dedup = None, {}

    def become_multi(self) -> None:
        super().become_multi()
        self.committed_state = self.model.copy_state(self.state)
        self.committed_dedup = dict(self.dedup)  # entries are immutable

    def ingest(self, incoming: list[Record], *, watch: str | None = None,
               on_outcome: OutcomeHook | None = None) -> bool:
        if not incoming:
            return False
        if not self.multi or not self.tentative or incoming[0].key > self.tentative[-1].key:
            return super().ingest(incoming, watch=watch, on_outcome=on_outcome)
        self.version += 1
        merged = self.tentative + incoming
        merged.sort(key=Record.key.fget)
        with codec.gc_paused():
            self.state = self.model.copy_state(self.committed_state)
            self.dedup = dict(self.committed_dedup)
            self.tentative, self._marks = [], []
            self._extend(merged, watch=watch, on_outcome=on_outcome)
        self.rebases += 1
        return True

    def commit(self, frontier: int) -> list[Record]:
        done = self.tentative[:bisect.bisect_right(self.tentative, frontier, key=_hlc)]
        if done and self.multi:
            log = tracked.UndoLog()
            with codec.gc_paused():
                self.model.replay(self.committed_state, self.committed_dedup, done, self._ctx, log)
        return super().commit(frontier)

    def apply_committed(self, recs: list[Record]) -> None:
        super().apply_committed(recs)
        if recs and self.multi:
            with codec.gc_paused():
                self.model.replay(self.committed_state, self.committed_dedup, recs, self._ctx, tracked.UndoLog())

    def with_committed(self, fn: Callable[[Any, dict], Any]) -> Any:
        if not self.multi:
            return fn(self.state, self.dedup)
        return fn(self.committed_state, self.committed_dedup)


def replica_for(model: Model, *, check: bool = False) -> Replica:
    """The replica a model needs: change-tracked, or the copying fallback."""
    return Replica(model, check=check) if model.tracking else CopyingReplica(model)


_TICK_OUTCOME = {"status": "ok", "value": None, "error": None}
