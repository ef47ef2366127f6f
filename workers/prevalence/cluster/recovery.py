"""Recovery: how a master comes back, or comes in, when it opens.

A retired name never comes back, and one process holds a name (the lease). A master
with a journal or a snapshot of its own recovers from its newest valid own snapshot; the
founder starts from the initial state; a newcomer loads the newest snapshot of a member
and announces itself (joining, step 1; `syncing` completes it). Then the own journal is
replayed after the base and compared with what was published about it, a torn tail set
aside and truncated, the previous owner's last segment sealed and a new segment started,
and the first sync reads every other journal: recovery is the same procedure as a sync,
run from the newest snapshot over every journal.

What was published about the own journal -- the seq in the own progress file, the
cursors peers publish for this master, the own snapshot, the seals -- is what anybody
may have seen. Records up to there must all still be in the journal: when some are gone
(a byte flipped in the last record, a file cut at a record boundary, a machine crash
under a relaxed fsync mode) recovery stops with `LostRecords` naming the missing range,
before it changes any file. A torn tail is only ever a record nobody can have seen.
"""

from __future__ import annotations

import gc
import logging
import os
import weakref

from .. import codec, files, seal as seals
from ..durable import fsync_dir
from ..errors import (BadFile, Corruption, LostRecords, RetiredMaster, TruncatedSegment,
                      UnknownRecordTransaction)
from ..snapshot import SnapshotBody, list_snapshots, load_state, write_snapshot
from ..writer import JournalWriter
from . import folder, membership
from .progress import Progress, read_progress
from .reader import JournalReader

log = logging.getLogger("prevalence.master")

RECOVERY_CHUNK_RECORDS = 100_000


class Recovering:
    """Mixin of `Master`: open-time recovery, base loading and the join announcement."""

    def _recover(self) -> None:
        shared, name = self.shared, self.name
        # 1. A retired name never comes back.
        self.retired = self._read_retired()
        if name in self.retired:
            raise RetiredMaster(f"master {name!r} was retired from the cluster in {shared} "
                                f"(cut at seq {self.retired[name]}); start it under a new name")
        # 2. One process per name, in folders that are real ones (nothing on the share is
        # followed), without the temp files a crash left behind.
        files.make_dirs(folder.masters_dir(shared), folder.master_dir(shared, name), what="master folder")
        self.lease.claim()
        self._remove_temp_files()
        existing = files.is_dir(folder.journal_dir(shared, name), "journal folder") or bool(
            list_snapshots(folder.snapshots_dir(shared, name)))
        joining = os.path.lexists(folder.joining_path(shared, name))
        own_progress = read_progress(shared, name, self.key)
        if own_progress is not None:
            self.acks = dict(own_progress.acks)
            self.kept_snapshots = {int(f): dict(c) for f, c in own_progress.kept_snapshots}
        # 3. Found, recover as a member, or (re)join.
        if existing and not joining:
            self.joined = True
            self._load_base(own_only=True)
        else:
            founder = membership.read_founder(shared, self.key)
            others = [m for m in folder.list_masters(shared) if m != name]
            if founder is None and not others:
                founder = membership.claim_founder(shared, name, self.key)
            if founder == name:
                self.joined = True
                self._load_base(own_only=True)
            else:
                self._announce_join()
        # 4. Replay every journal after the base, own first: what was published of it must
        # be there; a torn tail nobody saw is set aside.
        self._recover_own_journal(own_progress)
        if self.joined:
            self._open_writer()
        self.sync()
        # The recovered state lives as long as the process: move it out of the cyclic
        # GC's sight, so later collections do not walk millions of long-lived objects.
        gc.freeze()
        log.info("master %s open: seq %d, frontier %d, %d tentative, joined=%s",
                 name, self.seq, self.frontier, self._tentative_real(), self.joined)

    def _read_retired(self) -> dict[str, int]:
        """Valid retirements; one that fails its checks is not obeyed and is reported."""
        retired, bad = membership.read_retirements(self.shared, self.key)
        for exc in bad:
            self.last_error = str(exc)
            log.error("%s", exc)
        return retired

    def _remove_temp_files(self) -> None:
        """Remove the temp files (``.tmp-*``) a crash left in this master's own folders.
        Only this process writes there now (it holds the lease)."""
        shared, name = self.shared, self.name
        for directory in (folder.master_dir(shared, name), folder.journal_dir(shared, name),
                          folder.snapshots_dir(shared, name)):
            for path in files.remove_temp_files(directory):
                log.warning("removed %s, a temp file left by a crash", path)

    def _load_base(self, *, own_only: bool) -> SnapshotBody | None:
        """Load the newest valid snapshot (own, or any member's), else the initial state."""
        names = [self.name] if own_only else [m for m in folder.list_masters(self.shared) if m != self.name]
        candidates = []
        for m in names:
            try:
                candidates += [(f, p, m) for f, p in list_snapshots(folder.snapshots_dir(self.shared, m))]
            except BadFile as exc:
                if own_only:
                    raise  # our own snapshots folder is not a folder: refuse to open
                log.error("skipping the snapshots of %s: %s", m, exc)
                self.last_error = str(exc)
        candidates.sort(reverse=True)
        for frontier, path, m in candidates:
            try:
                # What it is about: a snapshot of the folder's master, under its own frontier.
                with codec.gc_paused():
                    body, root = load_state(path, self.key, self.model, master=m)
                    # Long-lived, and millions of containers: frozen (again once open) before
                    # the collector runs, or its first young collection would walk them all.
                    gc.freeze()
                dedup = body.dedup
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
        self.replica.reset(root, dedup, frontier, cursors)
        self.clock.observe(max(clock, frontier))
        self.seq = cursors.get(self.name, 0)
        for m in set(members) | set(self.acks) | {m for m in cursors if m != self.name}:
            if m != self.name:
                peer = self._peer(m)
                peer.counted = True
                peer.horizon = max(peer.horizon, frontier, self.acks.get(m, 0))
        others = [m for m in folder.list_masters(self.shared) if m != self.name and m not in self.retired]
        if others or any(p.counted for p in self.peers.values()):
            self.replica.become_multi()

    def _announce_join(self) -> None:
        """Joining, step 1: load the newest snapshot of a member and announce ourselves."""
        body = self._load_base(own_only=False)
        self._fault("before-announce")
        files.make_dirs(folder.master_dir(self.shared, self.name), what="master folder")
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
        self._announce_join()  # a new base: the replica starts over from it

    def _recover_own_journal(self, own_progress: Progress | None) -> None:
        """Read our own journal after the base; check nothing published is missing; set a
        torn tail aside and truncate it."""
        # What anybody may have seen of this journal (module docstring).
        published = self._published_seq(own_progress)
        reader = JournalReader(self.shared, self.name, self.seq, 0, self.key)
        read_any = False
        while True:
            # In chunks: a long journal never sits in memory whole (records are ~0.5 KB).
            res = reader.read_new(records_max=RECOVERY_CHUNK_RECORDS)
            if isinstance(res.error, TruncatedSegment):
                # The journal ends early: what it holds up to the cut is sound.
                end = res.records[-1].seq if res.records else self.seq
                self._check_published(published, end, cause=res.error)
            if res.error is not None:
                raise res.error  # damage before the end: Corruption naming file and offset
            self._check_own_transactions(res.records)
            if res.records:
                read_any = True
                self._ingest({self.name: res.records})
                self.seq = res.records[-1].seq
                self.own_horizon = res.records[-1].hlc
            if not res.records or res.torn is not None:
                break
        if not read_any and self.seq > 0:
            last = membership.last_written_seq(self.shared, self.name, self.key)
            if last < self.seq:
                raise LostRecords(
                    f"the journal of {self.name!r} ends at seq {last} but its own snapshot already covers "
                    f"seq {self.seq}: records {last + 1}..{self.seq} were lost (machine crash under "
                    f"fsync={self.fsync_mode}, or damage). Writing on would leave a gap. Retire this master and "
                    "start a new name")
        # Everything published must be here -- checked before any file is changed.
        self._check_published(published, self.seq,
                              cause=f"a torn tail at {res.torn_at[0]} offset {res.torn_at[1]} ({res.torn})"
                              if res.torn is not None else None)
        if res.zeros_at is not None:
            path, offset, n = res.zeros_at
            log.info("journal %s: %d zero bytes after the last record at offset %d (space the writer "
                     "reserved, or blocks never written): nothing to set aside, sealed there",
                     path, n, offset)
        if res.torn is not None:
            self._set_torn_tail_aside(*res.torn_at, res.torn)
        self._own_reader = reader

    def _published_seq(self, own_progress: Progress | None) -> list[tuple[int, str]]:
        """What was published of this journal: (seq, who says it) for the own progress file
        and every peer's cursor for this master."""
        said = []
        if own_progress is not None and own_progress.seq:
            said.append((own_progress.seq, f"its own progress file ({folder.progress_path(self.shared, self.name)})"))
        for m in folder.list_masters(self.shared):
            if m == self.name:
                continue
            p = self._peer_progress(m)
            seen = p.cursors.get(self.name, 0) if p else 0
            if seen:
                said.append((seen, f"master {m!r}, which has read it"))
        return said

    def _check_published(self, published: list[tuple[int, str]], end: int, cause=None) -> None:
        """LostRecords when the journal ends before what was published of it."""
        beyond = sorted((seq, who) for seq, who in published if seq > end)
        if not beyond:
            return
        last = beyond[-1][0]
        says = "; ".join(f"seq {seq}: {who}" for seq, who in reversed(beyond))
        why = f" Where the journal stops: {cause}." if cause is not None else ""
        raise LostRecords(
            f"the journal of {self.name!r} ends at seq {end}, but records up to seq {last} were published "
            f"({says}): records {end + 1}..{last} are gone (a damaged or cut journal file, or a machine crash "
            f"under fsync={self.fsync_mode}).{why} Nothing was set aside or truncated. Starting would reuse "
            f"those seqs with other content: restore the journal from a backup, or retire {self.name!r} "
            "(prevalence retire) and start this host under a new name")

    def _set_torn_tail_aside(self, path: str, offset: int, why: str) -> None:
        """Copy a torn tail aside, make the copy durable, then cut the segment there
        (etcd's WAL repair): a crash at any step loses nothing that was there."""
        directory = os.path.dirname(path)
        fd, st = files.open_file(path, os.O_RDWR, what="journal segment")
        try:
            # 1. Copy the tail to a new file of its own (never over an earlier copy).
            tail = files.pread_all(fd, offset, max(0, st.st_size - offset))
            n = 0
            while True:
                aside = f"{path}.torn-{offset:020d}" + (f".{n}" if n else "")
                try:
                    out = files.create_file(aside, what="torn tail's copy")
                    break
                except FileExistsError:  # an earlier torn tail set aside at the same offset
                    n += 1
            try:
                view = memoryview(tail)
                while view:
                    view = view[os.write(out, view):]
                os.fsync(out)
            finally:
                os.close(out)
            # 2. Make the copy's directory entry durable before the segment loses the bytes.
            fsync_dir(directory)
            # 3. Cut the segment through the descriptor (never through a path: no link followed).
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.warning("journal %s: torn tail at offset %d (%s): %d bytes set aside to %s and truncated",
                    path, offset, why, len(tail), aside)

    def _check_own_transactions(self, records: list) -> None:
        unknown = {rec.tx for rec in records} - self.model.transactions.keys() - {codec.TICK}
        for rec in records if unknown else ():
            if rec.tx in unknown:
                raise UnknownRecordTransaction(
                    f"this master's own journal names transaction {rec.tx!r}, which model "
                    f"{self.model.name!r} does not declare (code rolled back?). Deploy the code that "
                    "declares it; nothing was written or truncated", master=self.name, seq=rec.seq)

    def _open_writer(self) -> None:
        """Start writing: never into the previous owner's files (DESIGN invariant 10)."""
        self._seal_previous_segment()
        self.writer = JournalWriter(
            folder.journal_dir(self.shared, self.name), self.seq + 1, master=self.name, key=self.key,
            fsync=self.fsync_mode, fsync_interval_ms=self._fsync_interval_ms,
            segment_bytes_max=self._segment_bytes_max, reserve_bytes=self._journal_reserve_bytes,
            guard=self.lease.check_held, guard_window=self.lease,
            # None without a test hook: the writer then skips its fault points on every append.
            fault=self._fault if self._fault_on else None)
        self.writer.on_sync = self._on_sync
        # Weakly: a bound method would make master and lease a cycle, and the state is
        # frozen out of the cyclic collector's sight (`_recover`), so a closed master would
        # never be freed (a process that opens masters one after another ran out of memory).
        fenced = weakref.WeakMethod(self._fenced)
        self.lease.fence = lambda: (fn() if (fn := fenced()) is not None else None)

    def _seal_previous_segment(self) -> None:
        """Seal the last segment where recovery found its end, so that a previous owner still
        writing there (paused past its lease, then resumed) writes past the seal, where no
        reader looks. An empty last segment (created, then a crash) is removed instead: the
        new segment takes its name."""
        position = self._own_reader.position if self._own_reader is not None else None
        if position is None:
            return
        first, path, offset = position
        if seals.read_seal(path, master=self.name, key=self.key) is not None:
            return  # closed cleanly (or already sealed): it ends at its seal
        if offset == 0 and first == self.seq + 1:
            os.unlink(path)
            fsync_dir(os.path.dirname(path))
            log.info("removed %s, an empty segment left by the previous owner; writing a new one", path)
            return
        fd, _st = files.open_file(path, what="journal segment")
        try:
            crc = seals.segment_crc(fd, offset, path)
        finally:
            os.close(fd)
        seals.write_seal(path, offset, crc, master=self.name, key=self.key)
        log.info("sealed %s at %d bytes (seq %d), where the previous owner's records end", path, offset, self.seq)

    def _fenced(self) -> str | None:
        """Why this process's journal shows another owner took the name over, or None:
        its folder vanished, or its current segment was sealed or removed by someone else."""
        try:
            if not files.is_dir(folder.master_dir(self.shared, self.name), "master folder"):
                return (f"the folder of master {self.name!r} ({folder.master_dir(self.shared, self.name)}) "
                        "vanished: deleted or moved by an operator")
            writer = self.writer
            return writer.taken_over() if writer is not None else None
        except (BadFile, OSError) as exc:  # cannot tell: stop rather than write over another owner
            return f"the folder of master {self.name!r} cannot be checked ({exc})"

    def _check_own_folder(self) -> None:
        """At each sync: a master whose folder was deleted stops acknowledging at once."""
        if self.lease.lost is None and not self.closed:
            try:
                gone = not files.is_dir(folder.master_dir(self.shared, self.name), "master folder")
            except BadFile as exc:
                self.lease.lose(str(exc))
                return
            if gone:
                self.lease.lose(f"the folder of master {self.name!r} ({folder.master_dir(self.shared, self.name)}) "
                                "vanished: deleted or moved by an operator")
