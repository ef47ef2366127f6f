"""Small files: one JSON object each that says what it is about, signed with the cluster key
when there is one, parsed into a typed struct (DESIGN invariant 9).

The small files of the share -- lease, progress, seal, founder, retirement -- all have this
form. Unsigned (no cluster key)::

    {"kind": "lease", "master": "alpha", ...the fields of its struct...}

Signed (a cluster key is configured): the same object, byte for byte, under the name of
its kind, with the HMAC-SHA256 of those bytes::

    {"lease": {"kind": "lease", "master": "alpha", ...}, "hmac": "<64 hex digits>"}

(This is the shape a signed ``progress`` file always had, so signed progress files of
older releases read as they are.)

`decode` checks, in order, and raises `BadFile` naming the file, what it expected and what
it found, at the first check that fails: the JSON form; the signature (required with a
key); the typed fields (msgspec: a wrong type is an error, never a crash); the kind; the
master. Files written by older releases have no ``kind`` (and no ``master``, for seals):
they still read without a key; with a key they are refused (unsigned) -- except a signed
progress file, which was always signed.

Size and the kind of file (a regular file, nothing followed) are checked before any of
this, by `files.read_small`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Callable, TypeVar

import msgspec

from .errors import BadFile

T = TypeVar("T")
HMAC_FIELD = "hmac"

_outer = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()


def encode(kind: str, obj: msgspec.Struct, key: bytes | None) -> bytes:
    """The bytes of a small file holding `obj` (whose own ``kind`` field says `kind`)."""
    raw = _encoder.encode(obj)
    if not key:
        return raw
    mac = hmac.new(key, raw, hashlib.sha256).hexdigest()
    return _encoder.encode({kind: msgspec.Raw(raw), HMAC_FIELD: mac})


def decode(data: bytes, path: str, *, kind: str, type_: type[T], key: bytes | None,
           master: str | None = None, legacy: Callable[[bytes], Any] | None = None) -> T:
    """Parse and check a small file's bytes (module docstring).

    Args:
        kind: the kind the file must be.
        type_: its struct; it has ``kind: str = ""`` and ``master: str = ""`` fields.
        master: the master the file must be about (None: not checked here).
        legacy: parses an unsigned file of an older release that is not JSON (the
            founder's line of text) into a `type_`, or raises ValueError.

    Raises:
        BadFile: naming `path`, what was expected and what was found.
    """
    def bad(why: str) -> BadFile:
        return BadFile(f"{kind} file {why}", path=path)

    try:
        outer = _outer.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        if legacy is not None and key is None:
            try:
                return legacy(data)
            except ValueError as why:
                raise bad(f"is neither this release's JSON nor an older release's form ({why})") from None
        raise bad(f"is not a JSON object: {_short(exc)}") from None
    if HMAC_FIELD in outer:
        if set(outer) != {kind, HMAC_FIELD}:
            raise bad(f"is signed but holds {sorted(outer)}, expected [{kind!r}, {HMAC_FIELD!r}] "
                      "(a signed file of another kind?)")
        raw = bytes(outer[kind])
        if key is not None:
            try:
                mac = msgspec.json.decode(outer[HMAC_FIELD], type=str)
            except msgspec.DecodeError:
                raise bad("has an HMAC that is not a string") from None
            want = hmac.new(key, raw, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(want, mac):
                raise bad("fails its HMAC (wrong cluster key, or a forged or altered file)")
    elif key is not None:
        raise bad("is unsigned but a cluster key is configured (forged, or written by an older release "
                  "without the key); remove it or write it again with this release")
    else:
        raw = data
    try:
        obj = msgspec.json.decode(raw, type=type_)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise bad(f"does not hold a {kind}: {_short(exc)}") from None
    found = getattr(obj, "kind", "")
    if found not in (kind, ""):
        raise bad(f"says it is a {found!r} file, expected {kind!r} (a file copied to the wrong place?)")
    about = getattr(obj, "master", "")
    if master is not None and about != master and not (about == "" and found == ""):
        raise bad(f"is about master {about!r}, expected {master!r} (copied from another master's folder?)")
    return obj


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."
