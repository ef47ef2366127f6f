"""The master: one process's full copy of the state, its journal, and sync with the others.

The state is one copy, held by the master's `Replica` (`workers.prevalence.replica`):
committed records (at or below the frontier) plus the tentative ones above it, applied in
key order. Local transactions apply at once, so a caller reads its own write; a record
that arrives out of order rebases the tentative window by undoing it (change-tracked
state), never by copying the state. With one member the frontier is the master's own
clock, so everything commits at once.

Its behaviour comes from one mixin per concept, in the modules beside it:

* `recovery` -- opening: recover, found, or start joining; own journal's torn tail.
* `writing` -- own transactions: execute, execute_many, ticks, remembered outcomes.
* `syncing` -- catching up with the others: read, order, apply or rebase, ack, frontier.
* `housekeeping` -- own snapshots and garbage collection of own journal segments.
* `reporting` -- progress published to the folder, status and digest for operators.

This module holds the state itself: opening, reading, closing.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .. import codec, journal
from ..clock import HybridClock, wall_ms
from ..errors import LeaseLost, StorageError
from ..model import Model
from ..replica import replica_for
from ..writer import JournalWriter
from . import folder
from .housekeeping import Housekeeping
from .lease import LEASE_TTL_S_DEFAULT, Lease
from .reader import JournalReader
from .recovery import Recovering
from .shareclock import ShareClock
from .reporting import Reporting
from .syncing import Peer, Syncing
from .writing import Writing


class Master(Recovering, Writing, Syncing, Housekeeping, Reporting):
    """One master. Open with `Master.open`; not thread-safe (one caller thread)."""

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, model: Model, shared_dir: str, name: str, *, fsync: str = "always",
             cluster_key: bytes | None = None, fsync_interval_ms: int = journal.FSYNC_INTERVAL_MS_DEFAULT,
             segment_bytes_max: int = journal.SEGMENT_BYTES_MAX_DEFAULT,
             journal_reserve_bytes: int | None = None,
             lease_ttl_s: float = LEASE_TTL_S_DEFAULT, gc_grace_s: float = 60.0,
             snapshots_kept: int = 2, drift_max_ms: int = 60_000,
             now_ms: Callable[[], int] = wall_ms, share_now_ms: Callable[[], int | None] | None = None,
             fault: Callable[[str], None] | None = None,
             check_transactions: bool | None = None, deferred_sync: bool = False) -> "Master":
        """Open (recover, or found, or join) the master `name` on `shared_dir`.

        Args:
            model: the application's `Model`.
            shared_dir: the shared folder (NFS in production).
            name: this master's name: 1-64 of [A-Za-z0-9_.-].
            fsync: "always" | "interval" | "never" (see `writer.JournalWriter`).
            cluster_key: when set, every record, snapshot and small file (progress, lease,
                seal, founder, retirement) is signed (HMAC-SHA256) and unsigned or badly
                signed ones are treated as corrupt.
            segment_bytes_max: journal segments roll past this size.
            journal_reserve_bytes: zeros the journal writer keeps ahead of its offset so
                that a commit syncs data only; None = auto (`writer.RESERVE_BYTES_DEFAULT`
                on a local disk, 0 on NFS and other network filesystems).
            gc_grace_s: a journal segment is deleted this long after it became collectable.
            now_ms: wall clock in ms (tests inject one).
            drift_max_ms: how far clocks may disagree: a peer's record stamped further
                ahead of this master's clock is held (read once time catches up), and this
                master refuses writes (`ClockSkew`) while its wall clock and the shared
                folder's differ by more.
            share_now_ms: the shared folder's clock in ms (None while unknown), the
                reference this master's wall clock is checked against (`clock`). None (the
                default) = measured from the modification time of the lease file at each
                heartbeat (`shareclock`) when `now_ms` is the real wall clock; with an
                injected `now_ms` and no `share_now_ms`, nothing is checked (a test's fake
                wall clock has no file server to disagree with).
            fault: test hook called with a point name at each crash-worthy step.
            deferred_sync: with fsync "always", `execute` and `execute_many` start the
                commit's sync in the kernel and return before it completes (Linux; elsewhere
                they sync inline). The caller must call `settle()` before the outcome leaves
                the process; every other method of the master settles first. The Celery
                tier settles just before it publishes a result, so the sync overlaps
                Celery's own work on the task (`workers.master.results`). DESIGN invariant 1
                (success means on stable storage) then holds for the answer that leaves
                the process, not for the return of the Python call; off by default.
            check_transactions: check mode (slow: encodes the state three times per
                record): every record is applied, undone and applied again, and the state
                compared each time, so a change the undo log did not see, or a
                non-deterministic transaction, stops the master with an error naming the
                transaction. None (the default) = on when the environment sets
                ``PREVALENCE_CHECK_TRANSACTIONS=1`` (the test suite does).

        Raises:
            LeaseHeld: another live process holds the name.
            RetiredMaster: the name was retired.
            LostRecords: records this journal published (its progress, a seal, a snapshot,
                a peer's cursor says so) are no longer in it (see errors).
            Corruption: this master's own journal is damaged before its end.
            BadFile: one of its files is not what it must be (a lease that does not parse,
                a symbolic link where a folder or file should be ...), naming it.
        """
        if fsync not in journal.FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(journal.FSYNC_MODES)}, got {fsync!r}")
        folder.check_name(name)
        self = cls.__new__(cls)
        self._init(model, shared_dir, name, fsync=fsync, key=cluster_key,
                   fsync_interval_ms=fsync_interval_ms, segment_bytes_max=segment_bytes_max,
                   journal_reserve_bytes=journal_reserve_bytes,
                   lease_ttl_s=lease_ttl_s, gc_grace_s=gc_grace_s, snapshots_kept=snapshots_kept,
                   drift_max_ms=drift_max_ms, now_ms=now_ms, share_now_ms=share_now_ms, fault=fault)
        if check_transactions is None:
            check_transactions = os.environ.get("PREVALENCE_CHECK_TRANSACTIONS", "") in ("1", "on", "true")
        self.replica.check = bool(check_transactions) and model.tracking
        self.deferred_sync = deferred_sync and fsync == "always"
        try:
            # No collections while millions of records are read and applied: the first one
            # after each chunk walked every record's arguments (8-15% of a 1M-record
            # recovery here); `_recover` freezes what it built at the end.
            with codec.gc_paused():
                self._recover()
        except BaseException:
            self._release()
            raise
        return self

    def _init(self, model, shared, name, *, fsync, key, fsync_interval_ms, segment_bytes_max,
              journal_reserve_bytes, lease_ttl_s, gc_grace_s, snapshots_kept, drift_max_ms, now_ms,
              share_now_ms, fault):
        self.model = model
        self.shared = os.path.abspath(shared)
        self.name = name
        self.key = key
        self.fsync_mode = fsync
        self._fsync_interval_ms = fsync_interval_ms
        self._segment_bytes_max = segment_bytes_max
        self._journal_reserve_bytes = journal_reserve_bytes
        self.gc_grace_s = gc_grace_s
        self.snapshots_kept = snapshots_kept
        self._fault = fault or (lambda point: None)
        self._fault_on = fault is not None
        self.lease = Lease(self.shared, name, lease_ttl_s=lease_ttl_s, key=key)
        self._retired_path = folder.retired_path(self.shared, name)
        if share_now_ms is None and now_ms is wall_ms:
            share_clock = ShareClock()
            self.lease.on_written = share_clock.measured
            share_now_ms = share_clock
        self.clock_reference = ("none" if share_now_ms is None else
                                "shared folder" if isinstance(share_now_ms, ShareClock) else "injected")
        self.clock = HybridClock(now_ms=now_ms, drift_max_ms=drift_max_ms, reference_ms=share_now_ms)
        self._now_ms = now_ms
        self.writer: JournalWriter | None = None
        self._on_sync = None
        self.joined = False
        self.closed = False
        # True while something must happen before the live state may be read: a deferred
        # commit's sync to wait for, or a failed one to report (`settle`).
        self._unsettled = False
        self.failed: str | None = None
        self.deferred_sync = False
        self.seq = 0                     # last own seq written
        self.own_horizon = 0             # hlc of the last own record
        self.replica = replica_for(model)  # the state, the tentative window, frontier and cursors
        self.peers: dict[str, Peer] = {}
        self.acks: dict[str, int] = {}
        self.retired: dict[str, int] = {}
        self.outcomes: dict = {}         # own request id (or master:seq) -> (hlc, outcome)
        self._committed_rids: list[str] = []  # own request ids committed since the last drain
        self.outcomes_changed = 0
        self.last_error: str | None = None
        self.snapshot_frontier = -1
        # Own snapshots kept on disk: frontier -> cursors. GC keeps what the *oldest* of
        # them needs, so that falling back from a damaged newest snapshot still works.
        self.kept_snapshots: dict[int, dict] = {}
        self._unknown_snapshots = False
        self._digest_cache: tuple[int, str] | None = None
        self._published: bytes | None = None
        self._gc_seen: dict[str, float] = {}
        self._own_reader: JournalReader | None = None
        self._rejoin = False
        self._version_at_last_publish = -1
        self._version_at_last_status = -1

    @property
    def on_sync(self):
        """Called with the seconds each commit's journal sync took (metrics), or None."""
        return self._on_sync

    @on_sync.setter
    def on_sync(self, fn) -> None:
        self._on_sync = fn
        if self.writer is not None:
            self.writer.on_sync = fn

    @property
    def frontier(self) -> int:
        """The stable frontier: records at or below it are committed."""
        return self.replica.frontier

    @property
    def rebases(self) -> int:
        return self.replica.rebases

    # -- reading ---------------------------------------------------------------------

    def settle(self) -> None:
        """Wait until the last deferred commit is durable (see `deferred_sync`); cheap when
        nothing is pending.

        Raises:
            StorageError: the sync failed. What reached the disk is unknown while the live
                state holds the commit, so the master closes itself and releases its name:
                open it again to recover from what is on disk. Every later call raises too.
            LeaseLost: this process may have lost its name while the sync ran (paused past
                its lease): the commit is not acknowledged, and the master closes itself
                likewise.
        """
        if not self._unsettled:
            return
        if self.failed is not None:
            raise StorageError(self.failed)
        try:
            self.writer.settle()
            self._unsettled = False
        except (StorageError, LeaseLost) as exc:
            # The sync failed, or this process may have lost its name meanwhile (the write
            # is then not acknowledged): the live state holds a commit nobody may see.
            self.failed = self.last_error = (
                f"{exc}. Master {self.name!r} closed itself: its live state may hold a commit that "
                "is not on disk or not acknowledged; open it again to recover from the journal")
            self.closed = True
            try:
                self.writer.close(seal=False)
            finally:
                self._release()
            raise type(exc)(self.failed) from exc

    def query(self, q, *args) -> Any:
        """Run a query on the live state (reads this master's own writes at once)."""
        if self._unsettled:
            self.settle()
        fn = self.model.queries.get(q) if isinstance(q, str) else None
        if fn is None:
            fn = self.model.query_fn(q)
        return fn(self.replica.state, *args)

    def outcome(self, rid: str) -> dict | None:
        """The recorded outcome of a request id (or `master:seq`), with `committed`."""
        if self._unsettled:
            self.settle()
        first = self.replica.dedup.get(rid) if rid else None  # "" is no request id
        if first is not None:
            # A copy: the recorded outcome is part of the digest (and answers duplicates).
            return {"status": first.status, "value": codec.detached(first.value), "error": first.error,
                    "record": first.record_id, "committed": first.hlc <= self.frontier}
        kept = self.outcomes.get(rid)
        if kept is None:
            return None
        hlc, out = kept
        return dict(out, value=codec.detached(out["value"]), committed=hlc <= self.frontier)

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Flush the journal, publish progress and release the lease. Idempotent."""
        if self.closed:
            return
        if self._unsettled:
            self.settle()
        try:
            # A master whose name may have been taken over (re-checked if it was paused past
            # its lease) writes nothing more in its folder: no seal, no progress.
            holds = self.lease.holds()
            if self.writer is not None:
                self.writer.close(seal=holds)
            if holds:
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
            self.writer.abandon()
        self.lease.abandon()

    def __enter__(self) -> "Master":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
