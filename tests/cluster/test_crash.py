"""kill -9 at each step of sync, snapshot, GC and join; restart; converge (invariant 3)."""

import subprocess
import sys
import time

import pytest

from tests.support import open_member
from .helpers import assert_converged, sync_until_quiet

POINTS = [
    ("after-write", 3), ("after-fsync", 4), ("between-fsync-and-apply", 2),
    ("before-publish-rename", 3), ("mid-snapshot-write", 1), ("before-snapshot-rename", 2),
    ("after-snapshot-rename", 1), ("segment-created", 1), ("mid-roll", 1), ("before-gc-unlink", 1),
]


def run_child(shared, name, point, n, partners=(), writes=12):
    """Run the child to its kill; partners keep syncing and snapshotting meanwhile, and
    write now and then (to account "noise"): a cluster that goes quiet keeps its newest
    segments until the next write moves the frontiers, and GC would never be reached."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.cluster.child", str(shared), name, point, str(n),
                             str(writes)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    rounds = 0
    while proc.poll() is None and time.monotonic() < deadline:
        rounds += 1
        for m in partners:
            if rounds % 20 == 0:
                m.execute("deposit", "noise", 1)
            m.sync()
            m.snapshot()
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=10)
    acked = [line.split()[1] for line in out.splitlines() if line.startswith("ack ")]
    return proc.returncode, acked


def _cluster(tmp_path):
    a = open_member(tmp_path, "alpha", fsync="always", segment_bytes_max=400)
    a.execute("open_account", "acct", 0)
    a.execute("open_account", "noise", 0)
    b = open_member(tmp_path, "beta", fsync="always", segment_bytes_max=400)
    sync_until_quiet([a, b])
    return a, b


@pytest.mark.crash
@pytest.mark.parametrize("point,n", POINTS)
def test_member_killed_mid_step_restarts_and_converges(tmp_path, point, n):
    a, b = _cluster(tmp_path)
    b.close()
    code, acked = run_child(tmp_path, "beta", point, n, partners=[a])
    assert code == -9, f"fault point {point} was never reached (exit {code})"
    # The killed master restarts at once (its lease names a dead pid) and converges.
    b = open_member(tmp_path, "beta", fsync="always", segment_bytes_max=400)
    a.execute("deposit", "acct", 1, rid="after-crash")
    sync_until_quiet([a, b])
    assert_converged(tmp_path, [a, b])
    for rid in acked:
        assert a.outcome(rid) is not None, f"acknowledged {rid} lost after kill at {point}"
    present = [f"beta-{i}" for i in range(12) if a.outcome(f"beta-{i}") is not None]
    assert present[:len(acked)] == acked
    assert a.query("balance", "acct") == len(present) + 1, (present, acked, a.status())
    a.close(); b.close()


@pytest.mark.crash
@pytest.mark.parametrize("point,n", [("before-publish-rename", 1), ("mid-snapshot-write", 1),
                                     ("after-snapshot-rename", 1), ("before-publish-rename", 2)])
def test_joiner_killed_while_joining_restarts_and_converges(tmp_path, point, n):
    a, b = _cluster(tmp_path)
    for i in range(30):
        a.execute("deposit", "acct", 1)
        b.execute("deposit", "acct", 1)
        sync_until_quiet([a, b])
    a.snapshot(); b.snapshot()
    sync_until_quiet([a, b])
    code, acked = run_child(tmp_path, "gamma", point, n, partners=[a, b])
    assert code == -9, f"fault point {point} was never reached (exit {code})"
    c = open_member(tmp_path, "gamma", fsync="always", segment_bytes_max=400)
    for _ in range(4):
        for m in (a, b, c):
            m.sync()
    assert c.joined
    c.execute("deposit", "acct", 1, rid="gamma-after")
    sync_until_quiet([a, b, c])
    assert_converged(tmp_path, [a, b, c])
    for rid in acked:
        assert a.outcome(rid) is not None
    for m in (a, b, c):
        m.close()
