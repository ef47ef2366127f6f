"""Acknowledged records never vanish silently (issue 9, item 3; DESIGN invariants 1 and 5).

Recovery compares the end of its own journal with what was published about it -- its own
signed progress file and the cursors its peers publish for it -- and stops with an error
naming the missing range when published records are gone. A torn tail is only ever a
record nobody can have seen: otherwise nothing is set aside or truncated.
"""

from __future__ import annotations

import os

import pytest

from workers.prevalence import errors

from tests.engine.helpers import flip, frames, journal_bytes, middle, segments
from tests.support import open_master, open_member
from .helpers import sync_until_quiet

pytestmark = pytest.mark.faultfs  # also with every master behind a faultfs host (tests/faultfs)


def ten_deposits(shared, **kw):
    """One account, ten acknowledged deposits, progress published (seq 11), then a kill -9."""
    m = open_master(shared, fsync="always", **kw)
    m.execute("open_account", "a", 0)
    for _ in range(10):
        m.execute("deposit", "a", 1)
    m.sync()  # publishes progress: seq 11
    m.crash()
    (_first, seg), = segments(shared)
    return seg


@pytest.mark.parametrize("key", [None, b"cluster-key"])
def test_a_flipped_byte_in_the_last_published_record_stops_recovery_naming_the_missing_seq(tmp_path, key):
    seg = ten_deposits(tmp_path, cluster_key=key, journal_reserve_bytes=0)
    spans = frames(open(seg, "rb").read(), key)
    flip(seg, middle(spans[-1]))
    before = journal_bytes(tmp_path)
    with pytest.raises(errors.LostRecords, match=r"\b11\b") as err:
        open_master(tmp_path, fsync="always", cluster_key=key)
    assert seg in str(err.value) or "progress" in str(err.value)
    assert journal_bytes(tmp_path) == before  # nothing set aside, nothing truncated


def test_a_journal_cut_at_a_record_boundary_stops_recovery_naming_the_missing_range(tmp_path):
    seg = ten_deposits(tmp_path, journal_reserve_bytes=0)
    spans = frames(open(seg, "rb").read())
    os.truncate(seg, spans[5][0])  # seq 6..11 gone, exactly at a record boundary
    before = journal_bytes(tmp_path)
    with pytest.raises(errors.LostRecords, match=r"6\.\.11"):
        open_master(tmp_path, fsync="always")
    assert journal_bytes(tmp_path) == before


def test_a_cleanly_closed_journal_cut_at_a_record_boundary_stops_recovery(tmp_path):
    m = open_master(tmp_path, fsync="always")
    m.execute("open_account", "a", 0)
    for _ in range(9):
        m.execute("deposit", "a", 1)
    m.close()
    (_first, seg), = segments(tmp_path)
    spans = frames(open(seg, "rb").read())
    os.truncate(seg, spans[4][1])  # seq 6..10 gone
    with pytest.raises(errors.LostRecords, match=r"6\.\.10"):
        open_master(tmp_path, fsync="always")


def test_a_torn_tail_a_peer_has_already_read_is_not_set_aside(tmp_path):
    a = open_member(tmp_path, "alpha", fsync="always", journal_reserve_bytes=0)
    a.execute("open_account", "a", 0)
    b = open_member(tmp_path, "beta")
    sync_until_quiet([a, b])
    a.execute("deposit", "a", 1)
    b.sync()  # beta read alpha's last record and publishes its cursor
    a.crash()  # alpha's own progress does not have it yet
    b.close()
    (_first, seg), = segments(tmp_path, "alpha")
    spans = frames(open(seg, "rb").read())
    flip(seg, middle(spans[-1]))
    before = journal_bytes(tmp_path, "alpha")
    with pytest.raises(errors.LostRecords, match="beta"):
        open_member(tmp_path, "alpha", fsync="always")
    assert journal_bytes(tmp_path, "alpha") == before


def test_a_torn_tail_nobody_saw_is_still_set_aside(tmp_path):
    seg = ten_deposits(tmp_path, journal_reserve_bytes=0)
    m = open_master(tmp_path, fsync="always", journal_reserve_bytes=0)
    m.execute("deposit", "a", 1)  # seq 12: never published
    m.crash()
    last = segments(tmp_path)[-1][1]
    size = os.path.getsize(last)
    os.truncate(last, size - 3)
    m = open_master(tmp_path, fsync="always")
    assert m.seq == 11 and m.query("balance", "a") == 10
    m.close()
    assert seg  # the first segment is untouched
