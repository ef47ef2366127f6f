"""Reporting: what a master tells the other members and the operators about itself.

Progress is published to the shared folder when it changed (cursors, horizon, frontier,
acks, kept snapshots, and the digest once the state has held still); `status()` answers
tools (DESIGN §6); `digest()` is the canonical digest of the live state.
"""

from __future__ import annotations

import time
from typing import Any

from .. import codec
from ..clock import physical_ms
from ..model import PRUNE_MARK
from .progress import Progress, encode_progress, write_progress


class Reporting:
    """Mixin of `Master`: progress, digest and status."""

    def _tentative_real(self) -> int:
        return self.replica.tentative_real()

    def digest(self) -> str:
        """Canonical digest of the live state (cached until the next apply)."""
        if self._unsettled:
            self.settle()
        replica = self.replica
        if self._digest_cache is None or self._digest_cache[0] != replica.version:
            self._digest_cache = (replica.version, codec.digest_of(replica.state, replica.dedup))
        return self._digest_cache[1]

    def _cursors(self) -> dict[str, int]:
        """For every member, this master included, the last seq read."""
        cursors = {m: p.applied_seq for m, p in self.peers.items()}
        cursors[self.name] = self.seq
        return cursors

    def _progress(self) -> Progress:
        cursors = self._cursors()
        # The digest costs a pass over the whole state: publish it once the state has held
        # still for a whole sync (nothing tentative, nothing applied since the last one),
        # which is when operators compare digests, not at every sync under load.
        tentative = self._tentative_real()
        quiet = tentative == 0 and self.replica.version == self._version_at_last_publish
        self._version_at_last_publish = self.replica.version
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

    def status(self, *, digest: bool | None = True) -> dict:
        """A dict describing this master (see DESIGN §6 for the fields tools rely on).

        Args:
            digest: True computes the live digest (a pass over the whole state unless
                cached); None computes it only when cached or when the state has held still
                since the previous such call (what a status published after every sync
                wants: no O(state) pass per sync under load); False omits it. An omitted
                digest is None.
        """
        if self._unsettled:
            self.settle()
        if digest is None:
            quiet = self._tentative_real() == 0 and self.replica.version == self._version_at_last_status
            self._version_at_last_status = self.replica.version
            cached = self._digest_cache is not None and self._digest_cache[0] == self.replica.version
            digest = quiet or cached
        self._note_clock()
        cursors = self._cursors()
        now = self._now_ms()
        lag = {}
        for m, peer in self.peers.items():
            p = self._peer_progress(m)
            lag[m] = max(0, p.seq - peer.applied_seq) if p is not None else None
        return {
            "master": self.name, "joined": self.joined, "seq": self.seq, "clock": self.clock.last,
            "frontier": self.frontier, "tentative": self._tentative_real(), "cursors": cursors,
            "horizons": {m: p.horizon for m, p in self.peers.items()} | {self.name: self.own_horizon},
            "lag": lag,  # records each peer has published that this master has not read yet
            "horizon_age_ms": {m: max(0, now - physical_ms(p.horizon)) if p.horizon else None
                               for m, p in self.peers.items()},
            "counted": sorted(m for m, p in self.peers.items() if p.counted),
            "retired": dict(self.retired),
            "digest": self.digest() if digest else None, "rebases": self.rebases, "outcomes_changed": self.outcomes_changed,
            "undone": self.replica.undone, "check_transactions": self.replica.check,
            "state_size": _size(self.replica.state),
            "request_ids": len(self.replica.dedup) - (PRUNE_MARK in self.replica.dedup), "fsync": self.fsync_mode,
            "snapshot_frontier": self.snapshot_frontier,
            "peer_errors": {m: p.error for m, p in self.peers.items() if p.error},
            "held": {m: p.held_reason for m, p in self.peers.items() if p.held_reason},
            # How far this wall clock is from the shared folder's when more than allowed
            # (then it takes no writes; 0 while they agree), and what it is checked against.
            "clock_skew_ms": self.clock.skew_ms, "clock_reference": self.clock_reference,
            "last_error": self.last_error or self.lease.lost,
        }


def _size(root: Any) -> int:
    """A cheap size of the state: total length of its top-level collections."""
    if isinstance(root, dict):
        return sum(len(v) if isinstance(v, (dict, list, set, tuple)) else 1 for v in root.values())
    return len(root) if isinstance(root, (list, tuple, set)) else 1
