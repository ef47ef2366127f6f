"""Subprocess entry points: build a journal, then time a recovery in a fresh interpreter.

A recovery is measured the way it happens in production: a new process opens a folder
whose previous owner died (``os._exit`` without ``close``: no final snapshot), so
``Master.open`` loads nothing but the journal and replays every record. The child prints
one JSON object on stdout.

    python -m benchmarks.child build-ours DIR RECORDS
    python -m benchmarks.child recover-ours DIR
    python -m benchmarks.child build-coopy DIR RECORDS
    python -m benchmarks.child recover-coopy DIR
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

MASTER_NAME = "replay"
BATCH = 1000


def _maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def build_ours(shared_dir: str, records: int) -> dict[str, Any]:
    from benchmarks.ours import open_accounts, open_master
    from benchmarks.workload import make_workload

    wl = make_workload()
    # fsync=always with batches of 1000: every record is on disk before the process dies.
    m = open_master(shared_dir, MASTER_NAME, "always")
    open_accounts(m, wl.account_ids, wl.initial_balance)
    written = len(wl.account_ids)
    t0 = time.perf_counter()
    cursor = 0
    while written < records:
        n = min(BATCH, records - written)
        m.execute_many(
            [("transfer", [s, d, a], None) for s, d, a in wl.transfer_batch(cursor, n)]
        )
        cursor += n
        written += n
    build_s = time.perf_counter() - t0
    return {"records": written, "seq": m.status()["seq"], "build_s": round(build_s, 3)}


def recover_ours(shared_dir: str) -> dict[str, Any]:
    from benchmarks.ours import load_engine

    Master, model = load_engine()
    snapshot_files = _count_files(os.path.join(shared_dir, "masters", MASTER_NAME, "snapshots"))
    t0 = time.perf_counter()
    m = Master.open(model, shared_dir, MASTER_NAME, fsync="always")
    recovery_s = time.perf_counter() - t0
    status = m.status()
    return {
        "recovery_s": recovery_s,
        "seq": status["seq"],
        "snapshots_before_open": snapshot_files,
        "maxrss_mb": _maxrss_mb(),
    }


def build_coopy(path: str, records: int) -> dict[str, Any]:
    from benchmarks.peers import coopy_open
    from benchmarks.workload import make_workload

    wl = make_workload()
    system = coopy_open(path, "buffered")
    for a in wl.account_ids:
        system.open_account(a, wl.initial_balance)
    written = len(wl.account_ids)
    cursor = 0
    while written < records:
        s, d, a = wl.transfer(cursor)
        system.transfer(s, d, a)
        cursor += 1
        written += 1
    system.close()
    return {"records": written}


def recover_coopy(path: str) -> dict[str, Any]:
    from benchmarks.peers import coopy_open

    t0 = time.perf_counter()
    system = coopy_open(path, "buffered")
    recovery_s = time.perf_counter() - t0
    accounts = len(system.accounts)
    system.close()
    return {"recovery_s": recovery_s, "accounts": accounts, "maxrss_mb": _maxrss_mb()}


def _count_files(path: str) -> int:
    try:
        return len([n for n in os.listdir(path) if not n.startswith(".")])
    except FileNotFoundError:
        return 0


COMMANDS = {
    "build-ours": lambda a: build_ours(a[0], int(a[1])),
    "recover-ours": lambda a: recover_ours(a[0]),
    "build-coopy": lambda a: build_coopy(a[0], int(a[1])),
    "recover-coopy": lambda a: recover_coopy(a[0]),
}


def run_child(command: str, *args: str, timeout_s: float = 600) -> dict[str, Any]:
    """Run one command in a fresh interpreter; return its JSON answer.

    Raises RuntimeError with the child's stderr when it fails.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.child", command, *args],
        capture_output=True, text=True, timeout=timeout_s, cwd=root, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark child {command} {' '.join(args)} exited {proc.returncode}: "
            f"{proc.stderr.strip()[-2000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    result = COMMANDS[argv[0]](argv[1:])
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    # Die without close(): the next open must recover from the journal alone.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
