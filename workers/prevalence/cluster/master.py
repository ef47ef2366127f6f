"""The master: one process's full copy of the state, its journal, and sync with the others.

State is kept twice once the cluster has more than one member:

* **live** = committed + every tentative record, in key order. Local transactions apply
  here at once, so a caller reads its own write.
* **committed** = every record with ``hlc <= frontier``. Rebase restores live from it.

With one member there is no copy: the frontier is the master's own clock, so everything
commits at once.

A sync reads every member's new records, orders them by ``(hlc, master, seq)``, applies
them (fast path when they all order after what is applied, rebase otherwise), appends a
tick when a peer's real record waits on this master, moves the frontier, commits, acks
newcomers, collects garbage and publishes progress. Recovery is the same procedure run
from the newest snapshot over every journal.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import logging
import os
import time
from typing import Any, Callable, Iterable

from .. import codec, journal
from ..clock import HybridClock, physical_ms, wall_ms
from ..codec import Record
from ..errors import (BadArguments, Corruption, InvariantViolation, LostRecords, NotReady,
                      Rejected, RetiredMaster, TransactionFailed,
                      UnknownRecordTransaction, UnsupportedState, check)
from ..model import OK, REJECTED, Context, Model
from ..snapshot import SnapshotBody, decode_root, list_snapshots, load_snapshot, write_snapshot
from . import folder, membership
from .lease import LEASE_TTL_S_DEFAULT, Lease
from .progress import Progress, encode_progress, read_progress, write_progress
from .reader import JournalReader

log = logging.getLogger("prevalence.master")

OUTCOMES_KEPT = 100_000
_FLAT = frozenset({str, int, float, bool, type(None), bytes})  # values the codec returns unchanged
RECOVERY_CHUNK_RECORDS = 100_000
COPY_PER_APPLY = 8  # copying one state entry costs about 1/8 of applying one record (measured)


class Peer:
    """What this master knows of one other member."""

    __slots__ = ("name", "reader", "horizon", "max_real_hlc", "counted", "error", "torn",
                 "held", "retired_cut")

    def __init__(self, name: str, reader: JournalReader, horizon: int):
        self.name = name
        self.reader = reader
        self.horizon = horizon        # hlc of the last record read (or a lower bound)
        self.max_real_hlc = 0         # hlc of the last real (non-tick) record read
        self.counted = False          # counted in the frontier
        self.error: str | None = None
        self.torn: str | None = None
        self.held: str | None = None  # why reading is held back (clock ahead, retired cut)
        self.retired_cut: int | None = None


class Master:
    """One master. Open with `Master.open`; not thread-safe (one caller thread)."""

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, model: Model, shared_dir: str, name: str, *, fsync: str = "always",
             cluster_key: bytes | None = None, fsync_interval_ms: int = journal.FSYNC_INTERVAL_MS_DEFAULT,
             segment_bytes_max: int = journal.SEGMENT_BYTES_MAX_DEFAULT,
             lease_ttl_s: float = LEASE_TTL_S_DEFAULT, gc_grace_s: float = 60.0,
             snapshots_kept: int = 2, drift_max_ms: int = 60_000,
             now_ms: Callable[[], int] = wall_ms, fault: Callable[[str], None] | None = None,
             check_transactions: bool = False) -> "Master":
        """Open (recover, or found, or join) the master `name` on `shared_dir`.

        Args:
            model: the application's `Model`.
            shared_dir: the shared folder (NFS in production).
            name: this master's name: 1-64 of [A-Za-z0-9_.-].
            fsync: "always" | "interval" | "never" (see `journal.JournalWriter`).
            cluster_key: when set, every record, snapshot and progress file is signed
                (HMAC-SHA256) and unsigned or badly signed ones are treated as corrupt.
            segment_bytes_max: journal segments roll past this size.
            gc_grace_s: a journal segment is deleted this long after it became collectable.
            now_ms: wall clock in ms (tests inject one).
            fault: test hook called with a point name at each crash-worthy step.
            check_transactions: development aid (slow: a digest of the state per write):
                warn when a transaction that refused or raised left a partial mutation
                behind (`Rejected` must be raised before mutating).

        Raises:
            LeaseHeld: another live process holds the name.
            RetiredMaster: the name was retired.
            LostRecords: peers read records this journal no longer has (see errors).
            Corruption: this master's own journal is damaged before its end.
        """
        if fsync not in journal.FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(journal.FSYNC_MODES)}, got {fsync!r}")
        folder.check_name(name)
        self = cls.__new__(cls)
        self._init(model, shared_dir, name, fsync=fsync, key=cluster_key,
                   fsync_interval_ms=fsync_interval_ms, segment_bytes_max=segment_bytes_max,
                   lease_ttl_s=lease_ttl_s, gc_grace_s=gc_grace_s, snapshots_kept=snapshots_kept,
                   drift_max_ms=drift_max_ms, now_ms=now_ms, fault=fault)
        self.check_transactions = check_transactions
        try:
            self._recover()
        except BaseException:
            self._release()
            raise
        return self

    def _init(self, model, shared, name, *, fsync, key, fsync_interval_ms, segment_bytes_max,
              lease_ttl_s, gc_grace_s, snapshots_kept, drift_max_ms, now_ms, fault):
        self.model = model
        self.shared = os.path.abspath(shared)
        self.name = name
        self.key = key
        self.fsync_mode = fsync
        self._fsync_interval_ms = fsync_interval_ms
        self._segment_bytes_max = segment_bytes_max
        self.gc_grace_s = gc_grace_s
        self.snapshots_kept = snapshots_kept
        self._fault = fault or (lambda point: None)
        self._fault_on = fault is not None
        self.clock = HybridClock(now_ms=now_ms, drift_max_ms=drift_max_ms)
        self._now_ms = now_ms
        self.lease = Lease(self.shared, name, lease_ttl_s=lease_ttl_s)
        self.writer: journal.JournalWriter | None = None
        self.joined = False
        self.closed = False
        self.seq = 0                     # last own seq written
        self.own_horizon = 0             # hlc of the last own record
        self.frontier = 0
        self.peers: dict[str, Peer] = {}
        self.acks: dict[str, int] = {}
        self.retired: dict[str, int] = {}
        self.live_root: Any = None
        self.live_dedup: dict = {}
        self.committed_root: Any = None  # None while this master is the only member
        self.committed_dedup: dict | None = None
        self.committed_cursors: dict[str, int] = {}
        self.tentative: list[Record] = []
        self.outcomes: dict = {}         # own request id (or master:seq) -> (hlc, outcome)
        self.rebases = 0
        self.outcomes_changed = 0
        self.last_error: str | None = None
        self.snapshot_frontier = -1
        # Own snapshots kept on disk: frontier -> cursors. GC keeps what the *oldest* of
        # them needs, so that falling back from a damaged newest snapshot still works.
        self.kept_snapshots: dict[int, dict] = {}
        self._unknown_snapshots = False
        self._ctx = Context()
        self._version = 0                # bumps at every apply to live
        self._digest_cache: tuple[int, str] | None = None
        self._published: bytes | None = None
        self._gc_seen: dict[str, float] = {}
        self._own_reader: JournalReader | None = None
        self._rejoin = False
        self._version_at_last_publish = -1
        self.check_transactions = False
        self.partial_mutations = 0

    # -- recovery --------------------------------------------------------------------

    def _recover(self) -> None:
        shared, name = self.shared, self.name
        # 1. A retired name never comes back.
        self.retired = membership.read_retired(shared)
        if name in self.retired:
            raise RetiredMaster(f"master {name!r} was retired from the cluster in {shared} "
                                f"(cut at seq {self.retired[name]}); start it under a new name")
        # 2. One process per name.
        os.makedirs(folder.masters_dir(shared), exist_ok=True)
        self.lease.claim()
        existing = os.path.isdir(folder.journal_dir(shared, name)) or bool(
            list_snapshots(folder.snapshots_dir(shared, name)))
        joining = os.path.exists(folder.joining_path(shared, name))
        own_progress = read_progress(shared, name, self.key)
        if own_progress is not None:
            self.acks = dict(own_progress.acks)
            self.kept_snapshots = {int(f): dict(c) for f, c in own_progress.kept_snapshots}
        # 3. Found, recover as a member, or (re)join.
        if existing and not joining:
            self.joined = True
            self._load_base(own_only=True)
        else:
            founder = membership.read_founder(shared)
            others = [m for m in folder.list_masters(shared) if m != name]
            if founder is None and not others:
                founder = membership.claim_founder(shared, name)
            if founder == name:
                os.makedirs(folder.master_dir(shared, name), exist_ok=True)
                self.joined = True
                self._load_base(own_only=True)
            else:
                self._announce_join()
        # 4. Replay every journal after the base, own first (torn tail set aside).
        self._recover_own_journal()
        self._check_lost_records()
        if self.joined:
            self._open_writer()
        self.sync()
        # The recovered state lives as long as the process: move it out of the cyclic
        # GC's sight, so later collections do not walk millions of long-lived objects.
        gc.freeze()
        log.info("master %s open: seq %d, frontier %d, %d tentative, joined=%s",
                 name, self.seq, self.frontier, self._tentative_real(), self.joined)

    def _load_base(self, *, own_only: bool) -> None:
        """Load the newest valid snapshot (own, or any member's), else the initial state."""
        names = [self.name] if own_only else [m for m in folder.list_masters(self.shared) if m != self.name]
        candidates = []
        for m in names:
            candidates += [(f, p) for f, p in list_snapshots(folder.snapshots_dir(self.shared, m))]
        candidates.sort(reverse=True)
        for frontier, path in candidates:
            try:
                body = load_snapshot(path, self.key)
                if body.model != self.model.name:
                    raise Corruption(f"snapshot is of model {body.model!r}, this master runs {self.model.name!r}",
                                     path=path)
                root = decode_root(body, self.model.state_type)
                dedup = body.dedup
                got = codec.digest_of(root, dedup)
                if got != body.digest:
                    raise Corruption(f"state digest {got} does not match the recorded {body.digest}", path=path)
            except (Corruption, OSError) as exc:
                log.error("skipping snapshot %s: %s; falling back to an older one", path, exc)
                self.last_error = str(exc)
                continue
            self._set_base(root, dedup, body.frontier, dict(body.cursors), body.clock if own_only else body.frontier,
                           members=list(body.members))
            if own_only:
                self.snapshot_frontier = body.frontier
                self.kept_snapshots[body.frontier] = dict(body.cursors)
                on_disk = {f for f, _p in list_snapshots(folder.snapshots_dir(self.shared, self.name))}
                self._unknown_snapshots = bool(on_disk - set(self.kept_snapshots))
            return body
        self._set_base(self.model.root_factory(), {}, 0, {}, 0, members=[])
        return None

    def _set_base(self, root, dedup, frontier, cursors, clock, members) -> None:
        self._version += 1
        self.live_root = root
        self.live_dedup = dedup
        self.frontier = frontier
        self.committed_cursors = cursors
        self.clock.observe(max(clock, frontier))
        self.seq = cursors.get(self.name, 0)
        for m in set(members) | set(self.acks) | {m for m in cursors if m != self.name}:
            if m != self.name:
                peer = self._peer(m)
                peer.counted = True
                peer.horizon = max(peer.horizon, frontier, self.acks.get(m, 0))
        others = [m for m in folder.list_masters(self.shared) if m != self.name and m not in self.retired]
        if others or any(p.counted for p in self.peers.values()):
            self._make_committed_copy()

    def _peer(self, m: str) -> Peer:
        peer = self.peers.get(m)
        if peer is None:
            start = self.committed_cursors.get(m, 0)
            peer = Peer(m, JournalReader(self.shared, m, start, 0, self.key), 0)
            self.peers[m] = peer
        return peer

    def _announce_join(self) -> None:
        """Joining, step 1: load the newest snapshot of a member and announce ourselves."""
        body = self._load_base(own_only=False)
        self._fault("before-announce")
        os.makedirs(folder.master_dir(self.shared, self.name), exist_ok=True)
        if body is not None:
            # Keep the base as our own snapshot: a restart, and peers' GC, rely on it.
            own = SnapshotBody(master=self.name, model=body.model, frontier=body.frontier, cursors=body.cursors,
                               clock=body.frontier, members=body.members, digest=body.digest, root=body.root,
                               dedup=body.dedup)
            write_snapshot(folder.snapshots_dir(self.shared, self.name), own, self.key, self._fault)
            self.snapshot_frontier = body.frontier
            self.kept_snapshots = {body.frontier: dict(body.cursors)}
        folder.publish(folder.joining_path(self.shared, self.name), b"joining\n")
        self._publish_progress(force=True)
        log.info("master %s announced itself, joining from %s", self.name,
                 f"snapshot at frontier {body.frontier}" if body else "the initial state")

    def _restart_join(self) -> None:
        """Forget everything read so far and announce again from the newest snapshot."""
        self.peers = {}
        self.tentative = []
        self.committed_root = self.committed_dedup = None
        self.committed_cursors = {}
        self._announce_join()

    def _recover_own_journal(self) -> None:
        """Read our own journal after the base; set a torn tail aside and truncate it."""
        reader = JournalReader(self.shared, self.name, self.seq, 0, self.key)
        read_any = False
        while True:
            # In chunks: a long journal never sits in memory whole (records are ~0.5 KB).
            res = reader.read_new(records_max=RECOVERY_CHUNK_RECORDS)
            if res.error is not None:
                raise res.error
            self._check_own_transactions(res.records)
            if res.records:
                read_any = True
                self._ingest({self.name: res.records})
                self.seq = res.records[-1].seq
                self.own_horizon = res.records[-1].hlc
            if not res.records or res.torn is not None:
                break
        if res.torn is not None:
            path, offset = res.torn_at
            aside = f"{path}.torn-{offset:020d}"
            n = 1
            while os.path.exists(aside):  # an earlier torn tail set aside at the same offset
                aside = f"{path}.torn-{offset:020d}.{n}"
                n += 1
            with open(path, "rb") as f:
                f.seek(offset)
                tail = f.read()
            with open(aside, "wb") as f:
                f.write(tail)
                f.flush()
                os.fsync(f.fileno())
            os.truncate(path, offset)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            log.warning("journal %s: torn tail at offset %d (%s): %d bytes set aside to %s and truncated",
                        path, offset, res.torn, len(tail), aside)
        if not read_any and self.seq > 0:
            last = membership.last_written_seq(self.shared, self.name, self.key)
            if last < self.seq:
                raise LostRecords(
                    f"the journal of {self.name!r} ends at seq {last} but its own snapshot already covers "
                    f"seq {self.seq}: records were lost (machine crash under fsync={self.fsync_mode}, or "
                    "damage). Writing on would leave a gap. Retire this master and start a new name")
        self._own_reader = reader

    def _check_own_transactions(self, records: list) -> None:
        unknown = {rec.tx for rec in records} - self.model.transactions.keys() - {codec.TICK}
        for rec in records if unknown else ():
            if rec.tx in unknown:
                raise UnknownRecordTransaction(
                    f"this master's own journal names transaction {rec.tx!r}, which model "
                    f"{self.model.name!r} does not declare (code rolled back?). Deploy the code that "
                    "declares it; nothing was written or truncated", master=self.name, seq=rec.seq)

    def _check_lost_records(self) -> None:
        for m in folder.list_masters(self.shared):
            if m == self.name:
                continue
            p = self._peer_progress(m)
            seen = p.cursors.get(self.name, 0) if p else 0
            if seen > self.seq:
                raise LostRecords(
                    f"master {m!r} has read seq {seen} of {self.name!r}, but this journal ends at seq "
                    f"{self.seq}: records acknowledged earlier were lost (machine crash under fsync="
                    f"{self.fsync_mode}?). Starting would reuse those seqs. Retire {self.name!r} "
                    "(prevalence retire) and start this host under a new name")

    def _open_writer(self) -> None:
        reader = self._own_reader
        tail = None
        if reader is not None and reader._segment is not None:
            first, path = reader._segment
            tail = (first, path, reader._offset)
        self.writer = journal.JournalWriter(
            folder.journal_dir(self.shared, self.name), self.seq + 1, tail, fsync=self.fsync_mode,
            fsync_interval_ms=self._fsync_interval_ms, segment_bytes_max=self._segment_bytes_max,
            fault=self._fault)

    # -- writing -----------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.closed:
            raise InvariantViolation(f"master {self.name!r} is closed")
        if not self.joined:
            waiting = ", ".join(self._join_waiting_for()) or "nobody (next sync completes it)"
            raise NotReady(f"master {self.name!r} is still joining the cluster: waiting for "
                           f"acknowledgement from {waiting}. Members acknowledge at their next sync")
        if self.lease.lost:
            raise NotReady(self.lease.lost)

    def execute(self, tx, *args, rid: str | None = None) -> Any:
        """Journal one transaction durably, apply it and return its result.

        Raises:
            Rejected: the transaction refused (its outcome is recorded all the same).
            TransactionFailed: it raised something else (recorded; replays alike).
            UnknownTransaction, BadArguments: refused before anything was written.
            NotReady: still joining, or the lease was lost.
            StorageError: the disk refused; nothing was applied or acknowledged.
        """
        # Kept lean on purpose: this is the write path. `execute_many` is the general form.
        if self.closed or not self.joined or self.lease.lost:
            self._check_writable()
        model = self.model
        name = tx if tx.__class__ is str and tx in model.transactions else model.tx_name(tx)
        lo, hi = model._arity[name]
        if not lo <= len(args) <= hi:
            model.check_arguments(name, args)
        if rid is not None:
            if rid.__class__ is not str:
                raise BadArguments(f"request id must be a string, got {type(rid).__name__}")
            first = self.live_dedup.get(rid)
            if first is not None:
                # Idempotency: a known request id takes effect once; answer with its outcome.
                return _result(name, {"status": first[3], "value": first[4], "error": first[5]})
        seq = self.seq + 1
        try:
            rec = Record(self.name, seq, self.clock.tick(), rid or "", name, args)
            payload = codec.encode_record(rec)
        except (TypeError, ValueError, OverflowError, codec.msgspec.EncodeError) as exc:
            raise BadArguments(f"arguments of {name!r} cannot be encoded as plain data: {exc}") from None
        if len(payload) > journal.RECORD_BYTES_MAX:
            raise BadArguments(f"arguments of {name!r} encode to {len(payload)} bytes, more than the "
                               f"{journal.RECORD_BYTES_MAX} a record may hold")
        # Apply exactly what replay will read (flat arguments read back identical).
        if any(a.__class__ not in _FLAT for a in args):
            rec = codec.decode_record(payload)
        self.writer.append((payload,), self.key)
        if self._fault_on:
            self._fault("between-fsync-and-apply")
        self.seq = seq
        self.own_horizon = rec.hlc
        before = codec.digest_of(self.live_root) if self.check_transactions else None
        out = model.apply(self.live_root, self.live_dedup, rec, self._ctx)
        self._version += 1
        if before is not None:
            self._check_partial(rec, out, before)
        if self.committed_root is not None:
            self._remember(rec, out)
            self.tentative.append(rec)
        else:
            if rid:
                self._remember(rec, out)
            self.committed_cursors[self.name] = seq
            self.frontier = self.clock.last
        status = out["status"]
        if status == OK:
            return out["value"]
        return _result(name, out)

    def execute_many(self, requests: Iterable) -> list[dict]:
        """Commit a batch of (tx, args, rid) with one write and one fsync; apply in order.

        Every request is checked before anything is written: one bad request refuses the
        whole batch. Returns one outcome dict per request: {"status": "ok"|"rejected"|
        "error", "value", "error"} (+ "duplicate_of" for a request id already known).
        """
        if self.closed or not self.joined or self.lease.lost:
            self._check_writable()
        model = self.model
        transactions = model.transactions
        arity = model._arity
        dedup = self.live_dedup
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
                    plans.append({"status": first[3], "value": first[4], "error": first[5],
                                  "duplicate_of": f"{first[1]}:{first[2]}"})
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
            try:
                chunks = _encode_batches(fresh, batch=len(fresh) > 1)
            except (TypeError, ValueError, OverflowError, codec.msgspec.EncodeError) as exc:
                raise BadArguments(f"arguments cannot be encoded as plain data: {exc}") from None
            # Apply exactly what replay will read: flat arguments (str, int, float, bool,
            # None, bytes) read back identical, so only other batches are decoded again.
            if all(a.__class__ in _FLAT for rec in fresh for a in rec.args):
                decoded = fresh
            else:
                decoded = [rec for payload in chunks for rec in
                           (codec.decode_batch(payload) if len(fresh) > 1 else [codec.decode_record(payload)])]
            self.writer.append(chunks, self.key, count=len(fresh), batch=len(fresh) > 1)
            if self._fault_on:
                self._fault("between-fsync-and-apply")
            self.seq = seq
            self.own_horizon = decoded[-1].hlc
            records = list(zip(index, decoded))
        # Apply in order, only now that the batch is durable.
        multi = self.committed_root is not None
        outs: list = plans
        apply = model.apply
        root, ctx, check = self.live_root, self._ctx, self.check_transactions
        for i, rec in records:
            before = codec.digest_of(root) if check else None
            out = apply(root, dedup, rec, ctx)
            if before is not None:
                self._check_partial(rec, out, before)
            outs[i] = out
            if multi or rec.rid:
                self._remember(rec, out)
        if records:
            if multi:
                self.tentative.extend(rec for _i, rec in records)
            else:
                self.committed_cursors[self.name] = records[-1][1].seq
        if records:
            self._version += 1
            if not multi:
                self.frontier = self.clock.last
        for i, plan in enumerate(outs):
            if isinstance(plan, int):
                first = dict(records)[plan]
                outs[i] = dict(outs[plan], duplicate_of=first.record_id)
        return outs

    def _check_partial(self, rec: Record, out: dict, before: str) -> None:
        if out["status"] != OK and codec.digest_of(self.live_root) != before:
            self.partial_mutations += 1
            log.warning("transaction %s%s (%s) was %s but left a partial mutation behind: raise Rejected "
                        "before mutating. Every master replays it the same way, so they still agree",
                        rec.tx, tuple(rec.args), rec.record_id, out["status"])

    def _remember(self, rec: Record, out: dict) -> None:
        if rec.master != self.name:
            return
        if not rec.rid and self.committed_root is None:
            return  # alone, an outcome never changes: the caller already has it
        outcomes = self.outcomes
        outcomes[rec.rid or f"{rec.master}:{rec.seq}"] = (rec.hlc, out)
        if len(outcomes) > 2 * OUTCOMES_KEPT:
            # Keep the newest OUTCOMES_KEPT (dicts keep insertion order).
            for key in list(itertools.islice(outcomes, len(outcomes) - OUTCOMES_KEPT)):
                del outcomes[key]

    def _write_tick(self) -> None:
        rec = Record(self.name, self.seq + 1, self.clock.tick(), "", codec.TICK, ())
        self.writer.append([codec.encode_record(rec)], self.key)
        self.seq = rec.seq
        self.own_horizon = rec.hlc
        if self.committed_root is not None:
            self.tentative.append(rec)
        else:
            self.committed_cursors[self.name] = rec.seq

    # -- reading ---------------------------------------------------------------------

    def query(self, q, *args) -> Any:
        """Run a query on the live state (reads this master's own writes at once)."""
        fn = self.model.queries.get(q) if isinstance(q, str) else None
        if fn is None:
            fn = self.model.query_fn(q)
        return fn(self.live_root, *args)

    def outcome(self, rid: str) -> dict | None:
        """The recorded outcome of a request id (or `master:seq`), with `committed`."""
        first = self.live_dedup.get(rid)
        if first is not None:
            return {"status": first[3], "value": first[4], "error": first[5], "record": f"{first[1]}:{first[2]}",
                    "committed": first[0] <= self.frontier}
        kept = self.outcomes.get(rid)
        if kept is None:
            return None
        hlc, out = kept
        return dict(out, committed=hlc <= self.frontier)

    # -- sync ------------------------------------------------------------------------

    def sync(self, *, _again: bool = False) -> dict:
        """Catch up with every member now. Idempotent: call it as often as you like.

        Returns a report: records applied per peer, whether a rebase happened, whether a
        tick was written, the frontier, errors per peer.
        """
        if self.closed:
            raise InvariantViolation(f"sync on closed master {self.name!r}")
        started = time.perf_counter()
        # 1. Membership: retirements, newcomers.
        self.retired = membership.read_retired(self.shared)
        if self.name in self.retired:
            self.last_error = f"master {self.name!r} was retired by the operator; it takes no more writes"
            self.joined = False
        for m in folder.list_masters(self.shared):
            if m != self.name:
                self._peer(m)
        if self.committed_root is None and any(m not in self.retired for m in self.peers):
            # Not alone any more: from now on records commit only below the frontier.
            self._make_committed_copy()
        # 2. Read every peer's new records.
        new: dict[str, list] = {}
        for m, peer in self.peers.items():
            recs = self._read_peer(peer)
            if recs:
                new[m] = recs
        if self._rejoin:
            self._rejoin = False
            if not _again:
                log.warning("master %s: records it needs were collected before it was counted; "
                            "joining again from the newest snapshot", self.name)
                self._restart_join()
                return self.sync(_again=True)
        # 3. Apply them in key order (fast path or rebase).
        applied, rebased = self._ingest(new)
        # 4. Count newcomers (ack) and stop counting the retired.
        self._ack_newcomers()
        # 5. Joining: done once every member counts us.
        if not self.joined and self.name not in self.retired:
            self._try_complete_join()
        # 6. Tick when a peer's real record waits on us.
        ticked = False
        if self.joined and self.writer is not None and not self.lease.lost:
            waiting = max((p.max_real_hlc for p in self.peers.values() if p.counted), default=0)
            # A master that never wrote is counted by others at their acknowledgement,
            # which may lie below records it already holds (a joiner's snapshot): its
            # first tick lifts its horizon past all of them.
            first = self.seq == 0 and any(p.counted for p in self.peers.values())
            if waiting > self.own_horizon or first:
                self._write_tick()
                ticked = True
        # 7. Move the frontier and commit.
        self._advance_frontier()
        # 8. Garbage, then publish what we know -- unless another process owns the name now:
        # then nothing in that folder is ours to write any more (one writer per file).
        if not self.lease.lost:
            self._collect_garbage()
            self._publish_progress()
        errors = {m: p.error for m, p in self.peers.items() if p.error}
        return {"master": self.name, "applied": applied, "rebased": rebased, "ticked": ticked,
                "frontier": self.frontier, "tentative": self._tentative_real(), "errors": errors,
                "held": {m: p.held for m, p in self.peers.items() if p.held},
                "joined": self.joined, "duration_ms": round((time.perf_counter() - started) * 1000, 3)}

    def _read_peer(self, peer: Peer) -> list:
        reader = peer.reader
        before = (reader.last_seq, reader.last_hlc)
        res = reader.read_new()
        peer.torn = res.torn
        recs = res.records
        peer.error = str(res.error) if res.error is not None else None
        if res.error is not None and not self.joined and res.error.gap:
            # Joining, step 1 again: segments we needed were collected before our
            # announcement reached that member. Nothing is written yet: start over.
            self._rejoin = True
        peer.held = None
        cut = self.retired.get(peer.name)
        # Where reading must stop, if anywhere. A journal's seq and hlc only increase, so
        # each check looks at one end or bisects; only the transaction names need a pass.
        stop = len(recs)
        if recs:
            if recs[0].hlc <= self.frontier and peer.counted:
                stop = 0
                peer.error = str(InvariantViolation(
                    f"record of {peer.name!r} seq {recs[0].seq} has hlc {recs[0].hlc} at or below the "
                    f"committed frontier {self.frontier}: ordering protocol broken; not applied"))
                log.error("%s", peer.error)
            unknown = {r.tx for r in recs} - self.model.transactions.keys() - {codec.TICK}
            if unknown:
                i = next(i for i, r in enumerate(recs) if r.tx in unknown)
                if i < stop:
                    stop = i
                    peer.error = str(UnknownRecordTransaction(
                        f"record names transaction {recs[i].tx!r}, which model {self.model.name!r} does not "
                        "declare (version skew: deploy the code that declares it; reading resumes by itself)",
                        master=peer.name, seq=recs[i].seq))
            if self.clock.too_far_ahead(recs[-1].hlc):
                i = bisect.bisect_left(recs, True, key=lambda r: self.clock.too_far_ahead(r.hlc) > 0)
                if i < stop:
                    ahead = self.clock.too_far_ahead(recs[i].hlc)
                    stop, peer.held = i, (f"clock of {peer.name!r} is {ahead + self.clock.drift_max_ms} ms ahead "
                                          f"of ours (more than the {self.clock.drift_max_ms} ms allowed); waiting")
            if cut is not None and recs[-1].seq > cut:
                i = bisect.bisect_right(recs, cut, key=_seq)
                if i < stop:
                    stop, peer.held = i, f"retired at seq {cut}"
        stop = None if stop == len(recs) else stop
        if stop is not None:
            recs = recs[:stop]
            last = recs[-1] if recs else None
            reader.rewind(last.seq if last else before[0], last.hlc if last else before[1])
        if peer.error:
            self.last_error = peer.error
            log.error("reading %s: %s", peer.name, peer.error)
        if recs:
            peer.horizon = max(peer.horizon, recs[-1].hlc)
            for rec in reversed(recs):
                if rec.tx != codec.TICK:
                    peer.max_real_hlc = max(peer.max_real_hlc, rec.hlc)
                    break
        return recs

    def _ingest(self, new: dict[str, list]) -> tuple[dict, bool]:
        """Apply newly read records in key order; rebase if one orders before applied ones."""
        applied = {m: len(r) for m, r in new.items()}
        incoming = [r for recs in new.values() for r in recs]
        if not incoming:
            return applied, False
        if len(new) > 1:
            incoming.sort(key=_key)
        self.clock.observe(incoming[-1].hlc)
        self._version += 1
        with codec.gc_paused():
            if self.committed_root is None:
                # Sole member (or recovering one): everything read commits in order at once.
                self.model.replay(self.live_root, self.live_dedup, incoming, self._ctx)
                cursors = self.committed_cursors
                for m, recs in new.items():
                    cursors[m] = recs[-1].seq
                return applied, False
            if (len(incoming) * COPY_PER_APPLY >= _size(self.committed_root)
                    and self._commits_at_once(incoming[-1].hlc) and not any(r.tx for r in self.tentative)):
                # Nothing tentative but ticks (live equals committed), everything new is at or
                # below the frontier this sync will reach, and there are enough records that
                # applying them twice costs more than a copy of the state: apply them once, to
                # the committed state, and let live be a copy of it. Tentative ticks stay.
                self.model.replay(self.committed_root, self.committed_dedup, incoming, self._ctx)
                cursors = self.committed_cursors
                for m, recs in new.items():
                    cursors[m] = recs[-1].seq
                self.live_root = self.model.copy_state(self.committed_root)
                self.live_dedup = dict(self.committed_dedup)
                return applied, False
            if not self.tentative or _key(incoming[0]) > _key(self.tentative[-1]):
                # Fast path: everything new orders after everything applied.
                self.model.replay(self.live_root, self.live_dedup, incoming, self._ctx)
                self.tentative.extend(incoming)
                return applied, False
            self._rebase(incoming)
        return applied, True

    def _commits_at_once(self, hlc: int) -> bool:
        """Will this sync's frontier reach `hlc`? (Not when a newcomer gets counted now.)"""
        if any(not p.counted and m not in self.retired for m, p in self.peers.items()):
            return False  # it gets counted this sync, at the current frontier
        f = self.clock.last
        for peer in self.peers.values():
            if peer.counted and peer.horizon < f:
                f = peer.horizon
        return hlc <= f

    def _rebase(self, incoming: list) -> None:
        """Restore the committed state and replay every tentative record in key order."""
        merged = self.tentative + incoming
        merged.sort(key=_key)
        self.live_root = self.model.copy_state(self.committed_root)
        self.live_dedup = dict(self.committed_dedup)  # entries are replaced, never mutated
        apply = self.model.apply
        for rec in merged:
            if rec.tx == codec.TICK:
                continue
            out = apply(self.live_root, self.live_dedup, rec, self._ctx)
            if rec.master == self.name:
                before = self.outcomes.get(rec.rid or rec.record_id)
                if before is not None and before[1]["status"] != out["status"]:
                    self.outcomes_changed += 1
                    log.warning("rebase changed the outcome of %s (%s%s) from %s to %s", rec.record_id, rec.tx,
                                rec.args, before[1]["status"], out["status"])
                self._remember(rec, out)
        self.tentative = merged
        self.rebases += 1
        self._version += 1

    def _ack_newcomers(self) -> None:
        """Count every member we see from now on, at our current frontier (joining, step 2)."""
        for m, peer in self.peers.items():
            if m in self.retired:
                # Stop counting a retired member once we have read everything up to its cut.
                if peer.counted and peer.reader.last_seq >= self.retired[m]:
                    peer.counted = False
                continue
            if m not in self.acks:
                if not os.path.isdir(folder.master_dir(self.shared, m)):
                    continue
                self.acks[m] = self.frontier
                if self.committed_root is None:
                    self._make_committed_copy()
                peer.counted = True
                peer.horizon = max(peer.horizon, self.frontier)
                log.info("master %s now counts %s (acknowledged at frontier %d)", self.name, m, self.frontier)
            elif not peer.counted:
                peer.counted = True
                peer.horizon = max(peer.horizon, self.acks[m])

    def _make_committed_copy(self) -> None:
        check(not self.tentative, "committed copy made while tentative records exist")
        self.committed_root = self.model.copy_state(self.live_root)
        self.committed_dedup = dict(self.live_dedup)  # entries are replaced, never mutated

    def _advance_frontier(self) -> None:
        f = self.clock.last
        for peer in self.peers.values():
            if peer.counted:
                f = min(f, peer.horizon)
        check(f >= self.frontier or self.committed_root is None,
              f"frontier of {self.name} would move backwards: {self.frontier} -> {f}")
        if f <= self.frontier:
            return
        self.frontier = f
        if self.committed_root is None:
            return
        # Commit, in key order, every tentative record at or below the frontier.
        tentative = self.tentative
        n = bisect.bisect_right(tentative, f, key=_hlc)
        if n:
            done = tentative[:n]
            with codec.gc_paused():
                self.model.replay(self.committed_root, self.committed_dedup, done, self._ctx)
            cursors = self.committed_cursors
            for rec in done:
                cursors[rec.master] = rec.seq
            del tentative[:n]

    def _peer_progress(self, m: str) -> Progress | None:
        """Another master's progress; a damaged one counts as absent (and is reported)."""
        try:
            return read_progress(self.shared, m, self.key)
        except Corruption as exc:
            self.last_error = str(exc)
            log.error("%s", exc)
            return None

    def _join_waiting_for(self) -> list[str]:
        founder = membership.read_founder(self.shared)
        others = set(folder.list_masters(self.shared)) | ({founder} if founder else set())
        others.discard(self.name)
        waiting = []
        for m in sorted(others - set(self.retired)):
            p = self._peer_progress(m)
            if p is None or self.name not in p.acks:
                waiting.append(m)
        return waiting

    def _try_complete_join(self) -> None:
        """Joining, step 3: once every member counts us, move our clock past their acks."""
        if self._join_waiting_for():
            return
        acks = []
        for m in folder.list_masters(self.shared):
            if m != self.name and m not in self.retired:
                p = self._peer_progress(m)
                acks.append(p.acks[self.name])
        self.clock.observe(max(acks, default=0))
        self.joined = True
        self._open_writer()
        try:
            os.unlink(folder.joining_path(self.shared, self.name))
        except FileNotFoundError:
            pass
        log.info("master %s joined the cluster (clock past %d); taking writes", self.name, max(acks, default=0))

    # -- snapshots and garbage ---------------------------------------------------------

    def snapshot(self) -> str:
        """Write the committed state at the frontier to ``snapshots/``. Returns its path."""
        if self.closed:
            raise InvariantViolation(f"snapshot on closed master {self.name!r}")
        if self.lease.lost:
            raise NotReady(self.lease.lost)
        if self.writer is not None and self.fsync_mode != "always":
            # The snapshot is fsynced: the records it covers must be durable first.
            self.writer.flush()
        root = self.committed_root if self.committed_root is not None else self.live_root
        dedup = self.committed_dedup if self.committed_root is not None else self.live_dedup
        body = SnapshotBody(master=self.name, model=self.model.name, frontier=self.frontier,
                            cursors=dict(self.committed_cursors), clock=self.clock.last,
                            members=sorted(m for m, p in self.peers.items() if p.counted),
                            digest=codec.digest_of(root, dedup),
                            root=_raw(root),
                            dedup=dedup)
        # Check the state survives the codec: a restart or a rebase would otherwise run
        # transactions on something else than what they ran on live.
        if decode_root(body, self.model.state_type) != root:
            raise UnsupportedState(
                f"the state of model {self.model.name!r} does not read back equal from the codec (a "
                "container typed loosely, e.g. `dict` or `list`, holding msgspec Structs, tuples or "
                "sets, decodes as plain data). Annotate the field types of the state; no snapshot "
                "was written")
        snap_dir = folder.snapshots_dir(self.shared, self.name)
        path = write_snapshot(snap_dir, body, self.key, self._fault)
        self.snapshot_frontier = body.frontier
        self.kept_snapshots[body.frontier] = dict(body.cursors)
        keep = sorted(self.kept_snapshots)[-self.snapshots_kept:]
        self.kept_snapshots = {f: self.kept_snapshots[f] for f in keep}
        # Publish what the kept snapshots need before deleting the others, then prune:
        # the newest few stay (a joiner loading a deleted one retries on ENOENT).
        self._publish_progress()
        for f, old in list_snapshots(snap_dir):
            if f not in self.kept_snapshots:
                try:
                    os.unlink(old)
                except FileNotFoundError:
                    pass
        self._unknown_snapshots = False
        self._publish_progress()
        return path

    @property
    def snapshot_cursors(self) -> dict[str, int]:
        """Per member, the last seq that every kept own snapshot covers (GC's floor)."""
        if self._unknown_snapshots or not self.kept_snapshots:
            return {}
        floor: dict[str, int] = {}
        cursor_sets = list(self.kept_snapshots.values())
        for m in set().union(*cursor_sets):
            floor[m] = min(c.get(m, 0) for c in cursor_sets)
        return floor

    def _collect_garbage(self) -> None:
        """Delete own segments every member has read and every member's snapshot covers."""
        if self.writer is None:
            return
        segments = journal.list_segments(folder.journal_dir(self.shared, self.name))
        if len(segments) < 2:
            return
        covered = self.snapshot_cursors.get(self.name, 0)
        for m, peer in self.peers.items():
            if m in self.retired:
                continue
            p = self._peer_progress(m)
            if p is None:
                if peer.counted:
                    return  # a member that never published: keep everything
                continue
            covered = min(covered, p.cursors.get(self.name, 0))
            if os.path.exists(folder.joining_path(self.shared, m)):
                continue  # a joiner replays from the snapshot it loaded: its cursors are enough
            covered = min(covered, p.snapshot_cursors.get(self.name, 0))
        now = time.monotonic()
        for (first, path), (nxt, _p) in zip(segments, segments[1:]):
            if nxt - 1 > covered or path == self.writer.path:
                break
            seen = self._gc_seen.setdefault(path, now)
            if now - seen >= self.gc_grace_s:
                self._fault("before-gc-unlink")
                for gone in (path, journal.seal_path(path)):
                    try:
                        os.unlink(gone)
                    except FileNotFoundError:
                        pass
                self._gc_seen.pop(path, None)
                log.info("collected segment %s (every member has read and snapshotted up to seq %d)",
                         path, covered)

    # -- reporting -------------------------------------------------------------------

    def _tentative_real(self) -> int:
        return sum(1 for r in self.tentative if r.tx)

    def digest(self) -> str:
        """Canonical digest of the live state (cached until the next apply)."""
        if self._digest_cache is None or self._digest_cache[0] != self._version:
            self._digest_cache = (self._version, codec.digest_of(self.live_root, self.live_dedup))
        return self._digest_cache[1]

    def _cursors(self) -> dict[str, int]:
        """For every member, this master included, the last seq read."""
        cursors = {m: p.reader.last_seq for m, p in self.peers.items()}
        cursors[self.name] = self.seq
        return cursors

    def _progress(self) -> Progress:
        cursors = self._cursors()
        # The digest costs a pass over the whole state: publish it once the state has held
        # still for a whole sync (nothing tentative, nothing applied since the last one),
        # which is when operators compare digests, not at every sync under load.
        tentative = self._tentative_real()
        quiet = tentative == 0 and self._version == self._version_at_last_publish
        self._version_at_last_publish = self._version
        return Progress(master=self.name, joined=self.joined, seq=self.seq, horizon=self.own_horizon,
                        clock=self.clock.last, frontier=self.frontier, cursors=cursors,
                        snapshot_frontier=self.snapshot_frontier, snapshot_cursors=self.snapshot_cursors,
                        kept_snapshots=[[f, c] for f, c in sorted(self.kept_snapshots.items())],
                        acks=dict(self.acks), digest=self.digest() if quiet else "",
                        digest_frontier=self.frontier if quiet else -1, tentative=tentative,
                        rebases=self.rebases, last_error=self.last_error)

    def _publish_progress(self, force: bool = False) -> None:
        """Publish progress when it changed (an idle cluster writes nothing)."""
        p = self._progress()
        same = encode_progress(p, None)
        if same == self._published and not force:
            return
        p.updated = time.time()
        write_progress(self.shared, p, self.key, self._fault)
        self._published = same

    def status(self) -> dict:
        """A dict describing this master (see DESIGN §6 for the fields tools rely on)."""
        cursors = self._cursors()
        now = self._now_ms()
        lag = {}
        for m, peer in self.peers.items():
            p = self._peer_progress(m)
            lag[m] = max(0, p.seq - peer.reader.last_seq) if p is not None else None
        return {
            "master": self.name, "joined": self.joined, "seq": self.seq, "clock": self.clock.last,
            "frontier": self.frontier, "tentative": self._tentative_real(), "cursors": cursors,
            "horizons": {m: p.horizon for m, p in self.peers.items()} | {self.name: self.own_horizon},
            "lag": lag,  # records each peer has published that this master has not read yet
            "horizon_age_ms": {m: max(0, now - physical_ms(p.horizon)) if p.horizon else None
                               for m, p in self.peers.items()},
            "counted": sorted(m for m, p in self.peers.items() if p.counted),
            "retired": dict(self.retired),
            "digest": self.digest(), "rebases": self.rebases, "outcomes_changed": self.outcomes_changed,
            "partial_mutations": self.partial_mutations,
            "state_size": _size(self.live_root), "request_ids": len(self.live_dedup), "fsync": self.fsync_mode,
            "snapshot_frontier": self.snapshot_frontier,
            "peer_errors": {m: p.error for m, p in self.peers.items() if p.error},
            "held": {m: p.held for m, p in self.peers.items() if p.held},
            "last_error": self.last_error or self.lease.lost,
        }

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Flush the journal, publish progress and release the lease. Idempotent."""
        if self.closed:
            return
        try:
            if self.writer is not None:
                # A master whose name was taken over writes nothing more in its folder.
                self.writer.close(seal=not self.lease.lost)
            if not self.lease.lost:
                self._publish_progress()
        finally:
            self.closed = True
            self._release()

    def _release(self) -> None:
        self.lease.release()

    def crash(self) -> None:
        """Tests: drop this master as a kill -9 would (nothing flushed, lease left behind)."""
        self.closed = True
        if self.writer is not None:
            self.writer._closed = True
            try:
                os.close(self.writer._fd)
            except OSError:
                pass
        self.lease.abandon()

    def __enter__(self) -> "Master":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _key(rec: Record) -> tuple:
    return (rec.hlc, rec.master, rec.seq)


def _hlc(rec: Record) -> int:
    return rec.hlc


def _seq(rec: Record) -> int:
    return rec.seq


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


def _size(root: Any) -> int:
    """A cheap size of the state: total length of its top-level collections."""
    if isinstance(root, dict):
        return sum(len(v) if isinstance(v, (dict, list, set, tuple)) else 1 for v in root.values())
    return len(root) if isinstance(root, (list, tuple, set)) else 1


def _raw(value: Any) -> codec.msgspec.Raw:
    """The state's bytes, embedded as-is in a snapshot body."""
    return codec.msgspec.Raw(codec.encode_record(value))


def _result(tx, out: dict) -> Any:
    status = out["status"]
    if status == OK:
        return out["value"]
    if status == REJECTED:
        raise Rejected(out["error"])
    name = tx if isinstance(tx, str) else getattr(tx, "tx_name", repr(tx))
    etype, _, msg = (out["error"] or "").partition(": ")
    raise TransactionFailed(name, etype, msg)
