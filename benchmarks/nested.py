"""Issue 14's benchmark: three masters writing at once on a user's nested model.

The model (`MODEL`) is what a user writes without thinking of rebases: per user a dict
with a name, an email, a balance, a list of tags and a list of orders (each a dict), and
no hand-written copy. Each round every master executes `ORDERS_PER_ROUND` orders on
random users (``fsync="never"``), then every master syncs: records of the others order
before its own tentative ones, so nearly every sync rebases.

Each size runs in three fresh child processes (build the state and snapshot it; open one
master from the snapshot: the RSS it adds is *one copy*; run the three masters: their peak
RSS is their own), each printing one JSON object; ``python -m benchmarks.nested size USERS
ROUNDS DIR`` runs all three. Reported per size:
cluster writes/s, mean and p99 sync time, syncs that rebased, peak RSS per master against
the RSS of one copy of the state (measured in the same child before the cluster starts),
and the time to open a master from a snapshot of that state.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from workers.prevalence import Master, Model, Rejected

ORDERS_PER_ROUND = 50
#: Rounds run before the timed ones (`cluster`).
WARMUP_ROUNDS = 2
MASTERS = ("alpha", "beta", "gamma")
SKUS = tuple(f"sku-{i:03d}" for i in range(200))


def _new_state() -> dict:
    return {"users": {}}


MODEL = Model("nested-shop", _new_state)


@MODEL.transaction
def add_users(root, ctx, first: int, count: int) -> int:
    users = root["users"]
    for i in range(first, first + count):
        users[f"u{i:07d}"] = {"name": f"user {i}", "email": f"user{i}@example.com", "balance": 1000,
                              "tags": ["new", "mail"], "orders": [{"sku": SKUS[i % len(SKUS)], "qty": 1}]}
    return len(users)


@MODEL.transaction
def order(root, ctx, uid: str, sku: str, qty: int, price: int) -> int:
    user = root["users"].get(uid)
    if user is None:
        raise Rejected(f"no user {uid!r}")
    if user["balance"] < qty * price:
        raise Rejected("insufficient balance")
    user["balance"] -= qty * price
    user["orders"].append({"sku": sku, "qty": qty})
    if len(user["orders"]) > 20:
        user["orders"].pop(0)  # keep the last 20
    if "buyer" not in user["tags"]:
        user["tags"].append("buyer")
    return user["balance"]


@MODEL.transaction
def top_up(root, ctx, uid: str, amount: int) -> int:
    user = root["users"][uid]
    user["balance"] += amount
    return user["balance"]


@MODEL.query
def user_count(root) -> int:
    return len(root["users"])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
    an exec, so a child started by a large benchmark runner would report the runner's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def build(users: int, shared: str) -> dict[str, Any]:
    """Phase 1: the state of `users` users on master alpha, snapshotted."""
    os.makedirs(shared)
    a = Master.open(MODEL, shared, "alpha", fsync="never", gc_grace_s=0)
    batch = 10_000
    for first in range(0, users, batch):
        a.execute_many([("add_users", [first, min(batch, users - first)], None)])
    a.snapshot()
    a.close()
    return {"users": users}


def load(shared: str) -> dict[str, Any]:
    """Phase 2: open alpha from its snapshot; the RSS it adds is one copy of the state."""
    base_mb = _rss_mb()
    t0 = time.perf_counter()
    a = Master.open(MODEL, shared, "alpha", fsync="never", gc_grace_s=0)
    load_s = time.perf_counter() - t0
    one_copy_mb = _rss_mb() - base_mb
    a.close()
    return {"load_snapshot_s": round(load_s, 3), "one_copy_mb": round(one_copy_mb, 1)}


def cluster(users: int, rounds: int, shared: str) -> dict[str, Any]:
    """Phase 3: three masters (two join from alpha's snapshot) write at once and sync."""
    rng = random.Random(users)
    base_mb = _rss_mb()
    masters = [Master.open(MODEL, shared, n, fsync="never", gc_grace_s=0) for n in MASTERS]
    for _ in range(4):
        for m in masters:
            m.sync()
    uids = [f"u{i:07d}" for i in range(users)]
    syncs_ms: list[float] = []
    rebased = 0
    writes = 0

    def one_round() -> None:
        nonlocal rebased, writes
        for m in masters:
            m.execute_many([("order", [rng.choice(uids), rng.choice(SKUS), rng.randint(1, 3), rng.randint(1, 5)],
                             None) for _ in range(ORDERS_PER_ROUND)])
            writes += ORDERS_PER_ROUND
        for m in masters:
            t0 = time.perf_counter()
            report = m.sync()
            syncs_ms.append((time.perf_counter() - t0) * 1000)
            rebased += bool(report["rebased"])

    # Warm-up rounds, not counted: the first writes and syncs after an open touch memory
    # the open left cold (at 1M users they take tens of ms each).
    for _ in range(WARMUP_ROUNDS):
        one_round()
    syncs_ms.clear()
    rebased = writes = 0
    t_start = time.perf_counter()
    for _ in range(rounds):
        one_round()
    elapsed_s = time.perf_counter() - t_start
    for _ in range(4):
        for m in masters:
            m.sync()
    digests = {m.digest() for m in masters}
    peak_mb = _peak_mb() - base_mb
    for m in masters:
        m.close()
    syncs_ms.sort()
    return {"users": users, "rounds": rounds, "writes_per_s": round(writes / elapsed_s),
            "sync_ms_mean": round(statistics.fmean(syncs_ms), 2),
            "sync_ms_p99": round(syncs_ms[min(len(syncs_ms) - 1, int(len(syncs_ms) * 0.99))], 2),
            "syncs": len(syncs_ms), "rebased": rebased,
            "peak_mb_per_master": round(peak_mb / len(masters), 1), "converged": len(digests) == 1}


def rebase(users: int, windows: list[int], shared: str) -> dict[str, Any]:
    """Phase 4: the cost of one rebase on this state. The three masters settle; A executes
    one order, then B a window of W orders without syncing, so A's record orders before
    B's whole tentative window: B's next sync undoes the window and applies it again."""
    masters = [Master.open(MODEL, shared, n, fsync="never", gc_grace_s=0) for n in MASTERS]
    a, b = masters[0], masters[1]

    def settle() -> None:
        for _ in range(4):
            for m in masters:
                m.sync()

    settle()
    rng = random.Random(users + 1)
    uids = [f"u{i:07d}" for i in range(users)]

    def orders(n: int) -> list:
        return [("order", [rng.choice(uids), rng.choice(SKUS), 1, 1], None) for _ in range(n)]

    a.execute_many(orders(1))
    t0 = time.perf_counter()
    fast = b.sync()
    out: dict[str, Any] = {"users": users, "fast_path_sync_ms": round((time.perf_counter() - t0) * 1000, 3),
                           "fast_path_rebased": bool(fast["rebased"])}
    settle()
    for window in windows:
        a.execute_many(orders(1))
        for first in range(0, window, 1000):
            b.execute_many(orders(min(1000, window - first)))
        t0 = time.perf_counter()
        report = b.sync()
        out[f"window_{window}_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        out[f"window_{window}_rebased"] = bool(report["rebased"])
        settle()
    out["converged"] = len({m.digest() for m in masters}) == 1
    for m in masters:
        m.close()
    return out


def run_child(*args: Any) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.nested", *map(str, args)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"nested benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_size(users: int, rounds: int, root_dir: str) -> dict[str, Any]:
    """All three phases for one size, each in a fresh child process."""
    shared = os.path.join(root_dir, f"nested-{users}")
    run_child("build", users, shared)
    loaded = run_child("load", shared)
    r = run_child("cluster", users, rounds, shared)
    r.update(loaded)
    r["peak_per_master_vs_one_copy"] = (round(r["peak_mb_per_master"] / loaded["one_copy_mb"], 2)
                                        if loaded["one_copy_mb"] > 0 else None)
    return r


def bench_nested(s: Any, wl: Any, rep: Any) -> None:
    """The `nested` group of ``python -m benchmarks``."""
    from benchmarks.harness import value_line

    sizes = (10_000,) if s.quick else (10_000, 100_000, 1_000_000)
    rounds = 4 if s.quick else 40
    results = {}
    root = tempfile.mkdtemp(prefix="nested-", dir=s.temp_root)
    try:
        for users in sizes:
            rep.note(f"nested: {users:,} users, three masters, {rounds} rounds (child process)")
            r = run_size(users, rounds, root)
            results[users] = r
            if users >= 100_000 or s.quick:
                windows = (1, 100) if s.quick else (1, 1_000, 10_000)
                rep.note(f"nested: rebase cost at {users:,} users, windows {windows}")
                rb = run_child("rebase", users, ",".join(map(str, windows)), os.path.join(root, f"nested-{users}"))
                for w in windows:
                    rep.emit(value_line(
                        f"nested_rebase_{users}_{w}",
                        f"Rebase on sync, nested model: {users:,} users, window of {w:,} tentative records",
                        "ms", "ours Master.sync (rebase: undo the window, apply the record, redo)",
                        rb[f"window_{w}_ms"], higher_is_better=False,
                        target_max=10.0 if (users, w) == (1_000_000, 1_000) else None,
                        users=users, window=w, rebased=rb[f"window_{w}_rebased"],
                        fast_path_sync_ms=rb["fast_path_sync_ms"], converged=rb["converged"],
                        detail=f"rebased={rb[f'window_{w}_rebased']}; a fast-path sync of 1 record costs "
                               f"{rb['fast_path_sync_ms']} ms"))
            rep.emit(value_line(
                f"nested_{users}", f"Nested model, 3 masters writing at once, {users:,} users: cluster writes",
                "writes/s", "ours, fsync=never, 50 orders per master per round, then every master syncs",
                r["writes_per_s"], **{k: v for k, v in r.items() if k != "writes_per_s"},
                detail=(f"sync mean {r['sync_ms_mean']} ms, p99 {r['sync_ms_p99']} ms; rebased {r['rebased']}/"
                        f"{r['syncs']}; peak RSS per master {r['peak_mb_per_master']} MB = "
                        f"{r['peak_per_master_vs_one_copy']}x one copy ({r['one_copy_mb']} MB); "
                        f"snapshot load {r['load_snapshot_s']} s")))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if len(results) > 1:
        small, big = results[min(results)], results[max(results)]
        rep.emit(value_line("nested_scaling", f"Nested model: writes/s at {max(results):,} users over "
                            f"{min(results):,} users", "ratio", "ours", big["writes_per_s"] / small["writes_per_s"],
                            target_min=0.5))


BENCHES = {"nested": bench_nested}


def main(argv: list[str]) -> int:
    phase, rest = argv[0], argv[1:]
    if phase == "build":
        out = build(int(rest[0]), rest[1])
    elif phase == "load":
        out = load(rest[0])
    elif phase == "cluster":
        out = cluster(int(rest[0]), int(rest[1]), rest[2])
    elif phase == "rebase":  # after build (and cluster): python -m benchmarks.nested rebase USERS 1,1000 DIR
        out = rebase(int(rest[0]), [int(w) for w in rest[1].split(",")], rest[2])
    elif phase == "size":  # all phases: python -m benchmarks.nested size USERS ROUNDS DIR
        out = run_size(int(rest[0]), int(rest[1]), rest[2])
    else:
        print(f"unknown phase {phase!r}: build USERS DIR | load DIR | cluster USERS ROUNDS DIR | "
              "rebase USERS W1,W2 DIR | size USERS ROUNDS DIR", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
