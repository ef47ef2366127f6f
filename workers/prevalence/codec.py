"""The codec: records and state to bytes and back, data only (msgspec MessagePack).

Nothing read from the shared folder is unpickled or evaluated (invariant 9): every byte
goes through msgspec, which builds only plain data (None, bool, int, float, str, bytes,
lists, dicts) or declared structs such as `Record` and `RequestIdEntry`.

A record's payload is the MessagePack array ``[master, seq, hlc, rid, tx, args]``. A tick
is a record whose ``tx`` is the empty string: it carries no change, only a clock reading.

The *canonical* encoding sorts dict keys (``order="deterministic"``), so equal states
encode to equal bytes on any machine; the state digest is SHA-256 over it.

Nesting depth is bounded, on both sides:

* **Writing**: a transaction's argument may nest at most `DEPTH_MAX` containers deep
  (a list in a list ... ; a scalar is depth 0). Deeper arguments are refused with
  `BadArguments` before anything is written (`check_depth`).
* **Reading**: msgspec decodes recursively and stops at the interpreter's recursion limit
  (about a thousand levels, far above `DEPTH_MAX`): a record, snapshot or small file
  nested deeper than that is refused as corrupt, naming the file -- never a raw
  `RecursionError`. Everything a writer accepts is therefore readable.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import sys
from typing import Any

import msgspec

from .errors import BadArguments

TICK = ""  # the tx name of a tick record

#: The deepest nesting of containers a transaction argument may have (a scalar is 0).
DEPTH_MAX = 100
_CONTAINERS = (list, tuple, dict, set, frozenset)


class Record(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One journal record: a transaction (or a tick) issued by one master."""

    master: str
    seq: int
    hlc: int
    rid: str
    tx: str
    args: tuple  # a tuple: decodes faster and is never tracked by the cyclic GC

    @property
    def key(self) -> tuple[int, str, int]:
        """The order key every master computes alike: (hlc, master, seq).

        The only definition of the order: sort records with ``key=Record.key.fget``.
        """
        return (self.hlc, self.master, self.seq)

    @property
    def record_id(self) -> str:
        """`master:seq`, unique in the cluster; the request id when none was supplied."""
        return f"{self.master}:{self.seq}"

    @property
    def is_tick(self) -> bool:
        return self.tx == TICK


class RequestIdEntry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """What the request-id table (`model`) keeps of the first record that carried a
    request id: its order key and its outcome.

    Encoded, in snapshots and in the state digest, as the array ``[hlc, master, seq,
    status, value, error]``, exactly as a tuple of those six. A struct like `Record`
    rather than a NamedTuple: a table of millions of entries must stay out of the cyclic
    GC's sight (``gc=False``), which CPython grants plain tuples but never a tuple
    subclass. That is safe because an entry is in no reference cycle: its value is an atom
    or a fresh copy (`Model.apply`).

    The defaults exist only for decoding: the table also holds the prune mark (a
    one-element array under `model.PRUNE_MARK`), which decodes as an entry with only `hlc`
    set and which `snapshot.decode_snapshot` turns back into its plain tuple at once.
    """

    hlc: int
    master: str = ""
    seq: int = 0
    status: str = ""
    value: Any = None
    error: str | None = None

    @property
    def record_id(self) -> str:
        """`master:seq` of the first record that carried the request id."""
        return f"{self.master}:{self.seq}"


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Record)
_batch_decoder = msgspec.msgpack.Decoder(list[Record])
_canonical_encoder = msgspec.msgpack.Encoder(order="deterministic")

encode_record = _record_encoder.encode
decode_record = _record_decoder.decode
decode_batch = _batch_decoder.decode  # a batch frame: many records in one payload


def encode_args(tx: str, args: Any) -> bytes:
    """Encode transaction arguments, refusing what the codec cannot carry.

    Raises:
        BadArguments: a value is not plain data (an object, a set of mixed types, an int
            outside 64 bits ...) or nests deeper than `DEPTH_MAX`. Nothing has been
            written when this is raised.
    """
    check_depth(tx, args)
    try:
        return _record_encoder.encode(list(args))
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise BadArguments(f"arguments of {tx!r} cannot be encoded as plain data: {exc}") from None


def check_depth(tx: str, args: Any) -> None:
    """Refuse arguments that nest containers deeper than `DEPTH_MAX` (module docstring).

    Iterative (a deep value cannot exhaust the stack here) and cheap for flat arguments:
    only containers are walked.

    Raises:
        BadArguments: naming the transaction, the bound and the depth reached.
    """
    stack = [(value, 1) for value in args if isinstance(value, _CONTAINERS)]
    while stack:
        value, depth = stack.pop()
        if depth > DEPTH_MAX:
            raise BadArguments(f"arguments of {tx!r} nest containers too deep: more than {DEPTH_MAX} levels "
                               "(codec.DEPTH_MAX). Flatten them; nothing was written")
        items = value.values() if isinstance(value, dict) else value
        if isinstance(value, dict):
            stack.extend((k, depth + 1) for k in value if isinstance(k, _CONTAINERS))
        stack.extend((v, depth + 1) for v in items if isinstance(v, _CONTAINERS))


def depth_note() -> str:
    """What bounds the depth a decoder reaches, for messages."""
    return f"the interpreter's recursion limit, {sys.getrecursionlimit()} levels; writers allow {DEPTH_MAX}"


def canonical(value: Any) -> bytes:
    """The canonical bytes of a value: sorted dict keys, identical on every machine.

    msgspec sorts only str keys; a value holding dicts with other keys (ints, bytes ...)
    takes the slower path that turns each such dict into its items sorted by the
    canonical bytes of their keys.
    """
    try:
        return _canonical_encoder.encode(value)
    except TypeError:
        return _canonical_encoder.encode(_canonical_form(value))


def _canonical_form(value: Any) -> Any:
    if isinstance(value, dict):
        if all(k.__class__ is str for k in value):
            return {k: _canonical_form(v) for k, v in value.items()}
        items = [(canonical(k), _canonical_form(v)) for k, v in value.items()]
        items.sort(key=lambda kv: kv[0])
        return ["<map>", [[msgspec.Raw(k), v] for k, v in items]]
    if isinstance(value, (list, tuple)):
        return [_canonical_form(v) for v in value]
    if value.__class__ is RequestIdEntry:  # the tuple it encodes as (to_builtins makes bytes base64)
        return [_canonical_form(v) for v in msgspec.structs.astuple(value)]
    if isinstance(value, msgspec.Struct):
        return _canonical_form(msgspec.to_builtins(value, str_keys=False))
    return value


def digest_of(*parts: Any) -> str:
    """SHA-256 (hex, first 32 chars) of the canonical encoding of the parts, in order."""
    h = hashlib.sha256()
    for part in parts:
        h.update(canonical(part))
    return h.hexdigest()[:32]


def round_trip(value: Any, type_: Any = Any) -> Any:
    """Decode(encode(value)): what a reader of the bytes would get; a deep copy."""
    return msgspec.msgpack.decode(_record_encoder.encode(value), type=type_)


_IMMUTABLE_VALUES = frozenset({int, str, float, bool, bytes, type(None)})


def detached(value: Any) -> Any:
    """`value` itself when it is immutable, else a deep copy (`round_trip`): a recorded
    outcome handed to a caller, whose changes must not reach the record kept here (it is
    part of the digest, and what a duplicate request is answered)."""
    if value.__class__ in _IMMUTABLE_VALUES:
        return value
    try:
        return round_trip(value)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return f"<unencodable {type(value).__name__}>"  # as a request id's outcome records it


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic GC during bulk decoding/replay (records form no cycles).

    Allocating millions of small objects otherwise triggers a collection every few
    hundred records, which more than doubles the cost of replay.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
