"""Reading a master's journal incrementally, by the NFS rules.

A `JournalReader` remembers, for one master, the last seq it has read and where the next
record starts (segment and byte offset). Each `read_new()` lists the journal folder
(listing refreshes NFS lookups), reopens files by path (close-to-open consistency), reads
from the remembered offset and checks every record: gap-free seq, strictly increasing hlc,
checksums. A torn tail is "not written yet": it stops there and tries again next time. A
vanished segment (ENOENT, ESTALE: rotated away) sends it back to the listing.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from .. import codec, journal
from ..errors import Corruption
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
        segments = journal.list_segments(self.dir)
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
            # Reuse the bytes of a segment read by the previous call in chunks (recovery
            # reads a large journal records_max at a time); otherwise reopen by path.
            cached = self._cache
            if cached is not None and cached[0] == path and cached[1] <= self._offset:
                start = self._offset - cached[1]
                data = memoryview(cached[2])[start:]
                trusted = max(0, cached[3] - start)
            else:
                data = journal.read_from(path, self._offset)
                trusted = journal.trusted_prefix(data, path) if self._offset == 0 and self.key is None else 0
            want = None if records_max is None else max(1, records_max - len(out))
            res = journal.scan(data, path, 0, self.key, last_segment=not later, master=self.name,
                               base=self._offset, expect_seq=self.last_seq + 1, last_hlc=self.last_hlc,
                               trusted=trusted, records_max=want)
            if (want is not None and len(res.records) >= want and res.end_offset < len(data)
                    and not res.torn and res.corruption is None and not res.zero_tail):
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

    def rewind(self, last_seq: int, last_hlc: int) -> None:
        """Forget the position; the next read starts after `last_seq` (after a hand-back)."""
        self.last_seq = last_seq
        self.last_hlc = last_hlc
        self._segment = None
        self._offset = 0
