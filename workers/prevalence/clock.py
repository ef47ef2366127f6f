"""Hybrid logical clock (Kulkarni et al., 2014): physical milliseconds in the high bits,
a logical counter in the low 16 bits, packed in one int.

A master stamps each record with `tick()`, strictly above every value it has issued or
observed, so a transaction issued after reading another orders after it. Reading a peer's
record calls `observe()`. A peer far ahead of our wall clock is not followed blindly:
sync stops reading a peer at a record stamped more than `drift_max_ms` past this wall
clock (`too_far_ahead`) and reports it, so one bad clock cannot drag the cluster into the
future; the record is read once real time catches up.

**A reference clock.** The wall clock of one host can be wrong (an hour behind, a day
ahead, stepped back later). A master therefore also reads a *reference*: the shared
folder's clock, i.e. the modification time the file server stamps on a file the master
has just written (`workers.prevalence.cluster.shareclock`), which every master reads
alike. When the wall clock and the reference disagree by more than `drift_max_ms`, the
clock is *skewed* (`skew_ms` says by how much, positive when the wall clock is ahead):
its physical readings then come from the reference instead, so this master's ticks and
its check of its peers' clocks stay true to the cluster, and the master refuses writes
until the wall clock is corrected (`cluster.writing`). Without a reference (none given,
or not measured yet) the wall clock is taken as it is.
"""

from __future__ import annotations

import time
from typing import Callable

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1
DRIFT_MAX_MS_DEFAULT = 60_000
#: While the wall clock agrees with the reference, `tick` compares them again only once the
#: wall clock has moved this far (or back) since the last comparison: a write path's tick
#: then costs one clock read. A skew beyond the drift (seconds at least) shows at the first
#: tick after the wall clock jumped, forward or back.
RECHECK_MS = 100


_time_ns = time.time_ns


def wall_ms() -> int:
    return _time_ns() // 1_000_000


def physical_ms(hlc: int) -> int:
    return hlc >> LOGICAL_BITS


def from_ms(ms: int) -> int:
    return ms << LOGICAL_BITS


class HybridClock:
    """A hybrid logical clock; `now_ms` is injectable for tests.

    Args:
        now_ms: the wall clock, in ms.
        drift_max_ms: how far a peer's clock, or this wall clock against the reference,
            may be off before it counts as wrong.
        reference_ms: the reference clock in ms (module docstring), or None when there is
            none; it may itself return None while it has not been measured yet.
    """

    def __init__(self, last: int = 0, *, now_ms: Callable[[], int] = wall_ms,
                 drift_max_ms: int = DRIFT_MAX_MS_DEFAULT,
                 reference_ms: Callable[[], int | None] | None = None):
        self.last = last
        self._now_ms = now_ms
        self.drift_max_ms = drift_max_ms
        self._reference_ms = reference_ms
        #: How far the wall clock was ahead of the reference (negative: behind) at the last
        #: reading, when by more than `drift_max_ms`; 0 while they agree.
        self.skew_ms = 0
        self._checked_at_ms = -(1 << 62)  # the wall clock at the last comparison

    def reading_ms(self) -> int:
        """The physical time this clock goes by, in ms: the wall clock while it agrees
        with the reference (or there is none), else the reference. Updates `skew_ms`."""
        return self._reading_ms(self._now_ms())

    def _reading_ms(self, wall: int) -> int:
        if self._reference_ms is None:
            return wall
        ref = self._reference_ms()
        if ref is None:
            return wall
        self._checked_at_ms = wall
        skew = wall - ref
        if -self.drift_max_ms <= skew <= self.drift_max_ms:
            self.skew_ms = 0
            return wall
        self.skew_ms = skew
        return ref

    def tick(self) -> int:
        """A new timestamp strictly above every one issued or observed."""
        # The real wall clock read inline (a Python call less: `tick` runs on every commit).
        wall = _time_ns() // 1_000_000 if self._now_ms is wall_ms else self._now_ms()
        if self._reference_ms is not None and (self.skew_ms or not 0 <= wall - self._checked_at_ms < RECHECK_MS):
            wall = self._reading_ms(wall)
        wall <<= LOGICAL_BITS
        self.last = wall if wall > self.last else self.last + 1
        return self.last

    def observe(self, hlc: int) -> None:
        """Advance past `hlc` (a record read from a peer or from our own journal)."""
        if hlc > self.last:
            self.last = hlc

    def too_far_ahead(self, hlc: int) -> int:
        """How many ms `hlc` lies beyond wall clock + drift_max_ms (0 when acceptable)."""
        excess = physical_ms(hlc) - self.reading_ms() - self.drift_max_ms
        return excess if excess > 0 else 0
