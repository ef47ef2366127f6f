"""Durability: making bytes survive a crash (data sync, directory sync, atomic publish).

Every file of the shared folder has one writer. Journal segments grow in place and are
made durable with `sync_data`; every other file (snapshots, progress, seals, leases) is
published whole with `publish_file`, so a reader sees the old file or the new one,
never a part (DESIGN §4: temp name unique per host and pid + fsync + rename + directory
fsync).
"""

from __future__ import annotations

import os
import socket


def publish_file(path: str, data: bytes, fault=None) -> None:
    """Atomically replace `path` with `data`: temp + fsync + rename + directory fsync.

    The temp name is unique per host and pid, so two writers never share one; readers
    see the old whole file or the new whole file, never a part.
    """
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".tmp-{socket.gethostname()}-{os.getpid()}-{os.path.basename(path)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if fault:
        fault("before-publish-rename")
    os.replace(tmp, path)
    fsync_dir(directory)


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
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
