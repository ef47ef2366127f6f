"""The journal writer: appends framed records to one master's journal, durably.

One writer per journal directory (the lease guarantees it). It tracks its own offset and
writes with ``pwrite`` (never relying on ``O_APPEND``, which is not atomic across NFS
clients), makes each commit durable per the fsync mode before the caller acknowledges
it, rolls segments past `segment_bytes_max` (publishing each finished segment's seal)
and, on a local disk, keeps space reserved ahead of its offset (see `journal`). A commit
may also leave its sync running in the kernel (``append(wait=False)``) for the caller to
`settle` before it tells anyone. After a failed write or sync it refuses every later
append: what reached the disk is unknown until a restart recovers the journal.

It never appends to a file it did not create: every writer starts a new segment
(``O_CREAT | O_EXCL``: a file already there -- planted, or created by another owner of
the name -- is refused, never written into). Its `guard` runs before every write and
again once the write is durable, before the caller may acknowledge it: the master's
lease check (a zombie owner writes and acknowledges nothing, DESIGN invariant 10).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Callable

from . import files
from .durable import AsyncDataSync, fsync_dir, sync_data
from .errors import BadArguments, InvariantViolation, PrevalenceError, StorageError
from .journal import (APPEND_BYTES_MAX, CRC_BYTES, FORMAT_VERSION, FSYNC_INTERVAL_MS_DEFAULT, FSYNC_MODES,
                      HEADER_BYTES, RECORD_BYTES_MAX, SEGMENT_BYTES_MAX_DEFAULT, SEGMENT_BYTES_MAX_LIMIT,
                      format_segment_name, frame, seal_path)
from .seal import segment_crc, write_seal
from .tracked import write_frame

log = logging.getLogger("prevalence.journal")

FRAME_OVERHEAD = HEADER_BYTES + CRC_BYTES  # a frame without a key: header, payload, CRC

#: A commit's sync that takes longer than this is logged as a warning (etcd warns at 1 s:
#: on NFS a slow sync is the first sign of trouble on the server or the network).
SLOW_SYNC_WARN_S = 1.0

#: Bytes of zeros the writer keeps ahead of its offset on a local disk (see `journal`).
RESERVE_BYTES_DEFAULT = 256 * 1024
#: Filesystem types (``/proc/self/mountinfo``) on which the writer reserves nothing.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs",
                                 "lustre", "gpfs", "afs", "beegfs", "fuse.sshfs", "fuse.glusterfs",
                                 "fuse.ceph", "fuse.s3fs"})


def filesystem_type(path: str, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem holding `path` (Linux ``/proc/self/mountinfo``, or the
    text of one given as `mountinfo`), or None when it cannot be told."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mountinfo = f.read()
        except OSError:
            return None
    lines = mountinfo.splitlines()
    real = os.path.realpath(path)
    best, kind = "", None
    for line in lines:
        # <id> <parent> <major:minor> <root> <mount point> <options> [optional...] - <type> ...
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, right.split()[0]
    return kind


def on_network_filesystem(path: str) -> bool:
    """True when `path` is on NFS or another network filesystem (or the type is unknown
    because ``/proc`` is missing: then the writer plays safe and reserves nothing)."""
    kind = filesystem_type(path)
    return kind is None or kind in NETWORK_FILESYSTEMS or kind.startswith("nfs")


class _NothingWritten(StorageError):
    """The disk refused the reservation ahead of a record: nothing of it was written."""


def _storage_error(action: str, path: str, exc: OSError) -> StorageError:
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    return StorageError(f"{action} failed on {path}: {name} ({exc.strerror}). The record was "
                        "not acknowledged; check the disk/mount and restart the master")


class JournalWriter:
    """The only writer of one master's journal directory.

    Args:
        journal_dir: the master's ``journal/`` folder.
        next_seq: the seq the next record will carry; the writer's first segment is
            named for it (created here: never a file that exists already).
        master: the journal's master, named in the seals.
        key: the cluster key the seals are signed with (None: unsigned).
        fsync: "always" (each commit is on stable storage before it is acknowledged),
            "interval" (acknowledged commits may be lost for at most `fsync_interval_ms`
            after a power loss or OS crash; a process crash loses nothing), or "never"
            (durability left to the OS page cache: survives a process crash, not power loss).
        segment_bytes_max: roll to a new segment once the current one passes this size
            (at most `journal.SEGMENT_BYTES_MAX_LIMIT`).
        reserve_bytes: zeros kept written ahead of the offset (module docstring); None =
            `RESERVE_BYTES_DEFAULT` on a local filesystem, 0 on a network one.
        guard: called before every write and once it is durable (before the caller may
            acknowledge it); raises to refuse. After it refused a write that reached the
            file, the writer takes nothing more.
        guard_window: optional fast path of `guard` (the master's lease): an object with
            ``lost`` (None while held), ``valid_until_s`` and ``clock_s()``. While ``lost``
            is None and ``clock_s() < valid_until_s`` the guard would return at once, so
            the writer tests that inline and calls `guard` only otherwise (two calls less
            per commit). The test is the guard's own first line: nothing is skipped.
        fault: test hook, called with a point name ("before-write", "after-write", ...)
            at each step.
    """

    def __init__(self, journal_dir: str, next_seq: int, *, master: str = "", key: bytes | None = None,
                 fsync: str = "always", fsync_interval_ms: int = FSYNC_INTERVAL_MS_DEFAULT,
                 segment_bytes_max: int = SEGMENT_BYTES_MAX_DEFAULT, reserve_bytes: int | None = None,
                 guard: Callable[[], None] | None = None, guard_window=None, fault=None):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, got {fsync!r}")
        if reserve_bytes is not None and reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be >= 0, got {reserve_bytes}")
        if not 0 < segment_bytes_max <= SEGMENT_BYTES_MAX_LIMIT:
            raise ValueError(f"segment_bytes_max must be in 1..{SEGMENT_BYTES_MAX_LIMIT}, got {segment_bytes_max}")
        self.journal_dir = journal_dir
        self.master = master
        self.key = key
        self.fsync_mode = fsync
        self.fsync_interval_s = fsync_interval_ms / 1000.0
        self.segment_bytes_max = segment_bytes_max
        self.next_seq = next_seq
        self._guard = guard or (lambda: None)
        self._window = guard_window if guard is not None else None
        self._fault = fault or (lambda point: None)
        self._fault_on = fault is not None
        self._lock = threading.Lock()
        self._dirty = False
        self._last_fsync = time.monotonic()
        self._closed = False
        self._failed: str | None = None  # set when a write or fsync failed: no more appends
        self.syncing = False  # a commit's sync started by append(wait=False), not waited for yet
        self._sync_started = 0.0
        #: Called with the seconds each commit's sync took (metrics); None = nobody asks.
        self.on_sync = None
        self._aio: AsyncDataSync | None | bool = None  # opened at the first deferred commit
        files.make_dirs(journal_dir, what="journal folder")
        if reserve_bytes is None:
            reserve_bytes = 0 if on_network_filesystem(journal_dir) else RESERVE_BYTES_DEFAULT
        self.reserve_bytes = reserve_bytes
        self._open_new_segment(next_seq)
        self._flusher = None
        if fsync == "interval":
            self._flusher = threading.Thread(target=self._flush_loop, name="journal-fsync", daemon=True)
            self._flusher.start()

    @property
    def fd(self) -> int:
        """The descriptor of the current segment (-1 once closed). Read-only: for tests and
        diagnostics; everything written goes through `append`."""
        return self._fd

    def _open_new_segment(self, first_seq: int) -> None:
        self.segment_first = first_seq
        self.path = os.path.join(self.journal_dir, format_segment_name(first_seq))
        try:
            # O_EXCL: never a file that is already there, whoever put it there.
            self._fd, _st = files.open_file(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, what="journal segment")
            self._fault("segment-created")
            fsync_dir(self.journal_dir)
        except FileExistsError as exc:
            raise StorageError(f"creating segment {self.path} failed: a file is already there (planted, or "
                               "created by another process that took this master over). Nothing was written "
                               "into it; no record was acknowledged. Look at it, remove it if it is not this "
                               "master's, and restart the master") from exc
        except OSError as exc:
            raise _storage_error("creating segment", self.path, exc) from exc
        self.offset = 0
        self._reserved = 0  # the file's length: zeros from offset up to here are reserved

    def append(self, payloads: list[bytes], key: bytes | None, count: int | None = None,
               batch: bool = False, wait: bool = True) -> None:
        """Write framed payloads (already encoded records, in seq order) durably per mode.

        With `batch`, each payload is an encoded array of records (framed as a batch);
        `count` is then the number of records they hold.

        With ``wait=False`` (fsync "always" only) the sync is started in the kernel and the
        call returns before it completes: `settle()` must be called before anything of
        these records is revealed. Every other method settles first.

        Raises StorageError when the disk refuses; the records are then not acknowledged
        and the master must not apply them.
        """
        if self.syncing:
            self.settle()
        if self._closed or self._failed is not None:  # one test on the write path for both
            self._refuse_append()
        if key or batch or len(payloads) != 1:
            data = b"".join([frame(p, key, batch) for p in payloads])
            written = len(data)
            if written > APPEND_BYTES_MAX:
                raise BadArguments(f"a write of {written} bytes is more than the {APPEND_BYTES_MAX} one append "
                                   "may hold (journal.APPEND_BYTES_MAX): split the batch. Nothing was written")
            if count is None:
                count = len(payloads)
        else:
            # The commit of one record: framed and written in one call (`write_frame`
            # writes the bytes `frame(one, None)` makes).
            one = payloads[0]
            written = len(one) + FRAME_OVERHEAD
            if not FRAME_OVERHEAD < written <= FRAME_OVERHEAD + RECORD_BYTES_MAX:
                frame(one, None)  # raises, naming the size
            data = None
            count = 1
        # Nothing is written by an owner that may have lost its name (`guard`, its fast path
        # inlined: see `guard_window`).
        window = self._window
        if window is None or window.lost is not None or window.clock_s() >= window.valid_until_s:
            self._guard()
        with self._lock:
            try:
                # Attributes read once into locals: this is the write path of every commit.
                offset = self.offset
                end = offset + written
                if offset > 0 and end > self.segment_bytes_max:
                    self._roll()
                    offset, end = 0, written  # a new segment starts empty
                if end > self._reserved:
                    if self.reserve_bytes:
                        self._reserve(end)
                    else:
                        self._reserved = end
                fault_on = self._fault_on
                if fault_on:
                    self._fault("before-write")
                if data is None:
                    done = write_frame(self._fd, one, offset, FORMAT_VERSION)
                else:
                    done = os.pwrite(self._fd, data, offset)
                if done != written:  # a full disk, usually: refuse like any failed write
                    raise OSError(errno.ENOSPC, f"short write: {done} of {written} bytes")
                if fault_on:
                    self._fault("after-write")
                self.offset = end
                self.next_seq += count
                mode = self.fsync_mode
                if mode == "never":
                    pass  # durability left to the page cache: nothing to do
                elif mode == "always":
                    started = time.perf_counter()
                    if wait or not self._start_sync():
                        sync_data(self._fd)
                        self._synced(started)
                        if fault_on:
                            self._fault("after-fsync")
                    else:
                        self._sync_started = started
                else:
                    self._dirty = True
                    if time.monotonic() - self._last_fsync >= self.fsync_interval_s:
                        self._fsync_locked()
            except OSError as exc:
                # What reached the disk is unknown now: refuse everything until a restart
                # recovers the journal (a torn tail is set aside; a whole record stays).
                err = _storage_error("appending", self.path, exc)
                self._failed = str(err)
                raise err from exc
            except _NothingWritten:
                raise  # refused before the record was written: the journal stays usable
            except StorageError as exc:  # a segment could not be created while rolling
                self._failed = str(exc)
                raise
        if not self.syncing:
            # The guard again, now that the write is durable (per the mode) and before the
            # caller may acknowledge it. A refusal here leaves a record in the file that
            # nobody acknowledged: the writer takes nothing more.
            if window is None or window.lost is not None or window.clock_s() >= window.valid_until_s:
                try:
                    self._guard()
                except PrevalenceError as exc:
                    self._failed = f"the write was not acknowledged: {exc}"
                    raise

    def _refuse_append(self) -> None:
        """Raise why `append` takes nothing: the journal is closed, or an earlier write failed."""
        if self._closed:
            raise InvariantViolation("append on a closed journal")
        raise StorageError(f"journal {self.path} refused an earlier write ({self._failed}); it takes no "
                           "more records until the master restarts and recovers")

    def _start_sync(self) -> bool:
        """Start the commit's sync in the kernel; False where that is not possible."""
        if self._aio is None:
            self._aio = AsyncDataSync.open() or False
        if not self._aio:
            return False
        if self._aio.start(self._fd):
            self.syncing = True
            return True
        # The kernel refused (older than 4.18: EINVAL, or out of resources): sync inline
        # from now on rather than fail a system call per commit.
        self._aio.close()
        self._aio = False
        return False

    def settle(self) -> None:
        """Wait for the sync a deferred commit (``append(wait=False)``) started.

        Raises StorageError if it failed: what reached the disk is unknown, so the journal
        takes nothing more (as after any failed sync) until a restart recovers it.
        """
        if not self.syncing:
            return
        try:
            self._aio.wait()  # an interrupt (KeyboardInterrupt...) leaves it pending
        except OSError as exc:
            self.syncing = False
            err = _storage_error("syncing", self.path, exc)
            self._failed = str(err)
            raise err from exc
        self.syncing = False
        self._synced(self._sync_started)
        if self._fault_on:
            self._fault("after-fsync")
        try:
            self._guard()  # before the deferred commit may be acknowledged (see `append`)
        except PrevalenceError as exc:
            self._failed = f"the write was not acknowledged: {exc}"
            raise

    def _synced(self, started: float) -> None:
        """A commit's sync finished: report its duration, and warn when it was slow."""
        took_s = time.perf_counter() - started
        if took_s > SLOW_SYNC_WARN_S:
            log.warning("journal %s: syncing a commit took %.3f s (more than %.1f s): the disk or the "
                        "NFS server is slow; writes wait for it", self.path, took_s, SLOW_SYNC_WARN_S)
        if self.on_sync is not None:
            self.on_sync(took_s)

    def _roll(self) -> None:
        """Close the current segment durably, seal it and start the next one at next_seq."""
        self._fault("before-roll")
        self._drop_reservation()
        sync_data(self._fd)
        self._seal()
        fd, self._fd = self._fd, -1  # never touch a closed descriptor number again
        os.close(fd)
        self._fault("mid-roll")
        self._open_new_segment(self.next_seq)
        self._fault("after-roll")

    def _reserve(self, end: int) -> None:
        """Write zeros from the reserved end up to past `end`, before the record that
        needs them: when the disk is full this fails with nothing of the record written,
        so the append is refused cleanly and the journal stays usable. (The commit's sync
        makes the new length durable with the record.)"""
        start = max(self._reserved, self.offset)
        stop = max(end, min(end + self.reserve_bytes, self.segment_bytes_max))
        zeros = bytes(stop - start)
        try:
            done = os.pwrite(self._fd, zeros, start)
            if done != len(zeros):
                raise OSError(errno.ENOSPC, f"short write: {done} of {len(zeros)} bytes")
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            raise _NothingWritten(f"extending journal {self.path} to {stop} bytes failed: {name} "
                               f"({exc.strerror}); nothing of the record was written and it was not "
                               "acknowledged. Free space on the disk, then retry") from exc
        self._reserved = stop

    def _drop_reservation(self) -> None:
        """Cut the zeros after the last record: a finished segment ends with its last record."""
        if self._reserved > self.offset:
            os.ftruncate(self._fd, self.offset)
            self._reserved = self.offset

    def _fsync_locked(self) -> None:
        started = time.perf_counter()
        sync_data(self._fd)
        self._synced(started)
        self._dirty = False
        self._last_fsync = time.monotonic()

    def _flush_loop(self) -> None:
        while not self._closed:
            time.sleep(self.fsync_interval_s / 2)
            with self._lock:
                if self._dirty and not self._closed:
                    try:
                        self._fsync_locked()
                    except OSError as exc:
                        # Records acknowledged since the last good fsync may be lost: say so,
                        # and take no more until a restart recovers the journal.
                        err = _storage_error("background fsync", self.path, exc)
                        self._failed = str(err)
                        log.error("%s", err)

    def flush(self) -> None:
        """Force everything written so far to stable storage, whatever the mode."""
        self.settle()
        with self._lock:
            try:
                self._fsync_locked()
            except OSError as exc:
                raise _storage_error("fsync", self.path, exc) from exc

    def close(self, *, seal: bool = True) -> None:
        """Flush and close; truncate the reservation and publish the segment's seal unless
        `seal` is False (the folder was taken over: then only flush)."""
        if self._closed:
            return
        try:
            self.settle()
        except StorageError:
            pass  # recorded in _failed: the file is then closed without a sync or a seal
        if self._aio:
            self._aio.close()
        with self._lock:
            self._closed = True
            try:
                if self._fd >= 0:
                    try:
                        if self._failed is None:
                            # Without `seal` the folder may have a new owner already: leave
                            # the file alone (its seal, if any, is the new owner's).
                            if seal:
                                self._drop_reservation()
                            sync_data(self._fd)  # even under fsync=never: a clean close leaves nothing pending
                            if seal and self.offset:
                                self._seal()
                    finally:
                        fd, self._fd = self._fd, -1  # never touch a closed descriptor number again
                        os.close(fd)
            except OSError as exc:
                raise _storage_error("closing", self.path, exc) from exc

    def taken_over(self) -> str | None:
        """Why the segment this writer writes is no longer its own, or None: another process
        sealed it (a new owner of the name) or removed it (or its folder). Costs a listing
        of the journal folder (which also refreshes NFS lookups) and an fstat."""
        with self._lock:
            if self._closed or self._fd < 0:
                return None
            try:
                links = os.fstat(self._fd).st_nlink
            except OSError as exc:  # ESTALE on NFS: removed by another host
                return f"its journal segment {self.path} cannot be checked ({exc}): removed by another process?"
            if links == 0:
                return f"its journal segment {self.path} was removed by another process"
            names = files.list_dir(self.journal_dir, "journal folder")
            if os.path.basename(seal_path(self.path)) in names:
                return (f"its journal segment {self.path} was sealed by another process: a new owner took "
                        f"master {self.master!r} over (writes acknowledged after the seal are lost)")
        return None

    def abandon(self) -> None:
        """Tests: drop the journal as a kill -9 would. The descriptor is closed without a
        sync, a truncation of the reservation or a seal; afterwards `append` refuses and
        `close` does nothing."""
        if self._aio:
            self._aio.close()
        self._closed = True
        try:
            os.close(self._fd)
        except OSError:
            pass

    def _seal(self) -> None:
        """Publish the seal of the current segment: where it ends (its durable length) and
        the CRC-32 of its bytes, computed here from the file, not on the write path."""
        write_seal(self.path, self.offset, segment_crc(self._fd, self.offset, self.path), master=self.master,
                   key=self.key)
