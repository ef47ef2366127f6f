"""Syncing: catching up with every member, and moving the frontier.

A sync reads every member's new records, orders them by ``(hlc, master, seq)``, applies
them (fast path when they all order after what is applied, rebase otherwise), appends a
tick when a peer's real record waits on this master, moves the frontier, commits, acks
newcomers, collects garbage and publishes progress.

Catching up is bounded in memory: one round reads at most `SYNC_CHUNK_RECORDS` records
across all peers. When a peer has more, records of other peers that order after the last
one read from it are deferred to the next round (`Peer.deferred_records`), so every round
applies a prefix of the key order (no rebase from chunking); between rounds the frontier
moves, which commits the round and frees its records. A long backlog (a master that was
down, a joiner) therefore takes several rounds of one sync, never the backlog in memory.
(Between rounds the frontier also stays at or below the last record read from every peer
not counted yet: while such a newcomer has written nothing, rounds apply but commit only
at the end of the sync.)

A `Peer` is what this master knows of one other member. Joining, steps 2 and 3, happen
here too: every member counts a newcomer at its next sync (the ack), and the newcomer
takes writes once every member counts it.
"""

from __future__ import annotations

import bisect
import logging
import os
import time

from .. import codec
from ..codec import Record
from ..errors import Corruption, InvariantViolation, UnknownRecordTransaction, check
from . import folder, membership
from .progress import Progress, read_progress
from .reader import JournalReader

log = logging.getLogger("prevalence.master")

SYNC_CHUNK_RECORDS = 200_000  # records read from all peers in one round of a sync (~100 MB)


class Peer:
    """What this master knows of one other member."""

    __slots__ = ("name", "reader", "horizon", "max_real_hlc", "counted", "error", "held_reason",
                 "deferred_records")

    def __init__(self, name: str, reader: JournalReader, horizon: int):
        self.name = name
        self.reader = reader
        self.horizon = horizon        # hlc of the last record read (or a lower bound)
        self.max_real_hlc = 0         # hlc of the last real (non-tick) record read
        self.counted = False          # counted in the frontier
        self.error: str | None = None
        self.held_reason: str | None = None  # why reading is held back (clock ahead, retired cut)
        self.deferred_records: list = []     # read and checked, deferred to the next round (key order)

    @property
    def applied_seq(self) -> int:
        """The last seq of this peer applied here (deferred records do not count)."""
        return self.deferred_records[0].seq - 1 if self.deferred_records else self.reader.last_seq


class Syncing:
    """Mixin of `Master`: sync, reading peers, ingest and rebase, acks, frontier, joining."""

    def sync(self) -> dict:
        """Catch up with every member now. Idempotent: call it as often as you like.

        Returns a report: records applied per peer, whether a rebase happened, whether a
        tick was written, the frontier, errors per peer.
        """
        return self._sync(rejoined=False)

    def _sync(self, *, rejoined: bool) -> dict:
        """`sync`; `rejoined` is True on the one retry after joining again from scratch."""
        # The cyclic GC is paused for the whole sync, not only while records are decoded:
        # resumed right after reading, its first young collection walked every record just
        # read (their argument tuples), a third of a microsecond each; resumed here, those
        # that committed are freed already and the collection finds little (records and
        # undo entries form no cycles).
        with codec.gc_paused():
            return self._sync_paused(rejoined)

    def _sync_paused(self, rejoined: bool) -> dict:
        if self._unsettled:
            self.settle()
        if self.closed:
            raise InvariantViolation(f"sync on closed master {self.name!r}")
        started = time.perf_counter()
        changed_before = self.outcomes_changed
        # 1. Our own clock against the shared folder's; membership: our own folder,
        # retirements, newcomers.
        self._note_clock()
        self._check_own_folder()
        self.retired = self._read_retired()
        if self.name in self.retired:
            self.last_error = f"master {self.name!r} was retired by the operator; it takes no more writes"
            self.joined = False
        for m in folder.list_masters(self.shared):
            if m != self.name:
                self._peer(m)
        if not self.replica.multi and any(m not in self.retired for m in self.peers):
            # Not alone any more: from now on records commit only below the frontier.
            self.replica.become_multi()
        # 2-3. Read every peer's new records and apply them in key order (fast path or
        # rebase), a bounded number per round; between rounds the frontier commits them.
        applied: dict[str, int] = {}
        rebased = False
        while True:
            new, cap = self._read_peers()
            if self._rejoin:
                self._rejoin = False
                if not rejoined:
                    log.warning("master %s: records it needs were collected before it was counted; "
                                "joining again from the newest snapshot", self.name)
                    self._restart_join()
                    return self._sync_paused(True)
            counts, again = self._ingest(new, cap, at_once=True)
            rebased = rebased or again
            for m, n in counts.items():
                applied[m] = applied.get(m, 0) + n
            if cap is None:
                break
            # Every peer's records up to `cap` are in: commit up to there, no further (a
            # peer's horizon may be a lower bound from an ack, above records still unread).
            self._advance_frontier(cap)
        # 4. Count newcomers (ack) and stop counting the retired.
        self._ack_newcomers()
        # 5. Joining: done once every member counts us.
        if not self.joined and self.name not in self.retired:
            self._try_complete_join()
        # 6. Tick when a peer's real record waits on us.
        ticked = False
        # Whether this process still holds its name (re-checked if it was paused past its
        # lease): nothing in the folder is written otherwise.
        holds = self.lease.holds()
        if self.joined and self.writer is not None and holds:
            # A retired member's records up to its cut wait on us as much as a counted
            # member's: without a tick they would stay tentative in an idle cluster.
            waiting = max((p.max_real_hlc for m, p in self.peers.items() if p.counted or m in self.retired),
                          default=0)
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
        if holds:
            self._collect_garbage()
            self._publish_progress()
        errors = {m: p.error for m, p in self.peers.items() if p.error}
        return {"master": self.name, "applied": applied, "rebased": rebased, "ticked": ticked,
                "frontier": self.frontier, "tentative": self.replica.tentative_real(), "errors": errors,
                "held": {m: p.held_reason for m, p in self.peers.items() if p.held_reason},
                "reversed": self.outcomes_changed - changed_before,
                "joined": self.joined, "duration_ms": round((time.perf_counter() - started) * 1000, 3)}

    def _note_clock(self) -> None:
        """Report a wall clock that disagrees with the shared folder's (and stop reporting
        it once corrected): in `last_error`, hence in status and progress."""
        why = self.clock_problem()
        if why:
            if self.last_error != why:
                log.error("%s", why)
            self.last_error = why
        elif self.last_error and self.last_error.startswith(f"the wall clock of master {self.name!r}"):
            log.info("master %s: its wall clock agrees with the shared folder's again; taking writes", self.name)
            self.last_error = None

    def _peer(self, m: str) -> Peer:
        peer = self.peers.get(m)
        if peer is None:
            start = self.replica.cursors.get(m, 0)
            peer = Peer(m, JournalReader(self.shared, m, start, 0, self.key), 0)
            self.peers[m] = peer
        return peer

    def _read_peers(self) -> tuple[dict[str, list], int | None]:
        """One round: each peer's next records, cut to a prefix of the key order.

        Returns (records per peer, cap): cap is None when every peer was read to its end,
        else the hlc up to which every peer's records are in. A peer that filled its share
        may have records ordering before what the others returned: everything after its
        last record is deferred to the next round in `Peer.deferred_records`.
        """
        share = max(1, SYNC_CHUNK_RECORDS // max(1, len(self.peers)))
        new: dict[str, list] = {}
        full = []
        for m, peer in self.peers.items():
            deferred, peer.deferred_records = peer.deferred_records, []
            room = share - len(deferred)
            fresh = self._read_peer(peer, room) if room > 0 else []
            recs = deferred + fresh if deferred else fresh
            if room <= 0 or len(fresh) >= room:
                full.append(m)
            if recs:
                new[m] = recs
        cap = None
        if full:
            cap = min(new[m][-1].hlc for m in full)
            for m in list(new):
                recs = new[m]
                if recs[-1].hlc > cap:
                    i = bisect.bisect_right(recs, cap, key=_hlc)
                    self.peers[m].deferred_records = recs[i:]
                    if i:
                        new[m] = recs[:i]
                    else:
                        del new[m]
        for m, recs in new.items():
            peer = self.peers[m]
            peer.horizon = max(peer.horizon, recs[-1].hlc)
            for rec in reversed(recs):
                if rec.tx != codec.TICK:
                    peer.max_real_hlc = max(peer.max_real_hlc, rec.hlc)
                    break
        return new, cap

    def _read_peer(self, peer: Peer, records_max: int) -> list:
        """Up to `records_max` (a batch may add a few) new records of a peer, checked: reading
        stops before a record of an unknown transaction, from a clock too far ahead, past a
        retirement cut, or at or below the frontier (reported)."""
        reader = peer.reader
        before = (reader.last_seq, reader.last_hlc)
        res = reader.read_new(records_max=records_max)
        recs = res.records
        peer.error = str(res.error) if res.error is not None else None
        if res.error is not None and not self.joined and res.error.gap:
            # Joining, step 1 again: segments we needed were collected before our
            # announcement reached that member. Nothing is written yet: start over.
            self._rejoin = True
        peer.held_reason = None
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
                    stop, peer.held_reason = i, (
                        f"clock of {peer.name!r} is {ahead + self.clock.drift_max_ms} ms ahead of ours "
                        f"(more than the {self.clock.drift_max_ms} ms allowed); its records from seq "
                        f"{recs[i].seq} on are read once time catches up")
                    # Its journal only increases: whatever it writes from now on lies at or
                    # above this record, so the frontier may pass everything below it
                    # without waiting for the record to be read. (This trusts a record
                    # read but not applied: one that a machine crash of its owner under
                    # fsync=never/interval loses and reissues lower would be reported as
                    # below the frontier, never applied silently.)
                    peer.horizon = max(peer.horizon, recs[i].hlc - 1)
            if cut is not None and recs[-1].seq > cut:
                i = bisect.bisect_right(recs, cut, key=_seq)
                if i < stop:
                    stop, peer.held_reason = i, f"retired at seq {cut}"
        stop = None if stop == len(recs) else stop
        if stop is not None:
            recs = recs[:stop]
            last = recs[-1] if recs else None
            reader.rewind(last.seq if last else before[0], last.hlc if last else before[1])
        if peer.error:
            self.last_error = peer.error
            log.error("reading %s: %s", peer.name, peer.error)
        return recs

    def _ingest(self, new: dict[str, list], cap: int | None = None, *, at_once: bool = False) -> tuple[dict, bool]:
        """Apply newly read records in key order (the replica rebases if one orders before
        records already applied). Returns (records per peer, rebased).

        `at_once` (a sync, which read every peer up to `cap`, or to its end if None):
        records that order after the whole window and lie at or below the frontier this
        sync is bound to reach (`_frontier_target` over every member not retired, a bound
        no later step lowers) commit at once: the frontier moves there first, and they are
        applied without joining the window (`Replica.apply_committed`). Not in recovery,
        which has read no peer yet.
        """
        applied = {m: len(r) for m, r in new.items()}
        incoming = [r for recs in new.values() for r in recs]
        if not incoming:
            return applied, False
        if len(new) > 1:
            incoming.sort(key=Record.key.fget)
        self.clock.observe(incoming[-1].hlc)
        replica = self.replica
        if at_once and replica.multi and self.joined and (
                not replica.tentative or incoming[0].key > replica.tentative[-1].key):
            bound = self._frontier_target(cap, every_member=True)
            n = bisect.bisect_right(incoming, bound, key=_hlc)
            if n and bound > self.frontier:
                self._note_committed(replica.commit(bound))
                replica.apply_committed(incoming[:n])
                incoming = incoming[n:]
        rebased = replica.ingest(incoming, watch=self.name, on_outcome=self._reapplied) if incoming else False
        return applied, rebased

    def _reapplied(self, pairs: list) -> None:
        """A rebase applied these own tentative records again: their outcomes may differ
        (`_remember`, for the records a rebase applies again: one call per rebase)."""
        outcomes = self.outcomes
        for rec, out in pairs:
            key = rec.rid or f"{rec.master}:{rec.seq}"
            before = outcomes.get(key)
            if before is not None and before[1]["status"] != out["status"]:
                self.outcomes_changed += 1
                log.warning("rebase changed the outcome of %s (%s%s) from %s to %s", rec.record_id, rec.tx,
                            rec.args, before[1]["status"], out["status"])
            outcomes[key] = (rec.hlc, out)
        self._prune_outcomes()

    def _ack_newcomers(self) -> None:
        """Count every member we see from now on, at our current frontier (joining, step 2)."""
        for m, peer in self.peers.items():
            if m in self.retired:
                # Stop counting a retired member once we have read everything up to its cut.
                if peer.counted and peer.applied_seq >= self.retired[m]:
                    peer.counted = False
                continue
            if m not in self.acks:
                if not os.path.isdir(folder.master_dir(self.shared, m)):
                    continue
                self.acks[m] = self.frontier
                if not self.replica.multi:
                    self.replica.become_multi()
                peer.counted = True
                peer.horizon = max(peer.horizon, self.frontier)
                log.info("master %s now counts %s (acknowledged at frontier %d)", self.name, m, self.frontier)
            elif not peer.counted:
                peer.counted = True
                peer.horizon = max(peer.horizon, self.acks[m])

    def _advance_frontier(self, cap: int | None = None) -> None:
        """Move the frontier to the lowest horizon of the counted members (our clock
        included) and commit the tentative records at or below it.

        Between the rounds of one sync (`cap` given), also no further than `cap` and the
        horizon of every peer not yet counted: the acknowledgement that counts a newcomer
        comes at the end of the sync, at the frontier reached by then, and a newcomer's
        next record is only known to lie above its last one read.
        """
        f = self._frontier_target(cap, every_member=cap is not None)
        check(f >= self.frontier or not self.replica.multi or cap is not None,
              f"frontier of {self.name} would move backwards: {self.frontier} -> {f}")
        if f <= self.frontier:
            return
        # Commit, in key order, every tentative record at or below the frontier.
        self._note_committed(self.replica.commit(f))

    def _frontier_target(self, cap: int | None, *, every_member: bool) -> int:
        """Our clock, `cap` and the horizons of the counted members (`every_member`: of
        every member not retired too), whichever is lowest (`_advance_frontier`). Clocks
        and horizons only increase, so the target over every member is never above the
        frontier the sync reaches at its end."""
        f = self.clock.last if cap is None else min(cap, self.clock.last)
        retired = self.retired
        for m, peer in self.peers.items():
            if peer.counted or (every_member and m not in retired):
                f = min(f, peer.horizon)
        return f

    def _peer_progress(self, m: str) -> Progress | None:
        """Another master's progress; a damaged one counts as absent (and is reported)."""
        try:
            return read_progress(self.shared, m, self.key)
        except Corruption as exc:
            self.last_error = str(exc)
            log.error("%s", exc)
            return None

    def _join_waiting_for(self) -> list[str]:
        founder = membership.read_founder(self.shared, self.key)
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
                if p is None or self.name not in p.acks:
                    return  # unreadable or changed since the check: try again next sync
                acks.append(p.acks[self.name])
        self.clock.observe(max(acks, default=0))
        self.joined = True
        self._open_writer()
        try:
            os.unlink(folder.joining_path(self.shared, self.name))
        except FileNotFoundError:
            pass
        log.info("master %s joined the cluster (clock past %d); taking writes", self.name, max(acks, default=0))


def _hlc(rec: Record) -> int:
    return rec.hlc


def _seq(rec: Record) -> int:
    return rec.seq
