"""Change-tracked state, the pure-Python implementation: the specification.

`workers.prevalence.tracked` is the public face and says what the containers do (read it
first). This module is what it means, line by line: the C extension (`_tracked`, wired
up by `_tracked_c`) must behave identically (same undo entries, same state after undo,
same exceptions), and `tests/engine/test_tracked.py` runs its contract suite on both.
`tracked` uses this module when the extension is not built, or when
``PREVALENCE_TRACKED=python`` is set.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import os
import threading
import uuid
import zlib
from typing import Any

import msgspec

from .journal import HEADER  # the frame's header (`write_frame`): length, version, flags, reserved

__all__ = ["TDict", "TList", "Struct", "UndoLog", "MutationOutsideTransaction", "UntrackableValue",
           "convert", "begin_record", "finish_record", "end_record", "dict_set", "dict_delete",
           "dict_restore_point", "run_record", "apply_records", "write_frame", "ReadView", "INT_MIN", "INT_MAX", "MAX_DEPTH", "IMPLEMENTATION"]

#: Which implementation this is ("c" for `_tracked_c`).
IMPLEMENTATION = "python"


class MutationOutsideTransaction(TypeError):
    """Raised when tracked state is changed outside a transaction (a query, a caller
    holding a value returned by `execute`, code poking the state)."""


class UntrackableValue(TypeError):
    """Raised (as the outcome of the transaction) when a transaction stores into the state
    a value whose changes could not be tracked; the message names the type and why."""


_MISSING = object()
_END = object()  # "the deleted key was the last one"

_local = threading.local()

#: Immutable values that a snapshot reads back as themselves wherever they are stored.
_PLAIN_ATOMS = frozenset({str, int, float, bool, type(None), bytes})

#: Immutable values that a snapshot reads back as themselves only where the codec knows
#: their type: a Struct field annotated with it (or a dict key). In a plain dict or list
#: (a TDict or TList, decoded untyped) it would read them back as str, so there they are
#: refused (`UntrackableValue`), except an aware datetime whose UTC offset is 0 (`ctx.now`),
#: which reads back as itself.
_TYPED_ATOMS = frozenset({_dt.datetime, _dt.date, _dt.time, _dt.timedelta, decimal.Decimal, uuid.UUID})

#: Immutable values stored as they are (in a Struct field, or as a dict key).
_ATOMS = _PLAIN_ATOMS | _TYPED_ATOMS

_struct_setattr = msgspec.Struct.__setattr__

#: The integers MessagePack can hold: a state holding another could never be snapshotted.
INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1

#: How deep a value stored into the state may nest (containers, tuples and Structs inside
#: each other): deeper, it is refused (`UntrackableValue`) rather than risking the stack
#: here or in the snapshot codec (which recurses too).
MAX_DEPTH = 500


class UndoLog:
    """The undo entries of the records a replica has applied and not yet committed.

    `mark()` is a position; `undo_to(mark)` undoes every entry after it, newest first, and
    forgets them; `forget_before(mark)` drops entries that will never be undone (their
    records committed). Positions stay valid across `forget_before` (a running base).
    """

    __slots__ = ("entries", "base", "pending")

    def __init__(self) -> None:
        self.entries: list = []
        self.base = 0          # absolute position of entries[0]
        self.pending: list = []  # (container, key, value) stored this record, to convert

    def mark(self) -> int:
        return self.base + len(self.entries)

    def undo_to(self, mark: int) -> int:
        """Undo every entry after `mark`, newest first. Returns how many were undone."""
        entries = self.entries
        start = mark - self.base
        if start < 0:
            raise ValueError(f"undo to {mark}, before the oldest kept entry {self.base}")
        n = len(entries) - start
        for i in range(len(entries) - 1, start - 1, -1):
            entry = entries[i]
            entry[0](*entry[1:])
        del entries[start:]
        return n

    def forget_before(self, mark: int) -> None:
        drop = mark - self.base
        if drop > 0:
            del self.entries[:drop]
            self.base = mark

    def __len__(self) -> int:
        return len(self.entries)


def begin_record(log: UndoLog) -> None:
    """From now until `end_record`, tracked state changes in this thread go to `log`."""
    _local.log = log
    log.pending.clear()


def end_record() -> None:
    log = getattr(_local, "log", None)
    if log is not None:
        log.pending.clear()
    _local.log = None


def _current() -> UndoLog:
    log = getattr(_local, "log", None)
    if log is None:
        raise MutationOutsideTransaction(
            "tracked state changed outside a transaction: the state changes only inside a "
            "transaction (a query, or a value returned by execute/query, must not be mutated; "
            "copy it first)")
    return log


def finish_record() -> None:
    """Convert the plain values stored during this record (raises `UntrackableValue`)."""
    log = _local.log
    pending = log.pending
    i = 0
    while i < len(pending):  # conversion may not add entries, but stay safe
        container, key, value = pending[i]
        i += 1
        cls = container.__class__
        if cls is TDict or isinstance(container, dict):
            if dict.get(container, key, _MISSING) is value:
                converted = _convert(value, 1, True)
                if converted is not value:
                    dict.__setitem__(container, key, converted)
        elif isinstance(container, list):
            if 0 <= key < list.__len__(container) and list.__getitem__(container, key) is value:
                index = key
            else:
                index = next((j for j, x in enumerate(container) if x is value), -1)
            if index >= 0:
                converted = _convert(value, 1, True)
                if converted is not value:
                    list.__setitem__(container, index, converted)
        else:  # a Struct's field
            if getattr(container, key) is value:
                converted = convert(value)
                if converted is not value:
                    _struct_setattr(container, key, converted)
    pending.clear()


def convert(value: Any, *, adopt: bool = False) -> Any:
    """`value` with every plain dict and list in it replaced by a tracked one.

    Tracked containers are returned as they are (their contents are tracked already);
    Structs derived from `Struct` are converted in place. Raises `UntrackableValue` for a
    value whose changes could not be tracked, nested deeper than `MAX_DEPTH`, or that a
    snapshot would not read back as itself: a tuple or a `_TYPED_ATOMS` value (but a UTC
    datetime) inside a dict or list; `value` itself, like a Struct's field, may be one.

    `value` itself is left as it was, unless `adopt` is true: the caller hands it over
    (a freshly decoded snapshot) and must not use it afterwards, so an implementation may
    turn its containers into tracked ones in place instead of copying them (the C one
    does; this one always copies, which the contract allows).
    """
    return _convert(value, 1, False)


def _too_deep() -> UntrackableValue:
    return UntrackableValue(f"a value nested deeper than {MAX_DEPTH} levels cannot be stored in the "
                            "state (dicts, lists, tuples and Structs inside each other)")


def _untyped(value: Any) -> UntrackableValue:
    """The refusal of a tuple, a `_TYPED_ATOMS` value or an Enum member stored in a plain
    dict or list."""
    cls = value.__class__
    if cls is tuple:
        return UntrackableValue("a tuple cannot be stored in a plain dict or list in the state: a snapshot "
                                "would read it back as a list (use a list, or a Struct field annotated "
                                "with its type)")
    if isinstance(value, enum.Enum):
        return UntrackableValue(f"a {cls.__name__} member cannot be stored in a plain dict or list in the "
                                f"state: a snapshot would read it back as its value {value.value!r} (store "
                                f"the value, or the member in a Struct field annotated {cls.__name__})")
    if cls is _dt.datetime:
        return UntrackableValue("a datetime that is naive or not in UTC cannot be stored in a plain dict or "
                                "list in the state: a snapshot would read it back as a str or in UTC (store "
                                "it converted to UTC with tzinfo=datetime.timezone.utc, in a Struct field "
                                "annotated datetime, or as str/int)")
    return UntrackableValue(f"a {cls.__name__} cannot be stored in a plain dict or list in the state: a "
                            f"snapshot would read it back as a str (store it in a Struct field annotated "
                            f"{cls.__name__}, or as str/int)")


def _check_untyped_atom(value: Any) -> None:
    """A `_TYPED_ATOMS` value stored in a plain dict or list: refused unless it is an aware
    datetime whose UTC offset is 0 (raises `UntrackableValue`)."""
    if value.__class__ is _dt.datetime:
        offset = value.utcoffset()
        if offset is not None and not offset:
            return
    raise _untyped(value)


def _convert(value: Any, depth: int, loose: bool) -> Any:
    """`convert` of a value at nesting level `depth` (the value passed to `convert` is 1);
    `loose` when it is stored in a plain dict or list (or a tuple there), which a snapshot
    decodes untyped: tuples and `_TYPED_ATOMS` (but a UTC datetime) are refused there.

    Loops rather than comprehensions: one Python frame per level, so that `MAX_DEPTH`
    levels fit the default recursion limit.
    """
    cls = value.__class__
    if cls is int or cls is bool:
        if not INT_MIN <= value <= INT_MAX:
            raise UntrackableValue(f"integer {value} is out of the range a snapshot can hold "
                                   f"({INT_MIN}..{INT_MAX})")
        return value
    if cls in _PLAIN_ATOMS or cls is TDict or cls is TList:
        return value
    if cls in _TYPED_ATOMS:
        if loose:
            _check_untyped_atom(value)
        return value
    if cls is dict or cls is list or cls is tuple or isinstance(value, msgspec.Struct):
        if depth > MAX_DEPTH:
            raise _too_deep()
        depth += 1
    if cls is dict:
        out = TDict.__new__(TDict)
        for k, v in value.items():
            if k.__class__ is not str:
                _check_key(k, depth)
            vc = v.__class__
            dict.__setitem__(out, k, v if vc is str or vc is TDict or vc is TList else _convert(v, depth, True))
        return out
    if cls is list:
        items = []
        for x in value:
            items.append(x if x.__class__ is str else _convert(x, depth, True))
        return TList._adopt(items)
    if cls is tuple:
        if loose:
            raise _untyped(value)
        items = []
        for x in value:
            items.append(_convert(x, depth, False))
        for x in items:
            if x.__class__ is TDict or x.__class__ is TList or isinstance(x, Struct):
                raise UntrackableValue(f"a tuple holding a mutable {type(x).__name__} cannot be tracked "
                                       "(a tuple cannot be changed, its contents could): use a list")
        for a, b in zip(items, value):
            if a is not b:
                return tuple(items)
        return value
    if isinstance(value, Struct):
        for name in value.__struct_fields__:
            field = getattr(value, name)
            converted = _convert(field, depth, False)
            if converted is not field:
                _struct_setattr(value, name, converted)
        return value
    if isinstance(value, msgspec.Struct):
        if not value.__struct_config__.frozen:
            raise UntrackableValue(
                f"a mutable msgspec Struct {cls.__name__} cannot be tracked: derive it from "
                "workers.prevalence.Struct (or make it frozen=True)")
        for name in value.__struct_fields__:
            field = getattr(value, name)
            try:
                same = _convert(field, depth, False) is field
            except UntrackableValue as exc:
                raise UntrackableValue(f"frozen Struct {cls.__name__}, field {name!r}: {exc}") from None
            if not same:
                raise UntrackableValue(f"frozen Struct {cls.__name__} holds a mutable "
                                       f"{type(field).__name__} in field {name!r}: it could change untracked")
        return value
    if isinstance(value, enum.Enum):
        if loose:
            raise _untyped(value)  # a snapshot reads it back as its value
        return value
    raise UntrackableValue(f"a {cls.__name__} cannot be stored in the state: its changes could not be "
                           "tracked (use dicts, lists, str, int, float, bool, None, bytes, and Structs "
                           "derived from workers.prevalence.Struct, whose typed fields may also hold "
                           "tuples, dates, datetimes, times, timedeltas, Decimals and UUIDs)")


def _needs_conversion(value: Any) -> bool:
    """Whether a value stored into a TDict or TList must go through `convert` when the
    record ends: plain containers, Structs, tuples, `_TYPED_ATOMS` (to be checked),
    anything unknown, and integers out of range."""
    cls = value.__class__
    if cls is int:
        return not INT_MIN <= value <= INT_MAX
    return not (cls in _PLAIN_ATOMS or cls is TDict or cls is TList)


def _field_needs_conversion(value: Any) -> bool:
    """`_needs_conversion` of a value stored into a Struct's field, where `_TYPED_ATOMS`
    are stored as they are (the codec decodes a typed field back to its type)."""
    cls = value.__class__
    if cls is int:
        return not INT_MIN <= value <= INT_MAX
    return not (cls in _ATOMS or cls is TDict or cls is TList)


def _check_key(key: Any, depth: int = 1) -> None:
    """A dict key a snapshot reads back as itself (a str is checked by the caller's fast
    path): an int or bool in range, a float, None, bytes, a datetime in UTC, or a tuple of
    these. Every dict of the state is decoded untyped, whatever holds it."""
    cls = key.__class__
    if cls is tuple:
        if depth > MAX_DEPTH:
            raise _too_deep()
        for part in key:
            _check_key(part, depth + 1)
    elif cls is int or cls is bool:
        if not INT_MIN <= key <= INT_MAX:
            raise UntrackableValue(f"integer key {key} is out of the range a snapshot can hold")
    elif cls in _PLAIN_ATOMS:
        pass
    elif cls is _dt.datetime and key.utcoffset() == _dt.timedelta(0):
        pass
    else:
        raise _bad_key(key)


def _bad_key(key: Any) -> UntrackableValue:
    cls = key.__class__
    name = cls.__name__
    if isinstance(key, enum.Enum):
        return UntrackableValue(f"a {name} member cannot be a key in the state: a snapshot would read it back "
                                f"as its value {key.value!r} (use the value as the key)")
    if cls is _dt.datetime:
        return UntrackableValue("a datetime that is naive or not in UTC cannot be a key in the state: a snapshot "
                                "would read it back as a str or in UTC (convert it to UTC with "
                                "tzinfo=datetime.timezone.utc, or use a str or int key)")
    if cls in _TYPED_ATOMS:
        return UntrackableValue(f"a {name} cannot be a key in the state: a snapshot would read it back as a str "
                                "(use a str or int key)")
    if isinstance(key, msgspec.Struct):
        return UntrackableValue(f"a {name} cannot be a key in the state: a snapshot would read it back as a "
                                "dict, which cannot be a key (use a str, int or tuple key)")
    return UntrackableValue(f"a {name} cannot be a key in the state")


# -- undo functions (module level: an entry holds a reference, not a closure) -----------

def _undo_dict_set(d: dict, key: Any, old: Any) -> None:
    if old is _MISSING:
        dict.__delitem__(d, key)
    else:
        dict.__setitem__(d, key, old)


def _undo_dict_delete(d: dict, key: Any, old: Any, successor: Any) -> None:
    dict.__setitem__(d, key, old)  # back at the end
    if successor is _END:
        return
    # Move every key that followed it (from `successor` on) back behind it.
    keys = list(dict.__iter__(d))
    start = keys.index(successor)
    for k in keys[start:-1]:
        dict.__setitem__(d, k, dict.pop(d, k))


def _undo_dict_restore(d: dict, items: list) -> None:
    dict.clear(d)
    dict.update(d, items)


def _undo_list_append(lst: list) -> None:
    list.pop(lst)


def _undo_list_truncate(lst: list, n: int) -> None:
    list.__delitem__(lst, slice(n, None))


def _undo_list_set(lst: list, index: int, old: Any) -> None:
    list.__setitem__(lst, index, old)


def _undo_list_restore(lst: list, items: list) -> None:
    list.__setitem__(lst, slice(None), items)


def _undo_list_pop_end(lst: list, value: Any) -> None:
    list.append(lst, value)


def _undo_struct_set(s: Any, name: str, old: Any) -> None:
    _struct_setattr(s, name, old)


def _successor(d: dict, key: Any) -> Any:
    """The key after `key` in `d`'s order, or `_END`: O(1) for the newest key."""
    for last in reversed(d):
        if last == key:
            return _END
        break
    it = dict.__iter__(d)
    for k in it:
        if k == key:
            return next(it, _END)
    return _END


# -- engine-owned plain dicts (the request-id table) -----------------------------------

def run_record(log: UndoLog, fn: Any, root: Any, ctx: Any, args: tuple) -> Any:
    """``fn(root, ctx, *args)`` as one record of `log` (the write path's bracket, in one
    call): changes logged; plain values stored converted when it returns; if it raises (or
    the conversion refuses), everything it changed is undone and the exception propagates."""
    mark = log.mark()
    begin_record(log)
    try:
        value = fn(root, ctx, *args)
        finish_record()
        return value
    except BaseException:
        log.undo_to(mark)
        raise
    finally:
        end_record()


def apply_records(log: UndoLog, records, transactions: dict, root: Any, ctx: Any, slow,
                  watch: str | None = None, marks: list | None = None, tentative: list | None = None,
                  forget: bool = False, kinds: tuple | None = None) -> list:
    """Apply many records in order; the pairs (record, outcome) of master `watch`'s records.

    For each record: its undo-log mark goes to `marks` and the record to `tentative` (when
    given); a tick (empty tx) stops there. A record with a request id, or of master `watch`,
    goes to ``slow(record)`` (the model's full apply: request ids, outcomes), and a record of
    `watch` is returned with that outcome. Every other record runs as ``run_record(log,
    transactions[tx], root, ctx, record.args)`` after ``ctx.record = record`` and
    ``ctx._random = None``; nobody reads its outcome, so an Exception it raises (undone by
    `run_record`) is dropped where `Model.apply` would have made it the outcome. Anything
    else (KeyboardInterrupt) propagates; an unknown tx is a KeyError (names are checked
    when records are read). With `forget`, the undo entries of each record are dropped once
    it is applied (committed records: freed while they are still in the cache).

    With `kinds` = ``(Rejected, ok, rejected, error)`` (the model's exception class and
    outcome statuses), a record of `watch` without a request id runs here too, its outcome
    built as `Model.apply` builds it (`_outcome`).
    """
    if kinds is not None and not (isinstance(kinds, tuple) and len(kinds) == 4 and isinstance(kinds[0], type)
                                  and issubclass(kinds[0], BaseException)):
        raise TypeError("apply_records: kinds must be (Rejected, ok, rejected, error)")
    again = []
    for rec in list(records):  # a copy: callbacks changing the caller's list do not disturb the loop
        if forget and len(log):
            log.forget_before(log.mark())
        if marks is not None:
            marks.append(log.mark())
        if tentative is not None:
            tentative.append(rec)
        tx = rec.tx
        if not tx:
            continue
        watched = watch is not None and rec.master == watch
        if rec.rid or (watched and kinds is None):
            out = slow(rec)
            if watched:
                again.append((rec, out))
            continue
        fn = transactions[tx]
        ctx.record = rec
        ctx._random = None
        try:
            value = run_record(log, fn, root, ctx, rec.args)
        except Exception as exc:  # noqa: BLE001 -- undone; the outcome is read only if watched
            if watched:
                again.append((rec, _outcome(kinds, None, exc)))
        else:
            if watched:
                again.append((rec, _outcome(kinds, value, None)))
    if forget and len(log):
        log.forget_before(log.mark())
    return again


def _outcome(kinds: tuple, value: Any, exc: Exception | None) -> dict:
    """A record's outcome as `Model.apply` builds it (`apply_records` with `kinds`)."""
    rejected_class, ok, rejected, error = kinds
    if exc is None:
        return {"status": ok, "value": value, "error": None}
    text = str(exc)
    if isinstance(exc, rejected_class):
        return {"status": rejected, "value": None, "error": text}
    return {"status": error, "value": None, "error": f"{type(exc).__name__}: {text}"}


def write_frame(fd: int, payload: bytes, offset: int, version: int) -> int:
    """Write one record framed as ``journal.frame(payload, None)`` frames it (header: its
    length, `version`, flags 0, 0; the payload; the CRC-32 of both, little-endian) with one
    ``os.pwrite`` at `offset`; return the bytes written (a short write is the caller's to
    refuse). Not change tracking: the other half of every commit, in C with the rest."""
    if not 0 <= fd <= 0x7FFFFFFF:
        raise ValueError(f"write_frame: {fd} is not a file descriptor")
    if payload.__class__ is not bytes:
        raise TypeError(f"write_frame() needs the payload as bytes, got {type(payload).__name__}")
    n = len(payload)
    if not 0 < n <= 0xFFFFFFFF or not 0 <= version <= 255 or offset < 0:
        raise ValueError(f"write_frame: a payload of {n} bytes, version {version}, offset {offset} is out of range")
    body = HEADER.pack(n, version, 0, 0) + payload
    return os.pwrite(fd, body + zlib.crc32(body).to_bytes(4, "little"), offset)


def dict_set(log: UndoLog, d: dict, key: Any, value: Any) -> None:
    """``d[key] = value`` on a plain dict, undoably (for tables the engine itself keeps)."""
    log.entries.append((_undo_dict_set, d, key, d.get(key, _MISSING)))
    d[key] = value


def dict_restore_point(log: UndoLog, d: dict) -> None:
    """Log the whole contents of a plain dict (before a bulk change): O(len(d)) once."""
    log.entries.append((_undo_dict_restore, d, list(d.items())))


def dict_delete(log: UndoLog, d: dict, key: Any) -> None:
    """``del d[key]`` on a plain dict, undoably (its place in the order comes back too)."""
    log.entries.append((_undo_dict_delete, d, key, d[key], _successor(d, key)))
    del d[key]


# -- the containers --------------------------------------------------------------------

class TDict(dict):
    """A dict whose every change is logged for undo. Reads are dict's own."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if dict.__len__(self):
            raise TypeError("TDict.__init__ called again on a populated dict: that change could not be tracked")
        for k, v in convert(dict(*args, **kwargs)).items():
            dict.__setitem__(self, k, v)

    def __setitem__(self, key: Any, value: Any) -> None:
        log = _current()
        if key.__class__ is not str:
            _check_key(key)  # before anything changes: the caller sees the error at once
        log.entries.append((_undo_dict_set, self, key, dict.get(self, key, _MISSING)))
        dict.__setitem__(self, key, value)
        if _needs_conversion(value):
            log.pending.append((self, key, value))

    def __delitem__(self, key: Any) -> None:
        log = _current()
        old = dict.__getitem__(self, key)
        log.entries.append((_undo_dict_delete, self, key, old, _successor(self, key)))
        dict.__delitem__(self, key)

    def pop(self, key: Any, *default: Any) -> Any:
        if len(default) > 1:
            raise TypeError(f"pop expected at most 2 arguments, got {1 + len(default)}")
        if not dict.__contains__(self, key):
            if default:
                return default[0]
            raise KeyError(key)
        value = dict.__getitem__(self, key)
        self.__delitem__(key)
        return value

    def popitem(self) -> tuple:
        if not dict.__len__(self):
            raise KeyError("popitem(): dictionary is empty")
        key = next(reversed(self))
        value = dict.__getitem__(self, key)
        log = _current()
        log.entries.append((_undo_dict_delete, self, key, value, _END))
        dict.__delitem__(self, key)
        return key, value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        self.__setitem__(key, default)
        return dict.__getitem__(self, key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self.__setitem__(k, v)

    def __ior__(self, other: Any) -> "TDict":
        self.update(other)
        return self

    def clear(self) -> None:
        log = _current()
        log.entries.append((_undo_dict_restore, self, list(dict.items(self))))
        dict.clear(self)

    def __reduce__(self):  # copy/pickle give a plain dict: a copy is not part of the state
        return (dict, (dict(self),))

    def __repr__(self) -> str:
        return dict.__repr__(self)


class TList(list):
    """A list whose every change is logged for undo. Reads are list's own."""

    __slots__ = ()

    def __init__(self, iterable: Any = ()) -> None:
        if list.__len__(self):
            raise TypeError("TList.__init__ called again on a populated list: that change could not be tracked")
        list.extend(self, [_convert(x, 1, True) for x in iterable])

    @classmethod
    def _adopt(cls, items: list) -> "TList":
        out = cls.__new__(cls)
        list.extend(out, items)
        return out

    def _restore_point(self) -> UndoLog:
        log = _current()
        log.entries.append((_undo_list_restore, self, list.copy(self)))
        return log

    def _pend_all(self, log: UndoLog) -> None:
        for i, x in enumerate(self):
            if _needs_conversion(x):
                log.pending.append((self, i, x))

    def append(self, value: Any) -> None:
        log = _current()
        log.entries.append((_undo_list_append, self))
        list.append(self, value)
        if _needs_conversion(value):
            log.pending.append((self, list.__len__(self) - 1, value))

    def extend(self, iterable: Any) -> None:
        log = _current()
        n = list.__len__(self)
        entry = (_undo_list_truncate, self, n)
        log.entries.append(entry)
        try:
            list.extend(self, iterable)
        except BaseException:
            if list.__len__(self) == n and log.entries[-1] is entry:
                log.entries.pop()  # nothing changed (not iterable...): nothing to undo
            raise
        for i in range(n, list.__len__(self)):
            x = list.__getitem__(self, i)
            if _needs_conversion(x):
                log.pending.append((self, i, x))

    def __iadd__(self, other: Any) -> "TList":
        self.extend(other)
        return self

    def __setitem__(self, index: Any, value: Any) -> None:
        if index.__class__ is int:
            log = _current()
            n = list.__len__(self)
            i = index + n if index < 0 else index
            old = list.__getitem__(self, index)  # raises IndexError before anything is logged
            log.entries.append((_undo_list_set, self, i, old))
            list.__setitem__(self, i, value)
            if _needs_conversion(value):
                log.pending.append((self, i, value))
            return
        log = self._restore_point()
        list.__setitem__(self, index, value)
        self._pend_all(log)

    def __delitem__(self, index: Any) -> None:
        if index.__class__ is int:
            list.__getitem__(self, index)  # IndexError before anything is logged
        self._restore_point()
        list.__delitem__(self, index)

    def pop(self, index: int = -1) -> Any:
        n = list.__len__(self)
        if n and (index == -1 or index == n - 1):
            value = list.__getitem__(self, -1)
            _current().entries.append((_undo_list_pop_end, self, value))
            list.pop(self)
            return value
        value = list.__getitem__(self, index)  # IndexError before anything is logged
        self._restore_point()
        list.pop(self, index)
        return value

    def insert(self, index: int, value: Any) -> None:
        log = self._restore_point()
        list.insert(self, index, value)
        if _needs_conversion(value):
            self._pend_all(log)

    def remove(self, value: Any) -> None:
        i = list.index(self, value)  # ValueError before anything is logged
        self._restore_point()
        list.__delitem__(self, i)

    def clear(self) -> None:
        self._restore_point()
        list.clear(self)

    def sort(self, *, key: Any = None, reverse: bool = False) -> None:
        self._restore_point()
        list.sort(self, key=key, reverse=reverse)

    def reverse(self) -> None:
        self._restore_point()
        list.reverse(self)

    def __imul__(self, n: int) -> "TList":
        log = self._restore_point()
        list.__imul__(self, n)
        self._pend_all(log)  # a plain value repeated is converted at each place
        return self

    def __reduce__(self):  # copy/pickle give a plain list: a copy is not part of the state
        return (list, (list(self),))

    def __repr__(self) -> str:
        return list.__repr__(self)


class Struct(msgspec.Struct):
    """Base for msgspec Structs held in the state: attribute changes are logged for undo.

    Declare state types as ``class User(Struct): name: str; orders: list = []`` and
    mutate them in place (``user.name = "x"``, ``user.orders.append(o)``). A mutable
    Struct not derived from this class is refused when stored (`UntrackableValue`).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        log = _current()
        entries = log.entries
        entries.append((_undo_struct_set, self, name, getattr(self, name)))
        try:
            _struct_setattr(self, name, value)
        except BaseException:
            entries.pop()  # nothing changed (a frozen Struct, a wrong type): nothing to undo
            raise
        if _field_needs_conversion(value):
            log.pending.append((self, name, value))

    def __delattr__(self, name: str) -> None:
        _current()  # outside a transaction: MutationOutsideTransaction, as for any change
        raise TypeError(f"cannot delete field {name!r} of {type(self).__name__} in the state: a state Struct "
                        "keeps every field (its changes are logged for undo, and the codec writes every "
                        "field); set it to a value instead")


class ReadView:
    """A follower's lock-free read, seqlock-style (the C one saves the call's frame).

    ``query(q, *args)`` runs ``queries[q](state, *args)`` while `generation` is even and
    returns its value if `generation` did not move meanwhile; otherwise (an odd
    generation, a name that is not a str key of `queries`, more than 7 arguments, the query
    raised an Exception, or the generation moved) it returns ``slow(q, *args)``, which the
    owner runs under its lock. The owner makes `generation` odd while it changes `state`
    and even again after.
    """

    __slots__ = ("state", "generation", "_queries", "_slow")

    def __init__(self, queries: dict, slow) -> None:
        if not isinstance(queries, dict):
            raise TypeError("ReadView: queries must be a dict")
        if not callable(slow):
            raise TypeError("ReadView: slow must be callable")
        self.state = None
        self.generation = 0
        self._queries = queries
        self._slow = slow

    def query(self, q, *args):
        generation = self.generation
        fn = self._queries.get(q) if q.__class__ is str and len(args) < 8 else None
        if fn is not None and not generation & 1:
            try:
                value = fn(self.state, *args)
            except Exception:  # noqa: BLE001 -- run again under the lock, which raises it if real
                pass
            else:
                if self.generation == generation:
                    return value
        return self._slow(q, *args)
