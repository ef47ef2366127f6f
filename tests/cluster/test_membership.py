"""Leases (one process per name), garbage collection, lost records, load with fast syncs."""

import os
import subprocess
import sys
import threading
import time

import pytest

from workers.prevalence import journal
from workers.prevalence.cluster import folder
from workers.prevalence.errors import LeaseHeld, LostRecords

from tests.support import open_member
from .helpers import assert_converged, sync_until_quiet

pytestmark = pytest.mark.faultfs  # also with every master behind a faultfs host (tests/faultfs)


def test_second_process_claiming_a_live_master_name_refuses_to_start(tmp_path):
    a = open_member(tmp_path, "alpha")
    code = ("import sys; from workers.models.ledger import model; from workers.prevalence import Master\n"
            "from workers.prevalence.errors import LeaseHeld\n"
            "try:\n  Master.open(model, sys.argv[1], 'alpha')\nexcept LeaseHeld as e:\n  print(e); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "alpha" in proc.stdout and f"pid {os.getpid()}" in proc.stdout
    a.close()


def test_lease_of_a_live_process_on_another_host_is_held_until_its_ttl(tmp_path):
    import json
    os.makedirs(folder.master_dir(str(tmp_path), "alpha"))
    lease = {"host": "other-host", "boot_id": "x", "pid": 1, "pid_start": "1", "heartbeat": time.time()}
    with open(folder.lease_path(str(tmp_path), "alpha"), "w") as f:
        json.dump(lease, f)
    with pytest.raises(LeaseHeld, match="other-host"):
        open_member(tmp_path, "alpha", lease_ttl_s=30)
    lease["heartbeat"] = time.time() - 31
    with open(folder.lease_path(str(tmp_path), "alpha"), "w") as f:
        json.dump(lease, f)
    open_member(tmp_path, "alpha", lease_ttl_s=30).close()


def test_lease_left_by_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    a = open_member(tmp_path, "alpha")
    a.execute("open_account", "x", 1)
    a.crash()  # lease left behind, as after kill -9 ...
    import json
    path = folder.lease_path(str(tmp_path), "alpha")
    lease = json.loads(open(path).read())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lease["pid"] = proc.pid  # ... naming a process that is gone
    with open(path, "w") as f:
        json.dump(lease, f)
    b = open_member(tmp_path, "alpha")
    assert b.query("balance", "x") == 1
    b.close()


def test_segments_are_collected_only_once_every_member_read_and_snapshotted_them(tmp_path):
    a = open_member(tmp_path, "alpha", segment_bytes_max=300)
    a.execute("open_account", "x", 0)
    b = open_member(tmp_path, "beta", segment_bytes_max=300)
    sync_until_quiet([a, b])
    for i in range(40):
        a.execute("deposit", "x", 1)
    segs = lambda: journal.list_segments(folder.journal_dir(str(tmp_path), "alpha"))
    n_before = len(segs())
    assert n_before > 3
    sync_until_quiet([a, b])
    a.snapshot(); a.snapshot()
    sync_until_quiet([a, b])
    assert len(segs()) == n_before  # beta has read them but has no snapshot covering them
    b.snapshot()
    a.sync()
    assert len(segs()) < n_before
    # Folder-only verification and a late joiner still work after collection.
    c = open_member(tmp_path, "gamma", segment_bytes_max=300)
    for _ in range(3):
        for m in (a, b, c):
            m.sync()
    assert c.joined and c.query("balance", "x") == 40
    c.execute("deposit", "x", 1)
    sync_until_quiet([a, b, c])
    assert_converged(tmp_path, [a, b, c])


def test_a_joiners_snapshots_do_not_hold_collection_back(tmp_path):
    # A joining member replays from the snapshot it loaded: what it has read is enough, and
    # its own (older) snapshots must not keep every member's segments forever.
    a = open_member(tmp_path, "alpha", segment_bytes_max=300)
    a.execute("open_account", "x", 0)
    b = open_member(tmp_path, "beta", segment_bytes_max=300)
    sync_until_quiet([a, b])
    for i in range(40):
        a.execute("deposit", "x", 1)
    segs = lambda: journal.list_segments(folder.journal_dir(str(tmp_path), "alpha"))
    n_before = len(segs())
    sync_until_quiet([a, b])
    a.snapshot(); a.snapshot()
    a.sync()
    assert len(segs()) == n_before  # beta has read them, but its snapshots do not cover them
    marker = folder.joining_path(str(tmp_path), "beta")
    open(marker, "w").close()  # beta shows its joining marker, as a joiner does
    a.sync()
    assert len(segs()) < n_before
    os.unlink(marker)
    a.close()
    b.close()


def test_master_whose_journal_lost_records_peers_have_read_refuses_to_start(tmp_path):
    a = open_member(tmp_path, "alpha")
    a.execute("open_account", "x", 0)
    b = open_member(tmp_path, "beta")
    sync_until_quiet([a, b])
    for _ in range(3):
        a.execute("deposit", "x", 1)
    sync_until_quiet([a, b])
    a.close()
    # A machine crash under fsync=never: the journal's tail never reached the disk.
    seg = journal.list_segments(folder.journal_dir(str(tmp_path), "alpha"))[-1][1]
    data = open(seg, "rb").read()
    res = journal.scan(data, seg, 0, None, last_segment=True)
    with open(seg, "r+b") as f:
        f.truncate(len(data) - len(journal.frame(journal.codec.encode_record(res.records[-1]), None)))
    with pytest.raises(LostRecords, match="beta"):
        open_member(tmp_path, "alpha")


@pytest.mark.skipif(os.environ.get("PREVALENCE_FAST") == "1", reason="10 s load run")
def test_sync_every_10ms_under_load_for_10s_loses_nothing(tmp_path):
    a = open_member(tmp_path, "alpha", fsync="always")
    a.execute("open_account", "x", 0)
    b = open_member(tmp_path, "beta", fsync="always")
    sync_until_quiet([a, b])
    stop = time.monotonic() + 10
    acked = {"alpha": 0, "beta": 0}

    def writer_and_syncer(m):
        next_sync = time.monotonic()
        while time.monotonic() < stop:
            m.execute("deposit", "x", 1)
            acked[m.name] += 1
            if time.monotonic() >= next_sync:
                m.sync()
                next_sync += 0.010

    # Each master has its own thread (masters are single-threaded objects).
    threads = [threading.Thread(target=writer_and_syncer, args=(m,)) for m in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sync_until_quiet([a, b])
    ref = assert_converged(tmp_path, [a, b])
    assert a.query("balance", "x") == acked["alpha"] + acked["beta"]
    assert ref["records"]["alpha"] == acked["alpha"] + 1 and ref["records"]["beta"] == acked["beta"]
    assert a.rebases + b.rebases > 0  # the load really interleaved


def test_joiner_whose_segments_were_collected_before_it_announced_joins_again(tmp_path):
    a = open_member(tmp_path, "alpha", segment_bytes_max=300)
    a.execute("open_account", "x", 0)
    b = open_member(tmp_path, "beta", segment_bytes_max=300)
    sync_until_quiet([a, b])
    a.snapshot(); b.snapshot()

    def members_move_on(point):
        # gamma has loaded a snapshot but not announced itself yet: alpha writes on and
        # every member collects the segments gamma would need.
        # Their listings do not show gamma's folder yet (NFS lookup caching): hide it.
        if point == "before-announce" and not a.query("balance", "x"):
            here = folder.master_dir(str(tmp_path), "gamma")
            os.rename(here, str(tmp_path / "gamma-hidden"))
            for i in range(40):
                a.execute("deposit", "x", 1)
            sync_until_quiet([a, b])
            for i in range(2):  # twice: GC keeps what the older kept snapshot needs
                a.execute("open_account", f"pad{i}", 0)  # a new frontier, a new snapshot
                sync_until_quiet([a, b])
                a.snapshot(); b.snapshot()
                sync_until_quiet([a, b])
            os.rename(str(tmp_path / "gamma-hidden"), here)
            assert journal.list_segments(folder.journal_dir(str(tmp_path), "alpha"))[0][0] > 1

    c = open_member(tmp_path, "gamma", segment_bytes_max=300, fault=members_move_on)
    for _ in range(4):
        for m in (a, b, c):
            m.sync()
    assert c.joined and c.query("balance", "x") == 40
    sync_until_quiet([a, b, c])
    assert_converged(tmp_path, [a, b, c])


def test_a_batch_is_one_frame_and_a_reader_can_start_inside_it(tmp_path):
    from workers.prevalence.cluster.reader import JournalReader
    a = open_member(tmp_path, "alpha")
    a.execute("open_account", "x", 0)
    a.execute_many([("deposit", ["x", 1], None) for _ in range(10)])
    seg = journal.list_segments(folder.journal_dir(str(tmp_path), "alpha"))[0][1]
    data = open(seg, "rb").read()
    frames = 0
    off = 0
    while off < len(data) and not journal.all_zero(data[off:off + journal.HEADER_BYTES]):
        n, _v, flags, _r = journal.HEADER.unpack_from(data, off)
        frames += 1
        off += journal.HEADER_BYTES + n + journal.CRC_BYTES
    assert frames == 2 and flags & journal.FLAG_BATCH
    assert journal.all_zero(data, off)  # then the writer's reserved space, if any
    res = JournalReader(str(tmp_path), "alpha", 5, 0, None).read_new()
    assert [r.seq for r in res.records] == list(range(6, 12))
    # A torn batch is lost whole: it was never acknowledged.
    a.crash()
    with open(seg, "r+b") as f:
        f.truncate(off - 3)
    b = open_member(tmp_path, "alpha")
    assert b.seq == 1 and b.query("balance", "x") == 0


def test_batch_too_large_for_one_frame_is_split_and_replays(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "RECORD_BYTES_MAX", 400)
    a = open_member(tmp_path, "alpha")
    a.execute("open_account", "x", 0)
    outs = a.execute_many([("deposit", ["x", 1], None) for _ in range(50)])
    assert [o["status"] for o in outs] == ["ok"] * 50
    a.close()
    b = open_member(tmp_path, "alpha")
    assert b.query("balance", "x") == 50 and b.seq == 51


def test_status_digest_auto_skips_the_state_pass_until_the_state_holds_still(tmp_path):
    a = open_member(tmp_path, "alpha")
    a.execute("open_account", "x", 0)
    assert a.status()["digest"] == a.digest()  # default: always computed
    a.execute("deposit", "x", 1)
    assert a.status(digest=False)["digest"] is None
    auto = a.status(digest=None)  # first auto call after a change: not computed ...
    assert auto["digest"] is None and a._digest_cache[0] != a.replica.version
    assert a.status(digest=None)["digest"] == a.digest()  # ... then quiet: computed
    a.execute("deposit", "x", 1)
    a.digest()  # cached for this version: auto returns it at no cost
    assert a.status(digest=None)["digest"] == a.digest()
    a.close()


def test_retiring_a_live_master_is_refused_once_with_what_to_do(tmp_path):
    from workers.prevalence import PrevalenceError, retire

    import json
    import socket

    from workers.prevalence.cluster import lease

    open_member(str(tmp_path), "alpha").close()
    # The lease names a live process on this host (this test's parent), as a running
    # master's would.
    holder = os.getppid()
    body = {"host": socket.gethostname(), "boot_id": lease.boot_id(), "master": "alpha",
            "heartbeat": time.time(), "pid": holder, "pid_start": lease.pid_start(holder)}
    folder.publish(folder.lease_path(str(tmp_path), "alpha"), json.dumps(body).encode())
    with pytest.raises(PrevalenceError) as caught:
        retire(str(tmp_path), "alpha")
    message = str(caught.value)
    assert message.startswith("refusing to retire a live master: master 'alpha' is held by pid")
    assert message.count("top that process first") == 1 and "Stop it first" not in message
    assert "pick another master name" not in message and "--force" in message
