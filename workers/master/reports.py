"""Task reports: what a master's `sync` and `snapshot` tasks return, made to be read.

Flower, the worker log and ``prevalence sync --master M`` show a task's result as it is,
so these reports carry the figures an operator looks for, in words and units rather than
raw engine values: the stable frontier as an ISO 8601 UTC time (the raw hlc beside it),
the lag per peer (records that peer has published and this master has not read yet),
the tentative records, rebases and reversed outcomes (this sync's and the total), and
the digest of the state (``None`` while the state is changing: a master computes it only
once its state has held still for a sync, see `MasterRuntime.status_document`).

Plain data only (JSON builtins), built from the engine's sync report and the status
document the runtime just published, so that nothing here touches the state.
"""

from __future__ import annotations

import time
from typing import Any

#: Low bits of an hlc that hold its logical counter (`workers.prevalence.clock`; repeated
#: here so that formatting a report never imports the engine).
HLC_LOGICAL_BITS = 16


def hlc_iso(hlc: Any) -> str | None:
    """An hlc as the ISO 8601 UTC time of its physical part, to the millisecond, with
    ``+n`` for a non-zero logical counter (``2026-12-01T00:41:02.123Z+2``); None for none."""
    if not isinstance(hlc, int) or isinstance(hlc, bool) or hlc <= 0:
        return None
    physical_ms, counter = hlc >> HLC_LOGICAL_BITS, hlc & ((1 << HLC_LOGICAL_BITS) - 1)
    stamp = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(physical_ms // 1000))
             + f".{physical_ms % 1000:03d}Z")
    return stamp + (f"+{counter}" if counter else "")


def sync_report(master: str, report: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """The result of one `prevalence.sync` task on `master`.

    Args:
        report: what `Master.sync()` returned, or ``{"error", "error_type"}`` when it raised.
        status: the status document published right after it (`MasterRuntime.publish`).

    Keys, in the order Flower shows them: ``master``, ``frontier`` (ISO time),
    ``lag`` (peer -> records not read yet; None for a peer whose progress is unknown),
    ``tentative``, ``rebased`` (this sync), ``rebases`` (total), ``reversed`` (outcomes this
    sync reversed), ``reversed_total``, ``digest``, then ``applied`` (records read per
    peer), ``ticked``, ``joined``, ``duration_ms``, ``frontier_hlc`` and, when there are
    any, ``held``, ``peer_errors``, ``last_error``, ``error`` and ``error_type``.
    """
    frontier_hlc = report.get("frontier", status.get("frontier"))
    result: dict[str, Any] = {
        "master": master,
        "frontier": hlc_iso(frontier_hlc),
        "lag": status.get("lag"),
        "tentative": report.get("tentative", status.get("tentative")),
        "rebased": report.get("rebased"),
        "rebases": status.get("rebases"),
        "reversed": report.get("reversed"),
        "reversed_total": status.get("outcomes_changed"),
        "digest": status.get("digest"),
        "applied": report.get("applied"),
        "ticked": report.get("ticked"),
        "joined": report.get("joined", status.get("joined")),
        "duration_ms": report.get("duration_ms"),
        "frontier_hlc": frontier_hlc,
    }
    for key, value in (("held", report.get("held")), ("peer_errors", report.get("errors")),
                       ("last_error", status.get("last_error")), ("error", report.get("error")),
                       ("error_type", report.get("error_type"))):
        if value:
            result[key] = value
    return result


def snapshot_report(master: str, path: Any, status: dict[str, Any],
                    duration_ms: float) -> dict[str, Any]:
    """The result of one `prevalence.snapshot` task on `master` that wrote (or kept) the
    snapshot at `path`: ``master``, ``frontier`` (ISO time of the snapshot's frontier),
    ``path``, ``duration_ms``, ``frontier_hlc``."""
    frontier_hlc = status.get("snapshot_frontier")
    return {"master": master, "frontier": hlc_iso(frontier_hlc), "path": str(path),
            "duration_ms": round(duration_ms, 3), "frontier_hlc": frontier_hlc}
