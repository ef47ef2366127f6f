"""Writing: a master's own transactions, journaled durably before they are applied.

`execute` and `execute_many` check every request before anything is written, journal it
with one write and one fsync, then apply it to the live state and answer with its
outcome. With `deferred_sync` the fsync runs in the kernel while the state is applied and
the caller prepares its answer; `settle()` waits for it before the answer leaves. A known
request id takes effect once (idempotency). The outcomes of own records are remembered,
since a rebase may still change a tentative one. A tick is an own record with no change:
it only publishes a clock reading.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
from typing import Any, Iterable

from .. import codec, journal
from ..codec import Record
from ..errors import BadArguments, BadFile, ClockSkew, InvariantViolation, NotReady, Rejected, TransactionFailed
from ..model import OK, REJECTED
from . import membership

log = logging.getLogger("prevalence.master")

OUTCOMES_KEPT = 100_000
#: Committed own request ids kept for `drain_committed` between two drains.
COMMITTED_PENDING_MAX = 100_000
_args = operator.attrgetter("args")
_FLAT = frozenset({str, int, float, bool, type(None), bytes})  # values the codec returns unchanged


class Writing:
    """Mixin of `Master`: own transactions, their outcomes, and ticks."""

    def _check_writable(self) -> None:
        if self.closed:
            raise InvariantViolation(f"master {self.name!r} is closed")
        if self.name in self.retired:
            raise NotReady(self._retired_message())
        if not self.joined:
            waiting = ", ".join(self._join_waiting_for()) or "nobody (next sync completes it)"
            raise NotReady(f"master {self.name!r} is still joining the cluster: waiting for "
                           f"acknowledgement from {waiting}. Members acknowledge at their next sync")
        if self.lease.lost:
            raise NotReady(self.lease.lost)

    def _retired_message(self) -> str:
        return (f"master {self.name!r} was retired by the operator (cluster/retired/{self.name}, cut at seq "
                f"{self.retired[self.name]}): it takes no more writes; its records up to the cut count, nothing "
                "after it does. Stop this process")

    def _check_not_retired(self) -> None:
        """Before a write: stop at once if the operator retired this master meanwhile (a
        ``retire --force`` of a master still running), without waiting for the next sync.
        One existence check per write or batch (~0.7 us here: an `access` call, which raises
        nothing when the file is absent); on NFS a cached lookup may hide a new file for a
        while (lookupcache)."""
        if not os.access(self._retired_path, os.F_OK, follow_symlinks=False):
            return  # not retired
        try:
            cut = membership.read_retirement(self.shared, self.name, self.key)
        except BadFile as exc:
            self.last_error = str(exc)  # obeyed by nobody: reported, as at sync
            return
        if cut is None:
            return
        self.retired[self.name] = cut
        self.joined = False
        self.last_error = f"master {self.name!r} was retired by the operator; it takes no more writes"
        log.error("%s", self._retired_message())
        raise NotReady(self._retired_message())

    def clock_problem(self) -> str | None:
        """Why this master's wall clock cannot be trusted now (it disagrees with the shared
        folder's clock by more than the allowed drift), or None. Reads the clocks."""
        self.clock.reading_ms()
        skew = self.clock.skew_ms
        if not skew:
            return None
        return (f"the wall clock of master {self.name!r} is {abs(skew) / 1000:.0f} s "
                f"{'ahead of' if skew > 0 else 'behind'} the shared folder's clock (the file server's time), "
                f"more than the {self.clock.drift_max_ms / 1000:g} s allowed: it takes no writes until this "
                "host's clock is corrected (check its time synchronisation, e.g. NTP); it goes on reading its "
                "peers, timed by the shared folder's clock, so it holds nobody back")

    def _refuse_skewed(self) -> None:
        """Raise ClockSkew: the tick just taken found the wall clock off (`clock_problem`)."""
        why = self.clock_problem()
        if why:
            raise ClockSkew(why)

    def execute(self, tx, *args, rid: str | None = None) -> Any:
        """Journal one transaction durably, apply it and return its result.

        Raises:
            Rejected: the transaction refused (its outcome is recorded all the same).
            TransactionFailed: it raised something else (recorded; replays alike).
            UnknownTransaction, BadArguments: refused before anything was written.
            NotReady: still joining, the lease was lost, or this master was retired;
                `ClockSkew` (a NotReady): its wall clock disagrees with the shared folder's.
            StorageError: the disk refused; nothing was applied or acknowledged. (With
                `deferred_sync` a failed sync is raised by `settle` instead.)
        """
        # Kept lean on purpose: this is the write path (attributes read once into locals).
        # `execute_many` is the general form.
        if self._unsettled:
            self.settle()
        if self.closed or not self.joined or self.lease.lost:
            self._check_writable()
        replica = self.replica
        multi = replica.multi
        if multi:  # a master alone in its cluster sees a retirement at its next sync
            self._check_not_retired()
        model = self.model
        name = tx if tx.__class__ is str and tx in model.transactions else model.tx_name(tx)
        lo, hi = model.arity[name]
        if not lo <= len(args) <= hi:
            model.check_arguments(name, args)
        if rid is not None:
            if rid.__class__ is not str:
                raise BadArguments(f"request id must be a string, got {type(rid).__name__}")
            first = replica.dedup.get(rid) if rid else None  # "" is no request id
            if first is not None:
                # Idempotency: a known request id takes effect once; answer with its outcome.
                return _result(name, {"status": first.status, "value": codec.detached(first.value),
                                      "error": first.error})
        flat = _FLAT.issuperset(map(type, args))
        if not flat:
            codec.check_depth(name, args)  # before encoding: a deep value never reaches the encoder
        seq = self.seq + 1
        clock = self.clock
        try:
            rec = Record(self.name, seq, clock.tick(), rid or "", name, args)
            if clock.skew_ms:
                self._refuse_skewed()
            payload = codec.encode_record(rec)
        except (TypeError, ValueError, OverflowError, codec.msgspec.EncodeError) as exc:
            raise BadArguments(f"arguments of {name!r} cannot be encoded as plain data: {exc}") from None
        if len(payload) > journal.RECORD_BYTES_MAX:
            raise BadArguments(f"arguments of {name!r} encode to {len(payload)} bytes, more than the "
                               f"{journal.RECORD_BYTES_MAX} a record may hold")
        # Apply exactly what replay will read (flat arguments read back identical).
        if not flat:
            rec = codec.decode_record(payload)
        writer = self.writer
        if self.deferred_sync:
            writer.append((payload,), self.key, wait=False)
            self._unsettled = writer.syncing
        else:
            writer.append((payload,), self.key)
        if self._fault_on:
            self._fault("between-fsync-and-apply")
        self.seq = seq
        self.own_horizon = rec.hlc
        out = replica.apply_own(rec)  # alone, it also moves the frontier: committed at once
        if multi or rid:
            self._remember(rec, out)
        if out["status"] == OK:
            return out["value"]
        return _result(name, out)

    def execute_many(self, requests: Iterable) -> list[dict]:
        """Commit a batch of (tx, args, rid) with one write and one fsync; apply in order.

        Every request is checked before anything is written: one bad request refuses the
        whole batch. Returns one outcome dict per request: {"status": "ok"|"rejected"|
        "error", "value", "error", "record": "master:seq", "committed": bool} (+
        "duplicate_of" for a request id already known). ``committed`` False means
        tentative: a rebase may still change the outcome (`outcome(rid)` tells the final one
        once the frontier passes the record; with one member it is final at once).
        """
        if self._unsettled:
            self.settle()
        if self.closed or not self.joined or self.lease.lost:
            self._check_writable()
        self._check_not_retired()
        model = self.model
        transactions = model.transactions
        arity = model.arity
        dedup = self.replica.dedup
        plans: list = []  # per request: a known outcome (dict), an earlier index (int) or (tx, args, rid)
        batch_rids: dict[str, int] = {}
        n_new = 0
        # Check every request before anything is written (kept lean: this is the batch path).
        for i, item in enumerate(requests):
            try:
                tx, args, rid = item
            except (TypeError, ValueError):
                raise BadArguments(f"each request must be (tx, args, rid), got {item!r}") from None
            name = tx if tx.__class__ is str and tx in transactions else model.tx_name(tx)
            if args.__class__ is not tuple:
                if args.__class__ is not list and not isinstance(args, (list, tuple)):
                    raise BadArguments(f"arguments of {name!r} must be a list, got {type(args).__name__}")
                args = tuple(args)
            lo, hi = arity[name]
            if not lo <= len(args) <= hi:
                model.check_arguments(name, args)
            if rid:
                if rid.__class__ is not str:
                    raise BadArguments(f"request id must be a string, got {type(rid).__name__}")
                first = dedup.get(rid)
                if first is not None:
                    # Idempotency: a known request id takes effect once; answer with its outcome.
                    plans.append({"status": first.status, "value": codec.detached(first.value), "error": first.error,
                                  "duplicate_of": first.record_id, "record": first.record_id,
                                  "committed": first.hlc <= self.replica.frontier})
                    continue
                if rid in batch_rids:
                    plans.append(batch_rids[rid])  # the same request id twice in one batch
                    continue
                batch_rids[rid] = i
            elif rid is not None and rid.__class__ is not str:
                raise BadArguments(f"request id must be a string, got {type(rid).__name__}")
            plans.append((name, args, rid or ""))
            n_new += 1
        # Encode, then journal the whole batch with one write and one fsync. Records of one
        # batch take consecutive clock readings: one clock call for the batch.
        seq = self.seq
        index, fresh = [], []
        if n_new:
            hlc = self.clock.tick() - 1
            if self.clock.skew_ms:
                self._refuse_skewed()
            self.clock.last = hlc + n_new
            me = self.name
            if n_new == len(plans):  # the common case: every request is new
                index = range(n_new)
                fresh = [Record(me, seq + k, hlc + k, plan[2], plan[0], plan[1])
                         for k, plan in enumerate(plans, 1)]
                seq += n_new
            else:
                for i, plan in enumerate(plans):
                    if plan.__class__ is tuple:
                        seq += 1
                        hlc += 1
                        index.append(i)
                        fresh.append(Record(me, seq, hlc, plan[2], plan[0], plan[1]))
        records = []
        if fresh:
            flat = _FLAT.issuperset(map(type, itertools.chain.from_iterable(map(_args, fresh))))
            if not flat:
                for rec in fresh:  # before encoding: a deep value never reaches the encoder
                    codec.check_depth(rec.tx, rec.args)
            try:
                chunks = _encode_batches(fresh, batch=len(fresh) > 1)
            except (TypeError, ValueError, OverflowError, codec.msgspec.EncodeError) as exc:
                raise BadArguments(f"arguments cannot be encoded as plain data: {exc}") from None
            # Apply exactly what replay will read: flat arguments (str, int, float, bool,
            # None, bytes) read back identical, so only other batches are decoded again.
            if flat:
                decoded = fresh
            else:
                decoded = [rec for payload in chunks for rec in
                           (codec.decode_batch(payload) if len(fresh) > 1 else [codec.decode_record(payload)])]
            self.writer.append(chunks, self.key, count=len(fresh), batch=len(fresh) > 1,
                               wait=not self.deferred_sync)
            self._unsettled = self.writer.syncing  # a deferred sync to settle
            if self._fault_on:
                self._fault("between-fsync-and-apply")
            self.seq = seq
            self.own_horizon = decoded[-1].hlc
            records = list(zip(index, decoded))
        # Apply in order, only now that the batch is durable.
        replica = self.replica
        outs: list = plans
        if records:
            applied = replica.apply_own_many(decoded)
            multi = replica.multi
            if multi or batch_rids:
                for rec, out in zip(decoded, applied):
                    if multi or rec.rid:
                        self._remember(rec, out)
            # Final at once for a sole member; else tentative until the frontier passes.
            committed = not multi
            for rec, out in zip(decoded, applied):
                out["committed"] = committed
                out["record"] = f"{rec.master}:{rec.seq}"  # rec.record_id, without the call
            if len(applied) == len(plans):
                outs = applied
            else:
                for i, out in zip(index, applied):
                    outs[i] = out
            if not multi:
                replica.advance_alone(self.clock.last)
        if n_new != len(plans):  # known request ids, or one twice in the batch
            for i, plan in enumerate(outs):
                if isinstance(plan, int):
                    first = dict(records)[plan]
                    outs[i] = dict(outs[plan], duplicate_of=first.record_id)
        return outs

    def _note_committed(self, records: list) -> None:
        """Own records with a request id that just committed: their final outcomes wait
        for `drain_committed` (bounded: the oldest are dropped, their waiters ask again)."""
        me, pending = self.name, self._committed_rids
        for rec in records:
            if rec.rid and rec.master == me:
                pending.append(rec.rid)
        if len(pending) > COMMITTED_PENDING_MAX:
            del pending[:len(pending) - COMMITTED_PENDING_MAX]

    def drain_committed(self) -> list[dict]:
        """The final outcomes of this master's own requests committed since the last call:
        ``{"rid", "status", "value", "error", "record", "committed": True}`` each. The
        Celery tier publishes them after every sync for clients waiting on them."""
        rids, self._committed_rids = self._committed_rids, []
        out = []
        for rid in rids:
            doc = self.outcome(rid)
            if doc is not None and doc["committed"]:
                doc["rid"] = rid
                out.append(doc)
        return out

    def _remember(self, rec: Record, out: dict) -> None:
        if rec.master != self.name:
            return
        if not rec.rid and not self.replica.multi:
            return  # alone, an outcome never changes: the caller already has it
        outcomes = self.outcomes
        outcomes[rec.rid or f"{rec.master}:{rec.seq}"] = (rec.hlc, out)
        if len(outcomes) > 2 * OUTCOMES_KEPT:
            self._prune_outcomes()

    def _prune_outcomes(self) -> None:
        """Keep the newest OUTCOMES_KEPT outcomes once there are twice as many (dicts keep
        insertion order)."""
        outcomes = self.outcomes
        if len(outcomes) > 2 * OUTCOMES_KEPT:
            for key in list(itertools.islice(outcomes, len(outcomes) - OUTCOMES_KEPT)):
                del outcomes[key]

    def _write_tick(self) -> None:
        rec = Record(self.name, self.seq + 1, self.clock.tick(), "", codec.TICK, ())
        self.writer.append([codec.encode_record(rec)], self.key)
        self.seq = rec.seq
        self.own_horizon = rec.hlc
        self.replica.apply_own(rec)


def _encode_batches(records: list, *, batch: bool) -> list[bytes]:
    """Encode records as payloads of at most RECORD_BYTES_MAX each: one plain record, or
    (with `batch`) arrays of records, split in halves until each fits.

    Raises BadArguments when a single record is too large for any frame.
    """
    payload = codec.encode_record(records if batch else records[0])
    if len(payload) <= journal.RECORD_BYTES_MAX:
        return [payload]
    if len(records) == 1:
        raise BadArguments(f"arguments of {records[0].tx!r} encode to {len(payload)} bytes, more than the "
                           f"{journal.RECORD_BYTES_MAX} a record may hold")
    half = len(records) // 2
    return _encode_batches(records[:half], batch=True) + _encode_batches(records[half:], batch=True)


def _result(tx, out: dict) -> Any:
    status = out["status"]
    if status == OK:
        return out["value"]
    if status == REJECTED:
        raise Rejected(out["error"])
    name = tx if isinstance(tx, str) else getattr(tx, "tx_name", repr(tx))
    etype, _, msg = (out["error"] or "").partition(": ")
    raise TransactionFailed(name, etype, msg)
