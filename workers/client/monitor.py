"""Monitoring for operators: the cluster view built from the masters' status documents.

After every sync (and at start and stop) a master writes its status document, as JSON, to
the key ``prevalence:status:<master>`` with a TTL (`workers.status`, written by
`workers.master.publisher`). Redis holds nothing that matters (DESIGN invariant 6): if the
keys are flushed they come back at the next sync, and if Redis is down `cluster_view` reads
the masters' ``progress`` files from the shared folder instead and says so.

`cluster_view` returns plain data (``source``, ``converged``, ``verdict``, ``reasons``,
``masters``); `render_table` prints it for people, ``--json`` prints it for machines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from workers.status import STATUS_KEY_PREFIX, redis_client

#: How many masters `read_status_documents` reads at most (bound every loop).
MASTERS_MAX = 1000


class MonitorUnavailable(Exception):
    """Raised when the Redis that holds status documents cannot be reached or read."""


def read_status_documents(url: str) -> dict[str, dict[str, Any]]:
    """Read every master's status document from Redis.

    Raises `MonitorUnavailable` when Redis cannot be reached. A document that is not valid
    JSON is returned as ``{"master": name, "unreadable": text}``.
    """
    try:
        client = redis_client(url)
        keys = []
        for key in client.scan_iter(match=STATUS_KEY_PREFIX + "*", count=200):
            keys.append(key)
            if len(keys) >= MASTERS_MAX:
                break
        values = client.mget(keys) if keys else []
    except Exception as exc:  # any redis/socket failure means "Redis unavailable"
        raise MonitorUnavailable(f"{type(exc).__name__}: {exc}") from exc
    documents: dict[str, dict[str, Any]] = {}
    for key, value in zip(keys, values):
        if value is None:
            continue  # expired between SCAN and MGET
        name = key.decode()[len(STATUS_KEY_PREFIX):]
        try:
            documents[name] = json.loads(value)
        except ValueError:
            documents[name] = {"master": name, "unreadable": value[:200].decode("replace")}
    return documents


def _short(digest: Any) -> str:
    return str(digest)[:12] if digest else "-"


def add_lag_records(masters: dict[str, dict[str, Any]]) -> None:
    """Set ``lag_records`` on each document: per peer, how many of the peer's records
    (its ``seq``) this master has not read yet (its ``cursors``). Unknown peers are left out."""
    seqs = {name: doc.get("seq") for name, doc in masters.items()}
    for name, doc in masters.items():
        cursors = doc.get("cursors")
        if not isinstance(cursors, dict):
            continue
        behind = {}
        for peer, seq in seqs.items():
            if peer != name and isinstance(seq, int) and isinstance(cursors.get(peer, 0), int):
                behind[peer] = max(0, seq - cursors.get(peer, 0))
        doc["lag_records"] = behind


def format_hlc(hlc: Any) -> str:
    """An hlc reading as the UTC wall-clock time of its physical part (``HH:MM:SS.mmm``),
    with ``+n`` for a non-zero logical counter; ``-`` for none."""
    if not isinstance(hlc, int) or hlc <= 0:
        return "-"
    physical_ms, counter = hlc >> 16, hlc & 0xFFFF
    stamp = time.strftime("%H:%M:%S", time.gmtime(physical_ms / 1000)) + f".{physical_ms % 1000:03d}"
    return stamp + (f"+{counter}" if counter else "")


def _lag_text(lag: Any) -> str:
    if not isinstance(lag, dict) or not lag:
        return "-"
    return " ".join(f"{peer}:{value}" for peer, value in sorted(lag.items()))


def evaluate(masters: dict[str, dict[str, Any]], *, expected: Iterable[str] = (),
             stale_after_s: float | None = None, now_s: float | None = None,
             has_tentative: bool = True, down: dict[str, str] | None = None
             ) -> tuple[bool, list[str]]:
    """Decide whether the masters have converged, and why not.

    Converged (DESIGN §6): every expected master reported, none is down, stale or stopped,
    every one has ``tentative == 0``, all report the same cursors and the same digest.
    `down` maps a master whose lease shows its process gone to why (`mark_down`). Returns
    ``(converged, reasons)``; `reasons` explains each failed condition in a sentence.
    """
    reasons: list[str] = []
    down = down or {}
    now_s = time.time() if now_s is None else now_s
    missing = sorted(set(expected) - set(masters))
    for name in missing:
        if name in down:
            reasons.append(f"{name} is down: {down[name]}")
        else:
            reasons.append(f"{name} has not reported (down, or not started yet)")
    if not masters:
        return False, reasons or ["no master has reported"]
    for name, doc in sorted(masters.items()):
        if "unreadable" in doc:
            reasons.append(f"{name}'s status document is unreadable")
            continue
        state = doc.get("state")
        if name in down:
            reasons.append(f"{name} is down: {down[name]}")
        elif state and state not in ("ready", "running"):
            reasons.append(f"{name} is {state}")
        if (name not in down and stale_after_s is not None
                and isinstance(doc.get("reported_at"), (int, float))):
            age_s = now_s - doc["reported_at"]
            if age_s > stale_after_s:
                reasons.append(f"{name}'s last report is {age_s:.0f} s old (busy, or down?)")
        if has_tentative and doc.get("tentative") not in (0, None):
            reasons.append(f"{name} has {doc.get('tentative')} tentative record(s)")
        if doc.get("last_error"):
            reasons.append(f"{name} reports an error: {doc['last_error']}")
    readable = {n: d for n, d in masters.items() if "unreadable" not in d}
    cursors = {json.dumps(d.get("cursors"), sort_keys=True) for d in readable.values()}
    if len(cursors) > 1:
        reasons.append("the masters have read different records (cursors differ)")
    # A digest is left out (empty, None) while the state changes: unknown, not different.
    pending = sorted(n for n, d in readable.items() if not d.get("digest"))
    if pending:
        reasons.append(f"no digest yet from {', '.join(pending)} (reported once the state has "
                       "held still for a sync)")
    digests = {d.get("digest") for d in readable.values() if d.get("digest")}
    if len(digests) > 1:
        if len(cursors) == 1 and all(d.get("tentative") == 0 for d in readable.values()):
            reasons.append("DIVERGED: same records read, different digests; run "
                           "`prevalence verify` and report a bug (or a non-deterministic "
                           "transaction)")
        else:
            reasons.append("digests differ (expected while records are in flight)")
    return not reasons, reasons


def cluster_view(broker_url: str, shared_dir: Path | None, *, sync_interval_s: float,
                 read_progress: Callable[[Path], dict[str, dict[str, Any]]] | None = None,
                 read_retired: Callable[[Path], dict[str, int]] | None = None,
                 read_leases: Callable[[Path], dict[str, dict[str, Any]]] | None = None,
                 now_s: float | None = None) -> dict[str, Any]:
    """Build the cluster view from Redis, or from the progress files when Redis is down.

    Args:
        broker_url: the Redis holding status documents.
        shared_dir: the shared folder (its membership is the expected set of masters);
            None or unreadable means "trust Redis alone".
        sync_interval_s: the configured interval; a report older than three intervals plus
            30 s counts as stale.
        read_progress: `workers.prevalence.read_all_progress`, injected by the caller.
        read_retired: the retired names in the folder (name -> cut), injected likewise.
        read_leases: what each master's lease says of its process
            (`workers.prevalence.cluster.lease.read_all_holders`): a master whose process
            is gone, or whose heartbeat stopped, shows as ``down`` at once, instead of
            ``ready`` until its last report grows stale.
    """
    now_s = time.time() if now_s is None else now_s
    progress: dict[str, dict[str, Any]] | None = None
    progress_error: str | None = None
    if shared_dir is not None and read_progress is not None:
        try:
            progress = read_progress(shared_dir)
        except Exception as exc:  # a missing or unreadable folder is shown, not fatal
            progress_error = f"{type(exc).__name__}: {exc}"
    retired: set[str] = set()
    if shared_dir is not None and read_retired is not None:
        try:
            retired = set(read_retired(shared_dir))
        except Exception as exc:  # shown below with the folder's other troubles
            progress_error = progress_error or f"{type(exc).__name__}: {exc}"
    leases: dict[str, dict[str, Any]] = {}
    if shared_dir is not None and read_leases is not None:
        try:
            leases = read_leases(shared_dir)
        except Exception as exc:  # shown below with the folder's other troubles
            progress_error = progress_error or f"{type(exc).__name__}: {exc}"
    expected = [n for n in (progress or {}) if n not in retired]
    stale_after_s = 3 * sync_interval_s + 30.0
    view: dict[str, Any] = {"generated_at": now_s, "broker_url": _redact(broker_url),
                            "shared_dir": str(shared_dir) if shared_dir else None}
    try:
        masters = read_status_documents(broker_url)
        view["source"] = "redis"
        # A retired master is out of the cluster for good: not expected, not evaluated.
        retired |= {n for doc in masters.values() for n in (doc.get("retired") or {})}
        expected = [n for n in expected if n not in retired]
        masters = {n: d for n, d in masters.items() if n not in retired}
        down = mark_down(masters, leases)
        converged, reasons = evaluate(masters, expected=expected, stale_after_s=stale_after_s,
                                      now_s=now_s, down=down)
        # Show a member that has not reported with what its progress file says.
        for name in expected:
            if name not in masters and (progress or {}).get(name):
                doc = dict(progress[name])
                doc["state"] = "down" if name in down else "no report"
                masters[name] = doc
        mark_down(masters, leases)
    except MonitorUnavailable as exc:
        view["source"] = "progress-files"
        view["redis_error"] = str(exc)
        masters = {}
        for name, doc in (progress or {}).items():
            if name in retired:
                continue
            doc = dict(doc or {})
            doc.setdefault("master", name)
            if "joined" in doc:
                doc.setdefault("state", "ready" if doc["joined"] else "joining")
            masters[name] = doc
        converged, reasons = evaluate(masters, now_s=now_s, down=mark_down(masters, leases))
        if progress is None:
            reasons.append("the shared folder could not be read either"
                           + (f" ({progress_error})" if progress_error else ""))
            converged = False
    view["retired"] = sorted(retired)
    if progress_error:
        view["shared_dir_error"] = progress_error
    for name, doc in masters.items():
        reported_at = doc.get("reported_at", doc.get("updated"))
        if isinstance(reported_at, (int, float)):
            doc["age_s"] = round(now_s - reported_at, 1)
    add_lag_records(masters)
    view["masters"] = masters
    view["converged"] = converged
    view["reasons"] = reasons
    view["verdict"] = _verdict(view)
    return view


def mark_down(masters: dict[str, dict[str, Any]], leases: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Set ``state`` to ``down`` (and ``down`` to why) on every master whose lease says its
    process is gone; return those masters' names with why. A master that stopped cleanly
    (state ``stopped``, lease released) is left as it is."""
    down = {name: lease.get("why", "its lease says so") for name, lease in leases.items()
            if lease.get("lease") == "down"}
    for name, why in down.items():
        doc = masters.get(name)
        if doc is not None and doc.get("state") != "stopped":
            doc["state"] = "down"
            doc["down"] = why
    return down


def _redact(url: str) -> str:
    """Hide a password in a Redis URL before printing it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def _verdict(view: dict[str, Any]) -> str:
    n = len(view["masters"])
    if view["converged"]:
        digest = _short(next(iter(view["masters"].values())).get("digest"))
        return f"CONVERGED: {n} master(s), same records read, same digest {digest}."
    return "NOT CONVERGED: " + "; ".join(view["reasons"]) + "."


def render_table(view: dict[str, Any]) -> str:
    """Render a cluster view as a table followed by the verdict, for a terminal."""
    lines: list[str] = []
    if view["source"] == "redis":
        lines.append(f"Source: status documents in Redis ({view['broker_url']}).")
    else:
        lines.append(f"Redis is unavailable ({view.get('redis_error')}).")
        lines.append(f"Showing the progress files in {view.get('shared_dir')} instead "
                     "(written by each master when its progress changes; a master that is "
                     "down shows its last word).")
    header = ["MASTER", "STATE", "SEQ", "FRONTIER", "TENTATIVE", "LAG", "DIGEST", "REBASES",
              "AGE", "LAST ERROR"]
    rows = [header]
    for name, doc in sorted(view["masters"].items()):
        age = doc.get("age_s")
        rows.append([
            name,
            str(doc.get("state", "-")),
            str(doc.get("seq", "-")),
            format_hlc(doc.get("frontier")),
            str(doc.get("tentative", "-")),
            # The engine's own per-peer lag (records published but not read) when it
            # reports one; else the lag computed here from the reported seqs and cursors.
            _lag_text(doc["lag"] if isinstance(doc.get("lag"), dict) else doc.get("lag_records")),
            _short(doc.get("digest")),
            str(doc.get("rebases", "-")),
            f"{age:.0f}s" if isinstance(age, (int, float)) else "-",
            str(doc.get("last_error") or "-")[:60],
        ])
    if view.get("retired"):
        lines.append(f"Retired (no longer counted): {', '.join(view['retired'])}.")
    if len(rows) == 1:
        lines.append("(no master has reported)")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    lines.append("FRONTIER: hlc up to which records are committed (UTC). LAG: per peer, "
                 "records of that peer not read yet. AGE: seconds since the last report.")
    lines.append("")
    lines.append(view["verdict"])
    return "\n".join(lines)
