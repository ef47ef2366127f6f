"""The follower: a read-only replica of the cluster inside any process that mounts the share.

A web application opens one (`Follower.open(model, shared_dir)`) and queries it in
process, at memory speed, instead of a round trip through Celery per read. A follower
writes nothing to the shared folder, holds no lease and is not a member: it never holds
back the frontier or garbage collection. It loads the newest snapshot of a member and
reads every member's journal after it, in key order, like a joiner that never joins.

Views
    ``"committed"`` (default): only records at or below the follower's frontier are
    applied; the state is exactly the committed state (no rebases, nothing that can
    change). ``"latest"``: every record read is applied at once (tentative ones too,
    rebased when an earlier one arrives), like a master's own view.

The frontier
    The lower of (a) the lowest frontier the members publish in their progress files
    (a member counts a joiner at its frontier, so nothing can be written at or below the
    lowest of them), read *before* the journals, and (b) the hlc of the last record read
    from each member (journals only grow upwards, and on NFS a reader may see a journal
    late). A member that is down therefore holds the follower's frontier as it holds
    everyone's; status says how stale the view is.

Catching up after garbage collection
    Members collect segments every member has read: a follower that fell behind finds a
    gap and reloads from the newest snapshot (status counts the reloads).

Read your writes
    A write's answer names its record (``"record": "master:seq"``);
    ``wait_for(token)`` returns once that record is applied in this view.

Threads
    One lock guards changes of the state: `sync` holds it while it applies (a round of at
    most `SYNC_CHUNK_RECORDS`). `query` takes no lock, seqlock-style (`tracked.ReadView`):
    its answer stands if no change began or ended while it ran, else it runs again under
    the lock. ``follow_interval_s`` runs `sync` in a daemon thread at that interval.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator

from .. import codec, tracked
from ..clock import physical_ms
from ..codec import Record
from ..errors import Corruption, InvariantViolation
from ..model import Model
from ..replica import Replica
from ..snapshot import list_snapshots, load_state
from . import folder, membership
from .progress import read_progress
from .reader import JournalReader

log = logging.getLogger("prevalence.follower")

#: Records read from all members in one round of a sync (bounded memory, bounded lock hold).
SYNC_CHUNK_RECORDS = 50_000
VIEWS = ("committed", "latest")


class Follower:
    """A read-only replica (module docstring). Open with `Follower.open`."""

    @classmethod
    def open(cls, model: Model, shared_dir: str, *, view: str = "committed",
             cluster_key: bytes | None = None, follow_interval_s: float | None = None) -> "Follower":
        """Load the newest snapshot of a member and catch up with every journal.

        Args:
            model: the cluster's `Model` (the same code the masters run).
            shared_dir: the shared folder, mounted read-only or read-write.
            view: "committed" (default) or "latest" (module docstring).
            cluster_key: the cluster's HMAC key, when it has one.
            follow_interval_s: sync in a background thread this often; None = only when
                `sync` or `wait_for` is called.

        Raises:
            ValueError: an unknown view. Corruption: no member's snapshot could be read
                while journals no longer start at seq 1.
        """
        if view not in VIEWS:
            raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
        self = cls.__new__(cls)
        self.model = model
        self._queries = model.queries  # the read path's lookup (`query`)
        self.shared = shared_dir
        self.key = cluster_key
        self.view = view
        self._lock = threading.RLock()
        # The lock-free read (`query`): its generation is odd while the state changes
        # (`_changing`); queries read without the lock and check it did not move meanwhile.
        self._view = tracked.ReadView(model.queries, self._query_locked)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0
        self.last_error: str | None = None
        self.last_sync_at: float | None = None
        self.closed = False
        self._load()
        self._view.state = self.replica.state
        # Reads go straight to the view's C method (no Python frame of `query` around it:
        # more than half of a point read's cost). `Follower.query` below says what it does.
        self.query = self._view.query
        self.sync()
        if follow_interval_s is not None:
            self._thread = threading.Thread(target=self._follow, args=(follow_interval_s,),
                                            name="prevalence-follower", daemon=True)
            self._thread.start()
        return self

    # -- base ------------------------------------------------------------------------------

    def _load(self) -> None:
        """Start from the newest readable snapshot of any member (else the initial state)."""
        body = None
        candidates = sorted((f, p, m) for m in folder.list_masters(self.shared)
                            for f, p in list_snapshots(folder.snapshots_dir(self.shared, m)))
        for _frontier, path, master in reversed(candidates):
            try:
                body, root = load_state(path, self.key, self.model, master=master)
                break
            except (Corruption, OSError) as exc:  # a damaged or collected one: an older one
                log.warning("follower: skipping snapshot %s: %s", path, exc)
                body = None
        replica = Replica(self.model)
        if body is None:
            replica.reset(self.model.root_factory(), {}, 0, {})
        else:
            replica.reset(root, dict(body.dedup), body.frontier, dict(body.cursors))
        if self.view == "latest":
            replica.become_multi()
        self.replica = replica
        self.readers: dict[str, JournalReader] = {}
        self._held: list[Record] = []  # committed view: read, above the frontier, key order
        self._horizons: dict[str, int] = {}
        self.base = f"snapshot {body.master}@{body.frontier}" if body is not None else "initial state"

    def _reader(self, m: str) -> JournalReader:
        reader = self.readers.get(m)
        if reader is None:
            reader = JournalReader(self.shared, m, self.replica.cursors.get(m, 0), 0, self.key)
            self.readers[m] = reader
        return reader

    # -- following -------------------------------------------------------------------------

    def sync(self) -> dict:
        """Catch up now: read every member's new records and move the frontier. Returns a
        report (records applied per member, frontier, errors per member, reloaded)."""
        if self.closed:
            raise InvariantViolation("sync on a closed follower")
        # Paused for the whole sync, as a master's (`Syncing._sync`): the records read are
        # freed by the time the collector runs again.
        with codec.gc_paused():
            return self._sync()

    def _sync(self) -> dict:
        applied: dict[str, int] = {}
        errors: dict[str, str] = {}
        reloaded = False
        # (a) The members' published frontiers, read before the journals (module doc).
        retired = membership.read_retired(self.shared)
        members = [m for m in folder.list_masters(self.shared)]
        published = []
        for m in members:
            if m in retired:
                continue
            try:
                p = read_progress(self.shared, m, self.key)
            except Corruption as exc:
                errors[m] = str(exc)
                p = None
            published.append(p.frontier if p is not None else 0)
        while True:
            new, more, gap = self._read_round(members, retired, errors)
            if gap:
                # Segments this follower still needed were collected: start over from the
                # newest snapshot (members publish them, and keep what they cover).
                with self._changing():
                    self._load()
                self.reloads += 1
                reloaded = True
                log.warning("follower: %s; reloaded from %s", gap, self.base)
                continue
            with self._changing():
                self._apply(new, applied)
                live = [self._horizons.get(m, 0) for m in members if m not in retired]
                frontier = min(published + live) if (published or live) else self.replica.frontier
                self._commit(frontier)
            if not more:
                break
        self.last_sync_at = time.time()
        self.last_error = next(iter(errors.values()), None)
        return {"applied": applied, "frontier": self.replica.frontier, "errors": errors,
                "reloaded": reloaded, "view": self.view}

    def _read_round(self, members, retired, errors) -> tuple[list[Record], bool, str | None]:
        """One round: every member's next records (bounded); (records, more to read, gap)."""
        share = max(1, SYNC_CHUNK_RECORDS // max(1, len(members)))
        new: list[Record] = []
        more = False
        for m in members:
            reader = self._reader(m)
            res = reader.read_new(records_max=share)
            if res.error is not None:
                if res.error.gap:
                    return [], False, f"a segment of {m!r} was collected before this follower read it"
                errors[m] = str(res.error)
            recs = res.records
            cut = retired.get(m)
            if cut is not None:
                recs = [r for r in recs if r.seq <= cut]
            unknown = next((r for r in recs if r.tx and r.tx not in self.model.transactions), None)
            if unknown is not None:
                errors[m] = (f"record {unknown.record_id} names transaction {unknown.tx!r}, which this "
                             "code does not declare (deploy the code that declares it)")
                keep = recs.index(unknown)
                recs = recs[:keep]
                reader.rewind(recs[-1].seq if recs else unknown.seq - 1, recs[-1].hlc if recs else 0)
            if recs:
                self._horizons[m] = recs[-1].hlc
                new += recs
                more = more or len(res.records) >= share
        new.sort(key=Record.key.fget)
        return new, more, None

    def _apply(self, new: list[Record], applied: dict[str, int]) -> None:
        for rec in new:
            applied[rec.master] = applied.get(rec.master, 0) + 1
        if self.view == "latest":
            self.replica.ingest(new)
        elif new:
            held = self._held
            if held and new[0].key < held[-1].key:
                held = sorted(held + new, key=Record.key.fget)
            else:
                held = held + new
            self._held = held

    def _commit(self, frontier: int) -> None:
        if frontier <= self.replica.frontier:
            return
        if self.view == "latest":
            self.replica.commit(frontier)
            return
        # Committed view: apply, in key order, what the frontier now covers.
        n = bisect.bisect_right(self._held, frontier, key=lambda r: r.hlc)
        done, self._held = self._held[:n], self._held[n:]
        self.replica.ingest(done)  # a sole replica: applied and committed at once
        self.replica.frontier = frontier

    def _follow(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 - a background thread must not die silently
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("follower: sync failed: %s", self.last_error)

    # -- reading ---------------------------------------------------------------------------

    def query(self, q: str | Callable, *args: Any) -> Any:
        """Run a query on this follower's view. Returns its value.

        Reads take no lock, as a seqlock's readers do: the query runs on the state as it
        is, and its answer stands if no change began or ended meanwhile (the view's
        generation even and unchanged); otherwise (or if it raised: a dict changing under
        an iteration) it runs again under the lock, which changes wait for. The GIL makes
        each step of the query see memory as the follow thread left it; the generation
        check makes the whole answer come from one state between two applied batches.
        (An open follower answers through `tracked.ReadView.query` directly.)

        Raises:
            UnknownQuery: the model declares no such query. Whatever the query raises
            (run under the lock, so it is not a read torn by a change).
        """
        return self._view.query(q, *args)

    def _query_locked(self, q: str | Callable, *args: Any) -> Any:
        fn = self._queries.get(q) if q.__class__ is str else None
        if fn is None:
            fn = self.model.query_fn(q)
        with self._lock:
            return fn(self.replica.state, *args)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold the lock and mark the state as changing for lock-free queries (`query`)."""
        view = self._view
        with self._lock:
            view.generation += 1
            try:
                yield
            finally:
                view.state = self.replica.state  # `_load` replaces the replica
                view.generation += 1

    def applied_seq(self, master: str) -> int:
        """The last seq of `master` applied in this view."""
        if self.view == "committed":
            return self.replica.cursors.get(master, 0)
        reader = self.readers.get(master)
        return reader.last_seq if reader is not None else self.replica.cursors.get(master, 0)

    def wait_for(self, token: Any, timeout_s: float = 30.0, poll_s: float = 0.02) -> bool:
        """Wait until the record `token` names is applied in this view; True when it is,
        False on timeout. `token`: ``"master:seq"`` (a write answer's ``record``), a
        ``(master, seq)`` pair or ``{"master": ..., "seq": ...}``."""
        master, seq = _token(token)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.applied_seq(master) >= seq:
                return True
            if time.monotonic() >= deadline:
                return False
            if self._thread is None:
                self.sync()
            time.sleep(poll_s)

    def status(self) -> dict:
        """Frontier, its age (how stale the committed view is), cursors, held records."""
        frontier = self.replica.frontier
        age_ms = max(0, int(time.time() * 1000) - physical_ms(frontier)) if frontier else None
        return {"view": self.view, "frontier": frontier, "frontier_age_ms": age_ms,
                "cursors": {m: self.applied_seq(m) for m in sorted(set(self.readers) | set(self.replica.cursors))},
                "held": len(self._held), "tentative": self.replica.tentative_real(),
                "digest": self.digest(), "reloads": self.reloads, "base": self.base,
                "last_sync_at": self.last_sync_at, "last_error": self.last_error}

    def digest(self) -> str:
        """The canonical digest of this view's state (equal to the masters' and `verify`'s
        once every record is committed and applied)."""
        with self._lock:
            return codec.digest_of(self.replica.state, self.replica.dedup)

    def close(self) -> None:
        """Stop following. Idempotent."""
        self.closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "Follower":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _token(token: Any) -> tuple[str, int]:
    if isinstance(token, str):
        master, sep, seq = token.rpartition(":")
        if sep and master and seq.isdigit():
            return master, int(seq)
    elif isinstance(token, dict) and "master" in token and "seq" in token:
        return str(token["master"]), int(token["seq"])
    elif isinstance(token, (tuple, list)) and len(token) == 2:
        return str(token[0]), int(token[1])
    raise ValueError(f"a write token is 'master:seq', (master, seq) or {{'master', 'seq'}}, got {token!r}")
