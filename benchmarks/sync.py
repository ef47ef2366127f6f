"""Issue 3's benchmarks: how fast a master applies its peers' journals, what a rebase
costs against state size and window size, and the replication lag between two masters
syncing every 100 ms. All in one process, on one temp folder, through the public API.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from typing import Any, Callable

from benchmarks import ours
from benchmarks.engine import Settings
from benchmarks.harness import Reporter, Temp, median, perf_counter, skipped_line, value_line
from benchmarks.workload import SEED, Workload, account_id, make_workload
from workers.prevalence import Rejected

BATCH = 1000
SETTLE_ROUNDS = 4


def settle(masters: list[Any], rounds: int = SETTLE_ROUNDS) -> None:
    """Sync every master in turn ``rounds`` times: joins acknowledged, ticks exchanged,
    every record committed everywhere (DESIGN §3: an idle cluster goes quiet in a round
    or two)."""
    for _ in range(rounds):
        for m in masters:
            m.sync()


def write_transfers(master: Any, wl: Workload, start: int, count: int) -> None:
    done = 0
    while done < count:
        n = min(BATCH, count - done)
        master.execute_many(
            [("transfer", [s, d, a], None) for s, d, a in wl.transfer_batch(start + done, n)]
        )
        done += n


def rebased(report: Any) -> bool | None:
    """Whether a sync report says it rebased; None when the report does not say."""
    for key in ("rebased", "rebase"):
        if isinstance(report, dict) and key in report:
            return bool(report[key])
        if hasattr(report, key):
            return bool(getattr(report, key))
    return None


def open_pair(root: str, fsync: str = "always") -> tuple[Any, Any]:
    a = ours.open_master(root, "a", fsync)
    b = ours.open_master(root, "b", fsync)
    settle([a, b])
    return a, b


def bench_sync_apply(s: Settings, wl: Workload, rep: Reporter) -> None:
    """B.sync() applying N fresh records from A's journal, fast path (no rebase)."""
    per_round = 20_000 if s.quick else 200_000
    rounds = 2 if s.quick else 3
    title = f"Sync apply rate from a peer's journal ({per_round:,} records per sync)"
    missing = ours.engine_missing()
    if missing:
        rep.emit(skipped_line("sync_apply_rate", title, missing))
        return
    with Temp(s.temp_root) as root:
        a, b = open_pair(root)
        ours.open_accounts(a, wl.account_ids, wl.initial_balance)
        settle([a, b])
        rates = []
        flags = []
        cursor = 0
        for _ in range(rounds):
            write_transfers(a, wl, cursor, per_round)
            cursor += per_round
            t0 = perf_counter()
            report = b.sync()
            elapsed_s = perf_counter() - t0
            rates.append(per_round / elapsed_s)
            flags.append(rebased(report))
            settle([a, b], 1)
        agree = a.query("total") == b.query("total")
        a.close()
        b.close()
    rep.emit(value_line(
        "sync_apply_rate", title, "records/s", "ours Master.sync (fast path)", median(rates),
        target_min=500_000, rates_per_round=[round(r) for r in rates],
        rebased_per_round=flags, totals_agree=agree,
        detail=f"{rounds} syncs of {per_round:,} records; rebased: {flags}",
    ))


def bench_rebase(s: Settings, wl: Workload, rep: Reporter) -> None:
    """A rebase forced on B: A commits one transfer, then B commits a window of W
    transfers without syncing, so A's record orders before B's tentative window."""
    sizes = (10_000,) if s.quick else (100_000, 1_000_000)
    windows = (1, 100) if s.quick else (1, 1_000, 10_000)
    missing = ours.engine_missing()
    if missing:
        rep.emit(skipped_line("rebase_cost", "Rebase cost", missing))
        return
    for accounts in sizes:
        state_wl = make_workload(account_count=accounts, transfer_count=max(windows) + 1, seed=SEED + accounts)
        rep.note(f"rebase: building a state of {accounts:,} accounts on two masters")
        with Temp(s.temp_root) as root:
            a, b = open_pair(root, "never")
            t0 = perf_counter()
            ours.open_accounts(a, state_wl.account_ids, state_wl.initial_balance)
            settle([a, b])
            setup_s = perf_counter() - t0
            # The fixed cost of a sync that brings one record on the fast path, for scale.
            a.execute("transfer", account_id(0), account_id(1), 1)
            t0 = perf_counter()
            report = b.sync()
            fast_s = perf_counter() - t0
            settle([a, b])
            fast_flag = rebased(report)
            for window in windows:
                a.execute("transfer", account_id(2), account_id(3), 1)
                write_transfers(b, state_wl, 0, window)
                t0 = perf_counter()
                report = b.sync()
                rebase_s = perf_counter() - t0
                flag = rebased(report)
                settle([a, b])
                agree = a.query("total") == b.query("total")
                rep.emit(value_line(
                    f"rebase_cost_{accounts}_{window}",
                    f"Rebase on sync: {accounts:,} accounts, window of {window:,} tentative records",
                    "ms", "ours Master.sync (rebase)", rebase_s * 1000,
                    higher_is_better=False,
                    accounts=accounts, window=window, rebased=flag,
                    fast_path_sync_ms=round(fast_s * 1000, 3), fast_path_rebased=fast_flag,
                    setup_s=round(setup_s, 2), totals_agree=agree,
                    detail=f"rebased={flag}; a fast-path sync of 1 record costs {fast_s * 1000:.2f} ms",
                ))
            a.close()
            b.close()


def bench_lag(s: Settings, wl: Workload, rep: Reporter) -> None:
    """Commit on A, visible on B after B's next sync; B syncs every 100 ms in a thread."""
    sync_interval_s = 0.100
    duration_s = 1.5 if s.quick else 10.0
    title = "Replication lag A→B, B syncing every 100 ms (in-process)"
    missing = ours.engine_missing()
    if missing:
        rep.emit(skipped_line("replication_lag", title, missing))
        return
    probe = "lag-probe"
    with Temp(s.temp_root) as root:
        a, b = open_pair(root)
        ours.open_accounts(a, list(wl.account_ids) + [probe], 0)
        settle([a, b])
        seen: list[tuple[float, int]] = []  # (time B's sync returned, probe balance on B)
        sync_ms: list[float] = []
        stop = threading.Event()

        def syncer() -> None:
            # Fixed-rate schedule, as celery beat sends it: a slow sync does not push the
            # next one later.
            next_at = perf_counter()
            while not stop.is_set():
                t0 = perf_counter()
                b.sync()
                t1 = perf_counter()
                try:
                    seen.append((t1, b.query("balance", probe)))
                except Rejected:  # B has not read the probe's account yet
                    seen.append((t1, None))
                sync_ms.append((t1 - t0) * 1000)
                next_at += sync_interval_s
                delay_s = next_at - perf_counter()
                if delay_s > 0:
                    stop.wait(delay_s)

        thread = threading.Thread(target=syncer, name="bench-syncer", daemon=True)
        thread.start()
        rng = random.Random(SEED)
        committed: list[float] = []
        end = perf_counter() + duration_s
        while perf_counter() < end:
            time.sleep(rng.uniform(0.0, 0.050))
            a.execute("deposit", probe, 1)
            committed.append(perf_counter())
        # Let B catch up with the last commit, then stop it.
        deadline = perf_counter() + 5.0
        while (not seen or seen[-1][1] < len(committed)) and perf_counter() < deadline:
            time.sleep(0.01)
        stop.set()
        thread.join(timeout=10)
        a.close()
        b.close()
    lags_ms = []
    j = 0
    for i, t_commit in enumerate(committed):
        while j < len(seen) and seen[j][1] < i + 1:
            j += 1
        if j == len(seen):
            break
        lags_ms.append((seen[j][0] - t_commit) * 1000)
    lost = len(committed) - len(lags_ms)
    q = statistics.quantiles(lags_ms, n=100, method="inclusive") if len(lags_ms) >= 2 else [float("nan")] * 99
    rep.emit(value_line(
        "replication_lag", title, "ms", "p50 lag", q[49], higher_is_better=False,
        p99_ms=round(q[98], 2), max_ms=round(max(lags_ms), 2) if lags_ms else None,
        commits=len(committed), not_seen=lost, syncs=len(sync_ms),
        sync_ms_p50=round(median(sync_ms), 3),
        sync_ms_p99=round(statistics.quantiles(sync_ms, n=100, method="inclusive")[98], 3) if len(sync_ms) >= 2 else None,
        sync_interval_ms=sync_interval_s * 1000,
        detail=(f"p99 {q[98]:.1f} ms over {len(lags_ms)} commits; "
                f"sync itself p50 {median(sync_ms):.2f} ms"),
    ))


BENCHES: dict[str, Callable[[Settings, Workload, Reporter], None]] = {
    "sync_apply": bench_sync_apply,
    "rebase": bench_rebase,
    "lag": bench_lag,
}
