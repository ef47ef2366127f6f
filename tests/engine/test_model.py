"""The model: context time and randomness, outcomes, refusals before anything is written."""

from __future__ import annotations

import datetime as dt

import pytest

from workers.prevalence import Model, clock
from workers.prevalence.errors import (BadArguments, Rejected, TransactionFailed, UnknownRecordTransaction,
                                       UnknownTransaction)

from tests.support import FakeClock, open_master
from .helpers import journal_bytes, probe, records_in, segments


def test_context_now_is_the_records_timestamp(tmp_path):
    wall = FakeClock(1_700_000_000_123)
    m = open_master(tmp_path, model=probe, now_ms=wall)
    hlc, now_iso, rid = m.execute("stamp", rid="req-1")
    assert clock.physical_ms(hlc) == 1_700_000_000_123
    assert now_iso == dt.datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=dt.timezone.utc).isoformat()
    assert rid == "req-1"
    m.close()
    (rec,) = records_in(segments(tmp_path)[0][1])
    assert rec.hlc == hlc
    assert dt.datetime.fromtimestamp(clock.physical_ms(rec.hlc) / 1000, dt.timezone.utc).isoformat() == now_iso


def test_context_now_replays_as_the_records_timestamp_not_the_replay_time(tmp_path):
    wall = FakeClock(1_700_000_000_000)
    m = open_master(tmp_path, model=probe, now_ms=wall)
    m.execute("stamp")
    wall.ms += 5_000
    m.execute("stamp")
    log, digest = m.query("log"), m.digest()
    m.close()
    wall.ms += 86_400_000  # replayed a day later
    m = open_master(tmp_path, model=probe, now_ms=wall)
    assert m.query("log") == log
    assert m.digest() == digest
    assert [e[2] for e in log] == ["solo:1", "solo:2"]  # ctx.rid falls back to master:seq
    m.close()


def test_context_random_draws_the_same_on_replay(tmp_path):
    m = open_master(tmp_path, model=probe)
    draws = [m.execute("draw") for _ in range(5)]
    assert len(set(draws)) == 5  # seeded per record, not once per process
    digest = m.digest()
    m.close()
    m = open_master(tmp_path, model=probe)
    assert m.query("log") == draws
    assert m.digest() == digest
    m.close()


def test_transaction_that_raises_type_error_is_recorded_as_error_and_replays_the_same(tmp_path):
    m = open_master(tmp_path, model=probe)
    m.execute("add", 2)
    seq = m.seq
    with pytest.raises(TransactionFailed) as err:
        m.execute("add", "two", rid="bad-add")
    assert err.value.error_type == "TypeError"
    assert m.seq == seq + 1  # it is a record all the same
    out = m.outcome("bad-add")
    assert out["status"] == "error" and out["error"].startswith("TypeError")
    # Atomic: what it changed before it raised (the "add" log entry) is undone.
    assert m.query("log") == ["add"] and m.query("n") == 2
    digest = m.digest()
    m.close()
    m = open_master(tmp_path, model=probe)
    assert m.digest() == digest
    assert m.outcome("bad-add") == out
    with pytest.raises(TransactionFailed):  # a retry with the same request id answers the same
        m.execute("add", "two", rid="bad-add")
    m.close()


def test_rejected_transaction_is_a_recorded_outcome(tmp_path):
    m = open_master(tmp_path)
    m.execute("open_account", "a", 10)
    with pytest.raises(Rejected, match="insufficient funds"):
        m.execute("withdraw", "a", 11, rid="overdraw")
    assert m.outcome("overdraw")["status"] == "rejected"
    assert m.seq == 2
    assert m.query("balance", "a") == 10
    with pytest.raises(Rejected):
        m.execute("withdraw", "a", 11, rid="overdraw")  # a retry answers the same, unjournaled
    assert m.seq == 2
    digest = m.digest()
    m.close()
    m = open_master(tmp_path)
    assert m.outcome("overdraw")["status"] == "rejected"
    assert m.digest() == digest
    m.close()


def test_execute_many_reports_each_outcome(tmp_path):
    m = open_master(tmp_path, model=probe)
    outs = m.execute_many([("add", [1], None), ("refuse", ["no"], None), ("add", ["x"], None), ("add", [2], None)])
    assert [o["status"] for o in outs] == ["ok", "rejected", "error", "ok"]
    assert outs[0]["value"] == 1 and outs[3]["value"] == 3
    assert outs[1]["error"] == "no"
    m.close()


@pytest.mark.parametrize("args", [(), ("a",), ("a", 1, 2)], ids=["none", "too-few", "too-many"])
def test_wrong_arity_is_bad_arguments_and_nothing_is_journaled(tmp_path, args):
    m = open_master(tmp_path)
    m.execute("open_account", "a", 1)
    seq, before = m.seq, journal_bytes(tmp_path)
    with pytest.raises(BadArguments):
        m.execute("deposit", *args)
    with pytest.raises(BadArguments):
        m.execute_many([("deposit", ["a", 1], None), ("deposit", list(args), None)])
    assert (m.seq, journal_bytes(tmp_path)) == (seq, before)
    assert m.query("balance", "a") == 1
    m.close()


def test_unknown_transaction_is_refused_and_nothing_is_journaled(tmp_path):
    m = open_master(tmp_path)
    seq, before = m.seq, journal_bytes(tmp_path)
    with pytest.raises(UnknownTransaction, match="no transaction 'steal'"):
        m.execute("steal", "a", 1)
    with pytest.raises(UnknownTransaction):
        m.execute_many([("open_account", ["a", 1], None), ("steal", [], None)])
    with pytest.raises(UnknownTransaction):
        m.query("nope")
    with pytest.raises(UnknownTransaction):
        m.execute("balance", "a")  # a query is not a transaction
    assert (m.seq, journal_bytes(tmp_path)) == (seq, before)
    m.close()


def test_transactions_can_be_named_by_their_function(tmp_path):
    from workers.models import ledger
    m = open_master(tmp_path)
    assert m.execute(ledger.open_account, "a", 3) == 3
    assert m.query(ledger.balance, "a") == 3
    m.close()


def test_own_record_of_an_undeclared_transaction_stops_recovery_and_is_not_applied(tmp_path):
    m = open_master(tmp_path, model=probe)
    m.execute("add", 1)
    m.execute("draw", rid="newer-code")
    m.close()
    before = journal_bytes(tmp_path)
    older = Model("probe", lambda: {"log": [], "n": 0})  # the code before `draw` existed
    older.transaction(probe.transactions["add"], name="add")
    with pytest.raises(UnknownRecordTransaction) as err:
        open_master(tmp_path, model=older)
    assert "draw" in str(err.value) and err.value.seq == 2
    assert journal_bytes(tmp_path) == before


def test_outcome_that_returns_part_of_the_state_is_frozen_when_recorded(tmp_path):
    from workers.prevalence import verify
    aliasing = Model("aliasing", lambda: {"items": []})

    @aliasing.transaction
    def push(root, ctx, x):
        root["items"].append(x)
        return root["items"]  # the live list itself

    m = open_master(tmp_path, model=aliasing)
    m.execute("push", 1, rid="first")
    m.snapshot()
    m.execute("push", 2, rid="second")
    assert m.outcome("first")["value"] == [1]
    m.close()
    m = open_master(tmp_path, model=aliasing)  # from the snapshot, then the tail
    assert m.outcome("first")["value"] == [1]
    assert m.digest() == verify(str(tmp_path), aliasing)["digest"]
    m.close()


@pytest.mark.parametrize("batch", [
    pytest.param(False, id="execute"),
    pytest.param(True, id="execute_many"),
])
def test_a_transaction_that_raises_after_mutating_leaves_no_trace_here_or_after_replay(tmp_path, batch):
    m = open_master(tmp_path, model=probe)

    def run(tx, *args):
        if batch:
            return m.execute_many([(tx, list(args), None)])[0]["status"]
        try:
            m.execute(tx, *args)
        except (Rejected, TransactionFailed) as exc:
            return type(exc).__name__
        return "ok"

    assert run("add", 1) == "ok"
    before = m.digest()
    assert run("add", "x") in ("error", "TransactionFailed")  # appends to the log, then raises
    assert m.query("log") == ["add"] and m.digest() == before
    m.close()
    m = open_master(tmp_path, model=probe)  # replayed from the journal: the same
    assert m.query("log") == ["add"] and m.digest() == before
    m.close()


def test_check_mode_names_a_transaction_that_changes_the_state_behind_the_undo_log(tmp_path):
    from workers.prevalence import Model
    from workers.prevalence.errors import InvariantViolation
    sneaky = Model("sneaky", lambda: {"n": 0})

    @sneaky.transaction
    def bypass(root, ctx):
        dict.__setitem__(root, "n", root["n"] + 1)  # the class's own method: no undo entry

    @sneaky.transaction
    def honest(root, ctx):
        root["n"] += 1

    m = open_master(tmp_path, model=sneaky, check_transactions=True)
    m.execute("honest")
    with pytest.raises(InvariantViolation, match="'bypass'.*undo log did not see"):
        m.execute("bypass")
    m.crash()


def test_check_mode_names_a_transaction_that_is_not_deterministic(tmp_path):
    import random
    from workers.prevalence import Model
    from workers.prevalence.errors import InvariantViolation
    dice = Model("dice", lambda: {"n": 0})

    @dice.transaction
    def roll(root, ctx):
        root["n"] = random.random()  # not ctx.random: differs on every master

    m = open_master(tmp_path, model=dice, check_transactions=True)
    with pytest.raises(InvariantViolation, match="'roll'.*not deterministic"):
        m.execute("roll")
    m.crash()


def test_a_set_stored_in_the_state_is_refused_at_the_write_and_leaves_no_trace(tmp_path):
    from workers.prevalence import Model
    sets = Model("sets", lambda: {"tags": {}})

    @sets.transaction
    def tag(root, ctx, k):
        root["tags"][k] = {"a", "b"}

    m = open_master(tmp_path, model=sets)
    before = m.digest()
    with pytest.raises(TransactionFailed, match="UntrackableValue.*set"):
        m.execute("tag", "x")
    assert m.digest() == before
    m.snapshot()  # the state is still one a snapshot can hold
    m.close()


def test_a_value_returned_from_the_state_cannot_be_mutated_by_the_caller(tmp_path):
    from workers.prevalence.tracked import MutationOutsideTransaction
    m = open_master(tmp_path, model=probe)
    m.execute("stamp")
    entries = m.query("log")  # the probe's query returns a copy: mutating it is harmless
    entries.append("mine")
    with pytest.raises(MutationOutsideTransaction):
        m.replica.state["log"].append("behind the engine's back")
    assert m.query("log") == entries[:-1]
    m.close()


def test_declaring_a_name_twice_is_refused():
    from workers.prevalence import Model
    model = Model("twice", dict)

    @model.transaction
    def once(root, ctx):
        pass

    with pytest.raises(ValueError):
        model.transaction(once, name="once")
    with pytest.raises(ValueError):
        model.query(lambda root: None, name="once")


def test_values_returned_by_execute_query_and_outcome_cannot_change_the_state_or_the_recorded_outcome(tmp_path):
    # Issue 9, "Also": what the API returns is either the live state, which refuses every
    # change outside a transaction, or a copy; the recorded outcome of a request id (part of
    # the digest, and the answer every duplicate gets) is never handed out itself.
    from workers.prevalence import Struct, codec, verify
    from workers.prevalence.tracked import MutationOutsideTransaction

    class Order(Struct):
        sku: str
        qty: int = 1

    shop = Model("shop", lambda: {"users": {}})

    @shop.transaction
    def buy(root, ctx, uid, sku):
        user = root["users"].setdefault(uid, {"orders": [], "tags": {"n": 0}})
        user["orders"].append(Order(sku))
        return user  # part of the state (a plain dict stored during this transaction)

    @shop.query
    def user(root, uid):
        return root["users"][uid]

    m = open_master(tmp_path, model=shop)
    returned = [m.execute("buy", "u", "a", rid="r1"), m.execute_many([("buy", ["u", "b"], "r2")])[0]["value"],
                m.query("user", "u"), m.outcome("r1")["value"], m.outcome("r2")["value"],
                m.execute("buy", "u", "a", rid="r1"),                               # a duplicate's answer
                m.execute_many([("buy", ["u", "b"], "r2")])[0]["value"]]
    before = codec.digest_of(m.replica.state, m.replica.dedup)
    answers = (m.outcome("r1"), m.outcome("r2"))
    live = m.replica.state["users"]["u"]
    for value in returned:
        changes = (lambda: value.__setitem__("x", 1), lambda: value["orders"].append(1),
                   lambda: value["orders"].pop(), lambda: value["tags"].update(n=5),
                   lambda: value["orders"].sort(key=str), lambda: value.clear())
        if value is live or value["orders"] is live["orders"]:
            for change in changes + (lambda: setattr(value["orders"][0], "qty", 9),
                                     lambda: delattr(value["orders"][0], "qty")):
                with pytest.raises(MutationOutsideTransaction):
                    change()
        else:  # a copy: the caller may do what it likes with it
            for change in changes:
                change()
    assert codec.digest_of(m.replica.state, m.replica.dedup) == before
    assert (m.outcome("r1"), m.outcome("r2")) == answers
    m.close()
    assert verify(str(tmp_path), shop)["digest"] == before
