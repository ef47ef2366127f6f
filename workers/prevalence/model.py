"""The model: the application's transactions and queries, and how a record is applied.

A **transaction** is a named, deterministic function ``fn(root, ctx, *args)`` that
mutates the state; a **query** is ``fn(root, *args)`` and must not mutate it. A
transaction gets time and randomness only from its context (invariant 8): ``ctx.now`` is
the record's timestamp and ``ctx.random`` is seeded from the record id, so every master
that applies the record computes the same thing.

Applying a record yields an **outcome**: ``ok`` with the returned value, ``rejected``
when the transaction raised `Rejected` (the clean refusal), or ``error`` when it raised
anything else. A raising transaction is still a record: it raises the same way on every
master, so they agree, and it leaves no trace: whatever it changed before it raised is
undone (the state is change-tracked, `tracked`). The same holds for a transaction that
stores a value the state cannot hold (`tracked.UntrackableValue`: a set, an object...).

Request ids: a record carrying a client request id that already appeared earlier in the
order takes no effect; its outcome is the first one's (kept in the replicated `dedup`
table, which snapshots carry: request id -> `codec.RequestIdEntry`).

Request ids are remembered for `request_ids_kept_s` of record time (default 7 days; every
write through Celery carries one, so the table would otherwise grow for ever). Pruning is
part of applying, hence identical on every master: when a record with a new request id
starts a new *epoch* (an eighth of the retention), the ids whose first record is older
than the retention, counted from the epoch's start, are dropped. The epoch of the last
pruning is kept in the table under the empty key (an empty request id means "none").
A request retried after its id was dropped takes effect again.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import random as _random
from typing import Any, Callable

import msgspec

from . import codec, tracked
from .tracked import run_record
from .clock import from_ms, physical_ms
from .codec import RequestIdEntry
from .errors import BadArguments, Rejected, UnknownQuery, UnknownTransaction

OK = "ok"
REJECTED = "rejected"
ERROR = "error"
#: What `tracked.apply_records` needs to build a record's outcome as `Model.apply` does.
OUTCOME_KINDS = (Rejected, OK, REJECTED, ERROR)

REQUEST_IDS_KEPT_S_DEFAULT = 7 * 86400
PRUNE_MARK = ""  # the dedup key holding (epoch of the last pruning,)
PRUNE_EPOCHS = 8  # pruning runs once per retention / PRUNE_EPOCHS of record time


class Context:
    """What a transaction may know beyond its arguments: the record being applied."""

    __slots__ = ("record", "_random")

    def __init__(self):
        self.record: codec.Record | None = None
        self._random = None

    @property
    def hlc(self) -> int:
        return self.record.hlc

    @property
    def now(self) -> _dt.datetime:
        """The record's timestamp (UTC), the same on every master."""
        return _dt.datetime.fromtimestamp(physical_ms(self.record.hlc) / 1000.0, _dt.timezone.utc)

    @property
    def master(self) -> str:
        return self.record.master

    @property
    def rid(self) -> str:
        return self.record.rid or self.record.record_id

    @property
    def random(self) -> _random.Random:
        """A `random.Random` seeded from the record id: same draws on every master."""
        if self._random is None:
            self._random = _random.Random(self.record.record_id)
        return self._random


def _arity(sig: inspect.Signature, skip: int) -> tuple[int, int]:
    """(min, max) positional arguments after the first `skip`; (1, 0) = always use bind."""
    params = list(sig.parameters.values())[skip:]
    lo = hi = 0
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            hi += 1
            if p.default is p.empty:
                lo += 1
        elif p.kind is p.VAR_POSITIONAL:
            hi = 1 << 30
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            return (1, 0)
    return (lo, hi)


class Model:
    """A named set of transactions and queries over a root object.

    Args:
        name: the model's name, recorded in snapshots.
        root_factory: returns the initial state: dicts, lists, str, int, float, bool, None,
            bytes, UTC datetimes, and msgspec Structs derived from
            `workers.prevalence.Struct` (or frozen), whose typed fields may also hold
            tuples, dates, other datetimes, times, timedeltas, Decimals and UUIDs. It
            is made change-tracked when a master opens (`tracked`); so is every value a
            transaction stores.
        state_type: the type snapshots decode the root into; defaults to the type of
            ``root_factory()`` when that is a msgspec Struct, else plain data.
        request_ids_kept_s: how long (record time) a request id is remembered (module
            docstring); None = for ever. Part of the replicated semantics: every master
            must run the same value, as they run the same transactions.
        tracking: True (default): the state is change-tracked (`tracked`): one copy per
            master, a rebase undoes the window, transactions are atomic. False opts out,
            for a state the change log cannot hold (sets, objects): each master then keeps
            a second, committed copy, a rebase restores it by copying (cost: the size of
            the state) and a transaction that raises after mutating leaves its partial
            change behind (identically everywhere). Part of the replicated semantics.
        copy: with ``tracking=False``, a fast deep copy of the state (default: through the
            codec). It must return a state equal to its argument sharing nothing mutable.
    """

    def __init__(self, name: str, root_factory: Callable[[], Any], *, state_type: Any = None,
                 request_ids_kept_s: float | None = REQUEST_IDS_KEPT_S_DEFAULT, tracking: bool = True,
                 copy: Callable[[Any], Any] | None = None):
        self.name = name
        if copy is not None and tracking:
            raise ValueError("copy= is for a model that opts out of change tracking (tracking=False)")
        self.tracking = tracking
        self._copy = copy
        if request_ids_kept_s is not None and request_ids_kept_s <= 0:
            raise ValueError(f"request_ids_kept_s must be positive or None, got {request_ids_kept_s!r}")
        self._kept_ms = None if request_ids_kept_s is None else int(request_ids_kept_s * 1000)
        self._epoch_ms = None if self._kept_ms is None else max(1, self._kept_ms // PRUNE_EPOCHS)
        self.root_factory = root_factory
        if state_type is None:
            sample = root_factory()
            state_type = type(sample) if isinstance(sample, msgspec.Struct) else Any
        self.state_type = state_type
        self.transactions: dict[str, Callable] = {}
        self.queries: dict[str, Callable] = {}
        self._signatures: dict[str, inspect.Signature] = {}
        # name -> (min, max) positional arguments after root (and ctx); (1, 0): check with
        # `check_arguments`, which binds. Public so that the write path checks without a call.
        self.arity: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"Model({self.name!r})"

    def transaction(self, fn: Callable | None = None, *, name: str | None = None):
        """Declare a transaction ``fn(root, ctx, *args)``. Usable as ``@model.transaction``."""
        def register(f):
            tx = name or f.__name__
            if not tx or tx in self.transactions or tx in self.queries:
                raise ValueError(f"transaction name {tx!r} is empty or already declared in {self!r}")
            self.transactions[tx] = f
            self._signatures[tx] = inspect.signature(f)
            self.arity[tx] = _arity(self._signatures[tx], 2)
            f.tx_name = tx
            return f
        return register(fn) if fn is not None else register

    def query(self, fn: Callable | None = None, *, name: str | None = None):
        """Declare a query ``fn(root, *args)``. Usable as ``@model.query``."""
        def register(f):
            q = name or f.__name__
            if not q or q in self.queries or q in self.transactions:
                raise ValueError(f"query name {q!r} is empty or already declared in {self!r}")
            self.queries[q] = f
            self._signatures[q] = inspect.signature(f)
            self.arity[q] = _arity(self._signatures[q], 1)
            f.query_name = q
            return f
        return register(fn) if fn is not None else register

    def new_state(self, state: Any = None) -> Any:
        """The state a master starts from: `state` (a decoded snapshot) or the initial one,
        made change-tracked unless the model opted out."""
        state = self.root_factory() if state is None else state
        return tracked.convert(state) if self.tracking else state

    def copy_state(self, state: Any) -> Any:
        """An independent copy of an untracked state (``tracking=False``)."""
        if self._copy is not None:
            return self._copy(state)
        return codec.round_trip(state, self.state_type)

    # -- requests ------------------------------------------------------------------

    def tx_name(self, tx: str | Callable) -> str:
        name = tx if isinstance(tx, str) else getattr(tx, "tx_name", None)
        if name is None or name not in self.transactions:
            known = ", ".join(sorted(self.transactions)) or "none"
            raise UnknownTransaction(f"{self!r} has no transaction {tx!r} (known: {known})")
        return name

    def query_fn(self, q: str | Callable) -> Callable:
        name = q if isinstance(q, str) else getattr(q, "query_name", None)
        fn = self.queries.get(name) if name is not None else None
        if fn is None:
            known = ", ".join(sorted(self.queries)) or "none"
            raise UnknownQuery(f"{self!r} has no query {q!r} (known queries: {known})")
        return fn

    def check_arguments(self, name: str, args: tuple | list, *, is_query: bool = False) -> None:
        """Refuse arguments that do not fit the signature, before anything is written."""
        lo, hi = self.arity[name]
        if lo <= len(args) <= hi:
            return  # the common case, without inspect's slow bind
        sig = self._signatures[name]
        try:
            if is_query:
                sig.bind(None, *args)
            else:
                sig.bind(None, None, *args)
        except TypeError as exc:
            params = list(sig.parameters)[1 if is_query else 2:]
            raise BadArguments(f"{name}({', '.join(params)}) called with {len(args)} argument(s) "
                               f"{list(args)!r}: {exc}") from None

    # -- applying ------------------------------------------------------------------

    def replay(self, root: Any, dedup: dict, records: list, ctx: Context, log: tracked.UndoLog) -> None:
        """Apply many records (ticks skipped) that commit at once: the replay path.

        Same effects as `apply` on each record; the undo entries of each are forgotten as
        soon as it is applied (nothing will undo a committed record).
        """
        # The loop in C (`tracked.apply_records`): records with a request id take the full
        # `apply`; each record's entries are forgotten once it is applied.
        apply = self.apply
        tracked.apply_records(log, records, self.transactions, root, ctx,
                              lambda record: apply(root, dedup, record, ctx, log),
                              None, None, None, True)  # watch, marks, tentative, forget

    def apply(self, root: Any, dedup: dict, record: codec.Record, ctx: Context, log: tracked.UndoLog) -> dict:
        """Apply one record (not a tick) to the state. Returns its outcome.

        Every change goes to `log` (the caller keeps the entries while the record is
        tentative). A transaction that raises leaves no trace: its changes are undone at
        once, and its outcome is ``rejected`` or ``error``. The caller has checked that
        the transaction is known (version skew is caught at read time).
        """
        rid = record.rid
        if rid:
            first = dedup.get(rid)
            if first is not None:
                return {"status": first.status, "value": codec.detached(first.value), "error": first.error,
                        "duplicate_of": first.record_id}
        fn = self.transactions[record.tx]  # outside the try: an unknown name is a bug here
        ctx.record = record
        ctx._random = None
        try:
            # One record of the undo log: plain values stored become tracked (or are
            # refused) when it returns; if it raises, everything it changed is undone.
            value = run_record(log, fn, root, ctx, record.args)
            result = {"status": OK, "value": value, "error": None}
        except Rejected as exc:
            result = {"status": REJECTED, "value": None, "error": str(exc)}
        # A transaction's own exception is part of its deterministic outcome: replay must
        # raise it identically and carry on, so this one broad catch is on purpose.
        except Exception as exc:  # noqa: BLE001
            result = {"status": ERROR, "value": None, "error": f"{type(exc).__name__}: {exc}"}
        if rid:
            # Keep a copy: the value may be part of the state and change with it later.
            value = result["value"]
            if value is not None and value.__class__ not in (int, str, float, bool):
                try:
                    value = codec.round_trip(value)
                except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
                    value = f"<unencodable {type(value).__name__}>"
            if self._kept_ms is not None:
                self._prune_request_ids(dedup, record.hlc, log)
            # Immutable and never tracked by the cyclic GC (`RequestIdEntry`), so a table
            # of millions of request ids does not slow every collection.
            tracked.dict_set(log, dedup, rid, RequestIdEntry(record.hlc, record.master, record.seq,
                                                              result["status"], value, result["error"]))
        return result

    def _prune_request_ids(self, dedup: dict, hlc: int, log: tracked.UndoLog) -> None:
        """Drop expired request ids when `hlc` starts a new epoch (module docstring).

        Undoable like any change of the record: once per epoch the table's contents are
        logged whole (one entry), cheaper than one entry per expired id.
        """
        epoch = physical_ms(hlc) // self._epoch_ms
        mark = dedup.get(PRUNE_MARK)
        if mark is not None and epoch <= mark[0]:
            return
        if mark is not None:
            cutoff = from_ms(epoch * self._epoch_ms - self._kept_ms)
            expired = [rid for rid, first in dedup.items() if rid != PRUNE_MARK and first.hlc < cutoff]
            if expired:
                tracked.dict_restore_point(log, dedup)
                for rid in expired:
                    del dedup[rid]
        tracked.dict_set(log, dedup, PRUNE_MARK, (epoch,))
