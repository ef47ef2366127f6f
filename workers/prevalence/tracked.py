"""Change-tracked state: containers that log how to undo every change made to them.

A master keeps one copy of its state. To restore the committed state at a rebase, and to
leave no trace of a transaction that raised, it undoes changes newest first instead of
copying the state: the cost is the window of changes, not the size of the state.

What is tracked
    `TDict` (a dict), `TList` (a list) and `Struct` (a base for msgspec Structs). Their
    mutators append an *undo entry* to the undo log of the record being applied, then
    change the container. Reads are the built-in ones, at full speed. A model never
    names these types: plain dicts and lists that a transaction stores into the state
    (and the state the model's `root_factory` builds, and every snapshot loaded) are
    converted to them when the record ends (`finish_record`), so models are ordinary
    Python that mutates dicts, lists and Structs in place.

What is refused (loudly, never silently diverging)
    * A mutation outside a record: the state can only change inside a transaction. A
      caller that mutates a value returned by a query or a transaction gets
      `MutationOutsideTransaction`, not a silent change of one master's state.
    * A value the log cannot track, stored into the state: a set, an arbitrary object,
      a mutable msgspec Struct not derived from `Struct`, a frozen Struct or a tuple
      holding a mutable container; and, in a plain dict or list (which a snapshot
      decodes untyped), a value it would read back as another type: a tuple, a date, a
      time, a timedelta, a Decimal, a UUID, a datetime that is naive or not in UTC, an
      Enum member (read back as its value; all
      fine in a Struct field, which the codec decodes typed); a dict key (in any dict:
      every dict decodes untyped) other than a str, an int, a float, a bool, None, bytes,
      a UTC datetime or a tuple of these. The transaction then fails with `UntrackableValue`
      (its outcome is ``error``, identically on every master) and leaves no trace.
    * Bypasses that no subclass can see (``dict.__setitem__(d, k, v)``, ``heapq`` on a
      list, C extensions writing with ``PyDict_SetItem``): the check mode of the engine
      (`Master.open(..., check_transactions=True)` or ``PREVALENCE_CHECK_TRANSACTIONS=1``) undoes every record
      right after applying it and compares the state, byte for byte, with what it was
      before; a difference names the transaction.

Undo entries are tuples ``(function, *arguments)``; undoing calls them newest first.
Dict order is part of the state (transactions iterate), so undoing a delete puts the key
back where it was: free for the newest key, O(keys after it) otherwise.

The current log is per thread (set by `begin_record`, cleared by `end_record`): each
master applies its records in the thread that calls it, and two masters in one process
never share a log.

Two implementations, one contract
    The C extension `_tracked` (`_tracked_c` wires it up: `Struct`, the shared exception
    classes) and the pure-Python `_tracked_py`, which is the specification: same undo
    entries, same state after undo, same exceptions. This module picks one at import and
    routes everything through it (the current log lives in that implementation: a C
    thread-local, or a `threading.local`): the C one when it is built, unless
    ``PREVALENCE_TRACKED=python`` is set (``PREVALENCE_TRACKED=c`` makes a missing
    extension an error; a stale build, made from another version of `_tracked.c`, is
    refused with a warning). `IMPLEMENTATION` says which ("c" or "python").

`ReadView`: a follower's lock-free read (seqlock-style: the query's answer stands if the
follower's generation did not move while it ran; `cluster.follower`), in C with the rest
because a read's Python frame was a third of its cost.

`write_frame(fd, payload, offset, version)`: the write of a commit of one record (the
journal writer's), framed as `journal.frame(payload, None)` frames it and written with one
``pwrite``, in C for the same reason: building the frame's Python objects was a tenth of a
commit.

`convert(value, adopt=True)`: the caller hands `value` over (a freshly decoded snapshot),
so its containers may become tracked in place instead of being copied (recovery does).
"""

from __future__ import annotations

import os as _os
import warnings as _warnings

_CHOICE = _os.environ.get("PREVALENCE_TRACKED", "").strip().lower()
if _CHOICE not in ("", "c", "python"):
    raise ImportError(f"PREVALENCE_TRACKED={_CHOICE!r}: expected 'c' or 'python'")
if _CHOICE == "python":
    from . import _tracked_py as _impl
else:
    try:
        from . import _tracked_c as _impl
    except ImportError as _exc:
        if _CHOICE == "c":
            raise
        if not isinstance(_exc, ModuleNotFoundError):  # built but unusable (a stale build)
            _warnings.warn(f"change-tracked state falls back to Python: {_exc}", RuntimeWarning, stacklevel=2)
        from . import _tracked_py as _impl

__all__ = ["TDict", "TList", "Struct", "UndoLog", "MutationOutsideTransaction", "UntrackableValue",
           "convert", "begin_record", "finish_record", "end_record", "dict_set", "dict_delete",
           "dict_restore_point", "run_record", "apply_records", "write_frame", "ReadView", "INT_MIN", "INT_MAX", "MAX_DEPTH", "IMPLEMENTATION"]

#: Which implementation is in use: "c" (the `_tracked` extension) or "python".
IMPLEMENTATION: str = _impl.IMPLEMENTATION

TDict = _impl.TDict
TList = _impl.TList
Struct = _impl.Struct
UndoLog = _impl.UndoLog
MutationOutsideTransaction = _impl.MutationOutsideTransaction
UntrackableValue = _impl.UntrackableValue
convert = _impl.convert
begin_record = _impl.begin_record
finish_record = _impl.finish_record
end_record = _impl.end_record
run_record = _impl.run_record
apply_records = _impl.apply_records
write_frame = _impl.write_frame
ReadView = _impl.ReadView
dict_set = _impl.dict_set
dict_delete = _impl.dict_delete
dict_restore_point = _impl.dict_restore_point
INT_MIN = _impl.INT_MIN
INT_MAX = _impl.INT_MAX
MAX_DEPTH = _impl.MAX_DEPTH
