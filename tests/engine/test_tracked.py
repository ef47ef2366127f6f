"""Change-tracked containers: every change undoes exactly, newest first, whatever the mix.

The Hypothesis test applies random nested changes (inserts, deletes, list append/pop/
insert/sort, slices, moving a container from one place to another, Struct attribute sets,
raising half way) in random windows, undoes some of them, and compares the state, byte for
byte in an order-preserving encoding, with a reference copy taken at that point.
"""

from __future__ import annotations

import copy

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from workers.prevalence import tracked
from workers.prevalence.tracked import (MutationOutsideTransaction, Struct, TDict, TList, UndoLog,
                                        UntrackableValue, convert)

_encoder = msgspec.msgpack.Encoder()  # keeps dict order: order is part of the state


def snapshot(state) -> bytes:
    return _encoder.encode(state)


class Item(Struct):
    name: str
    qty: int = 0
    tags: list = []


class Frozen(msgspec.Struct, frozen=True):
    a: int
    b: tuple = ()


class Loose(msgspec.Struct):
    a: int


def in_record(log: UndoLog, fn, *args):
    """Run fn as a record does: changes logged, plain values converted at the end."""
    tracked.begin_record(log)
    try:
        out = fn(*args)
        tracked.finish_record()
        return out
    finally:
        tracked.end_record()


def fresh_state():
    return convert({"users": {f"u{i}": {"name": f"n{i}", "balance": i, "tags": ["a", "b"],
                                        "orders": [{"sku": "x", "qty": 1}]} for i in range(6)},
                    "queue": [1, 2, 3, 4], "items": [Item("i0", 1, ["t"])], "n": 0})


# -- single behaviours -------------------------------------------------------------------

def test_plain_values_stored_in_a_record_are_tracked_once_it_ends():
    state, log = fresh_state(), UndoLog()
    mine = {"orders": []}

    def tx():
        state["users"]["new"] = mine
        mine["orders"].append({"sku": "y"})  # the author's own reference still writes, until return
    in_record(log, tx)
    assert type(state["users"]["new"]) is TDict
    assert type(state["users"]["new"]["orders"]) is TList
    assert type(state["users"]["new"]["orders"][0]) is TDict
    assert state["users"]["new"]["orders"][0]["sku"] == "y"


def test_a_change_outside_a_record_is_refused():
    state = fresh_state()
    with pytest.raises(MutationOutsideTransaction):
        state["users"]["u1"]["balance"] = 5
    with pytest.raises(MutationOutsideTransaction):
        state["queue"].append(5)
    with pytest.raises(MutationOutsideTransaction):
        state["items"][0].qty = 3
    assert state["users"]["u1"]["balance"] == 1 and state["queue"] == [1, 2, 3, 4]


@pytest.mark.parametrize("value, why", [
    ({1, 2}, "set"), (object(), "object"), (Loose(1), "derive it from"), (Frozen(1, ([1],)), "frozen Struct"),
    (([1],), "tuple holding"), ({"deep": [{"x": {3}}]}, "set"),
])
def test_a_value_that_cannot_be_tracked_is_refused_when_the_record_ends(value, why):
    state, log = fresh_state(), UndoLog()
    before = snapshot(state)
    mark = log.mark()
    with pytest.raises(UntrackableValue, match=why):
        in_record(log, lambda: state.__setitem__("bad", value))
    log.undo_to(mark)
    assert snapshot(state) == before


def test_immutable_values_are_stored_as_they_are():
    state, log = fresh_state(), UndoLog()
    f = Frozen(1, (2, "x"))
    in_record(log, lambda: state.update(f=f, t=(1, (2, 3)), b=b"x"))
    assert state["f"] is f and state["t"] == (1, (2, 3))


def test_deleting_an_old_key_and_undoing_puts_it_back_in_its_place():
    state, log = fresh_state(), UndoLog()
    users = state["users"]
    order = list(users)
    mark = log.mark()
    in_record(log, lambda: users.pop("u2"))
    in_record(log, lambda: users.__delitem__("u4"))
    in_record(log, lambda: users.popitem())
    assert list(users) == ["u0", "u1", "u3"]
    log.undo_to(mark)
    assert list(users) == order


def test_copies_of_tracked_containers_are_plain():
    state = fresh_state()
    assert type(copy.deepcopy(state["users"])) is dict
    assert type(copy.copy(state["queue"])) is list
    assert type(state["queue"][:]) is list


def test_undo_forgets_and_positions_survive_forgetting():
    state, log = fresh_state(), UndoLog()
    in_record(log, lambda: state["queue"].append(5))
    kept = log.mark()
    in_record(log, lambda: state["queue"].append(6))
    log.forget_before(kept)
    assert len(log) == 1
    log.undo_to(kept)
    assert state["queue"] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        log.undo_to(kept - 1)


# -- the property ----------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "u0", "u1", "u3", 7, 8])
VALUES = st.recursive(st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none()),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.sampled_from("xyz"), inner, max_size=3)),
                      max_leaves=6)


class Boom(Exception):
    pass


def _containers(state):
    """Every dict, list and Struct in the state, in a deterministic order."""
    out, todo = [], [state]
    while todo:
        c = todo.pop()
        out.append(c)
        children = (c.values() if isinstance(c, dict) else c if isinstance(c, list)
                    else [getattr(c, f) for f in c.__struct_fields__])
        todo.extend(x for x in children if isinstance(x, (dict, list, Struct)))
    return out


OPS = st.tuples(st.integers(0, 10 ** 6), st.sampled_from([
    "dset", "ddel", "dpop", "popitem", "setdefault", "update", "dclear", "append", "extend", "lset",
    "lpop", "lpop0", "insert", "remove", "sort", "reverse", "slice", "delslice", "iadd", "imul", "lclear",
    "move", "struct", "raise"]), KEYS, VALUES)


def _apply(state, op):
    pick, kind, key, value = op
    containers = _containers(state)
    dicts = [c for c in containers if isinstance(c, dict)]
    lists = [c for c in containers if isinstance(c, list)]
    structs = [c for c in containers if isinstance(c, Struct)]
    d = dicts[pick % len(dicts)]
    lst = lists[pick % len(lists)] if lists else None
    if kind == "dset":
        d[key] = value
    elif kind == "ddel" and key in d:
        del d[key]
    elif kind == "dpop":
        d.pop(key, None)
    elif kind == "popitem" and d:
        d.popitem()
    elif kind == "setdefault":
        d.setdefault(key, value)
    elif kind == "update":
        d.update({key: value, "z": 1})
    elif kind == "dclear" and d is not state:
        d.clear()
    elif kind == "raise":
        d[key] = value
        raise Boom("half way")
    elif kind == "move":
        # A container moves from one place to another (taken out of its parent first).
        src = [k for k, v in d.items() if isinstance(v, (dict, list))]
        if src:
            moved = d.pop(src[pick % len(src)])
            state.setdefault("moved", {})["m"] = moved
    elif kind == "struct" and structs:
        s = structs[pick % len(structs)]
        if pick % 2:
            s.qty = s.qty + 1
        else:
            s.tags = [value]
    elif lst is None:
        return
    elif kind == "append":
        lst.append(value)
    elif kind == "extend":
        lst.extend([value, 1])
    elif kind == "lset" and lst:
        lst[pick % len(lst)] = value
    elif kind == "lpop" and lst:
        lst.pop()
    elif kind == "lpop0" and lst:
        lst.pop(0)
    elif kind == "insert":
        lst.insert(pick % 3, value)
    elif kind == "remove" and lst:
        lst.remove(lst[pick % len(lst)])
    elif kind == "sort":
        lst.sort(key=repr)
    elif kind == "reverse":
        lst.reverse()
    elif kind == "slice":
        lst[1:3] = [value, value]
    elif kind == "delslice":
        del lst[::2]
    elif kind == "iadd":
        lst += [value]
    elif kind == "imul":
        lst *= 2 if len(lst) < 8 else 1
    elif kind == "lclear":
        lst.clear()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(OPS, min_size=1, max_size=6), min_size=1, max_size=8), st.data())
def test_any_window_of_records_undoes_to_the_state_before_it(records, data):
    state, log = fresh_state(), UndoLog()
    points = []  # (mark, bytes of the state) before each record
    for ops in records:
        points.append((log.mark(), snapshot(state)))
        mark = log.mark()
        try:
            in_record(log, lambda: [_apply(state, op) for op in ops])
        except Boom:
            log.undo_to(mark)  # a record that raised leaves no trace
            assert snapshot(state) == points[-1][1]
        # Every container in the state is tracked once the record ended.
        assert all(type(c) in (TDict, TList) or isinstance(c, Struct) for c in _containers(state))
    # Undo a random suffix of the window, then the rest: each step lands on the reference.
    for mark, expected in reversed(points[data.draw(st.integers(0, len(points) - 1)):]):
        log.undo_to(mark)
        assert snapshot(state) == expected
    log.undo_to(points[0][0])
    assert snapshot(state) == points[0][1]
