"""Request ids are remembered for a bounded time, and forgotten alike on every master."""

from __future__ import annotations

import pytest

from workers.models import ledger
from workers.prevalence import Master, Model, tracked, verify
from workers.prevalence.clock import from_ms
from workers.prevalence.codec import Record
from workers.prevalence.model import PRUNE_MARK, Context

from tests.support import FakeClock
from .helpers import sync_until_quiet

# Builds its own short-memory copy of the flat ledger.
pytestmark = pytest.mark.ledger_only

KEPT_S = 8  # epochs of 1 s


def short_memory_ledger() -> Model:
    m = Model("ledger", ledger._new_state, request_ids_kept_s=KEPT_S)
    for name, fn in ledger.model.transactions.items():
        m.transaction(fn, name=name)
    for name, fn in ledger.model.queries.items():
        m.query(fn, name=name)
    return m


def test_the_request_id_table_stays_bounded_and_forgets_only_expired_ids():
    model = short_memory_ledger()
    root, dedup, ctx, log = tracked.convert(model.root_factory()), {}, Context(), tracked.UndoLog()
    model.apply(root, dedup, Record("m", 1, from_ms(1_000), "", "open_account", ("a", 0)), ctx, log)
    seq = 1
    for second in range(60):  # 10 requests per second of record time for a minute
        for k in range(10):
            seq += 1
            ms = 1_000 + second * 1000 + k * 100
            model.apply(root, dedup, Record("m", seq, from_ms(ms), f"r{second}.{k}", "deposit", ("a", 1)), ctx, log)
        ids = len(dedup) - 1
        assert ids <= (KEPT_S + KEPT_S / 8 + 1) * 10, ids  # never more than the window and an epoch
    assert root["accounts"]["a"] == 600
    newest = from_ms(1_000 + 59 * 1000 + 900)
    ages_ms = [(newest - first.hlc) >> 16 for rid, first in dedup.items() if rid != PRUNE_MARK]
    assert max(ages_ms) < (KEPT_S + 2) * 1000 and min(ages_ms) == 0
    # Within the window a retry takes no effect; after it, the id is forgotten.
    out = model.apply(root, dedup, Record("m", seq + 1, newest + 1, "r55.0", "deposit", ("a", 1)), ctx, log)
    assert out["duplicate_of"] and root["accounts"]["a"] == 600
    out = model.apply(root, dedup, Record("m", seq + 2, newest + 2, "r1.0", "deposit", ("a", 1)), ctx, log)
    assert "duplicate_of" not in out and root["accounts"]["a"] == 601


def test_retention_must_be_positive():
    with pytest.raises(ValueError, match="request_ids_kept_s"):
        Model("x", dict, request_ids_kept_s=0)


def test_masters_forget_request_ids_alike_and_a_late_retry_applies_once_everywhere(tmp_path):
    model = short_memory_ledger()
    clock = FakeClock()

    def master(name):
        return Master.open(model, str(tmp_path), name, fsync="never", gc_grace_s=0, now_ms=clock)

    a = master("alpha")
    b = master("beta")
    a.execute("open_account", "x", 0, rid="open")
    sync_until_quiet([a, b])
    for second in range(30):
        clock.ms += 1000
        a.execute("deposit", "x", 1, rid=f"a{second}")
        b.execute("deposit", "x", 1, rid=f"b{second}")
        if second % 3 == 0:
            sync_until_quiet([a, b])
    sync_until_quiet([a, b])
    # A retry within the window is recognised on either master; one from long ago is not.
    assert b.query("balance", "x") == 60
    assert b.outcome("a28")["value"] == 57
    assert b.execute("deposit", "x", 1, rid="a28") == 57  # the first one's outcome, no effect
    assert b.query("balance", "x") == 60 and "b2" not in b.replica.dedup and "b2" not in a.replica.dedup
    assert a.execute("deposit", "x", 1, rid="b2") == 61
    sync_until_quiet([a, b])
    ref = verify(str(tmp_path), model)
    assert ref["deterministic"] and {a.digest(), b.digest()} == {ref["digest"]}
    assert a.query("balance", "x") == b.query("balance", "x") == 61
    assert a.status()["request_ids"] <= 2 * (KEPT_S + 2) + 2
    # A master restarted from its snapshot forgets exactly the same ids.
    a.snapshot()
    a.close()
    a = master("alpha")
    assert a.digest() == b.digest() == ref["digest"]
    a.close()
    b.close()


def test_verify_counts_a_request_id_written_on_two_masters_once_as_a_duplicate(tmp_path):
    # A client retried on another master before the two synced: both journals hold the
    # request; the first in key order takes effect, the other is a duplicate everywhere.
    from tests.support import open_member

    a, b = open_member(tmp_path, "alpha", model=ledger.model), open_member(tmp_path, "beta", model=ledger.model)
    sync_until_quiet([a, b])
    a.execute("open_account", "x", 0, rid="open")
    sync_until_quiet([a, b])
    a.execute("deposit", "x", 5, rid="same")
    b.execute("deposit", "x", 5, rid="same")
    sync_until_quiet([a, b])
    ref = verify(str(tmp_path), ledger.model)
    assert ref["duplicates"] == 1 and ref["total"] == 3
    assert a.query("balance", "x") == b.query("balance", "x") == 5
    assert {a.digest(), b.digest()} == {ref["digest"]}
    a.close()
    b.close()
