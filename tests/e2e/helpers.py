"""Shared helpers of the Celery-tier tests: unique accounts, load generators, checks."""

from __future__ import annotations

import threading
import uuid

from workers.models.ledger import model

CONVERGE_S = 90.0


def one_master(make_cluster, env: dict[str, str], account: str):
    """Start a one-master cluster (alpha) with `env`; open `account`; return (cluster, client)."""
    from tests.e2e.conftest import make_client

    cluster = make_cluster(masters=("alpha",), env=env)
    cluster.start_masters()
    client = make_client(cluster)
    open_accounts(client, [account], master="alpha")
    return cluster, client


def converge(cluster, state_model=model) -> dict:
    """Wait until every master agrees with `verify`; return the view (with "verify")."""
    return cluster.wait_converged(CONVERGE_S, model=state_model)


def open_accounts(client, names: list[str], master: str | None = None) -> None:
    """Open accounts with balance 0 (one batch), asserting each opened."""
    outcomes = client.execute_many([("open_account", [n, 0]) for n in names], master=master)
    assert [o["status"] for o in outcomes] == ["ok"] * len(names), outcomes


def balances_everywhere(client, masters) -> dict[str, dict[str, int]]:
    return {m: client.query("balances", master=m) for m in masters}


class KeyedLoad:
    """Deposits of 1 into a fresh account each, each batch with its own request key.

    A deposit the client saw succeed is "acknowledged": afterwards its account must hold
    exactly 1 (present, and present once). Unacknowledged ones may hold 0 or 1, never 2.
    Runs in a thread until `stop()`; errors from the broker are expected during faults and
    retried with the same key (that is what keys are for).
    """

    def __init__(self, client, masters: list[str], *, retry_until_ok: bool = False,
                 reply_timeout_s: float = 10.0) -> None:
        self.client = client
        self.masters = masters
        self.retry_until_ok = retry_until_ok
        self.reply_timeout_s = reply_timeout_s
        self.acknowledged: list[str] = []
        self.attempted: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.prefix = uuid.uuid4().hex[:8]

    def start(self) -> "KeyedLoad":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "load thread did not stop"

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            account = f"{self.prefix}-{i}"
            # Route: through the shared queue, or aimed, in turn.
            target = None if i % 2 == 0 else self.masters[(i // 2) % len(self.masters)]
            self.attempted.append(account)
            if self._apply(account, target):
                self.acknowledged.append(account)
            i += 1

    def _apply(self, account: str, target: str | None) -> bool:
        # Open and deposit in one batch under one key (item ids <key>:0 and <key>:1), so a
        # retry that lands anywhere, before or after a sync, applies each item once.
        batch = [("open_account", [account, 0]), ("deposit", [account, 1])]
        while True:
            try:
                outcomes = self.client.execute_many(batch, master=target, key=account,
                                                    timeout_s=self.reply_timeout_s)
            except Exception as exc:  # broker down, no reply: retry with the same key
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if not self.retry_until_ok or len(self.failures) > 1000:
                    return False
                continue
            return [o["status"] for o in outcomes] == ["ok", "ok"]

    def check(self, balances: dict[str, int]) -> None:
        """Every acknowledged deposit present exactly once; no account above 1."""
        missing = [a for a in self.acknowledged if balances.get(a) != 1]
        assert not missing, f"acknowledged deposits lost or doubled: {missing[:10]}"
        doubled = {a: b for a, b in balances.items() if a.startswith(self.prefix) and b > 1}
        assert not doubled, f"deposits applied twice: {doubled}"
