"""A state the codec cannot write must be impossible (issue 9, item 5).

``open_account("x", 2**64 - 1)`` then ``deposit("x", 1)`` used to be acknowledged and then
break status, snapshot, sync, close and verify on every master, after every restart. Now
the write that would leave such a state fails (refused, or a recorded error) identically
on every master and in `verify`, and leaves no trace; the cluster goes on.
"""

from __future__ import annotations

import pytest

from workers.prevalence import Model, Rejected, verify
from workers.prevalence.errors import TransactionFailed

from tests import support
from tests.support import FakeClock, open_member
from .helpers import assert_converged, sync_until_quiet

HUGE = 2 ** 64 - 1


def _outcome(m, tx, *args, rid):
    try:
        m.execute(tx, *args, rid=rid)
    except (Rejected, TransactionFailed) as exc:
        return type(exc).__name__
    return "ok"


def _everything_still_works(tmp_path, masters, model):
    sync_until_quiet(masters)
    ref = assert_converged(tmp_path, masters)  # status and digest on every master, and verify
    for m in masters:
        m.snapshot()
        m.close()
    reopened = [open_member(tmp_path, m.name, model=model) for m in masters]
    sync_until_quiet(reopened)
    assert assert_converged(tmp_path, reopened)["digest"] == ref["digest"]
    return reopened


def test_a_balance_beyond_the_codecs_range_fails_alike_everywhere_and_leaves_no_trace(tmp_path, state_model):
    clock = FakeClock()
    a = open_member(tmp_path, "alpha", now_ms=clock)
    b = open_member(tmp_path, "beta", now_ms=clock)
    sync_until_quiet([a, b])
    clock.ms += 1
    first = _outcome(a, "open_account", "x", HUGE, rid="open-x")
    clock.ms += 1
    second = _outcome(a, "deposit", "x", 1, rid="deposit-x")
    # The flat ledger refuses a balance above BALANCE_MAX; the nested one has no bound of
    # its own and stores 2**64 - 1, then the deposit's 2**64 is refused by the state itself.
    if state_model == "ledger":
        assert first == "Rejected" and "x" not in a.query("balances")
    else:
        assert first == "ok" and second == "TransactionFailed"
        assert "UntrackableValue" in a.outcome("deposit-x")["error"]
        assert a.query("balance", "x") == HUGE
    assert second != "ok"
    a, b = _everything_still_works(tmp_path, [a, b], support.test_model())
    for m in (a, b):
        assert m.outcome("deposit-x")["status"] == a.outcome("deposit-x")["status"] != "ok"
        assert m.outcome("open-x")["status"] == a.outcome("open-x")["status"]
    a.close()
    b.close()


@pytest.mark.ledger_only  # its own model: one run is enough
def test_a_model_without_bounds_cannot_store_an_integer_the_codec_cannot_write(tmp_path):
    counter = Model("counter", lambda: {"n": 0, "log": []})

    @counter.transaction
    def add(root, ctx, amount):
        root["log"].append(amount)     # changed first: the failure must undo it
        root["n"] += amount
        return root["n"]

    clock = FakeClock()
    a = open_member(tmp_path, "alpha", model=counter, now_ms=clock)
    b = open_member(tmp_path, "beta", model=counter, now_ms=clock)
    sync_until_quiet([a, b])
    a.execute("add", HUGE - 1)
    clock.ms += 1
    with pytest.raises(TransactionFailed, match="UntrackableValue"):
        a.execute("add", 2)             # 2**64: beyond MessagePack's integers
    sync_until_quiet([a, b])
    res = b.execute_many([("add", [1], "fine"), ("add", [1], "over")])
    assert [r["status"] for r in res] == ["ok", "error"]   # a batch: only the bad one fails
    a, b = _everything_still_works(tmp_path, [a, b], counter)
    assert a.replica.state["n"] == HUGE and list(a.replica.state["log"]) == [HUGE - 1, 1]
    assert verify(str(tmp_path), counter)["deterministic"]
    a.close()
    b.close()
