"""Durability: making bytes survive a crash (data sync, directory sync, atomic publish).

Every file of the shared folder has one writer. Journal segments grow in place and are
made durable with `sync_data`; every other file (snapshots, progress, seals, leases) is
published whole with `publish_file`, so a reader sees the old file or the new one,
never a part (DESIGN §4: temp name unique per host and pid + fsync + rename + directory
fsync). Two are written otherwise: ``cluster/founder``, created once and exclusively
(O_EXCL), and the copy of a torn tail that recovery sets aside.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import sys

from . import files
from .errors import StorageError, UnsafeFile


def publish_file(path: str, data: bytes, fault=None, *, fault_name: str = "publish") -> int:
    """Atomically replace `path` with `data`: temp + fsync + rename + directory fsync.

    The temp name is unique per host and pid, so two writers never share one; readers
    see the old whole file or the new whole file, never a part. This is the one publish
    path of the engine: small files and snapshots alike. The temp file is created afresh
    (``O_CREAT | O_EXCL | O_NOFOLLOW``, after removing whatever a crash of an earlier
    process with this pid left under its name), so nothing planted there is written
    through; the rename replaces a link at `path` itself, never its target.

    Args:
        path: the final name; its directory must exist.
        data: the whole new content.
        fault: test hook, called with ``mid-<fault_name>-write`` (half the temp file
            written), ``before-<fault_name>-rename`` (temp file complete and fsynced) and
            ``after-<fault_name>-rename`` (renamed, directory not yet fsynced).
        fault_name: the word that names this file's fault points: "publish" (small files)
            or "snapshot".

    Returns:
        The file's modification time in ns, as the file server stamped it (read from the
        synced file: `cluster.shareclock` takes it as the shared folder's clock).

    Raises:
        StorageError: the disk refused (ENOSPC, EIO, a missing folder ...); the temp file
            is removed. UnsafeFile: a directory sits at the temp name.
    """
    directory = os.path.dirname(path)
    tmp = files.temp_name(directory, socket.gethostname(), os.getpid(), os.path.basename(path))
    try:
        try:
            os.unlink(tmp)  # left by a crash of an earlier process that had this pid
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise UnsafeFile("a directory sits at this temp name; remove it", path=tmp) from None
        fd = files.create_file(tmp, what="temp file")
        try:
            view = memoryview(data)
            if fault:  # in two halves, so that a test can crash with half the temp file written
                half = len(data) // 2
                _write_all(fd, view[:half])
                fault(f"mid-{fault_name}-write")
                view = view[half:]
            _write_all(fd, view)
            os.fsync(fd)
            mtime_ns = os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
        if fault:
            fault(f"before-{fault_name}-rename")
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise storage_error("publishing", path, exc) from exc
    if fault:
        fault(f"after-{fault_name}-rename")
    try:
        fsync_dir(directory)
    except OSError as exc:
        raise storage_error("publishing (directory sync)", path, exc) from exc
    return mtime_ns


def storage_error(action: str, path: str, exc: OSError) -> StorageError:
    """The `StorageError` for a refused operation on `path`, naming the errno."""
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else type(exc).__name__
    return StorageError(f"{action} {path} failed: {name} ({exc.strerror or exc}). Check the disk and the "
                        "mount (free space, quota, permissions), then retry")


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # best effort: the next open of this master removes temp files anyway


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def sync_data(fd: int) -> None:
    """Make a journal segment's written bytes durable: ``fdatasync`` where the platform has it.

    A commit needs the data and the file's new length on stable storage, which is what
    fdatasync guarantees; it skips timestamps, which saves a metadata write on every
    commit (SQLite makes the same choice). The directory entry of a new segment is made
    durable separately (`fsync_dir`). Looked up at call time so tests can inject faults.
    """
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # macOS and Windows have no fdatasync
        os.fsync(fd)


def fsync_dir(path: str) -> None:
    """Make a directory's entries durable (a new, renamed or removed file survives a crash)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Iocb(ctypes.Structure):
    """struct iocb of <linux/aio_abi.h> (little-endian layout)."""
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32),
                ("aio_rw_flags", ctypes.c_int32), ("aio_lio_opcode", ctypes.c_uint16),
                ("aio_reqprio", ctypes.c_int16), ("aio_fildes", ctypes.c_uint32),
                ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64),
                ("aio_flags", ctypes.c_uint32), ("aio_resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):
    """struct io_event of <linux/aio_abi.h>."""
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class AsyncDataSync:
    """A data sync that runs in the kernel while the caller goes on: Linux AIO
    ``IOCB_CMD_FDSYNC`` (Linux 4.18+), through ctypes and the raw system calls.

    Wrappers of Linux AIO that can do this exist on PyPI (``libaio``, over the system's
    libaio library, has an FDSYNC mode; ``linux-aio`` and ``caio`` too). The engine uses
    none: one operation on one descriptor takes a few dozen lines here, which is less to
    carry than another dependency (and, for ``libaio``, a system library) on every host.

    Why: a Celery worker spends a few hundred microseconds of its own (result encoding, a
    Redis read) between a task's return and the publication of its result, about as long
    as a commit's sync takes on a local disk. Started right after the write and waited for
    just before the result is published (`Master.settle`), the sync hides in that time. A
    Python thread cannot do this: it would need the GIL, which the worker holds while it
    works, before it could even start the sync.

    One sync in flight at a time: `start`, then `wait`. `open()` returns None where there is
    no such thing (another OS or CPU, a seccomp filter, ``fs.aio-max-nr`` exhausted): the
    caller then syncs inline. The context belongs to this process (not fork-safe).
    """

    #: io_setup, io_submit, io_getevents, io_destroy
    _NR = {"x86_64": (206, 209, 208, 207), "aarch64": (0, 2, 4, 1)}
    _FDSYNC = 3

    def __init__(self, syscall, numbers: tuple[int, int, int, int], ctx: ctypes.c_ulong) -> None:
        self._syscall = syscall
        self._nr_submit, self._nr_getevents, self._nr_destroy = (ctypes.c_long(n) for n in numbers[1:])
        self._ctx: ctypes.c_ulong | None = ctx
        self._iocb = _Iocb(aio_lio_opcode=self._FDSYNC)
        self._iocbs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._iocb))
        self._event = _IoEvent()
        self._event_ref = ctypes.byref(self._event)
        self._one = ctypes.c_long(1)
        self.in_flight = False

    @classmethod
    def open(cls) -> "AsyncDataSync | None":
        numbers = cls._NR.get(platform.machine())
        if numbers is None or sys.byteorder != "little" or ctypes.sizeof(_Iocb) != 64:
            return None
        try:
            syscall = ctypes.CDLL(None, use_errno=True).syscall
        except (OSError, AttributeError):
            return None
        syscall.restype = ctypes.c_long
        ctx = ctypes.c_ulong(0)
        if syscall(ctypes.c_long(numbers[0]), ctypes.c_long(1), ctypes.byref(ctx)) < 0:
            return None
        return cls(syscall, numbers, ctx)

    def start(self, fd: int) -> bool:
        """Start syncing `fd`'s data; False if the kernel would not take it (sync inline then)."""
        if self.in_flight or self._ctx is None:
            raise RuntimeError("AsyncDataSync.start: a sync is in flight, or the context is closed")
        self._iocb.aio_fildes = fd
        if self._syscall(self._nr_submit, self._ctx, self._one, self._iocbs) != 1:
            return False
        self.in_flight = True
        return True

    def wait(self) -> None:
        """Wait for the sync that `start` began; raise OSError if it failed."""
        if not self.in_flight:
            return
        while self._syscall(self._nr_getevents, self._ctx, self._one, self._one, self._event_ref, None) != 1:
            err = ctypes.get_errno()
            if err != errno.EINTR:  # EINTR: a signal (the worker's SIGTERM, say); still running
                self.in_flight = False
                raise OSError(err or errno.EIO, f"io_getevents: {os.strerror(err or errno.EIO)}")
        self.in_flight = False
        if self._event.res < 0:
            raise OSError(-self._event.res, os.strerror(-self._event.res))

    def close(self) -> None:
        """Release the kernel context (the kernel waits for a sync still in flight)."""
        if self._ctx is not None:
            self._syscall(self._nr_destroy, self._ctx)
            self._ctx = None
            self.in_flight = False
