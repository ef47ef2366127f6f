"""Recovery: how a master comes back, or comes in, when it opens.

A retired name never comes back, and one process holds a name (the lease). A master
with a journal or a snapshot of its own recovers from its newest valid own snapshot; the
founder starts from the initial state; a newcomer loads the newest snapshot of a member
and announces itself (joining, step 1; `syncing` completes it). Then the own journal is
replayed after the base, a torn tail set aside and truncated, and the first sync reads
every other journal: recovery is the same procedure as a sync, run from the newest
snapshot over every journal.
"""

from __future__ import annotations

import gc
import logging
import os

from .. import codec
from ..errors import Corruption, LostRecords, RetiredMaster, UnknownRecordTransaction
from ..snapshot import SnapshotBody, decode_root, list_snapshots, load_snapshot, write_snapshot
from ..writer import JournalWriter
from . import folder, membership
from .progress import read_progress
from .reader import JournalReader

log = logging.getLogger("prevalence.master")

RECOVERY_CHUNK_RECORDS = 100_000


class Recovering:
    """Mixin of `Master`: open-time recovery, base loading and the join announcement."""

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

    def _load_base(self, *, own_only: bool) -> SnapshotBody | None:
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
                root = decode_root(body, self.model.state_type, path)
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
        if res.zeros_at is not None:
            path, offset, n = res.zeros_at
            log.info("journal %s: %d zero bytes after the last record at offset %d (space the writer "
                     "reserved, or blocks never written): nothing to set aside, written over from there",
                     path, n, offset)
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
        tail = reader.position if reader is not None else None
        self.writer = JournalWriter(
            folder.journal_dir(self.shared, self.name), self.seq + 1, tail, fsync=self.fsync_mode,
            fsync_interval_ms=self._fsync_interval_ms, segment_bytes_max=self._segment_bytes_max,
            reserve_bytes=self._journal_reserve_bytes, fault=self._fault)
