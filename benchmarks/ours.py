"""Adapters from the engine's public API (DESIGN §6) to the harness's contenders.

Only the public interface is used: ``Master.open``, ``execute``, ``execute_many``,
``query``, ``sync``, ``status``, ``close``; the ledger model from ``workers.models``.
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness import perf_counter
from benchmarks.workload import Workload

OPEN_BATCH = 1000


def engine_missing() -> str | None:
    """Return why the engine cannot be imported, or None when it can."""
    try:
        load_engine()
    except ImportError as exc:
        return f"engine not importable: {exc}"
    return None


def load_engine() -> tuple[Any, Any]:
    """Return ``(Master, ledger_model)``."""
    from workers.models.ledger import model
    from workers.prevalence import Master

    return Master, model


def open_master(shared_dir: str, name: str, fsync: str) -> Any:
    Master, model = load_engine()
    return Master.open(model, shared_dir, name, fsync=fsync)


def open_accounts(master: Any, ids: tuple[str, ...] | list[str], initial: int) -> None:
    """Open accounts in batches of ``OPEN_BATCH`` (one fsync per batch)."""
    for i in range(0, len(ids), OPEN_BATCH):
        master.execute_many([("open_account", [a, initial], None) for a in ids[i : i + OPEN_BATCH]])


class OursTransfers:
    """Transfers through ``Master.execute`` (``per_commit == 1``) or ``execute_many``."""

    def __init__(
        self, name: str, shared_dir: str, workload: Workload, fsync: str, per_commit: int = 1
    ) -> None:
        self.name = name
        self.master = open_master(shared_dir, "bench", fsync)
        open_accounts(self.master, workload.account_ids, workload.initial_balance)
        self.workload = workload
        self.per_commit = per_commit
        self.cursor = 0

    def run(self, budget_s: float) -> tuple[int, float]:
        if self.per_commit == 1:
            return self._run_single(budget_s)
        return self._run_batch(budget_s)

    def _run_single(self, budget_s: float) -> tuple[int, float]:
        execute = self.master.execute
        wl = self.workload
        ops = 0
        t0 = perf_counter()
        deadline = t0 + budget_s
        while True:
            src, dst, amount = wl.transfer(self.cursor)
            execute("transfer", src, dst, amount)
            self.cursor += 1
            ops += 1
            now = perf_counter()
            if now >= deadline:
                return ops, now - t0

    def _run_batch(self, budget_s: float) -> tuple[int, float]:
        execute_many = self.master.execute_many
        wl = self.workload
        per_commit = self.per_commit
        ops = 0
        t0 = perf_counter()
        deadline = t0 + budget_s
        while True:
            # Building the batch is the caller's work and counts, as SQLite's loop does.
            batch = [
                ("transfer", [src, dst, amount], None)
                for src, dst, amount in wl.transfer_batch(self.cursor, per_commit)
            ]
            execute_many(batch)
            self.cursor += per_commit
            ops += per_commit
            now = perf_counter()
            if now >= deadline:
                return ops, now - t0

    def close(self) -> None:
        self.master.close()


class OursQuery:
    """Point reads through ``Master.query("balance", id)``."""

    def __init__(self, name: str, shared_dir: str, workload: Workload, keys: list[str]) -> None:
        self.name = name
        self.master = open_master(shared_dir, "bench", "never")
        open_accounts(self.master, workload.account_ids, workload.initial_balance)
        self.keys = keys

    def run(self, budget_s: float) -> tuple[int, float]:
        query = self.master.query
        keys = self.keys
        ops = 0
        t0 = perf_counter()
        deadline = t0 + budget_s
        while True:
            for k in keys:
                query("balance", k)
            ops += len(keys)
            now = perf_counter()
            if now >= deadline:
                return ops, now - t0

    def close(self) -> None:
        self.master.close()
