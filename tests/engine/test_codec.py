"""The codec: data-only encoding, refusal of what it cannot carry, canonical digests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from workers.prevalence import Struct, codec
from workers.prevalence.codec import Record
from workers.prevalence.errors import BadArguments

from tests.support import open_master
from .helpers import journal_bytes


@pytest.mark.parametrize("args", [[object()], [2 ** 70], [{"k": lambda: 1}], [1 + 2j]],
                         ids=["object", "int-beyond-64-bits", "function-in-dict", "complex"])
def test_unencodable_arguments_are_refused_as_bad_arguments(args):
    with pytest.raises(BadArguments, match="cannot be encoded"):
        codec.encode_args("deposit", args)


@pytest.mark.parametrize("bad", [object(), 2 ** 70, -(2 ** 64)], ids=["object", "huge", "huge-negative"])
def test_unencodable_arguments_are_refused_before_anything_is_written(tmp_path, bad):
    m = open_master(tmp_path)
    m.execute("open_account", "a", 5)
    seq, before = m.seq, journal_bytes(tmp_path)
    with pytest.raises(BadArguments):
        m.execute("deposit", "a", bad)
    with pytest.raises(BadArguments):
        m.execute_many([("deposit", ["a", 1], None), ("deposit", ["a", bad], None)])
    assert m.seq == seq
    assert journal_bytes(tmp_path) == before
    assert m.query("balance", "a") == 5
    # The master is not wedged by the refusal: the next good request commits.
    assert m.execute("deposit", "a", 1) == 6
    m.close()


def test_record_round_trips_through_its_payload():
    rec = Record("m", 7, 123456789, "rid-1", "transfer", ("a", "b", 5))
    back = codec.decode_record(codec.encode_record(rec))
    assert back == rec
    assert back.key == (123456789, "m", 7)
    assert back.record_id == "m:7"
    assert not back.is_tick
    assert Record("m", 8, 1, "", codec.TICK, ()).is_tick


def test_canonical_digest_does_not_depend_on_dict_insertion_order():
    a = {"accounts": {"x": 1, "y": 2, "z": {"p": [1, 2], "q": None}}, "n": 3}
    b = {"n": 3, "accounts": {"z": {"q": None, "p": [1, 2]}, "y": 2, "x": 1}}
    assert list(a) != list(b)
    assert codec.canonical(a) == codec.canonical(b)
    assert codec.digest_of(a, {}) == codec.digest_of(b, {})
    assert codec.digest_of(a, {}) != codec.digest_of({**a, "n": 4}, {})


plain = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12)


def _reversed_dicts(value):
    if isinstance(value, dict):
        return {k: _reversed_dicts(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_dicts(v) for v in value]
    return value


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=6), plain, max_size=8))
def test_equal_states_built_in_any_order_have_the_same_digest(state):
    assert codec.digest_of(state) == codec.digest_of(_reversed_dicts(state))
    assert codec.round_trip(state) == state


def test_ledger_opened_in_different_orders_has_the_same_digest(tmp_path):
    one = open_master(tmp_path / "one")
    two = open_master(tmp_path / "two")
    for acct in ("a", "b", "c"):
        one.execute("open_account", acct, 10)
    for acct in ("c", "b", "a"):
        two.execute("open_account", acct, 10)
    assert list(one.query("balances")) != list(two.query("balances"))
    assert one.digest() == two.digest()
    one.close()
    two.close()


def test_state_keyed_by_integers_has_a_digest_and_snapshots(tmp_path):
    from workers.prevalence import Model
    by_id = Model("by_id", lambda: {"accounts": {}})

    @by_id.transaction
    def put(root, ctx, key, value):
        root["accounts"][key] = value

    m = open_master(tmp_path, model=by_id)
    m.execute("put", 2, "two")
    m.execute("put", 1, "one")
    digest = m.digest()
    assert digest == codec.digest_of({"accounts": {1: "one", 2: "two"}}, {})  # insertion order aside
    m.snapshot()
    m.close()
    m = open_master(tmp_path, model=by_id)
    assert m.digest() == digest
    m.close()


def test_arguments_too_large_for_one_record_are_bad_arguments_and_nothing_is_written(tmp_path):
    from workers.prevalence import journal
    m = open_master(tmp_path)
    m.execute("open_account", "a", 1)
    seq, before = m.seq, journal_bytes(tmp_path)
    with pytest.raises(BadArguments):
        m.execute("open_account", "x" * (journal.RECORD_BYTES_MAX + 1), 0)
    assert (m.seq, journal_bytes(tmp_path)) == (seq, before)
    assert m.execute("deposit", "a", 1) == 2
    m.close()


class Account(Struct):  # state Structs derive from the change-tracked base
    balance: int = 0


class TypedRoot(Struct):
    accounts: dict[str, Account] = {}


class UntypedRoot(Struct):
    accounts: dict = {}  # holds Account structs, but says only "dict"


def _struct_model(name, root_type):
    from workers.prevalence import Model
    model = Model(name, root_type)

    @model.transaction
    def add(root, ctx, account_id, n):
        account = root.accounts.setdefault(account_id, Account())
        account.balance += n
        return account.balance

    return model


def test_struct_state_survives_snapshot_and_recovery(tmp_path):
    model = _struct_model("typed", TypedRoot)
    m = open_master(tmp_path, model=model)
    m.execute("add", "x", 3)
    m.snapshot()
    m.execute("add", "x", 2)
    digest = m.digest()
    m.close()
    m = open_master(tmp_path, model=model)
    assert m.replica.state == TypedRoot(accounts={"x": Account(5)})
    assert m.digest() == digest
    m.close()


def test_state_that_does_not_survive_the_codec_is_refused_at_snapshot(tmp_path):
    from workers.prevalence.errors import PrevalenceError
    model = _struct_model("untyped", UntypedRoot)
    m = open_master(tmp_path, model=model)
    m.execute("add", "x", 3)
    with pytest.raises(PrevalenceError):
        m.snapshot()
    m.close()
