"""The journal: framing, torn tail versus corruption, HMAC, segment naming."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from workers.prevalence import codec, journal
from workers.prevalence.codec import Record
from workers.prevalence.errors import InvariantViolation

from .helpers import frames, middle

KEY_A = b"cluster-key-A"
KEY_B = b"cluster-key-B"
PATH = "/shared/masters/m/journal/00000000000000000001.log"


def make_records(count: int, master: str = "m") -> list[Record]:
    return [Record(master, seq, 1000 + seq, f"r{seq}" if seq % 2 else "", "deposit", ("a", seq))
            for seq in range(1, count + 1)]


def framed(records, key=None) -> bytes:
    return b"".join(journal.frame(codec.encode_record(r), key) for r in records)


def scan(data, key=None, *, last_segment=True, base=0):
    return journal.scan(data, PATH, 0, key, last_segment=last_segment, master="m", base=base)


# -- framing ------------------------------------------------------------------------

@pytest.mark.parametrize("key", [None, KEY_A], ids=["plain", "hmac"])
def test_framed_records_scan_back_identical(key):
    records = make_records(5)
    data = framed(records, key)
    res = scan(data, key)
    assert res.records == records
    assert res.end_offset == len(data)
    assert res.torn is None and res.corruption is None


@settings(max_examples=50, deadline=None)
@given(payloads=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8),
       key=st.sampled_from([None, KEY_A]))
def test_frames_have_the_documented_layout(payloads, key):
    for p in payloads:
        f = journal.frame(p, key)
        n, version, flags = struct.unpack_from("<IBB", f, 0)
        assert (n, version) == (len(p), journal.FORMAT_VERSION)
        assert flags == (journal.FLAG_HMAC if key else 0)
        assert f[journal.HEADER_BYTES:journal.HEADER_BYTES + n] == p


def test_empty_payload_cannot_be_framed():
    with pytest.raises(InvariantViolation):
        journal.frame(b"", None)


def test_the_writer_refuses_an_empty_record_and_writes_nothing(tmp_path):
    # The one-record path frames in C (`write_frame`): its size check is the writer's.
    from workers.prevalence.writer import JournalWriter
    w = JournalWriter(str(tmp_path), 1, fsync="never", reserve_bytes=0)
    with pytest.raises(InvariantViolation):
        w.append([b""], None)
    w.append([b"\x96"], None)  # a one-byte payload is framed and written
    assert (w.offset, w.next_seq) == (len(journal.frame(b"\x96", None)), 2)
    w.close()


def test_flipped_length_is_caught_instead_of_read_as_a_torn_tail():
    records = make_records(3)
    data = bytearray(framed(records))
    second = frames(bytes(data))[1][0]
    # A flipped high bit of the length would make the record "run past the end of the
    # file" -- a torn tail that loses the valid third record -- if it were believed.
    data[second + 2] ^= 0x01
    res = scan(bytes(data))
    assert res.records == records[:1]
    assert res.torn is None
    assert res.corruption is not None
    assert res.corruption.offset == second


def test_zero_filled_tail_is_unwritten_space_not_torn_nor_corrupt():
    records = make_records(3)
    data = framed(records)
    res = scan(data + bytes(4096))
    assert res.records == records
    assert res.end_offset == len(data)
    assert res.corruption is None
    assert res.torn is None and res.zero_tail == 4096


def test_a_torn_record_followed_by_zeros_is_torn():
    records = make_records(3)
    data = framed(records)
    res = scan(data + framed(make_records(1))[:7] + bytes(4096))
    assert res.records == records and res.end_offset == len(data)
    assert res.corruption is None and res.torn is not None and res.zero_tail == 0


@pytest.mark.parametrize("tail", [b"", bytes(1), bytes(3 << 20), bytes(3 << 20) + b"\x01", b"\x01" + bytes(5)])
def test_all_zero_is_exact_at_any_length(tail):
    data = b"head" + tail
    assert journal.all_zero(data, 4) == (tail.count(0) == len(tail))
    assert journal.all_zero(memoryview(data)[2:], 2) == (tail.count(0) == len(tail))


def test_partial_final_record_is_torn_not_corrupt():
    records = make_records(3)
    data = framed(records)
    cut = frames(data)[2][0] + 20
    res = scan(data[:cut])
    assert res.records == records[:2]
    assert res.end_offset == frames(data)[2][0]
    assert res.torn is not None and res.corruption is None


def test_damaged_record_followed_by_a_valid_one_is_corruption_naming_path_and_offset():
    records = make_records(3)
    data = bytearray(framed(records))
    start, end = frames(bytes(data))[1]
    data[middle((start, end))] ^= 0x40  # a payload byte of the second record
    res = scan(bytes(data), base=4096)
    assert res.records == records[:1]
    assert res.torn is None
    err = res.corruption
    assert err is not None
    assert (err.path, err.offset, err.master) == (PATH, 4096 + start, "m")
    assert PATH in str(err) and f"offset {4096 + start}" in str(err)


def test_damaged_last_record_of_an_earlier_segment_is_corruption_not_torn():
    records = make_records(3)
    data = framed(records)
    res = scan(data[:-5], last_segment=False)
    assert res.records == records[:2]
    assert res.torn is None and res.corruption is not None


def test_zero_filled_tail_of_an_earlier_segment_is_corruption_not_torn():
    records = make_records(3)
    data = framed(records)
    last_start = frames(data)[2][0]
    res = scan(data[:last_start] + bytes(len(data) - last_start), last_segment=False)
    assert res.records == records[:2]
    assert res.torn is None and res.corruption is not None


def test_checksummed_payload_that_is_not_a_record_is_corruption():
    data = journal.frame(b"\x93\x01\x02\x03", None) + framed(make_records(1))
    res = scan(data)
    assert res.records == [] and res.corruption is not None
    assert "not a record" in str(res.corruption)


def test_unknown_format_version_is_not_read_as_a_record(monkeypatch):
    records = make_records(2)
    with monkeypatch.context() as patch:  # a frame from a future version, checksums intact
        patch.setattr(journal, "FORMAT_VERSION", journal.FORMAT_VERSION + 1)
        future = framed(records[:1])
    res = scan(future + framed(records[1:]))
    assert res.records == [] and res.corruption is not None
    assert "format version" in str(res.corruption)


def test_journal_wholly_in_a_future_format_version_is_corruption_not_torn(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(journal, "FORMAT_VERSION", journal.FORMAT_VERSION + 1)
        future = framed(make_records(3))
    res = scan(future)
    assert res.torn is None
    assert res.corruption is not None and "format version" in str(res.corruption)


# -- HMAC ---------------------------------------------------------------------------

def test_records_signed_with_the_configured_key_scan_back():
    records = make_records(4)
    assert scan(framed(records, KEY_A), KEY_A).records == records


def test_a_forged_record_between_signed_ones_is_corruption():
    records = make_records(3)
    data = framed(records[:1], KEY_A) + framed(records[1:2], KEY_B) + framed(records[2:], KEY_A)
    res = scan(data, KEY_A)
    assert res.records == records[:1]
    assert res.corruption is not None and "HMAC" in str(res.corruption)


def test_an_unsigned_record_between_signed_ones_is_corruption():
    records = make_records(3)
    data = framed(records[:1], KEY_A) + framed(records[1:2], None) + framed(records[2:], KEY_A)
    res = scan(data, KEY_A)
    assert res.records == records[:1]
    assert res.corruption is not None and "no HMAC" in str(res.corruption)


def test_records_signed_with_key_a_read_with_key_b_are_corruption():
    res = scan(framed(make_records(3), KEY_A), KEY_B)
    assert res.records == []
    assert res.torn is None
    assert res.corruption is not None and "HMAC" in str(res.corruption)


def test_unsigned_records_read_with_a_key_configured_are_corruption():
    res = scan(framed(make_records(3), None), KEY_A)
    assert res.records == []
    assert res.torn is None
    assert res.corruption is not None and "HMAC" in str(res.corruption)


def test_a_forged_final_record_is_corruption_not_a_torn_tail():
    records = make_records(3)
    data = framed(records[:2], KEY_A) + framed(records[2:], KEY_B)
    res = scan(data, KEY_A)
    assert res.records == records[:2]
    assert res.torn is None and res.corruption is not None


# -- segment naming -----------------------------------------------------------------

@pytest.mark.parametrize("seq,name", [
    (1, "00000000000000000001.log"),
    (42, "00000000000000000042.log"),
    (10 ** 19, "10000000000000000000.log"),
    (2 ** 64 - 1, "18446744073709551615.log"),
])
def test_segment_names_format_and_parse_as_a_pair(seq, name):
    assert journal.format_segment_name(seq) == name
    assert journal.parse_segment_name(name) == seq


@pytest.mark.parametrize("seq", [0, -1])
def test_segment_first_seq_below_one_is_refused(seq):
    with pytest.raises(InvariantViolation):
        journal.format_segment_name(seq)


@given(st.lists(st.integers(min_value=1, max_value=10 ** 20 - 1), min_size=2, max_size=20, unique=True))
def test_segment_name_text_order_is_seq_order(seqs):
    names = [journal.format_segment_name(s) for s in seqs]
    assert sorted(names) == [journal.format_segment_name(s) for s in sorted(seqs)]
    assert [journal.parse_segment_name(n) for n in names] == seqs


@pytest.mark.parametrize("name", [
    "1.log", "00000000000000000001.snap", "0000000000000000000x.log", "00000000000000000001.log.tmp",
    "00000000000000000001.log.torn-00000000000000000128", ".nfs000000000000000100000001",
    "-0000000000000000001.log", " 0000000000000000001.log",
])
def test_names_that_are_not_segments_parse_to_none(name):
    assert journal.parse_segment_name(name) is None


@pytest.mark.parametrize("name", ["0000000000000000000\u00b2.log",  # superscript two
                                  "\uff10" * 19 + "\uff11.log"],    # fullwidth 0...01
                         ids=["superscript", "fullwidth"])
def test_names_with_non_ascii_digits_are_not_segments(name, tmp_path):
    assert journal.parse_segment_name(name) is None
    (tmp_path / name).write_bytes(b"")  # a stray file does not break the listing
    (tmp_path / journal.format_segment_name(1)).write_bytes(b"")
    assert [f for f, _p in journal.list_segments(str(tmp_path))] == [1]


def test_list_segments_skips_silly_renames_temp_files_and_set_aside_tails(tmp_path):
    d = tmp_path / "journal"
    d.mkdir()
    keep = [journal.format_segment_name(s) for s in (1, 9, 10, 120)]
    skip = [".nfs000000000000000100000001", ".tmp-host-123-00000000000000000200.log",
            ".00000000000000000300.log", keep[1] + ".torn-00000000000000000064", "README", "1.log",
            keep[0] + ".tmp"]
    for n in keep + skip:
        (d / n).write_bytes(b"")
    assert journal.list_segments(str(d)) == [(int(n[:20]), os.path.join(str(d), n)) for n in keep]


def test_list_segments_of_a_missing_folder_is_empty(tmp_path):
    assert journal.list_segments(str(tmp_path / "nope")) == []


def test_looking_for_a_valid_record_after_damage_does_bounded_work(monkeypatch):
    import random
    import zlib
    crc_bytes = 0
    real_crc32 = zlib.crc32

    def counting_crc32(data, value=0):
        nonlocal crc_bytes
        crc_bytes += len(data)
        return real_crc32(data, value)

    data = framed(make_records(20)) + random.Random(7).randbytes(512 * 1024)
    monkeypatch.setattr(journal.zlib, "crc32", counting_crc32)
    res = scan(data)
    assert res.torn is not None and len(res.records) == 20
    size = len(data)
    assert crc_bytes <= 4 * size, f"{crc_bytes} bytes checksummed to scan {size}"


def test_batch_frame_with_a_gap_in_seqs_is_corruption_naming_the_record():
    from workers.prevalence import codec, journal as j
    recs = [codec.Record("m", s, 100 + s, "", "deposit", ("a", 1)) for s in (1, 2, 4)]
    data = j.frame(codec.encode_record(recs), None, batch=True)
    res = j.scan(data, "seg", 0, None, last_segment=True, master="m", expect_seq=1)
    assert res.corruption is not None and not res.records
    assert "expected seq 3" in str(res.corruption) and "found seq 4" in str(res.corruption)


def test_batch_frame_read_from_inside_starts_at_the_cursor():
    from workers.prevalence import codec, journal as j
    recs = [codec.Record("m", s, 100 + s, "", "deposit", ("a", 1)) for s in range(1, 6)]
    data = j.frame(codec.encode_record(recs), None, batch=True)
    res = j.scan(data, "seg", 0, None, last_segment=True, master="m", expect_seq=4)
    assert [r.seq for r in res.records] == [4, 5] and res.corruption is None


# -- the writer's reservation ------------------------------------------------------------

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:35 / /srv/prevalence/shared rw,relatime shared:20 - nfs4 nas:/export rw,vers=4.2
41 40 0:36 / /srv/prevalence/shared/local\\040disk rw - xfs /dev/vdb rw
"""


@pytest.mark.parametrize("path, kind", [
    ("/srv/prevalence/shared/masters/alpha/journal", "nfs4"),
    ("/srv/prevalence/shared", "nfs4"),
    ("/srv/prevalence/shared-not", "ext4"),
    ("/srv/prevalence/shared/local disk/x", "xfs"),
    ("/tmp", "ext4"),
])
def test_filesystem_type_takes_the_longest_mount_point(path, kind):
    from workers.prevalence.writer import filesystem_type
    assert filesystem_type(path, MOUNTINFO) == kind


def test_writer_reserves_zeros_ahead_and_a_clean_close_cuts_them(tmp_path):
    from workers.prevalence.writer import JournalWriter
    w = JournalWriter(str(tmp_path), 1, fsync="never", reserve_bytes=4096)
    payloads = [codec.encode_record(r) for r in make_records(3)]
    w.append(payloads, None)
    path, end = w.path, w.offset
    data = open(path, "rb").read()
    assert len(data) == end + 4096 and journal.all_zero(data, end)
    res = scan(data)
    assert res.records == make_records(3) and res.zero_tail == 4096 and res.torn is None
    w.close()
    assert os.path.getsize(path) == end


def test_writer_without_reservation_writes_records_only(tmp_path):
    from workers.prevalence.writer import JournalWriter
    w = JournalWriter(str(tmp_path), 1, fsync="never", reserve_bytes=0)
    w.append([codec.encode_record(r) for r in make_records(2)], None)
    assert os.path.getsize(w.path) == w.offset
    w.close()
