"""Backup: a consistent cut of the shared folder, copied elsewhere and verified.

A backup is itself a shared folder: restoring is starting masters on a copy of it (under
the same names). What it holds, per member: its newest valid snapshot, the journal
segments that any copied snapshot still needs (from the lowest seq a copied snapshot has
not applied, to the end), their seals, its progress file and its joining marker; and the
cluster's founder and retirement files. Never a lease (the restored masters claim their
names afresh), a temp file or a set-aside torn tail.

**The cut.** Files are read in an order that makes every copy agree with the files read
before it: progress files first, then snapshots, then journals. A journal only grows
(garbage collection removes only segments that every member's snapshot covers), so the
journals copied last hold every record a progress file or snapshot copied earlier speaks
of: a restored master finds all it published (no `LostRecords`). Each journal is cut at
its last complete record when it is read (the cut: one seq per master); a record being
written (a torn tail) or reserved zeros are left out. If a segment a copied snapshot needs
was collected meanwhile (a newer snapshot let garbage collection remove it), the attempt
starts over, at most `ATTEMPTS_MAX` times.

**The check.** The backup is verified twice over: `verify` on the copy gives its reference
digest, and `verify` on the source, limited to the same cut (``cuts``), must give the same
digest. Only then is the staging folder renamed to the destination:
a destination that exists is a complete, verified backup.

The share is hostile (invariant 9): every file is read through `files` (no symbolic link
followed, bounded reads) and checked as its reader checks it (snapshot and record
checksums and HMACs, seals, signed small files) before it is copied; a file that fails
stops the backup with an error naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from typing import Any, Callable

from .. import files, journal, seal as seals
from ..durable import fsync_dir, publish_file
from ..errors import BadFile, Corruption, PrevalenceError
from ..model import Model
from ..snapshot import SNAPSHOT_BYTES_MAX, decode_snapshot, list_snapshots
from . import folder, membership
from .progress import decode_progress
from .verify import verify

#: How many times a backup starts over when the folder changed under it.
ATTEMPTS_MAX = 5
#: The manifest a backup writes at its root (the cut, digests, when, from where).
MANIFEST_NAME = "backup-manifest.json"


class BackupError(PrevalenceError):
    """Raised when a backup cannot be made or does not verify (the message says why)."""


class _Changed(Exception):
    """The folder changed under an attempt (a file vanished): start over."""


Say = Callable[[str], None]


def backup(shared_dir: str, dest: str, model: Model, *, cluster_key: bytes | None = None,
           say: Say | None = None) -> dict[str, Any]:
    """Copy a consistent cut of `shared_dir` to `dest` and verify it (module docstring).

    Args:
        dest: a path that does not exist yet, or an empty folder.
        say: called with a line of progress now and then (None: silent).

    Returns the manifest: ``cuts`` (master -> last seq copied), ``digest`` (verify on
    the copy, equal to verify on the source at the cut), ``records`` (real records in the
    copy's journals),
    ``files`` and ``bytes`` copied, ``attempts``, ``source``, ``created_at``.

    Raises:
        BackupError: `dest` is not empty, a file on the share fails its checks, the folder
            kept changing, or the copy does not verify (nothing is left at `dest`).
    """
    say = say or (lambda line: None)
    shared_dir, dest = os.path.abspath(shared_dir), os.path.abspath(dest)
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.path.islink(dest) or os.listdir(dest)):
        raise BackupError(f"backup destination {dest} exists and is not an empty folder; "
                          "name a new one")
    if not files.is_dir(folder.masters_dir(shared_dir), "masters folder"):
        raise BackupError(f"{shared_dir} holds no masters/ folder: not a shared folder of this cluster")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(dest)}.partial-{socket.gethostname()}-{os.getpid()}")
    last_change = ""
    for attempt in range(1, ATTEMPTS_MAX + 1):
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        try:
            manifest = _copy_cut(shared_dir, staging, cluster_key, say)
        except _Changed as exc:
            last_change = str(exc)
            say(f"the folder changed while it was copied ({exc}); starting over "
                f"(attempt {attempt + 1} of {ATTEMPTS_MAX})")
            continue
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            manifest.update(_check(shared_dir, staging, model, cluster_key, manifest["cuts"], say))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        manifest.update(attempts=attempt, source=shared_dir, created_at=time.time())
        publish_file(os.path.join(staging, MANIFEST_NAME),
                     json.dumps(manifest, indent=2, sort_keys=True).encode())
        if os.path.isdir(dest):
            os.rmdir(dest)  # empty (checked above)
        os.rename(staging, dest)
        fsync_dir(parent)
        say(f"backup complete: {dest} (digest {manifest['digest']})")
        return manifest
    shutil.rmtree(staging, ignore_errors=True)
    raise BackupError(f"the folder {shared_dir} changed under {ATTEMPTS_MAX} attempts in a row (segments "
                      f"collected while they were copied; the last: {last_change}); try again, or snapshot "
                      "less often meanwhile")


# -- one attempt --------------------------------------------------------------------------

def _copy_cut(shared: str, out: str, key: bytes | None, say: Say) -> dict[str, Any]:
    """Copy progress, snapshots, then journals (module docstring: the cut)."""
    stats = {"files": 0, "bytes": 0}
    masters = folder.list_masters(shared)
    if not masters:
        raise BackupError(f"no master in {shared}: nothing to back up")
    say(f"masters: {', '.join(masters)}")
    # 1. Cluster files: founder and retirements (each checked as its reader checks it).
    _copy_cluster_files(shared, out, key, stats)
    # 2. Progress files and joining markers, before anything they speak of.
    retired = membership.read_retired(shared, key)
    joining: set[str] = set()
    for m in masters:
        os.makedirs(folder.master_dir(out, m))
        path = folder.progress_path(shared, m)
        data = files.read_small(path, "progress file")
        if data is not None:
            decode_progress(data, path, key, master=m)
            _write(folder.progress_path(out, m), data, stats)
        marker = files.read_small(folder.joining_path(shared, m), "joining marker")
        if marker is not None:
            joining.add(m)
            _write(folder.joining_path(out, m), marker, stats)
    # 3. Each member's newest valid snapshot; what it has applied sets the journal floor,
    # as garbage collection sees it: a retired master never starts again, and a joiner
    # that has no snapshot of its own joins again from a member's snapshot.
    floors: dict[str, int] = {m: -1 for m in masters}  # -1: no copied snapshot spoke yet
    for m in masters:
        body = _copy_newest_snapshot(shared, out, m, key, stats, say)
        if m in retired or (body is None and m in joining):
            continue
        if body is None:
            floors = {p: 0 for p in masters}  # a member without one replays every journal from seq 1
            continue
        for p in masters:
            applied = int(body.cursors.get(p, 0))
            floors[p] = applied if floors[p] < 0 else min(floors[p], applied)
    floors = {p: max(0, f) for p, f in floors.items()}
    # 4. Journals, last: each from the first segment a copied snapshot needs, cut at its
    # last complete record.
    cuts = {m: _copy_journal(shared, out, m, floors[m], key, stats, say) for m in masters}
    for path in (out, folder.masters_dir(out)):
        fsync_dir(path)
    return {"cuts": cuts, "floors": floors, "files": stats["files"], "bytes": stats["bytes"],
            "masters": masters}


def _copy_cluster_files(shared: str, out: str, key: bytes | None, stats: dict) -> None:
    os.makedirs(folder.masters_dir(out))
    founder = files.read_small(folder.founder_path(shared), "founder file")
    retired_names = files.list_dir(folder.retired_dir(shared), "retirements folder")
    if founder is None and not retired_names:
        return
    os.makedirs(folder.retired_dir(out))
    if founder is not None:
        membership.read_founder(shared, key)  # checks it (BadFile names it)
        _write(folder.founder_path(out), founder, stats)
    _retired, bad = membership.read_retirements(shared, key)
    if bad:
        raise BackupError(f"a retirement file fails its checks: {bad[0]}")
    for name in retired_names:
        if name.startswith(".") or not folder.NAME_RE.match(name):
            continue
        data = files.read_small(folder.retired_path(shared, name), "retirement file")
        if data is not None:
            _write(folder.retired_path(out, name), data, stats)


def _copy_newest_snapshot(shared: str, out: str, m: str, key: bytes | None, stats: dict, say: Say):
    """Copy master `m`'s newest snapshot that passes its checks; return its body (None: none)."""
    snapshots = list_snapshots(folder.snapshots_dir(shared, m))
    for frontier, path in reversed(snapshots):
        try:
            data, _size = files.read_file(path, bytes_max=SNAPSHOT_BYTES_MAX, what="snapshot")
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed since the listing: an older one, or a newer one comes next time
        except OSError as exc:
            raise _Changed(f"{path}: {exc}") from None
        try:
            body = decode_snapshot(data, path, key)
        except Corruption as exc:
            say(f"{m}: skipping a damaged snapshot: {exc}")
            continue
        if body.master != m or body.frontier != frontier:
            raise BackupError(f"snapshot {path} is about master {body.master!r} at frontier {body.frontier}, "
                              "not what its folder and name say (copied from elsewhere?)")
        os.makedirs(folder.snapshots_dir(out, m), exist_ok=True)
        _write(os.path.join(folder.snapshots_dir(out, m), os.path.basename(path)), data, stats)
        say(f"{m}: snapshot {os.path.basename(path)} ({len(data):,} bytes)")
        return body
    return None


def _copy_journal(shared: str, out: str, m: str, floor: int, key: bytes | None, stats: dict,
                  say: Say) -> int:
    """Copy the segments of `m` holding seqs after `floor`; return the last seq copied."""
    listing = journal.list_journal(folder.journal_dir(shared, m))
    segments = listing.segments
    if not segments:
        return floor
    needed = [i for i, (first, _path) in enumerate(segments)
              if i == len(segments) - 1 or segments[i + 1][0] - 1 > floor]
    start = needed[0]
    if segments[start][0] > floor + 1:
        raise _Changed(f"{m}'s journal starts at seq {segments[start][0]}, but a copied snapshot needs "
                       f"seq {floor + 1}: collected meanwhile")
    os.makedirs(folder.journal_dir(out, m))
    last_seq = segments[start][0] - 1
    chosen = segments[start:]
    started = time.monotonic()
    for n, (first, path) in enumerate(chosen, start=1):
        is_last = n == len(chosen)
        try:
            data, _size = journal.read_segment(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise _Changed(f"{path} vanished") from exc
        except OSError as exc:  # ESTALE: replaced or deleted on NFS
            raise _Changed(f"{path}: {exc}") from None
        seal = seals.read_seal(path, master=m, key=key) if first in listing.sealed else None
        trusted = seals.trusted_prefix(data, seal)
        if seal is not None and not trusted:
            raise BackupError(f"segment {path} does not match its seal (length {seal.length}, crc "
                              f"{seal.crc32:#010x}); not copied. Check the file (`prevalence verify`)")
        if seal is not None:
            data = data[:trusted]
        result = journal.scan(data, path, 0, key, last_segment=is_last, master=m, expect_seq=first,
                              first_seq=first, sealed=seal is not None, trusted=trusted)
        if result.corruption is not None:
            raise BackupError(f"not backed up: {result.corruption}")
        end = result.end_offset
        if result.records:
            last_seq = result.records[-1].seq
        elif not is_last:
            raise BackupError(f"segment {path} holds no complete record but later segments exist")
        _write(os.path.join(folder.journal_dir(out, m), os.path.basename(path)), data[:end], stats)
        if seal is not None:
            seal_data = files.read_small(journal.seal_path(path), "seal")
            _write(journal.seal_path(os.path.join(folder.journal_dir(out, m), os.path.basename(path))),
                   seal_data, stats)
        if time.monotonic() - started > 2.0 or is_last:
            say(f"{m}: journal segment {n} of {len(chosen)} copied (up to seq {last_seq}; "
                f"{stats['bytes']:,} bytes so far)")
            started = time.monotonic()
    return last_seq


def _write(path: str, data: bytes, stats: dict) -> None:
    publish_file(path, data)
    stats["files"] += 1
    stats["bytes"] += len(data)


# -- the check ----------------------------------------------------------------------------

def _check(shared: str, staging: str, model: Model, key: bytes | None, cuts: dict[str, int],
           say: Say) -> dict[str, Any]:
    """Verify the copy, and the source at the same cut; they must agree."""
    say("verifying the copy (replaying it) ...")
    copy = verify(staging, model, cluster_key=key, say=lambda line: say(f"copy: {line}"))
    if copy["errors"] or not copy.get("deterministic", True):
        raise BackupError(f"the copy does not verify: {copy['errors'] or 'replays disagree'}")
    say(f"copy: digest {copy['digest']}, {copy['total']} records; verifying the source at the same cut ...")
    try:
        source = verify(shared, model, cluster_key=key, cuts=cuts, say=lambda line: say(f"source: {line}"))
    except Corruption as exc:
        raise BackupError(f"the source could not be verified at the cut (collected meanwhile?): {exc}; "
                          "try again") from None
    if source["errors"]:
        raise BackupError(f"the source at the cut has errors: {source['errors']}")
    # The two may start from different bases (the source may still hold journals from seq
    # 1, the copy starts from a snapshot), so record counts differ; the digests may not.
    if source["digest"] != copy["digest"]:
        raise BackupError(f"the copy differs from the source at the cut: copy digest {copy['digest']} "
                          f"(from {copy['base']}), source {source['digest']} (from {source['base']})")
    return {"digest": copy["digest"], "records": copy["records"], "total": copy["total"],
            "base": copy["base"], "source_base": source["base"]}


def read_manifest(path: str) -> dict[str, Any] | None:
    """The manifest of the backup at `path` (None when it has none)."""
    data = files.read_small(os.path.join(path, MANIFEST_NAME), "backup manifest")
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise BadFile(f"backup manifest is not JSON: {exc}", path=os.path.join(path, MANIFEST_NAME)) from None


__all__ = ["backup", "BackupError", "read_manifest", "MANIFEST_NAME"]
