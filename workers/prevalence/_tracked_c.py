"""Change-tracked state, the C implementation: the `_tracked` extension, wired up.

The extension holds the containers (`TDict`, `TList`), the undo log (`UndoLog`, with its
`undo_to` in C), `convert`, the record bracket (the current log is a C thread-local) and
the undo functions. This module gives it what it shares with the specification
(`_tracked_py`): the exception classes (one pair for both implementations), the immutable
types stored as they are, the limits; and it declares `Struct`, whose ``__setattr__`` is
a C method. Importing it raises ModuleNotFoundError when the extension is not built, ImportError
when it was built from another version of `_tracked.c` (a stale build in a source tree).
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import importlib
import os

import msgspec

_c = importlib.import_module("._tracked", __package__)  # ModuleNotFoundError when not built

_SOURCE = os.path.join(os.path.dirname(__file__), "_tracked.c")
if _c.SOURCE_SHA256 and os.path.exists(_SOURCE):  # a source tree: is the build current?
    with open(_SOURCE, "rb") as _f:
        if hashlib.sha256(_f.read()).hexdigest() != _c.SOURCE_SHA256:
            raise ImportError("workers.prevalence._tracked was built from another version of _tracked.c: "
                              "rebuild it (pip install -e . or python setup.py build_ext --inplace)")

from ._tracked_py import (_PLAIN_ATOMS, _TYPED_ATOMS, INT_MAX, INT_MIN, MAX_DEPTH,
                          MutationOutsideTransaction, UntrackableValue)

__all__ = ["TDict", "TList", "Struct", "UndoLog", "MutationOutsideTransaction", "UntrackableValue",
           "convert", "begin_record", "finish_record", "end_record", "dict_set", "dict_delete",
           "dict_restore_point", "run_record", "apply_records", "write_frame", "ReadView", "INT_MIN", "INT_MAX", "MAX_DEPTH", "IMPLEMENTATION"]

IMPLEMENTATION = "c"

# The range check in C is fixed to MessagePack's integers: the specification must agree.
assert (INT_MIN, INT_MAX) == (-(1 << 63), (1 << 64) - 1)

_c._setup(MutationOutsideTransaction, UntrackableValue, tuple(_PLAIN_ATOMS), tuple(_TYPED_ATOMS),
          datetime.datetime, msgspec.Struct, enum.Enum, MAX_DEPTH)


class Struct(msgspec.Struct):
    """Base for msgspec Structs held in the state: attribute changes are logged for undo.

    Declare state types as ``class User(Struct): name: str; orders: list = []`` and
    mutate them in place (``user.name = "x"``, ``user.orders.append(o)``). A mutable
    Struct not derived from this class is refused when stored (`UntrackableValue`).
    """

    __setattr__ = _c.struct_setattr  # a method descriptor: called like a C type's method

    def __delattr__(self, name: str) -> None:
        # Rare, so in Python: setting the field to its own value raises
        # MutationOutsideTransaction outside a transaction (and inside logs a no-op undone
        # with the failed transaction).
        _c.struct_setattr(self, name, getattr(self, name))
        raise TypeError(f"cannot delete field {name!r} of {type(self).__name__} in the state: a state Struct "
                        "keeps every field (its changes are logged for undo, and the codec writes every "
                        "field); set it to a value instead")


_c._set_struct_base(Struct)

TDict = _c.TDict
TList = _c.TList
UndoLog = _c.UndoLog
convert = _c.convert
begin_record = _c.begin_record
finish_record = _c.finish_record
end_record = _c.end_record
run_record = _c.run_record
apply_records = _c.apply_records
write_frame = _c.write_frame
ReadView = _c.ReadView
dict_set = _c.dict_set
dict_delete = _c.dict_delete
dict_restore_point = _c.dict_restore_point
_MISSING = _c._MISSING  # the sentinels in undo entries, as in _tracked_py
_END = _c._END
