"""The shared folder's clock: the reference every master reads alike.

A file server stamps a file it writes with its own time (the modification time). A
master rewrites its lease every third of the lease TTL; right after writing the new lease
(and syncing it, so that on NFS the attributes come from the server) it reads that file's
modification time and notes it with a reading of its own monotonic clock taken just
before the write. Between two such measurements the shared folder's time is estimated
as the last stamp plus the monotonic time elapsed since: it does not move when this
host's wall clock is stepped, so `HybridClock` can tell at every write whether the wall
clock still agrees with the folder's (`clock.HybridClock.skew_ms`).

What it does not guarantee: the estimate is as good as the file server's clock (keep it
on NTP like every host: a server clock far off makes every master refuse writes, each
saying by how much its clock disagrees with the folder's), and it errs by the time one
write of the lease took (milliseconds, against a drift allowance of a minute by default).
A local folder's stamps come from this host's own clock: there it always agrees.
"""

from __future__ import annotations

from . import lease as lease_module


class ShareClock:
    """The shared folder's clock in ms, estimated from the last stamp measured."""

    __slots__ = ("_base",)

    def __init__(self) -> None:
        self._base: tuple[int, float] | None = None  # (stamp ms, monotonic s just before the write)

    def measured(self, mtime_ns: int, monotonic_before_s: float) -> None:
        """Note the stamp of a file written just after `monotonic_before_s` (one assignment:
        the heartbeat thread measures while the master's thread reads)."""
        self._base = (mtime_ns // 1_000_000, monotonic_before_s)

    def __call__(self) -> int | None:
        """The shared folder's time now, in ms, or None before the first measurement."""
        base = self._base
        if base is None:
            return None
        return base[0] + int((lease_module.monotonic_s() - base[1]) * 1000)
