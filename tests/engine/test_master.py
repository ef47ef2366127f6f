"""One master alone: commit, query, snapshot, recover; idempotency; durability modes."""

from __future__ import annotations

import os

import pytest

from workers.prevalence import verify
from workers.prevalence.errors import InvariantViolation, LeaseHeld, Rejected
from workers.models.ledger import model as ledger

from tests.support import open_master
from .helpers import journal_bytes, records_in, segments


def _busy_history(m, n=20):
    m.execute("open_account", "a", 1000)
    m.execute("open_account", "b", 0)
    for i in range(n):
        try:
            m.execute("transfer", "a", "b", 37 * (i % 5), rid=f"t{i}")
        except Rejected:
            pass


def test_committed_state_survives_close_and_reopen_with_an_identical_digest(tmp_path):
    m = open_master(tmp_path, fsync="always")
    _busy_history(m)
    m.snapshot()
    m.execute("deposit", "b", 5, rid="after-snapshot")
    balances, digest, seq = m.query("balances"), m.digest(), m.seq
    assert m.query("total") == 1005
    m.close()
    m = open_master(tmp_path, fsync="always")
    assert (m.query("balances"), m.digest(), m.seq) == (balances, digest, seq)
    assert m.outcome("after-snapshot")["status"] == "ok"
    assert verify(str(tmp_path), ledger)["digest"] == digest
    m.close()


def test_close_is_idempotent_and_use_after_close_stops_loudly(tmp_path):
    m = open_master(tmp_path)
    m.close()
    m.close()
    with pytest.raises(InvariantViolation):
        m.execute("open_account", "a", 1)
    with pytest.raises(InvariantViolation):
        m.snapshot()


def test_a_second_open_of_a_live_master_name_is_refused(tmp_path):
    m = open_master(tmp_path)
    with pytest.raises(LeaseHeld):
        open_master(tmp_path)
    m.close()
    open_master(tmp_path).close()  # released on close


def test_execute_many_commits_a_batch_with_one_write_and_one_fsync(tmp_path):
    hits = []
    m = open_master(tmp_path, fsync="always", fault=hits.append)
    m.execute("open_account", "a", 0)
    hits.clear()
    outs = m.execute_many([("deposit", ["a", 1], f"d{i}") for i in range(100)])
    assert [h for h in hits if h in ("after-write", "after-fsync")] == ["after-write", "after-fsync"]
    assert [o["value"] for o in outs] == list(range(1, 101))
    assert m.seq == 101
    m.close()
    assert [r.seq for r in records_in(segments(tmp_path)[0][1])] == list(range(1, 102))


def test_second_execute_with_the_same_request_id_returns_the_first_outcome_and_journals_nothing(tmp_path):
    m = open_master(tmp_path)
    m.execute("open_account", "a", 10)
    assert m.execute("deposit", "a", 5, rid="pay-1") == 15
    seq, before = m.seq, journal_bytes(tmp_path)
    assert m.execute("deposit", "a", 5, rid="pay-1") == 15
    assert m.execute("deposit", "a", 999, rid="pay-1") == 15  # the first outcome, whatever the args
    outs = m.execute_many([("deposit", ["a", 5], "pay-1")])
    assert outs[0]["value"] == 15 and outs[0]["duplicate_of"] == "solo:2"
    assert (m.seq, journal_bytes(tmp_path)) == (seq, before)
    assert m.query("balance", "a") == 15
    m.close()
    m = open_master(tmp_path)  # and after recovery
    assert m.execute("deposit", "a", 5, rid="pay-1") == 15
    assert m.seq == seq
    m.close()


def test_the_same_request_id_twice_in_one_batch_takes_effect_once(tmp_path):
    m = open_master(tmp_path)
    m.execute("open_account", "a", 0)
    outs = m.execute_many([("deposit", ["a", 4], "x"), ("deposit", ["a", 4], "x"), ("deposit", ["a", 1], None)])
    assert [o["value"] for o in outs] == [4, 4, 5]
    assert m.seq == 3
    m.close()


@pytest.mark.parametrize("mode", ["interval", "never"])
def test_relaxed_fsync_modes_commit_and_recover_after_close(tmp_path, mode):
    m = open_master(tmp_path, fsync=mode, fsync_interval_ms=5)
    _busy_history(m, 50)
    balances, digest = m.query("balances"), m.digest()
    m.close()
    m = open_master(tmp_path, fsync=mode)
    assert (m.query("balances"), m.digest()) == (balances, digest)
    m.close()


def test_unknown_fsync_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fsync"):
        open_master(tmp_path, fsync="sometimes")


def test_small_segments_roll_and_recover_in_order(tmp_path):
    m = open_master(tmp_path, segment_bytes_max=256)
    _busy_history(m, 40)
    balances, digest, seq = m.query("balances"), m.digest(), m.seq
    m.close()
    segs = segments(tmp_path)
    assert len(segs) > 3
    for (first, path), (nxt, _p) in zip(segs, segs[1:]):
        recs = records_in(path)
        assert recs[0].seq == first and recs[-1].seq == nxt - 1
        assert os.path.getsize(path) <= 256 or len(recs) == 1
    m = open_master(tmp_path, segment_bytes_max=256)
    assert (m.query("balances"), m.digest(), m.seq) == (balances, digest, seq)
    m.close()


def test_snapshot_and_sync_collect_segments_and_recovery_still_matches_verify(tmp_path):
    m = open_master(tmp_path, segment_bytes_max=256, gc_grace_s=0)
    _busy_history(m, 40)
    m.snapshot()
    m.sync()
    m.execute("deposit", "a", 1)
    assert segments(tmp_path)[0][0] > 1  # covered segments are gone
    digest = m.digest()
    m.close()
    m = open_master(tmp_path, segment_bytes_max=256)
    assert m.digest() == digest
    ref = verify(str(tmp_path), ledger)
    assert ref["digest"] == digest and ref["base"].startswith("snapshot")
    m.close()


def test_disk_full_on_write_refuses_the_transaction_and_applies_nothing(tmp_path, monkeypatch):
    import errno
    from workers.prevalence.errors import StorageError
    m = open_master(tmp_path, fsync="always")
    m.execute("open_account", "a", 0)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    from workers.prevalence import writer
    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", full)
        # A commit of one record is framed and written by `write_frame` (in C when built).
        patch.setattr(writer, "write_frame", lambda fd, payload, offset, version: full(fd, payload, offset))
        with pytest.raises(StorageError, match="ENOSPC"):
            m.execute("deposit", "a", 5, rid="refused")
    assert (m.seq, m.query("balance", "a"), m.outcome("refused")) == (1, 0, None)
    # The journal takes nothing more until a restart has recovered it.
    with pytest.raises(StorageError):
        m.execute("deposit", "a", 1, rid="later")
    m.close()
    m = open_master(tmp_path)
    assert (m.seq, m.query("balance", "a")) == (1, 0)
    m.execute("deposit", "a", 1, rid="later")  # space is back
    assert m.digest() == verify(str(tmp_path), ledger)["digest"]
    m.close()


def test_failed_fsync_stops_further_writes_and_leaves_a_journal_that_reopens(tmp_path, monkeypatch):
    import errno
    from workers.prevalence.errors import StorageError
    m = open_master(tmp_path, fsync="always")
    m.execute("open_account", "a", 0)
    name = "fdatasync" if hasattr(os, "fdatasync") else "fsync"  # what durable.sync_data calls
    real_fsync = getattr(os, name)

    def eio_once(fd):
        monkeypatch.setattr(os, name, real_fsync)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, name, eio_once)
    with pytest.raises(StorageError, match="EIO"):
        m.execute("deposit", "a", 5, rid="unacknowledged")
    assert m.query("balance", "a") == 0
    refused = False
    try:
        m.execute("deposit", "a", 1, rid="next")
    except StorageError:
        refused = True
    m.close()
    m = open_master(tmp_path)  # the unacknowledged record may or may not be there; nothing else
    assert m.query("balance", "a") in (0, 5)
    assert m.digest() == verify(str(tmp_path), ledger)["digest"]
    m.close()
    assert refused, "the writer took another write after a failed fsync"


def _write_lease(shared, **fields):
    import json
    import socket
    from workers.prevalence.cluster import folder, lease
    body = {"host": socket.gethostname(), "boot_id": lease.boot_id(), "master": "solo", "heartbeat": 0.0}
    body.update(fields)
    os.makedirs(os.path.dirname(folder.lease_path(str(shared), "solo")), exist_ok=True)
    folder.publish(folder.lease_path(str(shared), "solo"), json.dumps(body).encode())


def test_lease_naming_a_live_process_on_this_host_is_held(tmp_path):
    from workers.prevalence.cluster import lease
    parent = os.getppid()
    _write_lease(tmp_path, pid=parent, pid_start=lease.pid_start(parent))
    with pytest.raises(LeaseHeld, match=str(parent)):
        open_master(tmp_path)


def test_lease_naming_a_reused_pid_is_stale_at_once(tmp_path):
    # The pid is alive, but it started at another time: a new process that reused the pid.
    _write_lease(tmp_path, pid=os.getppid(), pid_start="1")
    open_master(tmp_path).close()


def test_status_names_a_holder_down_as_soon_as_its_process_on_this_host_is_gone(tmp_path):
    import subprocess
    import sys
    from workers.prevalence.cluster import lease
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    started = lease.pid_start(child.pid)
    _write_lease(tmp_path, pid=child.pid, pid_start=started, heartbeat=1000.0)
    assert lease.holder_state(str(tmp_path), "solo", now_s=1000.0)["lease"] == "alive"
    child.kill()
    child.wait()
    # Same heartbeat, same clock: only the process is gone, and that alone names it down.
    state = lease.holder_state(str(tmp_path), "solo", now_s=1000.0)
    assert state["lease"] == "down" and state["pid"] == child.pid
    assert f"pid {child.pid}" in state["why"] and "is gone" in state["why"]


def _stamp_lease(shared, mtime_s):
    """Set the lease file's modification time: the file server's stamp of its last write."""
    from workers.prevalence.cluster import folder
    os.utime(folder.lease_path(str(shared), "solo"), (mtime_s, mtime_s))


def test_status_names_a_holder_on_another_host_down_once_a_heartbeat_is_missed(tmp_path):
    from workers.prevalence.cluster import lease
    _write_lease(tmp_path, host="elsewhere", pid=4242, heartbeat=1000.0)
    _stamp_lease(tmp_path, 1000.0)  # written at 1000 s by the holder's clock and the server's alike
    period_s = lease.heartbeat_period_s(lease.LEASE_TTL_S_DEFAULT)
    due_s = 1000.0 + period_s + lease.HEARTBEAT_SLACK_S
    assert lease.holder_state(str(tmp_path), "solo", now_s=due_s)["lease"] == "alive"
    late = lease.holder_state(str(tmp_path), "solo", now_s=due_s + 0.5)
    assert late["lease"] == "down" and "no heartbeat from pid 4242 on host 'elsewhere'" in late["why"]
    # Well before the lease TTL: the lease is not stale for a claim yet.
    assert due_s + 0.5 < 1000.0 + lease.LEASE_TTL_S_DEFAULT


def test_status_keeps_a_holder_alive_whose_clock_or_file_servers_clock_is_behind(tmp_path):
    # Another host whose wall clock runs 5 s behind this one's: its heartbeat, written just
    # now, reads 5 s old here, past one period plus the slack of a short TTL. The file
    # server stamped the lease just now: the holder is alive.
    from workers.prevalence.cluster import lease
    ttl_s = 3.0
    limit_s = lease.heartbeat_period_s(ttl_s) + lease.HEARTBEAT_SLACK_S
    assert limit_s < 5.0
    _write_lease(tmp_path, host="elsewhere", pid=4242, heartbeat=995.0)
    _stamp_lease(tmp_path, 1000.0)
    state = lease.holder_state(str(tmp_path), "solo", lease_ttl_s=ttl_s, now_s=1000.0)
    assert state["lease"] == "alive" and state["heartbeat_age_s"] == 0.0, state
    # The file server's clock behind instead, the holder's right: alive too.
    _write_lease(tmp_path, host="elsewhere", pid=4242, heartbeat=1000.0)
    _stamp_lease(tmp_path, 995.0)
    assert lease.holder_state(str(tmp_path), "solo", lease_ttl_s=ttl_s, now_s=1000.0)["lease"] == "alive"
    # Stale by both: down.
    late = lease.holder_state(str(tmp_path), "solo", lease_ttl_s=ttl_s, now_s=1000.0 + limit_s + 0.5)
    assert late["lease"] == "down" and "no heartbeat from pid 4242" in late["why"]
    # A heartbeat more than a TTL in the future (a wrong clock, a forged file) is not
    # believed: a holder the file server last heard from long ago is down.
    _write_lease(tmp_path, host="elsewhere", pid=4242, heartbeat=1000.0 + 10 * ttl_s)
    _stamp_lease(tmp_path, 1000.0)
    forged = lease.holder_state(str(tmp_path), "solo", lease_ttl_s=ttl_s, now_s=1000.0 + limit_s + 0.5)
    assert forged["lease"] == "down", forged


def test_status_reads_a_released_or_damaged_lease_without_raising(tmp_path):
    from workers.prevalence.cluster import folder, lease
    assert lease.holder_state(str(tmp_path), "solo")["lease"] == "released"
    os.makedirs(os.path.dirname(folder.lease_path(str(tmp_path), "solo")), exist_ok=True)
    folder.publish(folder.lease_path(str(tmp_path), "solo"), b"garbage")
    state = lease.holder_state(str(tmp_path), "solo")
    assert state["lease"] == "unreadable" and "lease" in state["why"]


def test_master_whose_lease_was_taken_over_stops_taking_writes(tmp_path):
    from workers.prevalence.errors import NotReady
    m = open_master(tmp_path)
    m.execute("open_account", "a", 1)
    _write_lease(tmp_path, host="elsewhere", pid=4242, heartbeat=9e9)  # paused past the TTL; taken over
    m.lease.heartbeat()
    with pytest.raises(NotReady, match="taken over"):
        m.execute("deposit", "a", 1)
    assert m.query("balance", "a") == 1
    m.close()


def test_master_whose_lease_was_taken_over_writes_nothing_more_in_its_folder(tmp_path):
    from workers.prevalence.cluster import folder
    m = open_master(tmp_path)
    m.execute("open_account", "a", 1)
    _write_lease(tmp_path, host="elsewhere", pid=4242, heartbeat=9e9)
    m.lease.heartbeat()
    progress = folder.progress_path(str(tmp_path), "solo")
    with open(progress, "wb") as f:
        f.write(b'{"master": "solo", "seq": 7}')  # what the new owner published
    before = journal_bytes(tmp_path)
    m.sync()
    m.close()
    with open(progress, "rb") as f:
        assert f.read() == b'{"master": "solo", "seq": 7}'
    assert journal_bytes(tmp_path) == before


def test_segment_that_cannot_be_created_stops_the_journal_without_touching_other_files(tmp_path, monkeypatch):
    from workers.prevalence.errors import StorageError
    m = open_master(tmp_path, fsync="always", segment_bytes_max=150)
    m.execute("open_account", "a", 0)
    real_open = os.open

    def no_new_segments(path, flags, *args):
        if str(path).endswith(".log") and flags & os.O_CREAT:
            raise OSError(28, "No space left on device")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_new_segments)
    with pytest.raises(StorageError):
        for _ in range(10):  # until the segment is full and must roll
            m.execute("deposit", "a", 1)
    bystander = tmp_path / "bystander"
    bystander.write_bytes(b"")
    fd = real_open(str(bystander), os.O_RDWR)  # likely the number the journal closed
    try:
        with pytest.raises(StorageError):
            m.execute("deposit", "a", 1)
        assert os.fstat(fd).st_ino == bystander.stat().st_ino, "the journal closed a file that is not its own"
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    monkeypatch.undo()
    m.close()


def test_failed_background_fsync_stops_further_writes(tmp_path, monkeypatch):
    import errno
    import threading
    import time
    from workers.prevalence.errors import StorageError
    m = open_master(tmp_path, fsync="interval", fsync_interval_ms=20)
    m.execute("open_account", "a", 0)
    name = "fdatasync" if hasattr(os, "fdatasync") else "fsync"  # what durable.sync_data calls
    real_fsync = getattr(os, name)
    failed = threading.Event()

    def eio_in_background(fd):
        me = threading.current_thread()
        background = me is getattr(m.writer, "_flusher", None) or me.name == "journal-fsync"
        if background and not failed.is_set():
            failed.set()
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, name, eio_in_background)
    deadline = time.monotonic() + 10
    while not failed.is_set() and time.monotonic() < deadline:
        m.execute("deposit", "a", 1)  # keeps the journal dirty until the flusher runs
        failed.wait(0.01)
    assert failed.is_set(), "the background fsync never ran"
    with pytest.raises(StorageError):
        m.execute("deposit", "a", 1)
    monkeypatch.undo()
    m.close()


def test_a_full_disk_while_extending_the_reservation_refuses_cleanly_and_the_journal_goes_on(tmp_path, monkeypatch):
    import errno
    from workers.prevalence.errors import StorageError
    m = open_master(tmp_path, fsync="always", journal_reserve_bytes=4096)
    m.execute("open_account", "a", 0)
    real_pwrite = os.pwrite
    full = {"on": True}

    def pwrite(fd, data, offset):
        if full["on"] and not any(data):  # the zeros of the reservation
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    for i in range(200):  # past the reserved 4 KiB, so the writer must extend
        try:
            m.execute("deposit", "a", 1, rid=f"d{i}")
        except StorageError as exc:
            assert "nothing of the record was written" in str(exc) and "ENOSPC" in str(exc)
            refused = i
            break
    else:
        raise AssertionError("the reservation was never extended")
    assert m.query("balance", "a") == refused and m.outcome(f"d{refused}") is None
    full["on"] = False  # space freed: the same master takes writes again
    assert m.execute("deposit", "a", 1, rid=f"d{refused}") == refused + 1
    m.close()
    m = open_master(tmp_path)
    assert m.query("balance", "a") == refused + 1 and m.seq == refused + 2
    m.close()
