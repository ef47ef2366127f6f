"""Deferred sync: a commit's fsync runs in the kernel while the caller goes on, and nothing
of the commit is revealed until `settle()` saw it finish (``Master(deferred_sync=True)``).

The kill -9 cases (killed before the sync starts, while it is in flight, after it) are in
test_crash.py; the Celery tier's use of it in tests/celery/test_results_backend.py.
"""

from __future__ import annotations

import errno
import os

import pytest

from workers.models.ledger import model as ledger
from workers.prevalence import verify
from workers.prevalence.durable import AsyncDataSync
from workers.prevalence.errors import StorageError

from tests.support import open_master

AIO = AsyncDataSync.open()
needs_aio = pytest.mark.skipif(AIO is None, reason="no Linux AIO data sync on this machine")


@needs_aio
def test_the_kernel_data_sync_completes_and_a_bad_descriptor_is_refused_at_start(tmp_path):
    aio = AsyncDataSync.open()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"record", 0)
        assert aio.start(fd) is True and aio.in_flight
        with pytest.raises(RuntimeError, match="in flight"):
            aio.start(fd)
        aio.wait()
        assert not aio.in_flight
        aio.wait()  # nothing in flight: returns at once
    finally:
        os.close(fd)
    # A closed descriptor: the kernel refuses the submission, so the caller syncs inline
    # (and gets the real error from fdatasync there).
    assert aio.start(fd) is False and not aio.in_flight
    aio.close()
    aio.close()


def _deferred(tmp_path, **kw):
    return open_master(tmp_path, fsync="always", deferred_sync=True, **kw)


READERS = {
    "query": lambda m: m.query("balance", "a"),
    "outcome": lambda m: m.outcome("d1"),
    "digest": lambda m: m.digest(),
    "status": lambda m: m.status(),
    "sync": lambda m: m.sync(),
    "snapshot": lambda m: m.snapshot(),
    "execute with a known request id": lambda m: m.execute("deposit", "a", 5, rid="d1"),
    "execute": lambda m: m.execute("deposit", "a", 1),
    "execute_many": lambda m: m.execute_many([("deposit", ["a", 1], None)]),
    "close": lambda m: m.close(),
}


@needs_aio
@pytest.mark.parametrize("reader", list(READERS))
def test_a_deferred_commit_is_pending_until_settled_and_every_other_call_settles_first(tmp_path, reader):
    m = _deferred(tmp_path)
    m.execute("open_account", "a", 0)
    m.settle()
    settled = []
    real_settle = m.writer.settle

    def spy():
        settled.append(m.writer.syncing)
        real_settle()

    m.writer.settle = spy
    assert m.execute("deposit", "a", 5, rid="d1") == 5
    assert m.writer.syncing, "the sync should still be pending: execute returned before it"
    READERS[reader](m)
    # The call waited for the pending sync (the spy saw it pending) before anything else.
    assert settled[:1] == [True]
    assert not m.writer.syncing or reader in ("execute", "execute_many")
    if not m.closed:
        m.settle()
        assert not m.writer.syncing
        m.close()
    m = open_master(tmp_path, fsync="always")
    assert m.outcome("d1")["status"] == "ok"
    assert m.digest() == verify(str(tmp_path), ledger)["digest"]
    m.close()


@needs_aio
def test_deferred_commits_recover_like_inline_ones_across_batches_rejections_and_rolls(tmp_path):
    from workers.prevalence.errors import Rejected

    m = _deferred(tmp_path, segment_bytes_max=400)
    m.execute("open_account", "a", 10)
    m.execute_many([("open_account", ["b", 0], "ob"), ("transfer", ["a", "b", 4], "t1")])
    with pytest.raises(Rejected):
        m.execute("withdraw", "b", 100, rid="overdraft")
    for i in range(30):
        m.execute("deposit", "b", 1, rid=f"d{i}")
    m.settle()
    balances, digest = m.query("balances"), m.digest()
    m.close()
    m = open_master(tmp_path, fsync="always")
    assert (m.query("balances"), m.digest()) == (balances, digest) == ({"a": 6, "b": 34}, digest)
    assert m.outcome("overdraft")["status"] == "rejected"
    assert verify(str(tmp_path), ledger)["digest"] == digest
    m.close()


@needs_aio
def test_a_failed_deferred_sync_closes_the_master_which_then_reveals_nothing(tmp_path, monkeypatch):
    m = _deferred(tmp_path)
    m.execute("open_account", "a", 0)
    m.settle()

    def eio(self):
        self.in_flight = False
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(AsyncDataSync, "wait", eio)
    m.execute("deposit", "a", 5, rid="unknown")  # applied in memory, sync in flight
    with pytest.raises(StorageError, match=r"EIO.*closed itself"):
        m.settle()
    # The live state holds a commit whose durability is unknown: nothing reads it.
    for call in (lambda: m.query("balance", "a"), lambda: m.outcome("unknown"), m.digest, m.settle,
                 lambda: m.execute("deposit", "a", 1)):
        with pytest.raises(StorageError, match="closed itself"):
            call()
    assert m.closed and "closed itself" in m.last_error
    monkeypatch.undo()
    # It released its name: reopening (here, in the same process) recovers from the disk,
    # where the record may or may not be; nothing else is.
    m = open_master(tmp_path, fsync="always")
    assert m.query("balance", "a") in (0, 5)
    assert m.digest() == verify(str(tmp_path), ledger)["digest"]
    m.close()


def test_without_kernel_support_a_deferred_master_syncs_inline(tmp_path, monkeypatch):
    monkeypatch.setattr(AsyncDataSync, "open", classmethod(lambda cls: None))
    synced = []
    real = os.fdatasync if hasattr(os, "fdatasync") else os.fsync
    name = "fdatasync" if hasattr(os, "fdatasync") else "fsync"
    monkeypatch.setattr(os, name, lambda fd: (synced.append(fd), real(fd))[1])
    m = _deferred(tmp_path)
    m.execute("open_account", "a", 0)
    before = len(synced)
    m.execute("deposit", "a", 1)
    assert len(synced) == before + 1 and not m.writer.syncing  # synced before returning
    m.close()


def test_deferred_sync_is_ignored_unless_every_commit_is_synced(tmp_path):
    m = open_master(tmp_path, fsync="never", deferred_sync=True)
    assert m.deferred_sync is False
    m.execute("open_account", "a", 0)
    assert not m.writer.syncing
    m.close()


@needs_aio
def test_a_kernel_that_refuses_the_async_sync_gets_inline_syncs_from_then_on(tmp_path, monkeypatch):
    submitted = []
    monkeypatch.setattr(AsyncDataSync, "start", lambda self, fd: submitted.append(fd) or False)
    m = _deferred(tmp_path)
    for i in range(3):
        m.execute("open_account", f"a{i}", 0)
        assert not m.writer.syncing
    assert len(submitted) == 1  # asked once; inline ever after
    m.close()
    m = open_master(tmp_path, fsync="always")
    assert m.query("balances") == {"a0": 0, "a1": 0, "a2": 0}
    m.close()
