"""The engine on a filesystem that behaves like an NFS client and injects faults (faultfs:
tests/faultfs/faultfs.py). Every master sits behind a mount of its own (a host); the
operator's actions and `verify` use the real folder (the server).

First, that each fault is real (a test over faultfs can fail); then, for each fault, that
the engine survives it: the masters converge to `verify`'s digest, nothing acknowledged is
lost, and where it must stop it stops with an error naming the file.
"""

from __future__ import annotations

import errno
import os

import pytest

from workers.prevalence import files, retire
from workers.prevalence.cluster import folder
from workers.prevalence.errors import StorageError

from tests.support import open_member
from tests.cluster.helpers import assert_converged, sync_until_quiet

from .mount import FaultMount, FuseUnavailable, why_unavailable


@pytest.fixture
def hosts(tmp_path):
    """``hosts(n, **faults)``: n mounts of ``tmp_path/"share"`` (the server), all unmounted
    afterwards, also when the test fails."""
    reason = why_unavailable()
    if reason:
        pytest.skip(f"faultfs not run: {reason}")
    share = tmp_path / "share"
    share.mkdir()
    made: list[FaultMount] = []

    def make(n: int, **faults) -> list[FaultMount]:
        for i in range(n):
            try:
                made.append(FaultMount(share, tmp_path / f"host{len(made)}", faults).start())
            except FuseUnavailable as exc:
                pytest.skip(f"faultfs not run: {exc}")
        return made[-n:]
    make.share = share
    yield make
    while _opened:
        try:
            _opened.pop().close()
        except Exception:  # noqa: BLE001 -- teardown: a test may have closed it, or broken it on purpose
            pass
    for m in made:
        m.stop()


_opened: list = []


def open_on(host: FaultMount, name: str, **kw):
    """Open master `name` on `host` (closed by the `hosts` fixture at the end)."""
    kw.setdefault("fsync", "always")
    master = open_member(host.path, name, **kw)
    _opened.append(master)
    return master


def pair(hosts, **faults):
    h0, h1 = hosts(2, **faults)
    a = open_on(h0, "alpha")
    a.execute("open_account", "acct", 100, rid="open")
    b = open_on(h1, "beta")
    sync_until_quiet([a, b])
    assert b.joined
    return h0, h1, a, b


# -- the faults are real ------------------------------------------------------------------

def test_a_name_looked_up_before_it_existed_stays_hidden_on_that_host(hosts):
    h0, h1 = hosts(2)
    assert not os.path.exists(h0.path / "d")
    os.mkdir(h1.path / "d")
    assert not os.path.exists(h0.path / "d")          # the cached miss
    assert os.path.exists(h1.path / "d")
    assert "d" in os.listdir(h0.path)                  # a listing shows the truth, and
    assert os.path.exists(h0.path / "d")               # (default "listing" mode) drops the miss
    h0.set(negative_lookups="sticky")
    assert not os.path.exists(h0.path / "e")
    os.mkdir(h1.path / "e")
    assert "e" in os.listdir(h0.path)
    assert not os.path.exists(h0.path / "e")           # sticky: listing or not


def test_unsynced_writes_are_invisible_to_other_hosts_until_fsync(hosts):
    h0, h1 = hosts(2)
    fd = os.open(h1.path / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, b"record")
        assert (h0.path / "f").read_bytes() == b""
        os.fsync(fd)
        assert (h0.path / "f").read_bytes() == b"record"
    finally:
        os.close(fd)


def test_a_held_descriptor_misses_appends_that_a_reopen_sees_and_goes_stale_when_replaced(hosts):
    h0, h1 = hosts(2)
    (h1.path / "f").write_bytes(b"one")
    fd = os.open(h0.path / "f", os.O_RDONLY)
    try:
        with open(h1.path / "f", "ab") as f:
            f.write(b"two")
        assert os.pread(fd, 100, 0) == b"one" and os.fstat(fd).st_size == 3
        assert os.stat(h0.path / "f").st_size == 3                 # stat by path lags too
        assert (h0.path / "f").read_bytes() == b"onetwo"           # a reopen sees the append
        (h1.path / "g").write_bytes(b"new")
        os.rename(h1.path / "g", h1.path / "f")
        with pytest.raises(OSError) as exc:
            os.pread(fd, 100, 0)
        assert exc.value.errno == errno.ESTALE
    finally:
        os.close(fd)


def test_short_reads_vanishing_files_and_fsync_eio_are_injected(hosts):
    (h0,) = hosts(1, short_reads=3, vanish={"match": "/v$", "count": 1},
                  eio_fsync={"match": "/e$", "count": 1})
    (h0.path / "s").write_bytes(b"0123456789")
    fd = os.open(h0.path / "s", os.O_RDONLY)
    try:
        assert 1 <= len(os.pread(fd, 10, 0)) <= 3
    finally:
        os.close(fd)
    (h0.path / "v").write_bytes(b"x")
    with pytest.raises(FileNotFoundError):
        open(h0.path / "v", "rb")
    assert (h0.path / "v").read_bytes() == b"x"
    fd = os.open(h0.path / "e", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"lost")
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert (h0.path / "e").read_bytes() == b""          # the failed writeback lost the pages
    assert h0.stats() == {"short_read": 1, "vanish": 1, "eio_fsync": 1}


# -- the engine survives them -------------------------------------------------------------

def test_a_peers_journal_folder_made_after_a_member_looked_is_read(hosts):
    # tests/nfs found it on NFSv4.1: the cached miss outlived every listing for ~30 s.
    h0, h1 = hosts(2, negative_lookups="sticky")
    a = open_on(h0, "alpha")
    a.execute("open_account", "acct", 100, rid="open")
    b = open_on(h1, "beta")                # joining: masters/beta/ has no journal/ yet
    a.sync()                               # a reads beta: no journal there
    for _ in range(20):
        if b.joined:
            break
        b.sync()
        a.sync()
    assert b.joined
    b.execute("deposit", "acct", 5, rid="b-deposit")
    sync_until_quiet([a, b])
    assert a.status()["cursors"]["beta"] == b.seq
    assert a.outcome("b-deposit")["status"] == "ok"
    assert_converged(hosts.share, [a, b])


def test_a_retirement_is_seen_by_members_that_looked_before_the_retired_folder_existed(hosts):
    # tests/nfs found it on NFSv3 and v4.1: nothing listed cluster/, so the cached miss of
    # cluster/retired/ lasted until the directory cache expired.
    h0, h1, h2 = hosts(3)
    a = open_on(h0, "alpha")
    a.execute("open_account", "acct", 100, rid="open")
    # A cluster founded by an older release: no cluster/retired/ until the first retirement.
    if os.path.isdir(folder.retired_dir(str(hosts.share))):   # this release makes it with the cluster
        os.rmdir(folder.retired_dir(str(hosts.share)))
    b = open_on(h1, "beta")
    gone = open_on(h2, "gone")
    sync_until_quiet([a, b, gone])
    gone.close()
    a.execute("deposit", "acct", 1, rid="d1")
    for m in (a, b):
        m.sync()                           # both look for cluster/retired/: not there
    retire(str(hosts.share), "gone")       # the operator, on the server's folder
    for _ in range(3):
        a.sync()
        b.sync()
    assert all("gone" in m.status()["retired"] for m in (a, b))
    sync_until_quiet([a, b])
    assert_converged(hosts.share, [a, b])


def test_a_peers_progress_going_stale_under_a_reader_is_read_again(hosts):
    h0, h1, a, b = pair(hosts)
    stale = {"match": "/masters/alpha/progress$", "count": 2}   # two reads in a row go stale
    for i in range(10):
        a.execute("deposit", "acct", 1, rid=f"d{i}")
        a.sync()
        h1.set(estale=stale)
        b.sync()
        h1.set(estale=stale)
        b.status()
    assert h1.stats().get("estale", 0) >= 20        # status() reads it every time, sync() not always
    sync_until_quiet([a, b])
    assert_converged(hosts.share, [a, b])


def test_a_small_file_that_keeps_going_stale_is_a_storage_error_naming_it(hosts):
    h0, h1, a, b = pair(hosts)
    h1.set(estale={"match": "/masters/alpha/progress$", "count": files.STALE_REOPENS_MAX + 1})
    with pytest.raises(StorageError, match=r"progress file .*masters/alpha/progress failed: ESTALE"):
        b.status()
    b.status()                             # the fault is over: the next call reads it


def test_segments_vanishing_or_going_stale_between_listing_and_read_are_read_again(hosts):
    h0, h1, a, b = pair(hosts)
    h1.set(vanish={"match": "/masters/alpha/journal/.*\\.log$", "count": 4},
           estale={"match": "/masters/alpha/journal/.*\\.log$", "count": 4})
    for i in range(6):
        a.execute("deposit", "acct", 1, rid=f"d{i}")
        a.sync()
        b.sync()
    stats = h1.stats()
    assert stats.get("vanish") == 4 and stats.get("estale") == 4, stats
    sync_until_quiet([a, b])
    assert_converged(hosts.share, [a, b])
    assert b.query("balance", "acct") == 106


def test_short_reads_everywhere_change_nothing_in_sync_or_recovery(hosts):
    h0, h1, a, b = pair(hosts, short_reads=509)
    for i in range(20):
        (a if i % 2 else b).execute("deposit", "acct", 1, rid=f"d{i}")
        if i % 5 == 0:
            a.sync()
            b.sync()
    a.snapshot()
    sync_until_quiet([a, b])
    digest = a.status()["digest"]
    a.close()
    a = open_on(h0, "alpha")               # recovery: snapshot and journals, read 1..509 bytes at a time
    assert a.status()["digest"] == digest
    assert h0.stats()["short_read"] > 100
    sync_until_quiet([a, b])
    assert_converged(hosts.share, [a, b])


def test_fsync_eio_refuses_the_write_and_loses_nothing_acknowledged(hosts):
    h0, h1, a, b = pair(hosts)
    a.execute("deposit", "acct", 7, rid="acked")
    h0.set(eio_fsync={"match": "/masters/alpha/journal/.*\\.log$", "count": 1})
    with pytest.raises(StorageError, match=r"masters/alpha/journal/.*\.log.*EIO"):
        a.execute("deposit", "acct", 1000, rid="refused")
    with pytest.raises(StorageError):       # the journal takes nothing more until reopened
        a.execute("deposit", "acct", 1, rid="after")
    a.close()
    a = open_on(h0, "alpha")
    sync_until_quiet([a, b])
    ref = assert_converged(hosts.share, [a, b])
    for m in (a, b):
        assert m.outcome("acked")["status"] == "ok"
        assert m.outcome("refused") is None and m.outcome("after") is None
        assert m.query("balance", "acct") == 107
    assert ref["records"]["alpha"] >= 2


@pytest.mark.parametrize("fsync", ["never", "interval"])
def test_records_a_host_has_not_flushed_are_waited_for_and_then_read(hosts, fsync):
    # Under fsync=never/interval a master acknowledges before its records reach the server:
    # its peers see them only once its host writes them back (here: at close, or at the
    # interval's fsync). Until then they must wait, not fail, and then read them all.
    h0, h1 = hosts(2)
    a = open_on(h0, "alpha")
    a.execute("open_account", "acct", 100, rid="open")
    b = open_on(h1, "beta")
    sync_until_quiet([a, b])
    a.close()
    a = open_on(h0, "alpha", fsync=fsync)
    for i in range(5):
        a.execute("deposit", "acct", 1, rid=f"d{i}")
    a.sync()
    b.sync()
    if fsync == "never":                    # nothing written back yet: b has not read them
        assert b.status()["cursors"]["alpha"] < a.seq
    assert b.status()["last_error"] is None and not b.status()["peer_errors"]
    a.close()                               # the host writes back what it held
    a = open_on(h0, "alpha", fsync=fsync)
    sync_until_quiet([a, b])
    assert_converged(hosts.share, [a, b])
    for m in (a, b):
        assert m.query("balance", "acct") == 105
        assert all(m.outcome(f"d{i}")["status"] == "ok" for i in range(5))
