"""Hybrid logical clock (Kulkarni et al., 2014): physical milliseconds in the high bits,
a logical counter in the low 16 bits, packed in one int.

A master stamps each record with `tick()`, strictly above every value it has issued or
observed, so a transaction issued after reading another orders after it. Reading a peer's
record calls `observe()`. A peer far ahead of our wall clock is not followed blindly:
sync stops reading a peer at a record stamped more than `drift_max_ms` past this wall
clock (`too_far_ahead`) and reports it, so one bad clock cannot drag the cluster into the
future; the record is read once real time catches up.
"""

from __future__ import annotations

import time
from typing import Callable

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1
DRIFT_MAX_MS_DEFAULT = 60_000


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def physical_ms(hlc: int) -> int:
    return hlc >> LOGICAL_BITS


def from_ms(ms: int) -> int:
    return ms << LOGICAL_BITS


class HybridClock:
    """A hybrid logical clock; `now_ms` is injectable for tests."""

    def __init__(self, last: int = 0, *, now_ms: Callable[[], int] = wall_ms,
                 drift_max_ms: int = DRIFT_MAX_MS_DEFAULT):
        self.last = last
        self._now_ms = now_ms
        self.drift_max_ms = drift_max_ms

    def tick(self) -> int:
        """A new timestamp strictly above every one issued or observed."""
        wall = self._now_ms() << LOGICAL_BITS
        self.last = wall if wall > self.last else self.last + 1
        return self.last

    def observe(self, hlc: int) -> None:
        """Advance past `hlc` (a record read from a peer or from our own journal)."""
        if hlc > self.last:
            self.last = hlc

    def too_far_ahead(self, hlc: int) -> int:
        """How many ms `hlc` lies beyond wall clock + drift_max_ms (0 when acceptable)."""
        excess = physical_ms(hlc) - self._now_ms() - self.drift_max_ms
        return excess if excess > 0 else 0
