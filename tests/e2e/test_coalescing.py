"""The coalescing client through real workers: concurrent single writes travel as batches,
each caller gets its own outcome, and a bad item fails alone."""

from __future__ import annotations

import threading

import pytest

from tests.e2e.conftest import make_client
from tests.e2e.helpers import converge, open_accounts
from workers.client import Client, RequestRefused, TransactionRejected

pytestmark = pytest.mark.celery


def test_concurrent_single_writes_are_coalesced_and_each_caller_gets_its_own_outcome(cluster):
    plain = make_client(cluster)
    open_accounts(plain, ["co1", "co2"], master="alpha")
    converge(cluster)  # every master knows the accounts
    client = Client(plain.app, timeout_s=60, coalesce_ms=20)
    results: dict[int, object] = {}

    def caller(i: int) -> None:
        try:
            if i == 7:
                results[i] = client.execute("withdraw", "co2", 10**6, key=f"co-{i}")  # refused alone
            elif i == 9:
                results[i] = client.execute("deposit", "co1", key=f"co-{i}")  # wrong arity: alone
            else:
                results[i] = client.execute("deposit", "co1", 1, key=f"co-{i}", master="beta" if i % 2 else None)
        except Exception as exc:  # noqa: BLE001 - recorded per caller
            results[i] = exc

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    coalescer = client._coalescer
    client.close()
    assert coalescer.batches < len(threads)  # some writes travelled together
    assert isinstance(results[7], TransactionRejected)
    assert isinstance(results[9], RequestRefused) and results[9].error_type == "BadArguments"
    oks = [v for i, v in results.items() if i not in (7, 9)]
    assert all(isinstance(v, int) for v in oks), oks
    assert len(oks) == 46
    view = converge(cluster)
    assert view["verify"]["total"] - view["verify"]["duplicates"] >= 48
    assert plain.query("balance", "co1", master="gamma") == 46


def test_a_coalesced_write_retried_with_its_key_applies_once(cluster):
    plain = make_client(cluster)
    open_accounts(plain, ["co3"], master="alpha")
    with Client(plain.app, timeout_s=60, coalesce_ms=5) as client:
        first = client.execute_outcome("deposit", "co3", 5, key="co3-once", master="alpha")
        again = client.execute_outcome("deposit", "co3", 5, key="co3-once", master="alpha")
    assert first["status"] == again["status"] == "ok" and again["duplicate"] is True
    assert first["record"] and first["rid"] == "co3-once"
    assert plain.query("balance", "co3", master="alpha") == 5
