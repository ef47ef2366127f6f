"""The shared folder: where every file lives, and the one way to publish a small file.

    <shared>/
      cluster/founder            the founding master's name (created once, O_EXCL)
      cluster/retired/<name>     a retirement: the cut (last seq that counts); operator-written
      masters/<name>/
        lease                    host, pid, boot id, heartbeat (one process per name)
        joining                  present while the master waits to be counted by every member
        journal/<first-seq>.log  append-only segments
        snapshots/<frontier>.snap
        progress                 cursors, horizon, frontier, acks, digest

Every file has exactly one writer: the master owning the directory (invariant 2), or the
operator under ``cluster/``. Small files are published by temp name (unique per host and
pid) + fsync + rename + directory fsync, so a reader sees the old or the new whole file.
Nothing on the share is followed or blocked on (`files`). On NFS every file is reopened by
path to be read, a folder is entered only once its parent's listing shows it, and a file
replaced under a reader is read again: the module docstring of `files` says what the
engine relies on from an NFS client (attribute freshness, rename, ESTALE, ``.nfs*``).

A folder under ``masters/`` is a master once it holds a ``progress`` file or a
``journal`` folder: a master publishes its progress before it writes its first record,
so a stray folder (empty, or a lease left by a first start that never got that far) is
not a member, and nothing waits for it.
"""

from __future__ import annotations

import logging
import os
import re

from .. import files
from ..durable import publish_file
from ..errors import UnsafeFile

log = logging.getLogger("prevalence.folder")
_reported: set[str] = set()  # folders already reported as unusable (reported once per process)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"master name {name!r} is invalid: use 1-64 letters, digits, '_', '.', '-', "
                         "starting with a letter or digit")
    return name


def masters_dir(shared: str) -> str:
    return os.path.join(shared, "masters")


def master_dir(shared: str, name: str) -> str:
    return os.path.join(shared, "masters", name)


def journal_dir(shared: str, name: str) -> str:
    return os.path.join(shared, "masters", name, "journal")


def snapshots_dir(shared: str, name: str) -> str:
    return os.path.join(shared, "masters", name, "snapshots")


def lease_path(shared: str, name: str) -> str:
    return os.path.join(shared, "masters", name, "lease")


def progress_path(shared: str, name: str) -> str:
    return os.path.join(shared, "masters", name, "progress")


def joining_path(shared: str, name: str) -> str:
    return os.path.join(shared, "masters", name, "joining")


def is_joining(shared: str, name: str) -> bool:
    """Whether master `name` shows its joining marker, by a listing of its folder: a lookup
    by name could answer from an NFS client's cache (a marker removed by the joiner's host
    seen for up to a minute more, or one created there not seen)."""
    try:
        return "joining" in files.list_dir(master_dir(shared, name), "master folder")
    except UnsafeFile:
        return False


def cluster_dir(shared: str) -> str:
    return os.path.join(shared, "cluster")


def founder_path(shared: str) -> str:
    return os.path.join(shared, "cluster", "founder")


def retired_dir(shared: str) -> str:
    return os.path.join(shared, "cluster", "retired")


def retired_path(shared: str, name: str) -> str:
    return os.path.join(shared, "cluster", "retired", name)


def list_masters(shared: str) -> list[str]:
    """Names of every master, sorted (listings: they refresh NFS lookups). See the module
    docstring for what makes a folder a master; a symbolic link or a file under
    ``masters/`` is never entered (reported in the log, once)."""
    out = []
    for name in files.list_dir(masters_dir(shared), "masters folder"):
        if not NAME_RE.match(name):
            continue
        path = master_dir(shared, name)
        try:
            inside = files.list_dir(path, "master folder") if files.is_dir(path, "master folder") else []
        except UnsafeFile as exc:
            if path not in _reported:
                _reported.add(path)
                log.error("%s; it is not counted as a master", exc)
            continue
        if "progress" in inside or "journal" in inside:
            out.append(name)
    out.sort()
    return out


def publish(path: str, data: bytes, fault=None) -> int:
    """Atomically replace `path` with `data` (see `durable.publish_file`); returns the
    modification time (ns) the file server stamped on it.

    Raises:
        StorageError: the disk refused (naming the file).
    """
    return publish_file(path, data, fault)


def read_small(path: str, what: str = "small file") -> bytes | None:
    """A small published file's bytes (at most `files.SMALL_FILE_BYTES_MAX`), or None when
    it does not exist.

    Raises:
        UnsafeFile: not a regular file, or larger than a small file may be.
    """
    return files.read_small(path, what)
