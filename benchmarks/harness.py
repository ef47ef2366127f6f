"""Timing, interleaved rounds, result lines and the markdown table.

Fairness rules every benchmark follows:
- Both sides run the same seeded workload on temp dirs on the same disk, set up before
  timing starts.
- Rounds are interleaved: in each round every contender runs for the same time budget,
  and the order of contenders rotates from round to round, so that a noisy neighbour or
  a slow fsync period hits all of them alike.
- A figure is the median over rounds. The ratio is the median of the per-round ratios
  (ours and peer measured close together, so a slow-disk period that spans a round
  cancels out); the ratio of the medians and every per-round ratio are printed too.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

perf_counter = time.perf_counter


class Contender(Protocol):
    """One side of a comparison, already set up (accounts opened) before timing.

    ``run(budget_s)`` does operations until at least ``budget_s`` seconds have passed and
    returns ``(operations, elapsed_s)``. It continues the workload where the previous call
    stopped, so every contender walks the same sequence of transfers.
    """

    name: str

    def run(self, budget_s: float) -> tuple[int, float]: ...

    def close(self) -> None: ...


def run_interleaved(
    contenders: list[Contender], rounds: int, round_s: float
) -> dict[str, list[float]]:
    """Run every contender ``rounds`` times for ``round_s`` seconds, rotating the order.

    Returns: contender name -> list of rates (operations per second), one per round.
    """
    rates: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(rounds):
        k = r % len(contenders)
        order = contenders[k:] + contenders[:k]
        for contender in order:
            ops, elapsed_s = contender.run(round_s)
            rates[contender.name].append(ops / elapsed_s)
    return rates


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Temp:
    """A temp dir on the disk under test (``root``), removed on exit."""

    root: str | None
    prefix: str = "bench-"
    path: str = field(default="", init=False)

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix=self.prefix, dir=self.root)
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _round(x: float | None, digits: int = 3) -> float | None:
    if x is None:
        return None
    if x != x:  # nan
        return None
    if abs(x) >= 100:
        return round(x, 1)
    return round(x, digits)


def ratio_line(
    bench: str,
    title: str,
    unit: str,
    ours_name: str,
    ours_rates: list[float],
    peer_name: str,
    peer_rates: list[float],
    target_ratio: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """A result where the target is a ratio ours/peer (higher is better for both)."""
    ours = median(ours_rates)
    peer = median(peer_rates)
    per_round = [o / p for o, p in zip(ours_rates, peer_rates) if p]
    # The headline ratio is the median of per-round ratios: each pair ran close together,
    # so a slow-disk period that spans a round cancels out of its ratio.
    ratio = median(per_round) if per_round else None
    line: dict[str, Any] = {
        "bench": bench,
        "title": title,
        "unit": unit,
        "ours_name": ours_name,
        "ours": _round(ours),
        "peer_name": peer_name,
        "peer": _round(peer),
        "ratio": _round(ratio),
        "ratio_of_medians": _round(ours / peer) if peer else None,
        "ratio_per_round": [_round(x) for x in per_round],
        "target": f">= {target_ratio:g}x" if target_ratio is not None else None,
        "met": (ratio >= target_ratio) if (target_ratio is not None and ratio) else None,
        "rounds": len(ours_rates),
    }
    line.update(extra)
    return line


def value_line(
    bench: str,
    title: str,
    unit: str,
    ours_name: str,
    ours: float | None,
    *,
    peer_name: str | None = None,
    peer: float | None = None,
    higher_is_better: bool = True,
    target_min: float | None = None,
    target_max: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A result with an absolute target (a rate floor or a time ceiling), peer optional.

    ``ratio`` is always "how many times better than the peer": ours/peer for rates,
    peer/ours for times.
    """
    ratio = None
    if ours and peer:
        ratio = ours / peer if higher_is_better else peer / ours
    target = None
    met = None
    if target_min is not None:
        target = f">= {target_min:,g} {unit}"
        met = ours is not None and ours >= target_min
    if target_max is not None:
        target = f"<= {target_max:,g} {unit}"
        met = ours is not None and ours <= target_max
    line: dict[str, Any] = {
        "bench": bench,
        "title": title,
        "unit": unit,
        "ours_name": ours_name,
        "ours": _round(ours),
        "peer_name": peer_name,
        "peer": _round(peer),
        "ratio": _round(ratio),
        "target": target,
        "met": met,
    }
    line.update(extra)
    return line


def skipped_line(bench: str, title: str, reason: str) -> dict[str, Any]:
    return {"bench": bench, "title": title, "skipped": reason}


def meta_line(args: Any) -> dict[str, Any]:
    """The first line of every run: what machine, which code, which options."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip() or None
        # Uncommitted engine changes make the commit id a lie: say so.
        dirty = bool(subprocess.run(
            ["git", "status", "--porcelain", "--", "workers/prevalence", "workers/models"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {
        "bench": "_meta",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python -m benchmarks", *getattr(args, "argv", sys.argv[1:])]),
        "git_commit": commit,
        "engine_uncommitted_changes": dirty,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "temp_root": args.dir or tempfile.gettempdir(),
        # Other work on the machine skews every figure: a reader should see how busy it was.
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "quick": args.quick,
    }


def end_line(started_s: float) -> dict[str, Any]:
    """The last line of a run: how long it took and how busy the machine was by then."""
    return {
        "bench": "_end",
        "duration_s": round(perf_counter() - started_s, 1),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


class Reporter:
    """Prints each result as one JSON line as soon as it is known, and keeps them all."""

    def __init__(self, print_json: bool, out_path: str | None) -> None:
        self.print_json = print_json
        self.lines: list[dict[str, Any]] = []
        self._out = open(out_path, "w", encoding="utf-8") if out_path else None

    def emit(self, line: dict[str, Any]) -> None:
        self.lines.append(line)
        text = json.dumps(line, sort_keys=False)
        if self.print_json:
            print(text, flush=True)
        if self._out:
            self._out.write(text + "\n")
            self._out.flush()

    def note(self, message: str) -> None:
        """Progress for a human, on stderr: stdout carries only JSON lines."""
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._out:
            self._out.close()


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and unit in ("s", "ms", "µs"):
        return f"{x:.3g}" if x < 100 else f"{x:,.0f}"
    if isinstance(x, (int, float)):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.3g}"
    return str(x)


def markdown_table(lines: list[dict[str, Any]]) -> str:
    """Render result lines as the README's markdown table, headed by how they were made."""
    meta = next((l for l in lines if l.get("bench") == "_meta"), {})
    out = []
    if meta:
        out.append(
            f"Produced by `{meta.get('command')}` on {meta.get('date_utc')} "
            f"(commit {meta.get('git_commit')}"
            f"{' + uncommitted engine changes' if meta.get('engine_uncommitted_changes') else ''}, "
            f"Python {meta.get('python')}, "
            f"SQLite {meta.get('sqlite')}, {meta.get('cpus')} cores, "
            f"load average {meta.get('loadavg_1m_at_start')} at start"
            f"{', quick run' if meta.get('quick') else ''})."
        )
        out.append("")
    out.append("| Benchmark | Ours | Peer | Peer figure | Ratio | Target | Met | Detail |")
    out.append("|---|---:|---|---:|---:|---|:-:|---|")
    for l in lines:
        if l.get("bench", "").startswith("_"):
            continue
        if "skipped" in l:
            out.append(f"| {l['title']} | skipped: {l['skipped']} | | | | | | |")
            continue
        unit = l.get("unit", "")
        ours = f"{_fmt(l.get('ours'), unit)} {unit}"
        peer = f"{_fmt(l.get('peer'), unit)} {unit}" if l.get("peer") is not None else "—"
        ratio = f"{l['ratio']:.2f}×" if l.get("ratio") is not None else "—"
        met = {True: "yes", False: "**no**", None: ""}[l.get("met")]
        out.append(
            f"| {l['title']} | {ours} | {l.get('peer_name') or '—'} | {peer} | {ratio} "
            f"| {l.get('target') or ''} | {met} | {l.get('detail') or ''} |"
        )
    return "\n".join(out)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Call ``fn`` once; return its result and the elapsed seconds."""
    t0 = perf_counter()
    result = fn()
    return result, perf_counter() - t0
