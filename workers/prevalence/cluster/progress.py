"""Progress: what a master publishes about itself after a sync, by atomic rename.

Other masters read it for garbage collection (cursors, snapshot cursors), joining (acks)
and lost-record detection; `prevalence status` reads it when Redis is down. A small file
(`smallfile`: JSON an operator can read, kind ``progress``, the master it is about, an
HMAC with a cluster key): one that fails its checks -- garbage, unsigned on a keyed
cluster, or a valid file of another master copied here -- raises `BadFile` naming it, and
readers treat it as absent (reported).
"""

from __future__ import annotations

import logging

import msgspec

from .. import files, smallfile
from ..errors import Corruption
from . import folder

log = logging.getLogger("prevalence.progress")


PROGRESS_KIND = "progress"


class Progress(msgspec.Struct, kw_only=True):
    kind: str = PROGRESS_KIND       # ("" in a progress file of an older release)
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


def encode_progress(p: Progress, key: bytes | None) -> bytes:
    return smallfile.encode(PROGRESS_KIND, p, key)


def decode_progress(data: bytes, path: str, key: bytes | None, master: str | None = None) -> Progress:
    """Parse and check a progress file's bytes (`smallfile.decode`); raises BadFile."""
    return smallfile.decode(data, path, kind=PROGRESS_KIND, type_=Progress, key=key, master=master)


def write_progress(shared: str, p: Progress, key: bytes | None, fault=None) -> None:
    folder.publish(folder.progress_path(shared, p.master), encode_progress(p, key), fault)


def read_progress(shared: str, name: str, key: bytes | None = None) -> Progress | None:
    """Master `name`'s progress, None when it has published none.

    Raises:
        BadFile: it fails its checks (module docstring), naming the file.
    """
    path = folder.progress_path(shared, name)
    data = files.read_small(path, "progress file")
    if data is None:
        return None
    return decode_progress(data, path, key, master=name)


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
            d["joining"] = folder.is_joining(shared, name)
            out[name] = d
    return out
