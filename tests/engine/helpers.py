"""Helpers for engine tests: a probe model and reading a journal's frames (opening a master
and the clock are in `tests.support`)."""

from __future__ import annotations

import os

from tests.support import NAME
from workers.prevalence import Model, Rejected, codec, journal
from workers.prevalence.cluster import folder


def journal_dir(shared, name=NAME) -> str:
    return folder.journal_dir(str(shared), name)


def snapshots_dir(shared, name=NAME) -> str:
    return folder.snapshots_dir(str(shared), name)


def segments(shared, name=NAME) -> list[tuple[int, str]]:
    return journal.list_segments(journal_dir(shared, name))


def journal_bytes(shared, name=NAME) -> dict[str, bytes]:
    """Every file in the journal folder (segments and set-aside tails) with its bytes."""
    d = journal_dir(shared, name)
    out = {}
    for n in sorted(os.listdir(d)):
        with open(os.path.join(d, n), "rb") as f:
            out[n] = f.read()
    return out


def frames(data: bytes, key: bytes | None = None) -> list[tuple[int, int]]:
    """(start, end) of each frame in an intact segment.

    Computed by re-framing each record read back, so it does not depend on the layout.
    """
    res = journal.scan(data, "<frames>", 0, key, last_segment=True)
    assert res.corruption is None and res.torn is None, "not an intact segment"
    out, off = [], 0
    for rec in res.records:
        end = off + len(journal.frame(codec.encode_record(rec), key))
        out.append((off, end))
        off = end
    assert off == len(data) - res.zero_tail, "re-framing did not reproduce the segment's size"
    return out


def middle(span: tuple[int, int]) -> int:
    """An offset in the middle of a frame: inside its payload whatever the layout."""
    return (span[0] + span[1]) // 2


def records_in(path: str, key: bytes | None = None) -> list[codec.Record]:
    res = journal.scan(journal.read_file(path), path, 0, key, last_segment=True)
    assert res.corruption is None and res.torn is None
    return res.records


def flip(path: str, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


# -- a probe model: time, randomness, failures -------------------------------------

probe = Model("probe", lambda: {"log": [], "n": 0})


@probe.transaction
def stamp(root, ctx):
    """Record the context's time and request id."""
    entry = [ctx.hlc, ctx.now.isoformat(), ctx.rid]
    root["log"].append(entry)
    return entry


@probe.transaction
def draw(root, ctx):
    """Draw from the context's random source."""
    value = ctx.random.randrange(1 << 40)
    root["log"].append(value)
    return value


@probe.transaction
def add(root, ctx, k):
    """Add k to n; raises TypeError for a non-number *after* a partial mutation."""
    root["log"].append("add")
    root["n"] = root["n"] + k
    return root["n"]


@probe.transaction
def refuse(root, ctx, why):
    raise Rejected(why)


@probe.query
def n(root):
    return root["n"]


@probe.query
def log(root):
    return list(root["log"])
