"""Prometheus metrics of a master worker (``PREVALENCE_METRICS_PORT``).

Served by `prometheus_client`'s HTTP server in a thread of the worker. The values are set
by the task thread after every sync (and every commit's journal sync is observed as it
completes), never read from the engine by the scraping thread: a scrape never touches the
master's state.

Metrics (label ``master`` on every one; ``peer`` where it says so):

- ``prevalence_seq`` — last seq this master wrote.
- ``prevalence_frontier_age_seconds`` — wall time since the frontier's clock reading: how
  far behind "now" the committed state is.
- ``prevalence_lag_records{peer}`` — the peer's records this master has not read yet.
- ``prevalence_tentative_records`` — real records above the frontier.
- ``prevalence_rebases_total``, ``prevalence_reversed_outcomes_total`` — counters.
- ``prevalence_sync_duration_seconds`` — histogram of `Master.sync` durations.
- ``prevalence_fsync_duration_seconds`` — histogram of each commit's journal sync.
- ``prevalence_journal_bytes`` — bytes in this master's journal segments.
- ``prevalence_snapshot_age_seconds`` — wall time since the newest own snapshot's frontier.
- ``prevalence_clock_skew_seconds{peer}`` — how far the peer's last record's clock is ahead
  of this master's (negative: behind).
- ``prevalence_wall_clock_skew_seconds`` — how far this master's wall clock is ahead of the
  shared folder's (negative: behind) while that is more than the allowed drift, when it
  takes no writes; 0 while they agree.
- ``prevalence_last_error`` — 1 while the master reports an error, else 0.
- ``prevalence_up`` — 1 once the master is open and consuming.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

logger = logging.getLogger("workers.master.metrics")

#: Buckets of the sync and fsync histograms (seconds): sub-millisecond disks to slow NFS.
SYNC_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """One master's metrics in their own registry (several masters may share a process in
    tests; a registry per master keeps them apart)."""

    def __init__(self, master: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.master = master
        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Gauge(name, doc, ("master", *labels), registry=r)

        self.seq = gauge("prevalence_seq", "Last seq this master wrote to its journal.")
        self.frontier_age = gauge("prevalence_frontier_age_seconds",
                                  "Seconds between now and the frontier's clock reading.")
        self.lag = gauge("prevalence_lag_records", "Records of the peer this master has not read yet.", ("peer",))
        self.skew = gauge("prevalence_clock_skew_seconds",
                          "How far the peer's last record's clock is ahead of this master's.", ("peer",))
        self.wall_skew = gauge("prevalence_wall_clock_skew_seconds",
                               "This wall clock minus the shared folder's, beyond the allowed drift "
                               "(writes refused); 0 within it.")
        self.tentative = gauge("prevalence_tentative_records", "Real records above the frontier.")
        self.journal_bytes = gauge("prevalence_journal_bytes", "Bytes in this master's journal segments.")
        self.snapshot_age = gauge("prevalence_snapshot_age_seconds",
                                  "Seconds since the frontier of the newest own snapshot.")
        self.last_error = gauge("prevalence_last_error", "1 while the master reports an error.")
        self.up = gauge("prevalence_up", "1 once the master is open and consuming.")
        self.rebases = Counter("prevalence_rebases", "Rebases (a record arrived below tentative ones).",
                               ("master",), registry=r)
        self.reversed = Counter("prevalence_reversed_outcomes",
                                "Own outcomes a rebase changed (ok <-> refused).", ("master",), registry=r)
        self.sync_duration = Histogram("prevalence_sync_duration_seconds", "Duration of Master.sync.",
                                       ("master",), buckets=SYNC_BUCKETS_S, registry=r)
        self.fsync_duration = Histogram("prevalence_fsync_duration_seconds",
                                        "Duration of each commit's journal sync.", ("master",),
                                        buckets=SYNC_BUCKETS_S, registry=r)
        self._fsync = self.fsync_duration.labels(master)
        self._rebases_seen = 0
        self._reversed_seen = 0

    def serve(self, address: tuple[str, int]) -> None:
        """Start the HTTP endpoint (``/metrics``) in a daemon thread."""
        from prometheus_client import start_http_server

        start_http_server(address[1], addr=address[0], registry=self.registry)
        logger.info("prevalence: metrics of %s on http://%s:%d/metrics", self.master, *address)

    def observe_fsync(self, seconds: float) -> None:
        """`Master.on_sync`: one commit's journal sync took `seconds`."""
        self._fsync.observe(seconds)

    def update(self, status: dict[str, Any], report: dict[str, Any] | None, *, up: bool,
               journal_dir: str | None = None) -> None:
        """Set every gauge from a status document (and the sync report that preceded it)."""
        m = self.master
        now_ms = time.time() * 1000
        self.up.labels(m).set(1 if up else 0)
        self.seq.labels(m).set(status.get("seq") or 0)
        frontier = status.get("frontier") or 0
        self.frontier_age.labels(m).set(max(0.0, (now_ms - (frontier >> 16)) / 1000) if frontier else 0)
        self.tentative.labels(m).set(status.get("tentative") or 0)
        self.last_error.labels(m).set(1 if status.get("last_error") else 0)
        self.wall_skew.labels(m).set((status.get("clock_skew_ms") or 0) / 1000)
        snap = status.get("snapshot_frontier")
        if isinstance(snap, int) and snap > 0:
            self.snapshot_age.labels(m).set(max(0.0, (now_ms - (snap >> 16)) / 1000))
        clock = status.get("clock") or 0
        horizons = status.get("horizons") if isinstance(status.get("horizons"), dict) else {}
        for peer, horizon in horizons.items():
            if peer != m and isinstance(horizon, int) and horizon and clock:
                self.skew.labels(m, peer).set(((horizon >> 16) - (clock >> 16)) / 1000)
        lag = status.get("lag") if isinstance(status.get("lag"), dict) else {}
        for peer, behind in lag.items():
            if isinstance(behind, int):
                self.lag.labels(m, peer).set(behind)
        rebases = status.get("rebases") or 0
        if rebases > self._rebases_seen:
            self.rebases.labels(m).inc(rebases - self._rebases_seen)
            self._rebases_seen = rebases
        reversed_ = status.get("outcomes_changed") or 0
        if reversed_ > self._reversed_seen:
            self.reversed.labels(m).inc(reversed_ - self._reversed_seen)
            self._reversed_seen = reversed_
        if report and isinstance(report.get("duration_ms"), (int, float)):
            self.sync_duration.labels(m).observe(report["duration_ms"] / 1000)
        if journal_dir is not None:
            self.journal_bytes.labels(m).set(_dir_bytes(journal_dir))


def _dir_bytes(path: str) -> int:
    """Bytes of the regular files in `path` (the journal's segments); 0 when missing."""
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and entry.name.endswith(".log"):
                    total += entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0
    return total
