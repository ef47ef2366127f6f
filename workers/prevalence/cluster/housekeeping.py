"""Housekeeping: a master's own snapshots, and garbage collection of its own journal.

A snapshot holds the committed state at the frontier; the newest `snapshots_kept` stay.
A journal segment is deleted only after a grace period, once every member has read it
and every member's kept snapshots cover it (`snapshot_cursors` is this master's floor).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from .. import codec, journal
from ..errors import InvariantViolation, UnsupportedState
from ..snapshot import SnapshotBody, decode_root, list_snapshots, write_snapshot
from . import folder

log = logging.getLogger("prevalence.master")


class Housekeeping:
    """Mixin of `Master`: snapshots and garbage collection."""

    def snapshot(self) -> str:
        """Write the committed state at the frontier to ``snapshots/``. Returns its path."""
        if self._unsettled:
            self.settle()
        if self.closed:
            raise InvariantViolation(f"snapshot on closed master {self.name!r}")
        self.lease.check_held()  # raises LeaseLost (NotReady) once another process may own the name
        if self.writer is not None and self.fsync_mode != "always":
            # The snapshot is fsynced: the records it covers must be durable first.
            self.writer.flush()
        body = self.replica.with_committed(self._snapshot_body)
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

    def _snapshot_body(self, root: Any, dedup: dict) -> SnapshotBody:
        """The snapshot of the committed state (called with the tentative window undone)."""
        body = SnapshotBody(master=self.name, model=self.model.name, frontier=self.frontier,
                            cursors=dict(self.replica.cursors), clock=self.clock.last,
                            members=sorted(m for m, p in self.peers.items() if p.counted),
                            digest=codec.digest_of(root, dedup),
                            root=_raw(root),
                            dedup=dict(dedup))  # entries are immutable: a shallow copy is a copy
        # Check the state survives the codec: a restart or a rebase would otherwise run
        # transactions on something else than what they ran on live.
        if decode_root(body, self.model.state_type) != root:
            raise UnsupportedState(
                f"the state of model {self.model.name!r} does not read back equal from the codec (a "
                "container typed loosely, e.g. `dict` or `list`, holding msgspec Structs, tuples or "
                "sets, decodes as plain data). Annotate the field types of the state; no snapshot "
                "was written")
        return body

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
            snapshot_cursor = p.snapshot_cursors.get(self.name, 0)
            # A joiner replays from the snapshot it loaded: its cursors are enough. (Its
            # folder is listed only when its snapshots would hold collection back.)
            if snapshot_cursor < covered and not folder.is_joining(self.shared, m):
                covered = snapshot_cursor
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


def _raw(value: Any) -> codec.msgspec.Raw:
    """The state's bytes, embedded as-is in a snapshot body."""
    return codec.msgspec.Raw(codec.encode_record(value))
