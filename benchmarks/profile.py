"""Profile our side of a benchmark with cProfile and print where the time goes.

    python -m benchmarks.profile never        # execute, fsync=never
    python -m benchmarks.profile always       # execute, fsync=always
    python -m benchmarks.profile batch        # execute_many of 1000
    python -m benchmarks.profile query        # Master.query
    python -m benchmarks.profile recover      # Master.open on a 200k-record journal
    python -m benchmarks.profile sync_apply   # B.sync() of 200k records
    python -m benchmarks.profile rebase       # B.sync() that rebases, 100k accounts

With ``--plain`` the scenario runs unprofiled, for a sampling profiler:
``py-spy record -r 1000 -f raw -o out.txt -- python -m benchmarks.profile --plain never``.

For each function: calls, own time and cumulative time in µs per call, and both per
benchmark operation (a transaction, a read, a record), sorted by own time. cProfile adds
its own overhead per call (~0.1–0.3 µs), so per-op figures run above the benchmark's;
the split between functions is what to read.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from typing import Any, Callable

from benchmarks import child, ours, sync
from benchmarks.harness import Temp
from benchmarks.workload import make_workload, account_id, SEED


PLAIN = False  # --plain: run without cProfile (to sample with py-spy instead)


def _profile(fn: Callable[[], Any]) -> pstats.Stats | None:
    if PLAIN:
        import time
        t0 = time.perf_counter()
        fn()
        print(f"(plain run: {time.perf_counter() - t0:.3f} s)")
        return None
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    return pstats.Stats(prof)


def report(stats: pstats.Stats | None, ops: int, title: str, top: int = 25) -> None:
    if stats is None:
        print(f"== {title}: {ops:,} ops")
        return
    rows = []
    for (filename, line, name), (cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = _short(filename) + f":{line}({name})"
        rows.append((tt, ct, nc, where))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"\n== {title}: {ops:,} ops, profiled total {total:.3f} s = {total / ops * 1e6:.2f} µs/op")
    print(f"{'own µs/op':>10} {'cum µs/op':>10} {'calls/op':>9} {'own µs/call':>11} {'cum µs/call':>11}  function")
    for tt, ct, nc, where in rows[:top]:
        print(f"{tt / ops * 1e6:10.3f} {ct / ops * 1e6:10.3f} {nc / ops:9.3f} "
              f"{tt / nc * 1e6:11.3f} {ct / nc * 1e6:11.3f}  {where}")


def _short(filename: str) -> str:
    for marker in ("/workers/", "/benchmarks/", "/site-packages/", "/lib/python3"):
        i = filename.find(marker)
        if i >= 0:
            return filename[i + 1:]
    return filename


def scenario_execute(fsync: str, per_commit: int, ops: int) -> None:
    wl = make_workload()
    with Temp(None) as root:
        c = ours.OursTransfers("ours", root, wl, fsync, per_commit)
        c.run(0.2)  # warm up
        master = c.master
        if per_commit == 1:
            execute = master.execute
            def work() -> None:
                for i in range(ops):
                    s, d, a = wl.transfer(i)
                    execute("transfer", s, d, a)
        else:
            batches = [[("transfer", [s, d, a], None) for s, d, a in wl.transfer_batch(i, per_commit)]
                       for i in range(0, ops, per_commit)]
            def work() -> None:
                for b in batches:
                    master.execute_many(b)
        report(_profile(work), ops, f"execute fsync={fsync} per_commit={per_commit}")
        c.close()


def scenario_query(ops: int) -> None:
    wl = make_workload()
    keys = wl.query_keys(ops)
    with Temp(None) as root:
        c = ours.OursQuery("ours", root, wl, keys[:1000])
        query = c.master.query
        def work() -> None:
            for k in keys:
                query("balance", k)
        report(_profile(work), ops, "Master.query('balance')")
        c.close()


def scenario_recover(records: int) -> None:
    with Temp(None) as root:
        built = child.run_child("build-ours", root, str(records))
        Master, model = ours.load_engine()
        stats = _profile(lambda: Master.open(model, root, child.MASTER_NAME, fsync="always"))
        report(stats, built["seq"], f"recovery of {built['seq']:,} records")


def scenario_sync_apply(records: int) -> None:
    wl = make_workload()
    with Temp(None) as root:
        a, b = sync.open_pair(root)
        ours.open_accounts(a, wl.account_ids, wl.initial_balance)
        sync.settle([a, b])
        sync.write_transfers(a, wl, 0, records)
        report(_profile(b.sync), records, f"B.sync() applying {records:,} records")
        a.close()
        b.close()


def scenario_rebase(accounts: int, window: int) -> None:
    wl = make_workload(account_count=accounts, transfer_count=window + 1, seed=SEED + accounts)
    with Temp(None) as root:
        a, b = sync.open_pair(root, "never")
        ours.open_accounts(a, wl.account_ids, wl.initial_balance)
        sync.settle([a, b])
        a.execute("transfer", account_id(2), account_id(3), 1)
        sync.write_transfers(b, wl, 0, window)
        report(_profile(b.sync), window + 1, f"rebase: {accounts:,} accounts, window {window:,}")
        a.close()
        b.close()


SCENARIOS: dict[str, Callable[[], None]] = {
    "never": lambda: scenario_execute("never", 1, 300_000),
    "always": lambda: scenario_execute("always", 1, 5_000),
    "batch": lambda: scenario_execute("always", 1000, 200_000),
    "query": lambda: scenario_query(500_000),
    "recover": lambda: scenario_recover(200_000),
    "sync_apply": lambda: scenario_sync_apply(200_000),
    "rebase": lambda: scenario_rebase(100_000, 1000),
}


def main(argv: list[str]) -> int:
    global PLAIN
    if "--plain" in argv:
        PLAIN = True
        argv = [a for a in argv if a != "--plain"]
    names = argv or list(SCENARIOS)
    for name in names:
        if name not in SCENARIOS:
            print(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
            return 2
        SCENARIOS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
