"""Records and snapshots built to hurt: bounded work and a named error, never a crash
(issue 9, items 7 and 8).
"""

from __future__ import annotations

import os
import struct
import zlib

import msgspec
import pytest

from workers.prevalence import codec, errors, journal, snapshot

from tests.support import open_master
from .helpers import journal_bytes, snapshots_dir


def valid_frames(n: int) -> bytes:
    return b"".join(journal.frame(codec.encode_record(codec.Record("m", i, 1000 + i, "", "deposit", ("a", 1))), None)
                    for i in range(1, n + 1))


def fake_headers(total_bytes: int, declared: int) -> bytes:
    """Bytes that are nothing but frame headers, each declaring `declared` payload bytes
    and followed by what starts like a record (a MessagePack array of six): a candidate
    frame every 16 bytes, each as costly to check as the adversary can make it."""
    one = struct.pack("<IBBH", declared, journal.FORMAT_VERSION, 0, 0) + b"\x96" * 8
    return (one * (total_bytes // len(one)))[:total_bytes]


class CountingZlib:
    """`zlib` as the journal module sees it, counting the bytes it checksums."""

    def __init__(self):
        self.bytes = 0

    def crc32(self, data, value=0):
        self.bytes += len(data)
        return zlib.crc32(data, value)


@pytest.mark.parametrize("key", [None, b"k"])
def test_the_search_for_a_valid_record_after_damage_is_linear_and_the_damage_is_reported(monkeypatch, key):
    good = valid_frames(3) if key is None else b"".join(
        journal.frame(codec.encode_record(codec.Record("m", i, 1000 + i, "", "deposit", ("a", 1))), key)
        for i in range(1, 4))
    damaged = b"\x07" * 20  # a frame header that makes no sense, then ...
    hostile = fake_headers(512 * 1024, 60 * 1024)  # ... 512 KiB of fake headers declaring 60 KiB each
    data = good + damaged + hostile
    counting = CountingZlib()
    monkeypatch.setattr(journal, "zlib", counting)
    res = journal.scan(data, "/share/masters/m/journal/x.log", 0, key, last_segment=True, master="m",
                       expect_seq=1)
    assert len(res.records) == 3 and res.end_offset == len(good)
    assert counting.bytes <= 8 * len(data), f"checksummed {counting.bytes} bytes of a {len(data)}-byte segment"
    assert res.corruption is not None and "x.log" in str(res.corruption) and f"offset {len(good)}" in str(res.corruption)


def test_a_real_torn_tail_is_still_torn_after_a_bounded_search():
    good = valid_frames(5)
    torn = valid_frames(6)[len(good):][:-7]  # the sixth record, cut short
    res = journal.scan(good + torn, "x.log", 0, None, last_segment=True)
    assert len(res.records) == 5 and res.torn is not None and res.corruption is None


# -- item 8: nesting depth -------------------------------------------------------------------

def nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [codec_depth + 1 for codec_depth in (getattr(codec, "DEPTH_MAX", 100),)] + [10_000])
def test_arguments_nested_too_deep_are_bad_arguments_and_nothing_is_written(tmp_path, depth):
    m = open_master(tmp_path)
    m.execute("open_account", "a", 1)
    before = journal_bytes(tmp_path)
    with pytest.raises(errors.BadArguments, match="deep"):
        m.execute("deposit", nested(depth), 1)
    with pytest.raises(errors.BadArguments, match="deep"):
        m.execute_many([("deposit", ["a", 1], None), ("deposit", [nested(depth), 1], None)])
    assert journal_bytes(tmp_path) == before and m.seq == 1
    m.execute("deposit", "a", 1)
    m.close()


def test_arguments_nested_within_the_bound_are_written_and_read_back(tmp_path):
    from tests.engine.helpers import probe
    m = open_master(tmp_path, model=probe)
    depth = getattr(codec, "DEPTH_MAX", 100) - 1
    with pytest.raises(errors.TransactionFailed):
        m.execute("add", nested(depth))  # a list is no number: recorded as an error
    m.close()
    m = open_master(tmp_path, model=probe)
    assert m.seq == 1
    m.close()


def test_a_record_nested_too_deep_with_a_valid_checksum_is_corruption_naming_its_offset():
    head = codec.encode_record(codec.Record("m", 1, 1000, "", "deposit", ("HOLE",)))
    payload = head.replace(msgspec.msgpack.encode("HOLE"), b"\x91" * 100_000 + b"\x90")
    data = valid_frames(0) + journal.frame(payload, None)
    res = journal.scan(data, "x.log", 0, None, last_segment=True, master="m", expect_seq=1)
    assert res.records == [] and res.corruption is not None
    assert "x.log" in str(res.corruption) and "offset 0" in str(res.corruption)


def test_a_snapshot_nested_too_deep_is_skipped_with_an_error_naming_it(tmp_path):
    m = open_master(tmp_path)
    m.execute("open_account", "a", 1)
    m.snapshot()
    m.execute("deposit", "a", 1)
    m.close()
    (_f, path), = snapshot.list_snapshots(snapshots_dir(tmp_path))
    body = snapshot.load_snapshot(path, None)
    deep = msgspec.structs.replace(body, root=msgspec.Raw(b"\x91" * 100_000 + b"\x90"),
                                   frontier=body.frontier + 1)
    planted = os.path.join(snapshots_dir(tmp_path), snapshot.format_snapshot_name(deep.frontier))
    with open(planted, "wb") as f:
        f.write(snapshot.encode_snapshot(deep, None))
    m = open_master(tmp_path)
    assert m.query("balance", "a") == 2 and m.snapshot_frontier == body.frontier
    assert planted in (m.last_error or "")
    m.close()
