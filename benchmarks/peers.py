"""The peers: SQLite in WAL mode (what a user would pick instead), coopy and ZODB
FileStorage (other Python ways to keep objects durable), and a bare dict for reads.

Each contender does the ledger transfer the way its own users would write it: check the
source balance, debit, credit, commit. coopy and ZODB are optional (``pip install
.[bench]``): when one is missing its lines say "skipped" and why.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from benchmarks.harness import perf_counter
from benchmarks.workload import Workload

# --------------------------------------------------------------------------- SQLite


class SqliteLedger:
    """A SQLite WAL database holding the ledger, in autocommit mode with explicit BEGIN."""

    def __init__(self, path: str, workload: Workload, synchronous: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        # WITHOUT ROWID keys the table by account id directly: SQLite's fastest layout
        # for this table, so the comparison is against SQLite at its best.
        self.conn.execute(
            "CREATE TABLE accounts (id TEXT PRIMARY KEY, balance INTEGER NOT NULL) WITHOUT ROWID"
        )
        self.conn.execute("BEGIN")
        self.conn.executemany(
            "INSERT INTO accounts VALUES (?, ?)",
            [(a, workload.initial_balance) for a in workload.account_ids],
        )
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


class SqliteTransfers:
    """Transfers, ``per_commit`` of them in each BEGIN ... COMMIT."""

    def __init__(
        self, name: str, path: str, workload: Workload, synchronous: str, per_commit: int
    ) -> None:
        self.name = name
        self.db = SqliteLedger(path, workload, synchronous)
        self.workload = workload
        self.per_commit = per_commit
        self.cursor = 0

    def _transfer(self, ex: Any, src: str, dst: str, amount: int) -> None:
        # The debit carries the overdraft check, as a careful SQLite user writes it.
        if ex(
            "UPDATE accounts SET balance = balance - ? WHERE id = ? AND balance >= ?",
            (amount, src, amount),
        ).rowcount != 1:
            raise RuntimeError("workload transfer refused: accounts are too small")
        ex("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, dst))

    def run(self, budget_s: float) -> tuple[int, float]:
        ex = self.db.conn.execute
        transfer = self._transfer
        wl = self.workload
        per_commit = self.per_commit
        ops = 0
        t0 = perf_counter()
        deadline = t0 + budget_s
        while True:
            ex("BEGIN")
            for src, dst, amount in wl.transfer_batch(self.cursor, per_commit):
                transfer(ex, src, dst, amount)
            ex("COMMIT")
            self.cursor += per_commit
            ops += per_commit
            now = perf_counter()
            if now >= deadline:
                return ops, now - t0

    def close(self) -> None:
        self.db.close()


class SqliteQuery:
    """Point reads by primary key, the statement cached by the sqlite3 module."""

    def __init__(self, name: str, path: str, workload: Workload, keys: list[str]) -> None:
        self.name = name
        self.db = SqliteLedger(path, workload, "NORMAL")
        self.keys = keys

    def run(self, budget_s: float) -> tuple[int, float]:
        ex = self.db.conn.execute
        sql = "SELECT balance FROM accounts WHERE id = ?"
        keys = self.keys
        ops = 0
        t0 = perf_counter()
        deadline = t0 + budget_s
        while True:
            for k in keys:
                ex(sql, (k,)).fetchone()[0]
            ops += len(keys)
            now = perf_counter()
            if now >= deadline:
                return ops, now - t0

    def close(self) -> None:
        self.db.close()


class DictQuery:
    """The floor of any in-memory read: ``d[key]`` on a plain dict, inline in the loop."""

    def __init__(self, name: str, workload: Workload, keys: list[str]) -> None:
        self.name = name
        self.d = {a: workload.initial_balance for a in workload.account_ids}
        self.keys = keys

    def run(self, budget_s: float) -> tuple[int, float]:
        d = self.d
        keys = self.keys
        ops = 0
        t0 = perf_counter()
        deadline = t0 + budget_s
        while True:
            for k in keys:
                d[k]
            ops += len(keys)
            now = perf_counter()
            if now >= deadline:
                return ops, now - t0

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- coopy


def coopy_missing() -> str | None:
    try:
        import coopy  # noqa: F401
    except ImportError:
        return "coopy is not installed (pip install '.[bench]')"
    return None


class CoopyLedgerSystem:
    """The ledger as a coopy system: coopy journals every public method call."""

    def __init__(self) -> None:
        self.accounts: dict[str, int] = {}

    def open_accounts(self, ids: list[str], initial: int) -> None:
        for a in ids:
            self.accounts[a] = initial

    def open_account(self, id: str, initial: int) -> None:
        self.accounts[id] = initial

    def transfer(self, src: str, dst: str, amount: int) -> None:
        accounts = self.accounts
        if accounts[src] < amount:
            raise ValueError("overdraw")
        accounts[src] -= amount
        accounts[dst] += amount


def coopy_open(path: str, durability: str) -> Any:
    import coopy

    return coopy.open(
        CoopyLedgerSystem, path, durability=durability, validation="off"
    )


class CoopyTransfers:
    """coopy with ``durability="sync"``: one fsync'd journal record per method call."""

    def __init__(self, name: str, path: str, workload: Workload) -> None:
        self.name = name
        self.system = coopy_open(path, "sync")
        self.system.open_accounts(list(workload.account_ids), workload.initial_balance)
        self.workload = workload
        self.cursor = 0

    def run(self, budget_s: float) -> tuple[int, float]:
        transfer = self.system.transfer
        wl = self.workload
        ops = 0
        t0 = perf_counter()
        deadline = t0 + budget_s
        while True:
            src, dst, amount = wl.transfer(self.cursor)
            transfer(src, dst, amount)
            self.cursor += 1
            ops += 1
            now = perf_counter()
            if now >= deadline:
                return ops, now - t0

    def close(self) -> None:
        self.system.close()


# --------------------------------------------------------------------------- ZODB


def zodb_missing() -> str | None:
    try:
        import BTrees  # noqa: F401
        import transaction  # noqa: F401
        import ZODB  # noqa: F401
    except ImportError:
        return "ZODB is not installed (pip install '.[bench]')"
    return None


class ZodbTransfers:
    """ZODB FileStorage (fsyncs every commit), accounts in an OOBTree, one commit per transfer."""

    def __init__(self, name: str, path: str, workload: Workload) -> None:
        import transaction
        import ZODB
        import ZODB.FileStorage
        from BTrees.OOBTree import OOBTree

        self.name = name
        self.storage = ZODB.FileStorage.FileStorage(os.path.join(path, "Data.fs"))
        self.db = ZODB.DB(self.storage)
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(self.tm)
        root = self.conn.root()
        root.accounts = accounts = OOBTree()
        for a in workload.account_ids:
            accounts[a] = workload.initial_balance
        self.tm.commit()
        self.accounts = accounts
        self.workload = workload
        self.cursor = 0

    def run(self, budget_s: float) -> tuple[int, float]:
        accounts = self.accounts
        commit = self.tm.commit
        wl = self.workload
        ops = 0
        t0 = perf_counter()
        deadline = t0 + budget_s
        while True:
            src, dst, amount = wl.transfer(self.cursor)
            if accounts[src] < amount:
                raise RuntimeError("workload transfer refused: accounts are too small")
            accounts[src] -= amount
            accounts[dst] += amount
            commit()
            self.cursor += 1
            ops += 1
            now = perf_counter()
            if now >= deadline:
                return ops, now - t0

    def close(self) -> None:
        self.conn.close()
        self.db.close()
