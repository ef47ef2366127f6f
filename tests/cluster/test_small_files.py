"""Small files say what they are about and are checked (issue 9, items 4 and 9).

Every small file of the share (retirement, founder, lease, seal, progress) and every
snapshot names its kind and master, is signed with the cluster key when there is one, and
is parsed into a typed struct: a file that is garbage, unsigned on a keyed cluster, or
about another master is refused with one error type (`errors.BadFile`) naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest

from workers.prevalence import errors, journal, retire, snapshot
from workers.prevalence.cluster import folder

from tests.support import open_member
from .helpers import assert_converged, sync_until_quiet

KEY = b"cluster-key"


def pair(tmp_path, **kw):
    a = open_member(tmp_path, "alpha", **kw)
    a.execute("open_account", "x", 0)
    b = open_member(tmp_path, "beta", **kw)
    sync_until_quiet([a, b])
    return a, b


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# -- item 4: with a cluster key, unsigned or misplaced files are not trusted ---------------

def test_an_unsigned_retirement_on_a_keyed_cluster_is_not_obeyed_and_is_reported(tmp_path):
    a, b = pair(tmp_path, cluster_key=KEY)
    path = folder.retired_path(str(tmp_path), "beta")
    write(path, json.dumps({"master": "beta", "cut": 0, "retired_at": 0}).encode())
    a.sync(), b.sync()
    b.execute("deposit", "x", 5)
    sync_until_quiet([a, b])
    for m in (a, b):
        status = m.status()
        assert "beta" in status["counted"] or m is b
        assert status["retired"] == {}
        assert path in (m.last_error or "")
    assert a.query("balance", "x") == b.query("balance", "x") == 5
    a.close(), b.close()


def test_a_retirement_signed_with_the_cluster_key_is_obeyed(tmp_path):
    a, b = pair(tmp_path, cluster_key=KEY)
    b.close()
    retire(str(tmp_path), "beta", key=KEY)
    a.sync()
    assert a.status()["retired"] == {"beta": b.seq}
    a.close()


def test_a_signed_progress_file_copied_over_another_masters_is_refused(tmp_path):
    a, b = pair(tmp_path, cluster_key=KEY, segment_bytes_max=300)
    b.snapshot()
    for _ in range(30):
        a.execute("deposit", "x", 1)  # several segments beta has not read
    a.snapshot()
    shutil.copyfile(folder.progress_path(str(tmp_path), "alpha"), folder.progress_path(str(tmp_path), "beta"))
    a.sync()  # garbage collection must not trust the copy
    assert folder.progress_path(str(tmp_path), "beta") in (a.last_error or "")
    report = b.sync()
    assert not report["errors"], report
    sync_until_quiet([a, b])
    assert_converged(tmp_path, [a, b])
    a.close(), b.close()


def test_a_snapshot_of_another_master_planted_in_a_masters_folder_is_not_loaded(tmp_path):
    a, b = pair(tmp_path)
    a.execute("deposit", "x", 3)
    sync_until_quiet([a, b])
    b.snapshot()
    own = b.snapshot_frontier
    theirs = snapshot.list_snapshots(folder.snapshots_dir(str(tmp_path), "alpha")) or [(0, a.snapshot())]
    planted = os.path.join(folder.snapshots_dir(str(tmp_path), "beta"), snapshot.format_snapshot_name(own + 10 ** 9))
    shutil.copyfile(theirs[-1][1], planted)
    b.close()
    b = open_member(tmp_path, "beta")
    assert b.snapshot_frontier == own
    assert planted in (b.last_error or "")
    a.close(), b.close()


def test_a_seal_copied_from_another_segment_is_refused_naming_it(tmp_path):
    a, b = pair(tmp_path, segment_bytes_max=300)
    for _ in range(20):
        b.execute("deposit", "x", 1)
    segs = journal.list_segments(folder.journal_dir(str(tmp_path), "beta"))
    assert len(segs) >= 3
    sealed = [p for _f, p in segs if os.path.exists(journal.seal_path(p))]
    target = journal.seal_path(sealed[1])
    shutil.copyfile(journal.seal_path(sealed[0]), target)
    report = a.sync()
    assert target in report["errors"].get("beta", ""), report
    a.close(), b.close()


def test_an_unsigned_founder_on_a_keyed_cluster_is_refused_naming_it(tmp_path):
    a, b = pair(tmp_path, cluster_key=KEY)
    path = folder.founder_path(str(tmp_path))
    write(path, b"beta\n")  # what an older release wrote, or a forgery
    with pytest.raises(errors.BadFile) as err:
        open_member(tmp_path, "gamma", cluster_key=KEY)
    assert path in str(err.value)
    a.close(), b.close()


def test_an_unsigned_lease_on_a_keyed_cluster_is_refused_naming_it(tmp_path):
    a, b = pair(tmp_path, cluster_key=KEY)
    a.close()
    path = folder.lease_path(str(tmp_path), "alpha")
    write(path, json.dumps({"host": "other-host", "boot_id": "x", "pid": 1, "master": "alpha",
                            "heartbeat": time.time()}).encode())
    with pytest.raises(errors.BadFile) as err:
        open_member(tmp_path, "alpha", cluster_key=KEY)
    assert path in str(err.value)
    b.close()


# -- item 9: garbage small files -------------------------------------------------------------

GARBAGE = {"binary": b"\xff\xfe\x00garbage", "json-of-another-shape": b'[1, 2, 3]',
           "wrong-types": b'{"master": 7, "cut": "x", "seq": "x", "host": 7, "pid": "abc", "heartbeat": "soon"}',
           "deep": b"[" * 100_000 + b"]" * 100_000}


@pytest.mark.parametrize("garbage", GARBAGE, ids=list(GARBAGE))
def test_a_garbage_retirement_file_is_reported_naming_it_and_sync_goes_on(tmp_path, garbage):
    a, b = pair(tmp_path)
    path = folder.retired_path(str(tmp_path), "beta")
    write(path, GARBAGE[garbage])
    b.execute("deposit", "x", 1)
    report = a.sync()
    assert report["applied"].get("beta") == 1
    assert path in (a.last_error or "")
    assert a.status()["retired"] == {}
    a.close(), b.close()


@pytest.mark.parametrize("garbage", GARBAGE, ids=list(GARBAGE))
def test_a_garbage_lease_refuses_the_claim_with_an_error_naming_it(tmp_path, garbage):
    a, b = pair(tmp_path)
    a.close()
    path = folder.lease_path(str(tmp_path), "alpha")
    write(path, GARBAGE[garbage])
    with pytest.raises(errors.BadFile) as err:
        open_member(tmp_path, "alpha")
    assert path in str(err.value) and "lease" in str(err.value)
    b.close()


@pytest.mark.parametrize("garbage", dict(GARBAGE, name=b"not a valid name!\n"),
                         ids=list(GARBAGE) + ["invalid-name"])
def test_a_garbage_founder_file_refuses_a_joiner_with_an_error_naming_it(tmp_path, garbage):
    a, b = pair(tmp_path)
    path = folder.founder_path(str(tmp_path))
    write(path, dict(GARBAGE, name=b"not a valid name!\n")[garbage])
    with pytest.raises(errors.BadFile) as err:
        open_member(tmp_path, "gamma")
    assert path in str(err.value)
    a.close(), b.close()


@pytest.mark.parametrize("garbage", GARBAGE, ids=list(GARBAGE))
def test_a_garbage_progress_file_is_reported_naming_it(tmp_path, garbage):
    a, b = pair(tmp_path)
    b.close()
    path = folder.progress_path(str(tmp_path), "beta")
    write(path, GARBAGE[garbage])
    status = a.status()
    assert status["lag"]["beta"] is None
    assert path in (status["last_error"] or "")
    a.close()


def test_a_lease_heartbeat_far_in_the_future_is_not_fresh_forever(tmp_path):
    a, b = pair(tmp_path)
    a.close()
    path = folder.lease_path(str(tmp_path), "alpha")
    write(path, json.dumps({"host": "other-host", "boot_id": "x", "pid": 1, "pid_start": "1", "master": "alpha",
                            "heartbeat": time.time() + 10 ** 7}).encode())
    # Rewritten just now (by a live holder whose clock is wrong?): held, and the message says why.
    with pytest.raises(errors.LeaseHeld, match="future"):
        open_member(tmp_path, "alpha", lease_ttl_s=30)
    # Nobody has rewritten it for longer than the TTL: stale, whatever its heartbeat claims.
    old = time.time() - 120
    os.utime(path, (old, old))
    open_member(tmp_path, "alpha", lease_ttl_s=30).close()
    b.close()
    assert socket.gethostname() != "other-host"
