"""The journal: one master's records, append-only, in segments named by their first seq.

Byte layout of one framed record (all integers little-endian)::

    offset  size  field
    0       4     payload length N (1 .. RECORD_BYTES_MAX)
    4       1     format version (FORMAT_VERSION)
    5       1     flags: bit 0 = an HMAC-SHA256 follows the payload;
                  bit 1 = a batch: the payload is an array of records (one execute_many)
    6       2     reserved, zero
    8       N     payload: the MessagePack record (see codec.Record)
    8+N     32    HMAC-SHA256(cluster key, bytes 0 .. 8+N), when flag bit 0 is set
    end-4   4     CRC-32 of every byte of the frame before it

One CRC covers header, payload and HMAC, so a reader checks a frame with a single
``crc32(frame) == RESIDUE`` (appending a CRC-32 to its message gives a constant).
A flipped length moves where the CRC is looked for, so it fails; whether the damage is
a torn tail or corruption is then decided by looking for a valid frame after it.

Segments: ``journal/<first-seq>.log``, 20 digits zero-padded, so text order is seq
order; a new segment starts when the current one passes ``segment_bytes_max``. Names
never clash, however often a master syncs or rolls.

Seals (`seal`): ``journal/<first-seq>.seal`` says where a finished segment ends (its
length and CRC-32), published when the writer rolls or closes it and by a new owner on
the previous owner's last segment. A sealed segment ends at its seal: readers never read
past it, and damage inside it is corruption, never a torn tail. Every segment but the
last is sealed.

A segment's first record carries the seq in its name: an old segment copied under a
later name is corruption naming that file.

Bounds: a record's payload is at most `RECORD_BYTES_MAX`; one write (one
``execute_many``) at most `APPEND_BYTES_MAX`; a segment file at most
`SEGMENT_BYTES_LIMIT`, checked against the file's size before it is read.

Reserved space: on a local disk the writer extends the current segment with zeros ahead
of its offset, `writer.RESERVE_BYTES_DEFAULT` at a time, so that a commit overwrites blocks the
file already has and ``fdatasync`` writes the data alone, not the file's new size and
block map too (about 1.5x faster per commit here; SQLite's WAL gets the same effect by
reusing its file). Rolling or closing a segment truncates the reservation. Zeros after
the last record of the last segment are therefore **unwritten space**: the journal ends
there, with no error and nothing to set aside (zeros hold no data); the writer resumes
at that offset. On a network filesystem the writer reserves nothing (auto-detected):
there a reader's page cache can hold the zeros of a reserved block after the writer
has filled it, while a growing file size always tells it to read again.

Reading tells two failures apart (etcd's WAL does the same):

* **Torn tail** -- the last record of the last segment is incomplete or fails its
  checksum (whatever follows it being zeros), and no valid record follows it. It was
  never acknowledged (the writer fsyncs before it acknowledges): it means "not written
  yet". A peer stops there and looks again at its next sync; the owner, at recovery,
  copies the bytes aside to ``<segment>.torn-<offset>`` and truncates them.
* **Corruption** -- a damaged record followed by a valid one. Nothing is truncated and
  nothing is skipped: reading that journal stops with an error naming the file, offset
  and cause.

Writing is `writer.JournalWriter`'s: it tracks its own offset and writes with ``pwrite``
(never relying on ``O_APPEND``, which is not atomic across NFS clients) and checks the
return codes of ``fsync`` and ``close``, where NFS reports ``EIO``/``ENOSPC``/``EDQUOT``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import operator
import os
import struct
import zlib
from dataclasses import dataclass, field

import msgspec

from . import codec, files
from .errors import Corruption, InvariantViolation, check

log = logging.getLogger("prevalence.journal")

FORMAT_VERSION = 1
FLAG_HMAC = 0x01
FLAG_BATCH = 0x02
FLAGS_KNOWN = FLAG_HMAC | FLAG_BATCH
HEADER = struct.Struct("<IBBH")
HEADER_BYTES = HEADER.size  # 8
CRC_BYTES = 4
FRAME_BYTES_MIN = HEADER_BYTES + 1 + CRC_BYTES
RESIDUE = 0x2144DF1C  # crc32(m + crc32(m).to_bytes(4, "little")) for every m
_U32 = struct.Struct("<I")
HMAC_BYTES = 32
RECORD_BYTES_MAX = 16 * 1024 * 1024
#: The most bytes one append (one execute_many) may write.
APPEND_BYTES_MAX = 64 * 1024 * 1024
#: The largest segment file a reader accepts: a writer's segments stay below it.
SEGMENT_BYTES_LIMIT = 256 * 1024 * 1024
SEGMENT_BYTES_MAX_DEFAULT = 64 * 1024 * 1024
#: The most `segment_bytes_max` may be: a segment grows past it by at most one append.
SEGMENT_BYTES_MAX_LIMIT = SEGMENT_BYTES_LIMIT - APPEND_BYTES_MAX
#: The search for a valid frame after damage checksums at most this many times the bytes
#: it searches (the search is linear; a segment that would need more is reported).
SEARCH_CRC_FACTOR = 4
#: First payload bytes of a frame: a record is a MessagePack array of six (0x96), a batch
#: an array of records (fixarray, array 16 or array 32).
_PAYLOAD_STARTS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
SEGMENT_SUFFIX = ".log"
SEQ_DIGITS = 20

_ZEROS = bytes(1024 * 1024)  # compared against to tell unwritten space

FSYNC_MODES = ("always", "interval", "never")
FSYNC_INTERVAL_MS_DEFAULT = 200


# -- naming -------------------------------------------------------------------------

SEAL_SUFFIX = ".seal"
def seal_path(segment_path: str) -> str:
    """The seal's path of a segment (`seal` reads and writes it)."""
    return segment_path[:-len(SEGMENT_SUFFIX)] + SEAL_SUFFIX


def format_segment_name(first_seq: int) -> str:
    check(first_seq >= 1, f"segment first seq must be >= 1, got {first_seq}")
    return f"{first_seq:0{SEQ_DIGITS}d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The first seq of a segment file name, or None when the name is not a segment."""
    if len(name) != SEQ_DIGITS + len(SEGMENT_SUFFIX) or not name.endswith(SEGMENT_SUFFIX):
        return None
    digits = name[:SEQ_DIGITS]
    if not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)


@dataclass
class Listing:
    """One listing of a journal folder."""

    segments: list[tuple[int, str]] = field(default_factory=list)  # (first seq, path), in seq order
    sealed: frozenset[int] = frozenset()  # first seqs of the segments that have a seal file


def list_journal(journal_dir: str) -> Listing:
    """The segments and seals of a journal folder, by listing (NFS: listing refreshes
    lookups). Skips `.nfs*` silly-rename files, temp files and set-aside torn tails.
    Empty when the folder does not exist (yet).

    Raises:
        UnsafeFile: the folder is a symbolic link or not a directory.
    """
    segments, sealed = [], set()
    for name in files.list_dir(journal_dir, "journal folder"):
        if name.startswith("."):
            continue
        first = parse_segment_name(name)
        if first is not None:
            segments.append((first, os.path.join(journal_dir, name)))
        elif name.endswith(SEAL_SUFFIX):
            first = parse_segment_name(name[:-len(SEAL_SUFFIX)] + SEGMENT_SUFFIX)
            if first is not None:
                sealed.add(first)
    segments.sort()
    return Listing(segments, frozenset(sealed))


def list_segments(journal_dir: str) -> list[tuple[int, str]]:
    """(first seq, path) of every segment, in seq order (see `list_journal`)."""
    return list_journal(journal_dir).segments


# -- framing ------------------------------------------------------------------------

def frame(payload: bytes, key: bytes | None, batch: bool = False) -> bytes:
    """Frame one encoded record, or a batch of them (see the module docstring)."""
    n = len(payload)
    if n == 0 or n > RECORD_BYTES_MAX:
        raise InvariantViolation(f"record payload of {n} bytes is outside 1..{RECORD_BYTES_MAX}")
    if not key and not batch:
        # The common frame (no key, one record), built with the fewest calls. The same
        # bytes as below with flags 0, and as `tracked.write_frame` writes for the commit
        # of one record (the writer's path for every `execute`).
        body = HEADER.pack(n, FORMAT_VERSION, 0, 0) + payload
        return body + _U32.pack(zlib.crc32(body))
    flags = (FLAG_HMAC if key else 0) | (FLAG_BATCH if batch else 0)
    body = HEADER.pack(n, FORMAT_VERSION, flags, 0) + payload
    if key:
        body += hmac.new(key, body, hashlib.sha256).digest()
    return body + _U32.pack(zlib.crc32(body))


@dataclass
class ScanResult:
    """What one pass over a segment's bytes found."""

    records: list          # decoded codec.Record, in file order
    end_offset: int        # offset just past the last valid record
    torn: str | None = None  # why the tail after end_offset is "not written yet", if any
    corruption: Corruption | None = None  # set when a damaged record precedes valid data
    zero_tail: int = 0     # bytes of zeros after end_offset: unwritten (reserved) space


def all_zero(data, start: int = 0) -> bool:
    """True when every byte of `data` from `start` on is zero (C-speed compares)."""
    if not isinstance(data, bytes):
        data = bytes(memoryview(data)[start:])
        start = 0
    zeros = memoryview(_ZEROS)
    size = len(data)
    while start < size:
        n = min(size - start, len(_ZEROS))
        if not data.startswith(zeros[:n], start):
            return False
        start += n
    return True


def _frame_error(data, off: int, key: bytes | None) -> tuple[str | None, int]:
    """Check the frame at `off`. Returns (None, next offset) or (what is wrong, 0).

    A problem found *after* the checksum passed (unknown version or flags, missing or
    wrong HMAC) is returned with end = -1: the bytes were written whole, so this can
    never be a torn write.
    """
    size = len(data)
    if size - off < FRAME_BYTES_MIN:
        return f"{size - off} bytes left, fewer than the smallest frame ({FRAME_BYTES_MIN})", 0
    n, version, flags, reserved = HEADER.unpack_from(data, off)
    if n == 0 or n > RECORD_BYTES_MAX:
        return f"declared length {n} outside 1..{RECORD_BYTES_MAX}", 0
    mac_len = HMAC_BYTES if flags & FLAG_HMAC else 0
    end = off + HEADER_BYTES + n + mac_len + CRC_BYTES
    if end > size:
        return (f"declared length {n} runs past the end of the file "
                f"({size - off - HEADER_BYTES} bytes left)"), 0
    if zlib.crc32(data[off:end]) != RESIDUE:
        return "checksum mismatch", 0
    if version != FORMAT_VERSION:
        return (f"format version {version}, expected {FORMAT_VERSION} (written by a newer release? "
                "upgrade this master)"), -1
    if reserved != 0 or flags & ~FLAGS_KNOWN:
        return f"unknown flags {flags:#x}/{reserved:#x}", -1
    if key is not None:
        if not mac_len:
            return "record has no HMAC but a cluster key is configured", -1
        mac_at = end - CRC_BYTES - HMAC_BYTES
        want = hmac.new(key, bytes(data[off:mac_at]), hashlib.sha256).digest()
        if not hmac.compare_digest(want, bytes(data[mac_at:mac_at + HMAC_BYTES])):
            return "HMAC mismatch (wrong cluster key or forged record)", -1
    return None, end


def _valid_frame_after(data, start: int, key: bytes | None) -> tuple[int | None, str | None]:
    """The first valid frame at or after `start`. Error path only.

    Returns (its offset, None); (None, None) when there is none; or (None, why) when the
    search gave up: it is linear in the bytes searched. Candidates are found by C-speed
    searches for the fixed header bytes 4..7 (version, known flags, reserved zero) and
    taken in file order; a candidate whose declared length does not fit, or whose payload
    does not start like a record, costs nothing more. The others are checksummed, at most
    `SEARCH_CRC_FACTOR` times the bytes searched in all: bytes that hold more plausible
    headers than that are not a torn write (an adversary's fake headers, each declaring
    a megabyte, would otherwise cost a checksum of a megabyte each).
    """
    raw = bytes(data)
    size = len(raw)
    budget = SEARCH_CRC_FACTOR * max(0, size - start) + FRAME_BYTES_MIN
    spent = checked = 0
    patterns = [bytes([FORMAT_VERSION, flags, 0, 0]) for flags in range(FLAGS_KNOWN + 1)]
    found_at = [raw.find(p, start + 4) for p in patterns]
    while True:
        live = [at for at in found_at if at != -1]
        if not live:
            return None, None
        at = min(live)
        i = found_at.index(at)
        found_at[i] = raw.find(patterns[i], at + 1)
        off = at - 4
        n = _U32.unpack_from(raw, off)[0]
        mac_len = HMAC_BYTES if patterns[i][1] & FLAG_HMAC else 0
        end = off + HEADER_BYTES + n + mac_len + CRC_BYTES
        if not 0 < n <= RECORD_BYTES_MAX or end > size or raw[off + HEADER_BYTES] not in _PAYLOAD_STARTS:
            continue
        spent += end - off
        checked += 1
        if spent > budget:
            return None, (f"the {size - start} bytes after it hold more frame headers than a torn write can "
                          f"leave (gave up after checksumming {checked} candidates, {spent} bytes), so this "
                          "is not a torn tail")
        if _frame_error(raw, off, key)[0] is None:
            return off, None


def scan(data: bytes, path: str, offset: int, key: bytes | None, *, last_segment: bool,
         master: str | None = None, base: int = 0, expect_seq: int | None = None,
         last_hlc: int = 0, trusted: int = 0, records_max: int | None = None,
         first_seq: int | None = None, sealed: bool = False) -> ScanResult:
    """Decode the framed records of `data` starting at `offset`.

    Stops at the first damaged frame and decides whether it is a torn tail (nothing valid
    after it in this, the last, segment, which no seal closes) or corruption. Decoding is
    strict: a payload that is not a well-formed record (nested deeper than the decoder
    goes, say) is corruption too. With `expect_seq`, records before it are skipped and
    every later one must carry the next seq, a higher hlc than the last and `master` --
    the journal's order, checked again on read. With `first_seq` (`data` starts at the
    segment's start), the first record must carry it: the seq in the segment's name.
    `sealed`: `data` ends at the segment's seal. `base` is the file offset of ``data[0]``,
    for messages; offsets in the result are relative to `data`.
    """
    records = []
    size = len(data)
    off = offset
    problem = None

    def corrupt(why: str, at: int) -> ScanResult:
        return ScanResult(records, at, corruption=Corruption(why, path=path, offset=base + at, master=master,
                                                             seq=expect_seq))

    off, problem, failed, expect_seq = _scan_frames(data, off, key, master, expect_seq, last_hlc, trusted,
                                                    records_max, first_seq, records)
    if failed is not None:
        return corrupt(*failed)
    if problem is None:
        return ScanResult(records, off)
    # Zeros, a damaged frame at `off`: unwritten space, torn tail or corruption?
    tail = last_segment and not sealed
    if tail and all_zero(data, off):
        return ScanResult(records, off, zero_tail=size - off)
    later, gave_up = _valid_frame_after(memoryview(data), off + 1, key)
    if later is None and gave_up is None and tail:
        return ScanResult(records, off, torn=problem)
    if gave_up is not None:
        found = gave_up
    elif later is not None:
        found = f"a valid record follows at offset {base + later}"
    elif sealed:
        found = (f"the segment is sealed at {base + size} bytes: every record up to its seal was durable, "
                 "so this is not a torn tail")
    else:
        found = "later segments exist, so this is not the tail"
    return ScanResult(records, off, corruption=Corruption(
        f"damaged record ({problem}); {found}. Expected a valid record here. "
        "Nothing was skipped or truncated; restore this file from a backup or a peer, "
        "or retire this master", path=path, offset=base + off, master=master))


def _scan_frames(data, off: int, key: bytes | None, master: str | None, expect_seq: int | None,
                 last_hlc: int, trusted: int, records_max: int | None, first_seq: int | None,
                 records: list):
    """The loop of `scan`: appends to `records`; returns (offset reached, the damaged
    frame's problem or None, (why, offset) of a corruption or None, expect_seq)."""
    append = records.append
    decode = codec.decode_record
    decode_batch = codec.decode_batch
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    size = len(data)
    mv = memoryview(data)
    limit = records_max if records_max is not None else -1
    while off < size and len(records) != limit and (limit < 0 or len(records) < limit):
        # Fast path: a plain (unsigned) frame whose single CRC checks out.
        if size - off >= FRAME_BYTES_MIN:
            n, version, flags, reserved = unpack(data, off)
            end = off + HEADER_BYTES + n + CRC_BYTES
            if (not flags & ~FLAG_BATCH and key is None and version == FORMAT_VERSION and reserved == 0 and n
                    and end <= size and (end <= trusted or crc32(mv[off:end]) == RESIDUE)):
                payload = mv[off + HEADER_BYTES:end - CRC_BYTES]
            else:
                problem, end = _frame_error(mv, off, key)
                if problem is not None:
                    if end == -1:
                        return off, None, (f"damaged record ({problem}); its checksum matches, so it was "
                                           "written whole: this is not a torn tail. Nothing was skipped "
                                           "or truncated", off), expect_seq
                    return off, problem, None, expect_seq
                payload = mv[off + HEADER_BYTES:end - CRC_BYTES - (HMAC_BYTES if flags & FLAG_HMAC else 0)]
        else:
            return off, f"{size - off} bytes left, fewer than the smallest frame ({FRAME_BYTES_MIN})", None, expect_seq
        if flags & FLAG_BATCH:
            # A batch (one execute_many): decoded in one call, checked record by record.
            try:
                batch = decode_batch(payload)
            except msgspec.DecodeError as exc:
                return off, None, (f"checksum matches but the payload is not a batch of records: {exc}", off), expect_seq
            except RecursionError:
                return off, None, (_too_deep(), off), expect_seq
            if not batch:
                return off, None, ("checksum matches but the batch holds no record", off), expect_seq
            if first_seq is not None:
                if batch[0].seq != first_seq:
                    return off, None, (_misnamed(first_seq, batch[0]), off), expect_seq
                first_seq = None
            if expect_seq is not None:
                if not records and batch[0].seq < expect_seq:
                    batch = batch[expect_seq - batch[0].seq:]  # before the cursor: read from the start
                    if not batch:
                        off = end
                        continue
                # The journal's order, checked on read with C-speed passes over the batch:
                # seqs gap-free from expect_seq, hlcs strictly increasing, one master.
                hlcs = [r.hlc for r in batch]
                if ([r.seq for r in batch] != list(range(expect_seq, expect_seq + len(batch)))
                        or hlcs[0] <= last_hlc or not all(map(operator.lt, hlcs, hlcs[1:]))
                        or {r.master for r in batch} != {master}):
                    for rec in batch:  # find and name the first record out of order
                        if rec.seq != expect_seq or rec.hlc <= last_hlc or rec.master != master:
                            return off, None, (
                                f"record out of sequence: expected seq {expect_seq} of {master!r} with hlc "
                                f"above {last_hlc}, found seq {rec.seq} of {rec.master!r} with hlc {rec.hlc}",
                                off), expect_seq
                        expect_seq += 1
                        last_hlc = rec.hlc
                expect_seq += len(batch)
                last_hlc = hlcs[-1]
            records += batch
            off = end
            continue
        try:
            rec = decode(payload)
        except msgspec.DecodeError as exc:
            return off, None, (f"checksum matches but the payload is not a record: {exc}", off), expect_seq
        except RecursionError:
            return off, None, (_too_deep(), off), expect_seq
        if first_seq is not None:
            if rec.seq != first_seq:
                return off, None, (_misnamed(first_seq, rec), off), expect_seq
            first_seq = None
        if expect_seq is not None:
            if rec.seq != expect_seq or rec.hlc <= last_hlc or rec.master != master:
                if rec.seq < expect_seq and rec.master == master and not records:
                    off = end  # before the cursor, in a segment read from its start
                    continue
                return off, None, (f"record out of sequence: expected seq {expect_seq} of {master!r} with hlc "
                                   f"above {last_hlc}, found seq {rec.seq} of {rec.master!r} with hlc {rec.hlc}",
                                   off), expect_seq
            expect_seq += 1
            last_hlc = rec.hlc
        append(rec)
        off = end
    return off, None, None, expect_seq


def _too_deep() -> str:
    return (f"checksum matches but the payload is nested deeper than the decoder goes ({codec.depth_note()}): "
            "not a record this engine writes. Nothing was skipped or truncated")


def _misnamed(first_seq: int, rec) -> str:
    return (f"the segment is named for seq {first_seq} but its first record is seq {rec.seq} of "
            f"{rec.master!r}: a file copied or renamed into this journal (an old segment replayed under a "
            "later name?). Nothing was read from it; remove it")


def read_segment(path: str, offset: int = 0, end: int | None = None) -> tuple[bytes, int]:
    """Bytes ``[offset, end)`` of a segment (to its end when `end` is None) and the file's
    size, reopening it by path (NFS close-to-open consistency).

    Raises:
        UnsafeFile: not a regular file, or larger than `SEGMENT_BYTES_LIMIT` (checked before
            reading). OSError: FileNotFoundError, ESTALE (rotated away) ...
    """
    return files.read_file(path, bytes_max=SEGMENT_BYTES_LIMIT, what="journal segment", offset=offset, end=end)


def read_file(path: str) -> bytes:
    """A whole segment's bytes (see `read_segment`)."""
    return read_segment(path)[0]
