"""Reading a master's journal incrementally, by the NFS rules.

A `JournalReader` remembers, for one master, the last seq it has read and where the next
record starts (segment and byte offset). Each `read_new()` lists the journal folder
(listing refreshes NFS lookups), reopens files by path (close-to-open consistency), reads
from the remembered offset and checks every record: gap-free seq, strictly increasing hlc,
checksums, and a segment's first record against the seq in its name. A torn tail is "not
written yet": it stops there and tries again next time. A vanished segment (ENOENT,
ESTALE: rotated away) sends it back to the listing.

A sealed segment ends at its seal: bytes past it (a zombie owner's late writes after a
takeover) are never read, and reported once; a reader that already read past a seal
stops with an error (it read records the journal does not hold). Reads are bounded
(`journal.SEGMENT_BYTES_LIMIT`) and never follow a link or block on a special file: a
bad file stops reading this master with an error naming it, nothing else.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from .. import codec, journal, seal as seals
from ..errors import BadFile, Corruption, TruncatedSegment
from . import folder

log = logging.getLogger("prevalence.reader")

_VANISHED = (errno.ENOENT, errno.ESTALE)


@dataclass
class ReadResult:
    records: list
    torn: str | None = None       # why reading stopped at a tail that is not written yet
    torn_at: tuple[str, int] | None = None  # (path, offset) of that torn tail
    error: Corruption | None = None
    zeros_at: tuple[str, int, int] | None = None  # (path, offset, bytes) of unwritten space


class JournalReader:
    def __init__(self, shared: str, name: str, last_seq: int, last_hlc: int, key: bytes | None):
        self.shared = shared
        self.name = name
        self.dir = folder.journal_dir(shared, name)
        self.key = key
        self.last_seq = last_seq      # the last seq handed out
        self.last_hlc = last_hlc      # its hlc (0 when unknown: checks start at the next record)
        self._segment: tuple[int, str] | None = None  # (first seq, path) being read
        self._offset = 0              # where the record after last_seq starts in _segment
        self._cache = None            # (path, file offset, bytes, trusted) of a segment read in chunks
        self._seals: dict[str, seals.Seal] = {}  # path -> seal, once read (a seal never changes)
        self._past_seal_reported: set[str] = set()

    @property
    def position(self) -> tuple[int, str, int] | None:
        """Where the record after `last_seq` starts: (first seq of its segment, that
        segment's path, byte offset in it); None while no segment is located (nothing read
        yet, or after `rewind`). The form `JournalWriter` takes as the `tail` to continue."""
        if self._segment is None:
            return None
        first, path = self._segment
        return (first, path, self._offset)

    def read_new(self, records_max: int | None = None) -> ReadResult:
        """Every complete record after `last_seq`, in seq order (up to records_max)."""
        out: list = []
        for _attempt in range(3):
            try:
                with codec.gc_paused():
                    return self._read(out, records_max)
            except BadFile as exc:  # a file that is not what it must be (a link, a FIFO, a bad seal ...)
                return ReadResult(out, error=exc)
            except OSError as exc:
                if exc.errno not in _VANISHED:
                    raise
                # The segment was rotated away between listing and reading: list again.
                self._segment = None
        return ReadResult(out, torn="segments kept vanishing while being read; will retry")

    def _locate(self, segments: list[tuple[int, str]]) -> tuple[int, str] | None | Corruption:
        """The segment holding last_seq + 1 (and reset the offset), None if not written yet."""
        want = self.last_seq + 1
        best = None
        for first, path in segments:
            if first <= want:
                best = (first, path)
        if best is None:
            if segments:
                return Corruption(
                    f"gap: the next record to read is seq {want} but the oldest segment starts at "
                    f"seq {segments[0][0]} (segments were removed before this master read them). "
                    "Rejoin from a newer snapshot", path=segments[0][1], master=self.name, seq=want,
                    gap=True)
            return None
        self._offset = 0
        return best

    def _read(self, out: list, records_max: int | None) -> ReadResult:
        listing = journal.list_journal(self.dir)
        segments = listing.segments
        if not segments and self.last_seq > 0:
            return ReadResult(out, error=Corruption(
                f"journal folder {self.dir} holds no segment, although seq {self.last_seq} of {self.name!r} was "
                "read from it: the master's folder was deleted or moved. Restore it, or retire the master "
                f"(prevalence retire {self.name} --force)", path=self.dir, master=self.name))
        if self._segment is None or self._segment not in segments:
            located = self._locate(segments)
            if isinstance(located, Corruption):
                return ReadResult(out, error=located)
            if located is None:
                return ReadResult(out)
            self._segment = located
        while True:
            first, path = self._segment
            later = [s for s in segments if s[0] > first]
            seal = self._seal(first, path, listing)
            if seal is not None and self._offset > seal.length:
                return ReadResult(out, error=Corruption(
                    f"this reader has read {self.name!r} up to offset {self._offset}, past the segment's seal at "
                    f"{seal.length}: records it read there are not part of the journal (written by a previous "
                    "owner after a takeover?). Do not use this master's state; restart it so it rebuilds",
                    path=path, offset=seal.length, master=self.name, seq=self.last_seq))
            if later and seal is None:
                # Before blaming the end of an unsealed segment that has a successor, check the
                # successor is what its name says (an old segment replayed under a later name).
                problem = self._check_first_record(later[0])
                if problem is not None:
                    return ReadResult(out, error=problem)
            # Reuse the bytes of a segment read by the previous call in chunks (recovery
            # reads a large journal records_max at a time); otherwise reopen by path.
            cached = self._cache
            cut = None  # the size of a sealed segment shorter than its seal
            if cached is not None and cached[0] == path and cached[1] <= self._offset:
                start = self._offset - cached[1]
                data = memoryview(cached[2])[start:]
                trusted = max(0, cached[3] - start)
            else:
                data, size = journal.read_segment(path, self._offset, seal.length if seal else None)
                if seal is not None and size > seal.length:
                    self._report_past_seal(path, seal, size)
                if seal is not None and size < seal.length:
                    cut = size  # read what is left, then say what is missing
                    seal = None
                trusted = (seals.trusted_prefix(data, seal) if self._offset == 0 and self.key is None
                           else 0)
            want = None if records_max is None else max(1, records_max - len(out))
            # A segment cut short of its seal reads like a last segment: damage with nothing
            # valid after it is where the records stop (said below), not corruption.
            res = journal.scan(data, path, 0, self.key, last_segment=not later or cut is not None,
                               master=self.name, base=self._offset, expect_seq=self.last_seq + 1,
                               last_hlc=self.last_hlc, trusted=trusted, records_max=want,
                               first_seq=first if self._offset == 0 else None, sealed=seal is not None)
            if (want is not None and len(res.records) >= want and res.end_offset < len(data)
                    and not res.torn and res.corruption is None and not res.zero_tail and cut is None):
                # Stopped at records_max inside this segment: keep its bytes for the next call.
                # (Only bytes up to the end of the written records are fixed; the zeros the
                # writer reserved after them change, so a scan that reaches them drops the
                # copy and the next call reads the file again.)
                if cached is None or cached[0] != path or cached[1] > self._offset:
                    self._cache = (path, self._offset, bytes(data), trusted)
                if res.records:
                    out += res.records
                    self.last_seq = res.records[-1].seq
                    self.last_hlc = res.records[-1].hlc
                self._offset += res.end_offset
                return ReadResult(out)
            self._cache = None
            if res.records:
                out += res.records
                self.last_seq = res.records[-1].seq
                self.last_hlc = res.records[-1].hlc
            self._offset += res.end_offset
            if cut is not None and res.corruption is None and res.end_offset < len(data) and not (
                    res.torn or res.zero_tail):
                return ReadResult(out)  # stopped at records_max: the next call reads on
            if cut is not None and res.corruption is None:
                return ReadResult(out, error=TruncatedSegment(
                    f"segment is {cut} bytes but its seal says {self._seals[path].length}: records that were "
                    f"durable are gone from seq {self.last_seq + 1} on (the file was cut or replaced). Restore "
                    "it from a backup", path=path, offset=cut, master=self.name, seq=self.last_seq + 1))
            if res.corruption is not None:
                return ReadResult(out, error=res.corruption)
            if res.torn is not None:
                return ReadResult(out, torn=res.torn, torn_at=(path, self._offset))
            if not later:
                return ReadResult(out, zeros_at=(path, self._offset, res.zero_tail) if res.zero_tail else None)
            nxt = later[0]
            if nxt[0] != self.last_seq + 1:
                return ReadResult(out, error=Corruption(
                    f"gap between segments: {path} ends at seq {self.last_seq} but the next segment "
                    f"starts at seq {nxt[0]}", path=nxt[1], master=self.name, seq=self.last_seq + 1, gap=True))
            self._segment = nxt
            self._offset = 0
            if records_max is not None and len(out) >= records_max:
                return ReadResult(out)

    def _seal(self, first: int, path: str, listing: journal.Listing) -> seals.Seal | None:
        """The seal of a segment, when the listing shows one (read once, then remembered)."""
        seal = self._seals.get(path)
        if seal is None and first in listing.sealed:
            seal = seals.read_seal(path, master=self.name, key=self.key)
            if seal is not None:
                self._seals[path] = seal
        return seal

    def _check_first_record(self, segment: tuple[int, str]) -> Corruption | None:
        """Corruption when a segment's first record does not carry the seq in its name."""
        first, path = segment
        head, _size = journal.read_segment(path, 0, journal.HEADER_BYTES)
        if len(head) < journal.HEADER_BYTES:
            return None  # empty or just created: nothing to check yet
        n = journal.HEADER.unpack_from(head, 0)[0]
        data, _size = journal.read_segment(path, 0, journal.HEADER_BYTES + min(n, journal.RECORD_BYTES_MAX)
                                           + journal.HMAC_BYTES + journal.CRC_BYTES)
        res = journal.scan(data, path, 0, self.key, last_segment=True, master=self.name, records_max=1,
                           first_seq=first)
        return res.corruption

    def _report_past_seal(self, path: str, seal: seals.Seal, size: int) -> None:
        """Bytes past a seal are never read; other than zeros (space the writer had
        reserved), they are writes of a previous owner after a takeover: say so, once."""
        if path in self._past_seal_reported:
            return
        self._past_seal_reported.add(path)
        tail, _size = journal.read_segment(path, seal.length, min(size, seal.length + journal.SEGMENT_BYTES_LIMIT))
        if not journal.all_zero(tail):
            log.error("journal %s of %s: %d bytes past its seal at offset %d were written after the segment "
                      "was sealed (by a previous owner paused past its lease?); they are not part of the "
                      "journal and are never read", path, self.name, size - seal.length, seal.length)

    def rewind(self, last_seq: int, last_hlc: int) -> None:
        """Forget the position; the next read starts after `last_seq` (after a hand-back)."""
        self.last_seq = last_seq
        self.last_hlc = last_hlc
        self._segment = None
        self._offset = 0
