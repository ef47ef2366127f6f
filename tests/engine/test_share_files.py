"""Files on the share are never followed, never blocked on and read with bounds (DESIGN
invariant 9; issue 9, items 1 and 6, and the temp-file and torn-tail items of "Also").

Whatever sits where the engine expects one of its files -- a symlink (to a file outside
the share, to /dev/zero), a FIFO, a directory, a sparse file of many GiB -- is refused
with an error naming it; nothing outside the share is ever written.
"""

from __future__ import annotations

import importlib
import os
import socket

import pytest

from workers.prevalence import errors, journal, snapshot
from workers.prevalence.cluster import folder

from tests.support import open_master
from .helpers import journal_bytes, journal_dir, segments, snapshots_dir

OUTSIDE = b"precious bytes outside the share\n" * 50


def plant(path: str, kind: str, outside: str) -> None:
    """Put something that is not a regular file at `path`."""
    if kind == "symlink":
        os.symlink(outside, path)
    elif kind == "dangling-symlink":
        os.symlink(outside + ".not-yet", path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        os.mkdir(path)
    else:
        raise AssertionError(kind)


def closed_master(shared) -> int:
    """A master with one account, closed; returns its last seq."""
    m = open_master(shared, fsync="always")
    m.execute("open_account", "a", 1)
    m.execute("deposit", "a", 1)
    seq = m.seq
    m.close()
    return seq


@pytest.fixture
def outside(tmp_path):
    path = tmp_path / "outside.txt"
    path.write_bytes(OUTSIDE)
    return str(path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_something_not_a_regular_file_where_the_next_segment_goes_is_refused_and_nothing_outside_is_written(
        tmp_path, outside, kind):
    shared = tmp_path / "shared"
    seq = closed_master(shared)
    planted = os.path.join(journal_dir(shared), journal.format_segment_name(seq + 1))
    plant(planted, kind, outside)
    with pytest.raises(errors.Corruption) as err:
        open_master(shared, fsync="always")
    assert planted in str(err.value)
    assert open(outside, "rb").read() == OUTSIDE
    assert not [n for n in os.listdir(journal_dir(shared)) if ".torn-" in n]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["journal", "snapshots", "master"])
def test_a_symlinked_folder_of_the_master_is_refused_and_nothing_is_written_through_it(tmp_path, which):
    shared = tmp_path / "shared"
    closed_master(shared)
    elsewhere = tmp_path / "elsewhere"
    real = {"journal": journal_dir(shared), "snapshots": snapshots_dir(shared),
            "master": folder.master_dir(str(shared), "solo")}[which]
    if not os.path.isdir(real):
        os.makedirs(real)
    os.rename(real, elsewhere)
    os.symlink(elsewhere, real)
    before = sorted(os.listdir(elsewhere))
    with pytest.raises(errors.Corruption) as err:
        m = open_master(shared, fsync="always")
        m.execute("deposit", "a", 1)
        m.snapshot()
        m.close()
    assert real in str(err.value)
    assert sorted(os.listdir(elsewhere)) == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["symlink", "dangling-symlink", "fifo"])
def test_something_planted_at_the_temp_name_of_a_published_file_is_never_written_through(tmp_path, outside, kind):
    shared = tmp_path / "shared"
    closed_master(shared)
    # The temp names publish_file uses are predictable (host and pid): plant them all.
    mdir = folder.master_dir(str(shared), "solo")
    planted = []
    for name in ("lease", "progress"):
        path = os.path.join(mdir, f".tmp-{socket.gethostname()}-{os.getpid()}-{name}")
        plant(path, kind, outside)
        planted.append(path)
    try:
        m = open_master(shared, fsync="always")
        m.execute("deposit", "a", 1)
        m.close()
    except errors.PrevalenceError as exc:
        assert any(p in str(exc) for p in planted), exc
    assert open(outside, "rb").read() == OUTSIDE
    assert not os.path.exists(outside + ".not-yet")


@pytest.mark.timeout(60)
def test_a_symlink_at_the_name_a_torn_tail_is_set_aside_to_is_never_written_through(tmp_path, outside):
    shared = tmp_path / "shared"
    m = open_master(shared, fsync="always", journal_reserve_bytes=0)
    m.execute("open_account", "a", 1)
    m.crash()
    (_first, seg), = segments(shared)
    size = os.path.getsize(seg)
    with open(seg, "ab") as f:
        f.write(b"a torn write")
    os.symlink(outside + ".not-yet", f"{seg}.torn-{size:020d}")
    m = open_master(shared, fsync="always")
    assert m.query("balance", "a") == 1
    m.close()
    assert not os.path.exists(outside + ".not-yet")
    assert open(outside, "rb").read() == OUTSIDE


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["symlink-to-dev-zero", "fifo", "sparse-5-gib"])
def test_a_hostile_newest_snapshot_is_skipped_with_an_error_naming_it(tmp_path, kind):
    shared = tmp_path / "shared"
    m = open_master(shared)
    m.execute("open_account", "a", 1)
    m.snapshot()
    m.execute("deposit", "a", 1)
    m.close()
    planted = os.path.join(snapshots_dir(shared), snapshot.format_snapshot_name(10 ** 18))
    if kind == "symlink-to-dev-zero":
        os.symlink("/dev/zero", planted)
    elif kind == "fifo":
        os.mkfifo(planted)
    else:
        with open(planted, "wb") as f:
            f.write(snapshot.encode_snapshot(snapshot.load_snapshot(snapshot.list_snapshots(
                snapshots_dir(shared))[0][1], None), None)[:32])
            f.truncate(5 << 30)
    m = open_master(shared)
    assert m.query("balance", "a") == 2
    assert planted in (m.last_error or "")
    m.close()


# -- "Also": temp files, the torn tail's directory entry ------------------------------------

def test_temp_files_a_crash_left_in_the_masters_folders_are_removed_at_open(tmp_path):
    shared = tmp_path / "shared"
    closed_master(shared)
    left = [os.path.join(folder.master_dir(str(shared), "solo"), ".tmp-deadhost-4242-progress"),
            os.path.join(snapshots_dir(shared), ".tmp-deadhost-4242-00000000000000000001.snap"),
            os.path.join(journal_dir(shared), ".tmp-deadhost-4242-00000000000000000001.seal")]
    os.makedirs(snapshots_dir(shared), exist_ok=True)
    for path in left:
        with open(path, "wb") as f:
            f.write(b"half a file")
    m = open_master(shared)
    assert [p for p in left if os.path.exists(p)] == []
    m.close()


def test_a_set_aside_torn_tail_has_its_directory_entry_made_durable_before_the_segment_is_cut(
        tmp_path, monkeypatch):
    from workers.prevalence import durable
    shared = tmp_path / "shared"
    m = open_master(shared, fsync="always", journal_reserve_bytes=0)
    m.execute("open_account", "a", 1)
    m.crash()
    (_first, seg), = segments(shared)
    size = os.path.getsize(seg)
    with open(seg, "ab") as f:
        f.write(b"a torn write")
    aside = f"{seg}.torn-{size:020d}"
    jdir = os.path.abspath(journal_dir(shared))
    events = []
    real_fsync_dir, real_truncate, real_ftruncate = durable.fsync_dir, os.truncate, os.ftruncate

    def spy_fsync_dir(path):
        events.append(("fsync_dir", os.path.abspath(path), os.path.exists(aside)))
        real_fsync_dir(path)

    def spy_truncate(target, length):
        events.append(("truncate", length))
        (real_ftruncate if isinstance(target, int) else real_truncate)(target, length)

    monkeypatch.setattr(durable, "fsync_dir", spy_fsync_dir)
    for module in ("workers.prevalence.cluster.recovery", "workers.prevalence.writer",
                   "workers.prevalence.journal", "workers.prevalence.files"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, "fsync_dir"):
            monkeypatch.setattr(mod, "fsync_dir", spy_fsync_dir)
    monkeypatch.setattr(os, "truncate", spy_truncate)
    monkeypatch.setattr(os, "ftruncate", spy_truncate)
    m = open_master(shared, fsync="always")
    m.close()
    # Crash-safe order: the copy's directory entry is durable before the segment is cut.
    cut = events.index(("truncate", size))
    assert ("fsync_dir", jdir, True) in events[:cut], events
    assert journal_bytes(shared)[os.path.basename(aside)] == b"a torn write"
