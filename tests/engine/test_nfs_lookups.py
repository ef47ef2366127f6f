"""What the engine does on the share that an NFS client's caches punish (DESIGN section 4, the
comments of `workers.prevalence.files`), checked on a local folder by watching the calls:

* a folder is never looked up by name while it is missing: a failed lookup leaves a
  negative entry in an NFS client's cache that hides the folder, once another host makes
  it, for up to a minute (found by tests/nfs on NFSv4.1 for a peer's ``journal/`` and on
  v3 and v4.1 for ``cluster/retired/``);
* a small file that goes stale under a reader (``ESTALE``: on NFSv3, a peer renamed a new
  one over it) is read again by path instead of failing `sync()` / `status()`.

The same behaviour on a filesystem that really caches negative lookups and answers ESTALE
is in tests/faultfs; on real NFS clients in tests/nfs/test_nfs_rules.py.
"""

from __future__ import annotations

import errno
import os

import pytest

from workers.prevalence import files
from workers.prevalence.cluster import folder
from workers.prevalence.errors import StorageError

from tests.support import open_member


@pytest.fixture
def lookups(monkeypatch):
    """Every path the engine opens or stats by name, in order (listings included)."""
    seen: list[str] = []
    real_open, real_lstat, real_stat = os.open, os.lstat, os.stat

    def spy(real):
        def call(path, *args, **kw):
            if isinstance(path, (str, bytes, os.PathLike)):
                seen.append(os.fsdecode(path))
            return real(path, *args, **kw)
        return call
    monkeypatch.setattr(os, "open", spy(real_open))
    monkeypatch.setattr(os, "lstat", spy(real_lstat))
    monkeypatch.setattr(os, "stat", spy(real_stat))
    return seen


def _joined_pair(tmp_path, **a_kw):
    """Members a (holding account x = 10) and b, once b has joined."""
    a = open_member(tmp_path, "a", **a_kw)
    a.execute("open_account", "x", 10)
    b = open_member(tmp_path, "b")
    while not b.joined:
        a.sync()
        b.sync()
    return a, b


def test_a_joiners_journal_folder_is_never_looked_up_by_name_before_it_exists(tmp_path, lookups):
    a = open_member(tmp_path, "a")
    a.execute("open_account", "x", 10)
    b = open_member(tmp_path, "b")        # joining: masters/b/ without journal/ yet
    b_journal = folder.journal_dir(str(tmp_path), "b")
    assert not os.path.exists(b_journal)
    lookups.clear()
    a.sync()                               # a reads b: finds no journal
    a.status()
    assert b_journal not in lookups, "a looked masters/b/journal up by name while it was missing"
    while not b.joined:
        b.sync()
        a.sync()
    b.execute("deposit", "x", 5)
    a.sync()
    assert a.query("balance", "x") == 15
    assert b_journal in lookups            # once listed in masters/b/, it is entered by name


def test_the_retired_folder_is_made_with_the_cluster(tmp_path):
    open_member(tmp_path, "a")
    assert os.path.isdir(folder.retired_dir(str(tmp_path)))


def test_a_cluster_without_a_retired_folder_is_never_looked_up_by_name_until_it_exists(tmp_path, lookups):
    # A cluster founded by an older release has no cluster/retired/ until the first retirement.
    a, b = _joined_pair(tmp_path)
    os.rmdir(folder.retired_dir(str(tmp_path)))
    files._known_dirs.discard(folder.retired_dir(str(tmp_path)))  # as in a master started after it
    lookups.clear()
    a.sync()
    b.sync()
    assert folder.retired_dir(str(tmp_path)) not in lookups
    b.close()
    from workers.prevalence import retire
    retire(str(tmp_path), "b", force=True)
    a.sync()
    assert "b" in a.status()["retired"]


def stale_then(monkeypatch, times: int):
    """The read of a small file (`files._read_opened`) raising ESTALE `times` times, then
    reading for real."""
    real = files._read_opened
    calls = {"n": 0}

    def read_file(path, **kw):
        calls["n"] += 1
        if calls["n"] <= times:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), path)
        return real(path, **kw)
    monkeypatch.setattr(files, "_read_opened", read_file)
    return calls


def test_a_small_file_that_goes_stale_while_read_is_read_again_by_path(tmp_path, monkeypatch):
    path = tmp_path / "progress"
    path.write_bytes(b"new whole file")
    calls = stale_then(monkeypatch, files.STALE_REOPENS_MAX)
    assert files.read_small(str(path), "progress file") == b"new whole file"
    assert calls["n"] == files.STALE_REOPENS_MAX + 1


def test_a_small_file_that_keeps_going_stale_is_a_storage_error_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "progress"
    path.write_bytes(b"x")
    stale_then(monkeypatch, files.STALE_REOPENS_MAX + 1)
    with pytest.raises(StorageError, match=r"progress file .*progress failed: ESTALE"):
        files.read_small(str(path), "progress file")


def test_a_peer_progress_going_stale_during_sync_and_status_is_not_an_error(tmp_path, monkeypatch):
    a, b = _joined_pair(tmp_path)
    real = files._read_opened
    a_progress = folder.progress_path(str(tmp_path), "a")
    stale = {"left": 0}

    def read_file(path, **kw):
        if path == a_progress and stale["left"]:
            stale["left"] -= 1
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), path)
        return real(path, **kw)
    monkeypatch.setattr(files, "_read_opened", read_file)
    for _ in range(3):
        a.execute("deposit", "x", 1)
        a.sync()
        stale["left"] = 2
        b.sync()
        stale["left"] = 2
        assert b.status()["cursors"]["a"] >= 1
    assert stale["left"] < 2    # the stale reads did happen


def test_a_peers_joining_marker_is_read_from_a_listing_not_looked_up_by_name(tmp_path, lookups):
    """Garbage collection and status ask whether a peer is still joining. A lookup of its
    marker by name answers from an NFS client's cache: a marker the joiner removed stays
    visible for up to a minute (and collection would then skip that member's snapshots),
    one it created stays invisible. They list the peer's folder instead."""
    from workers.prevalence.cluster.progress import read_all_progress

    a, b = _joined_pair(tmp_path, segment_bytes_max=4096)
    for i in range(200):                   # several segments of a: collection has work
        a.execute("deposit", "x", 1)
    marker = folder.joining_path(str(tmp_path), "b")
    lookups.clear()
    for _ in range(3):
        a.sync()
        b.sync()
    assert len(os.listdir(folder.journal_dir(str(tmp_path), "a"))) >= 2
    assert read_all_progress(str(tmp_path))["b"]["joining"] is False
    assert marker not in lookups, "the joining marker of b was looked up by name"
    open(marker, "w").close()              # as a joining member shows it
    assert read_all_progress(str(tmp_path))["b"]["joining"] is True
    a.close()
    b.close()
