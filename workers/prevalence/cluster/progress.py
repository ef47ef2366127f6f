"""Progress: what a master publishes about itself after a sync, by atomic rename.

Other masters read it for garbage collection (cursors, snapshot cursors), joining (acks)
and lost-record detection; `prevalence status` reads it when Redis is down. JSON, so an
operator can read it; with a cluster key it carries an HMAC and a bad one is ignored
(treated as absent) with an error in the log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

import msgspec

from ..errors import Corruption
from . import folder

log = logging.getLogger("prevalence.progress")


class Progress(msgspec.Struct, kw_only=True):
    master: str
    joined: bool = False
    seq: int = 0                    # last seq written to own journal
    horizon: int = 0                # hlc of own last record
    clock: int = 0
    frontier: int = 0
    cursors: dict = {}              # member -> last seq read (self included)
    snapshot_frontier: int = -1     # newest own snapshot's frontier (-1: none)
    snapshot_cursors: dict = {}     # member -> last seq covered by every kept own snapshot (GC floor)
    kept_snapshots: list = []       # [frontier, cursors] of each own snapshot kept on disk
    acks: dict = {}                 # peer -> own frontier when this master started counting it
    digest: str = ""                # digest of the committed state at `digest_frontier`
    digest_frontier: int = -1
    tentative: int = 0
    rebases: int = 0
    updated: float = 0.0            # wall time of publication (display only, never ordering)
    last_error: str | None = None


class _Signed(msgspec.Struct):
    progress: msgspec.Raw
    hmac: str


def encode_progress(p: Progress, key: bytes | None) -> bytes:
    raw = msgspec.json.encode(p)
    if not key:
        return raw
    mac = hmac.new(key, raw, hashlib.sha256).hexdigest()
    return msgspec.json.encode(_Signed(progress=msgspec.Raw(raw), hmac=mac))


def decode_progress(data: bytes, path: str, key: bytes | None) -> Progress:
    try:
        if key:
            signed = msgspec.json.decode(data, type=_Signed)
            want = hmac.new(key, bytes(signed.progress), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(want, signed.hmac):
                raise Corruption("progress HMAC mismatch (wrong cluster key or forged file)", path=path)
            data = bytes(signed.progress)
        return msgspec.json.decode(data, type=Progress)
    except msgspec.DecodeError as exc:
        raise Corruption(f"progress file does not decode: {exc}", path=path) from None


def write_progress(shared: str, p: Progress, key: bytes | None, fault=None) -> None:
    folder.publish(folder.progress_path(shared, p.master), encode_progress(p, key), fault)


def read_progress(shared: str, name: str, key: bytes | None = None) -> Progress | None:
    path = folder.progress_path(shared, name)
    data = folder.read_small(path)
    if data is None:
        return None
    return decode_progress(data, path, key)


def read_all_progress(shared: str, key: bytes | None = None) -> dict[str, dict]:
    """Every master's progress as plain dicts (for status without Redis)."""
    out = {}
    for name in folder.list_masters(shared):
        try:
            p = read_progress(shared, name, key)
        except Corruption as exc:
            out[name] = {"master": name, "last_error": str(exc)}
            continue
        if p is not None:
            d = msgspec.to_builtins(p)
            d["joining"] = os.path.exists(folder.joining_path(shared, name))
            out[name] = d
    return out
