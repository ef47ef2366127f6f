"""Recovery: a torn tail is unwritten and set aside; damage before the end is refused intact.

Half of these run on the hand-made files in tests/fixtures (see its README). Those marked
`faultfs` also run with the master behind a faultfs host (tests/faultfs); the others
compare error paths with the real folder's.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from workers.prevalence import journal, seal, snapshot
from workers.prevalence.errors import Corruption

from tests.fixtures import make_fixtures as fx

from tests.support import open_master
from .helpers import flip, frames, middle, journal_bytes, journal_dir, segments, snapshots_dir


FIXTURES = os.path.dirname(os.path.abspath(fx.__file__))
FIRST_SEGMENT = journal.format_segment_name(1)


def install(shared, *, journal_file=None, snapshot_files=()) -> str:
    """Copy fixture files into master `fixture`'s folders; returns the segment's path."""
    jdir = journal_dir(shared, fx.MASTER)
    os.makedirs(jdir)
    seg = os.path.join(jdir, FIRST_SEGMENT)
    if journal_file:
        shutil.copyfile(os.path.join(FIXTURES, journal_file), seg)
    if snapshot_files:
        sdir = snapshots_dir(shared, fx.MASTER)
        os.makedirs(sdir)
        for name, frontier in snapshot_files:
            shutil.copyfile(os.path.join(FIXTURES, name), os.path.join(sdir, snapshot.format_snapshot_name(frontier)))
    return seg


def open_fixture(shared, **kw):
    return open_master(shared, name=fx.MASTER, **kw)


# -- the fixture files themselves ------------------------------------------------------

@pytest.mark.faultfs
def test_fixture_files_are_exactly_what_the_script_builds():
    for name, data in fx.build().items():
        with open(os.path.join(FIXTURES, name), "rb") as f:
            assert f.read() == data, f"{name} is stale: run python -m tests.fixtures.make_fixtures"


@pytest.mark.faultfs
def test_valid_fixture_journal_recovers_every_record(tmp_path):
    install(tmp_path, journal_file="journal-valid.log")
    m = open_fixture(tmp_path)
    assert (m.seq, m.query("balance", "a")) == (3, fx.BALANCE_AFTER_3)
    assert m.outcome("r3")["value"] == fx.BALANCE_AFTER_3
    m.close()


# -- torn tails ----------------------------------------------------------------------

def write_segmented_journal(shared) -> None:
    """A closed journal of 21 records (an account, then 20 deposits of 1) in several segments."""
    m = open_master(shared, segment_bytes_max=300)
    m.execute("open_account", "a", 0)
    for _ in range(20):
        m.execute("deposit", "a", 1)
    m.close()


@pytest.mark.parametrize("name,tail_bytes", [("journal-torn-tail.log", fx.TORN_BYTES)])
def test_torn_final_record_is_set_aside_and_truncated_with_good_records_kept(tmp_path, caplog, name, tail_bytes):
    seg = install(tmp_path, journal_file=name)
    intact = len(fx.build()["journal-valid.log"])
    with caplog.at_level(logging.WARNING, logger="prevalence.journal"):
        m = open_fixture(tmp_path, fsync="always")
    assert (m.seq, m.query("balance", "a")) == (3, fx.BALANCE_AFTER_3)
    aside = f"{seg}.torn-{intact:020d}"
    with open(aside, "rb") as f:
        assert f.read() == fx.build()[name][intact:]
    assert os.path.getsize(aside) == tail_bytes
    assert os.path.getsize(seg) == intact
    assert any("torn tail" in r.getMessage() and aside in r.getMessage() for r in caplog.records)
    # The segment is sealed where the good records end and the writer starts a segment of
    # its own (it never appends to a file it did not create); a reopen reads all of it.
    assert seal.read_seal(seg).length == intact
    assert m.execute("deposit", "a", 1, rid="r4") == fx.BALANCE_AFTER_3 + 1
    m.close()
    kept = [n for n in journal_bytes(tmp_path, fx.MASTER) if n.endswith(".log") or ".torn-" in n]
    assert kept == [FIRST_SEGMENT, os.path.basename(aside), journal.format_segment_name(4)]
    m = open_fixture(tmp_path)
    assert (m.seq, m.query("balance", "a")) == (4, fx.BALANCE_AFTER_3 + 1)
    m.close()


@pytest.mark.faultfs
@pytest.mark.parametrize("reserve", [0, 1 << 20])
def test_zero_filled_tail_is_unwritten_space_sealed_where_the_records_end(tmp_path, caplog, reserve):
    # Writeback extended the file before the data landed, or the writer's own reservation:
    # zeros hold no data, so nothing is set aside; the good records stay, the segment is
    # sealed where they end, and the next record goes to a segment of the new owner's own.
    seg = install(tmp_path, journal_file="journal-zero-tail.log")
    intact = len(fx.build()["journal-valid.log"])
    with caplog.at_level(logging.INFO, logger="prevalence.master"):
        m = open_fixture(tmp_path, fsync="always", journal_reserve_bytes=reserve)
    assert any(f"{fx.ZERO_TAIL_BYTES} zero bytes after the last record at offset {intact}" in r.getMessage()
               for r in caplog.records)
    assert (m.seq, m.query("balance", "a")) == (3, fx.BALANCE_AFTER_3)
    assert m.execute("deposit", "a", 1, rid="r4") == fx.BALANCE_AFTER_3 + 1
    assert not [n for n in journal_bytes(tmp_path, fx.MASTER) if ".torn-" in n]
    with open(seg, "rb") as f:
        assert f.read() == fx.build()["journal-zero-tail.log"]  # the previous owner's file, untouched
    assert seal.read_seal(seg).length == intact
    assert m.writer.path != seg
    m.close()
    m = open_fixture(tmp_path)
    assert (m.seq, m.query("balance", "a")) == (4, fx.BALANCE_AFTER_3 + 1)
    m.close()


@pytest.mark.faultfs
def test_torn_tail_written_by_a_master_is_set_aside_on_reopen(tmp_path):
    m = open_master(tmp_path, segment_bytes_max=300, journal_reserve_bytes=0)
    m.execute("open_account", "a", 0)
    for _ in range(20):
        m.execute("deposit", "a", 1)
    m.crash()  # kill -9: its last segment is not sealed, its progress file says seq 0
    first, seg = segments(tmp_path)[-1]
    data = open(seg, "rb").read()
    start, _end = frames(data)[-1]
    with open(seg, "r+b") as f:
        f.truncate(len(data) - 3)  # the last record lost its last three bytes
    m = open_master(tmp_path, segment_bytes_max=300)
    assert m.query("balance", "a") == 19 and m.seq == 20
    assert os.path.exists(f"{seg}.torn-{start:020d}")
    m.close()


# -- corruption before the end ---------------------------------------------------------

@pytest.mark.parametrize("name", ["journal-flipped-payload-mid.log", "journal-flipped-length-mid.log"])
def test_damaged_middle_record_refuses_to_open_and_leaves_the_file_byte_identical(tmp_path, name):
    seg = install(tmp_path, journal_file=name)
    with pytest.raises(Corruption) as err:
        open_fixture(tmp_path)
    second = frames(fx.build()["journal-valid.log"])[1][0]
    assert (err.value.path, err.value.offset, err.value.master) == (seg, second, fx.MASTER)
    assert f"offset {second}" in str(err.value) and seg in str(err.value)
    assert journal_bytes(tmp_path, fx.MASTER) == {FIRST_SEGMENT: fx.build()[name]}
    # Refusing released the name: a second attempt refuses the same way, not with LeaseHeld.
    with pytest.raises(Corruption):
        open_fixture(tmp_path)


def test_damaged_record_in_an_earlier_segment_refuses_to_open_and_truncates_nothing(tmp_path):
    write_segmented_journal(tmp_path)
    (_f, first), *_rest = segments(tmp_path)
    start, end = frames(open(first, "rb").read())[-1]
    flip(first, middle((start, end)))  # the last record of the first segment
    before = journal_bytes(tmp_path)
    with pytest.raises(Corruption) as err:
        open_master(tmp_path, segment_bytes_max=300)
    assert (err.value.path, err.value.offset) == (first, start)
    assert journal_bytes(tmp_path) == before


@pytest.mark.faultfs
def test_missing_middle_segment_is_a_gap_and_refuses_to_open(tmp_path):
    write_segmented_journal(tmp_path)
    segs = segments(tmp_path)
    assert len(segs) >= 3
    os.unlink(segs[1][1])
    before = journal_bytes(tmp_path)
    with pytest.raises(Corruption, match="gap"):
        open_master(tmp_path, segment_bytes_max=300)
    assert journal_bytes(tmp_path) == before


@pytest.mark.faultfs
def test_zeroed_end_of_an_earlier_segment_refuses_to_open_and_truncates_nothing(tmp_path):
    write_segmented_journal(tmp_path)
    (_f, first), *_rest = segments(tmp_path)
    data = open(first, "rb").read()
    start, _end = frames(data)[-1]
    with open(first, "r+b") as f:  # "zero a block": the last record of the first segment
        f.seek(start)
        f.write(bytes(len(data) - start))
    before = journal_bytes(tmp_path)
    with pytest.raises(Corruption):
        open_master(tmp_path, segment_bytes_max=300)
    assert journal_bytes(tmp_path) == before


# -- HMAC ------------------------------------------------------------------------------

@pytest.mark.faultfs
def test_signed_fixture_journal_recovers_with_its_key(tmp_path):
    install(tmp_path, journal_file="journal-signed-key-a.log")
    m = open_fixture(tmp_path, cluster_key=fx.KEY_A)
    assert (m.seq, m.query("balance", "a")) == (3, fx.BALANCE_AFTER_3)
    m.close()


@pytest.mark.faultfs
def test_master_reopened_with_another_key_refuses_to_open(tmp_path):
    m = open_master(tmp_path, cluster_key=b"key-A")
    m.execute("open_account", "a", 1)
    m.close()
    before = journal_bytes(tmp_path)
    with pytest.raises(Corruption, match="HMAC"):
        open_master(tmp_path, cluster_key=b"key-B")
    assert journal_bytes(tmp_path) == before


@pytest.mark.faultfs
@pytest.mark.parametrize("key", [b"another-key", None], ids=["wrong-key", "unsigned-read-with-key"])
def test_journal_that_fails_its_hmac_refuses_to_open_and_is_not_truncated(tmp_path, key):
    fixture = "journal-signed-key-a.log" if key else "journal-valid.log"
    install(tmp_path, journal_file=fixture)
    with pytest.raises(Corruption, match="HMAC"):
        open_fixture(tmp_path, cluster_key=key or fx.KEY_A)
    assert journal_bytes(tmp_path, fx.MASTER) == {FIRST_SEGMENT: fx.build()[fixture]}


# -- snapshots -------------------------------------------------------------------------

@pytest.mark.parametrize("name,why", [("snapshot-flipped-body.snap", "body checksum"),
                                      ("snapshot-truncated.snap", "does not match the file size"),
                                      ("snapshot-huge-length.snap", "does not match the file size")])
@pytest.mark.faultfs
def test_damaged_fixture_snapshots_are_corruption(name, why):
    path = os.path.join(FIXTURES, name)
    with pytest.raises(Corruption, match=why) as err:
        snapshot.load_snapshot(path, None)
    assert err.value.path == path


@pytest.mark.faultfs
def test_valid_fixture_snapshot_equals_a_replay_of_the_valid_journal(tmp_path):
    body = snapshot.load_snapshot(os.path.join(FIXTURES, "snapshot-valid.snap"), None)
    install(tmp_path, journal_file="journal-valid.log")
    m = open_fixture(tmp_path)
    assert m.digest() == body.digest
    m.close()


@pytest.mark.faultfs
def test_recovery_skips_a_damaged_newest_snapshot_for_an_older_valid_one(tmp_path):
    frontier = fx.HLC0 + 3
    install(tmp_path, journal_file="journal-valid.log",
            snapshot_files=[("snapshot-valid.snap", frontier), ("snapshot-flipped-body.snap", frontier + 10)])
    m = open_fixture(tmp_path)
    assert m.snapshot_frontier == frontier
    assert (m.seq, m.query("balance", "a")) == (3, fx.BALANCE_AFTER_3)
    m.close()


@pytest.mark.faultfs
def test_recovery_from_only_damaged_snapshots_replays_the_journal(tmp_path):
    frontier = fx.HLC0 + 3
    install(tmp_path, journal_file="journal-valid.log",
            snapshot_files=[("snapshot-truncated.snap", frontier), ("snapshot-flipped-body.snap", frontier + 10)])
    m = open_fixture(tmp_path)
    assert m.snapshot_frontier == -1
    assert (m.seq, m.query("balance", "a")) == (3, fx.BALANCE_AFTER_3)
    m.close()


# -- a snapshot ahead of its journal -----------------------------------------------------

@pytest.mark.faultfs
def test_journal_that_ends_before_its_snapshot_refuses_to_open_instead_of_writing_a_gap(tmp_path):
    from workers.prevalence.errors import LostRecords
    m = open_master(tmp_path)
    m.execute("open_account", "a", 0)
    for i in range(9):
        m.execute("deposit", "a", 1)
    m.snapshot()  # covers seq 1..10
    m.close()
    (_f, seg), = segments(tmp_path)
    spans = frames(open(seg, "rb").read())
    os.truncate(seg, spans[-3][1])  # the journal lost seq 9 and 10 (the snapshot has them)
    before = journal_bytes(tmp_path)
    with pytest.raises((Corruption, LostRecords)):
        m = open_master(tmp_path)
        m.execute("deposit", "a", 1)  # what the engine does today: seq 11 after seq 8
        m.close()
    assert journal_bytes(tmp_path) == before


@pytest.mark.faultfs
def test_snapshot_makes_the_journal_durable_before_it_is_published(tmp_path, monkeypatch):
    events = []
    name = "fdatasync" if hasattr(os, "fdatasync") else "fsync"  # what durable.sync_data calls
    real_fsync = getattr(os, name)

    def spy(fd):
        events.append(("fsync", fd))
        real_fsync(fd)

    m = open_master(tmp_path, fsync="never", fault=events.append)
    for i in range(3):
        m.execute("open_account", f"a{i}", 1)
    monkeypatch.setattr(os, name, spy)
    events.clear()
    m.snapshot()
    monkeypatch.undo()
    assert ("fsync", m.writer.fd) in events[:events.index("before-snapshot-rename")]
    m.close()


@pytest.mark.faultfs
def test_a_second_torn_tail_at_the_same_offset_does_not_overwrite_the_first(tmp_path):
    m = open_master(tmp_path)
    m.execute("open_account", "a", 1)
    m.close()
    open_master(tmp_path).crash()  # leaves the new owner's segment, empty, unsealed
    for garbage in (b"first torn write", b"second"):
        (_first, seg) = segments(tmp_path)[-1]  # both times: that segment, at offset 0
        with open(seg, "ab") as f:
            f.write(garbage)
        open_master(tmp_path).crash()
    kept = sorted(v for n, v in journal_bytes(tmp_path).items() if ".torn-" in n)
    assert kept == [b"first torn write", b"second"]
