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
"""

from __future__ import annotations

import os
import re

from ..durable import publish_file

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


def cluster_dir(shared: str) -> str:
    return os.path.join(shared, "cluster")


def founder_path(shared: str) -> str:
    return os.path.join(shared, "cluster", "founder")


def retired_dir(shared: str) -> str:
    return os.path.join(shared, "cluster", "retired")


def retired_path(shared: str, name: str) -> str:
    return os.path.join(shared, "cluster", "retired", name)


def list_masters(shared: str) -> list[str]:
    """Names of every master folder, sorted (a listing: refreshes NFS lookups)."""
    try:
        names = os.listdir(masters_dir(shared))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if NAME_RE.match(n) and os.path.isdir(master_dir(shared, n)))


def publish(path: str, data: bytes, fault=None) -> None:
    """Atomically replace `path` with `data` (see `durable.publish_file`)."""
    publish_file(path, data, fault)


def read_small(path: str) -> bytes | None:
    """A small published file's bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
