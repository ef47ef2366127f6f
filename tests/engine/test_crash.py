"""kill -9 at every crash-worthy step of one master; reopen; nothing acknowledged is lost.

Each case runs on the example ledger and on the nested one (`tests.support.nested_ledger`).
The child (tests/engine/crash_child.py) prints each transaction once `execute` has
returned; after its SIGKILL the test reopens the folder in this process at once (the
lease names a dead pid) and checks every acknowledged transaction is there, the journal
is a gap-free prefix, and the state equals `verify`'s offline replay.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from workers.prevalence import verify
from workers.prevalence.cluster import folder

from .crash_child import SEGMENT_BYTES_MAX
from tests import support
from tests.support import open_master

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WRITES = 12
CHILD_TIMEOUT_S = 60

# (point, N): kill at the N-th time the engine reaches `point`. Each N is chosen so the
# point is reached in the middle of the run, with acknowledged writes before it.
POINTS = [
    ("after-write", 1),              # the first record written, not yet fsynced
    ("after-write", 4),              # written, not yet fsynced
    ("after-fsync", 5),              # durable, not yet applied or acknowledged
    ("between-fsync-and-apply", 6),
    ("segment-created", 1),          # the very first segment, before any record
    ("segment-created", 3),          # a roll's new segment, created but empty
    ("before-roll", 2),
    ("mid-roll", 2),                 # old segment closed, new one not yet created
    ("after-roll", 2),
    ("mid-snapshot-write", 2),       # half a temp snapshot on disk
    ("before-snapshot-rename", 2),
    ("after-snapshot-rename", 2),    # renamed, directory not yet fsynced
    ("before-publish-rename", 1),    # the first progress file, at open
    ("before-publish-rename", 3),    # progress temp file written, not renamed
    ("before-gc-unlink", 1),         # a covered segment about to be collected
    ("before-gc-unlink", 2),
]


def run_child(shared: str, point: str, n: int, fsync: str = "always") -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-m", "tests.engine.crash_child", shared, point, str(n), str(WRITES),
                           fsync],
                          cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    acked = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ack ")]
    return proc.returncode, acked


# A process crash loses nothing the OS accepted, whatever the fsync mode.
RELAXED = [("never", "after-write", 4), ("never", "mid-roll", 2), ("never", "mid-snapshot-write", 2),
           ("interval", "after-write", 5), ("interval", "after-roll", 1), ("interval", "before-gc-unlink", 1)]
# Deferred sync: killed before the sync starts, while it is in flight in the kernel
# (between-fsync-and-apply fires right after the append returns), and once it is done.
DEFERRED = [("deferred", "after-write", 4), ("deferred", "between-fsync-and-apply", 5),
            ("deferred", "after-fsync", 5), ("deferred", "mid-roll", 2)]
CASES = [("always", p, n) for p, n in POINTS] + RELAXED + DEFERRED


@pytest.mark.crash
@pytest.mark.parametrize("kind", ["ledger", "nested"])
@pytest.mark.parametrize("fsync,point,n", CASES, ids=[f"{f}-{p}-{n}" for f, p, n in CASES])
def test_master_killed_at_a_fault_point_reopens_with_every_acknowledged_transaction(tmp_path, monkeypatch, fsync,
                                                                                  point, n, kind):
    # On the example ledger and on the nested one (changed in place, refusing after
    # mutating: its writes go through the change log); the child inherits the choice.
    monkeypatch.setenv("PREVALENCE_TEST_MODEL", kind)
    model = support.test_model()
    shared = str(tmp_path)
    code, acked = run_child(shared, point, n, fsync)
    assert code == -signal.SIGKILL, f"fault point {point} #{n} was never reached (exit {code})"
    # The dead child's lease is still there, and names a dead pid: it is stale at once.
    assert os.path.exists(folder.lease_path(shared, "solo"))
    m = open_master(shared, fsync="always", segment_bytes_max=SEGMENT_BYTES_MAX)
    # Every acknowledged transaction is present; what is present is a prefix of the run.
    for rid in acked:
        assert m.outcome(rid) is not None, f"acknowledged {rid} lost after kill at {point} #{n}"
    present = [i for i in range(WRITES) if m.outcome(f"w{i}") is not None]
    assert present == list(range(len(present)))
    assert len(present) >= len([r for r in acked if r != "open"])
    assert m.query("balances").get("acct") == (len(present) if m.outcome("open") else None)
    assert verify(shared, model)["digest"] == m.digest()
    # It keeps working: a new write lands after the recovered ones and survives a reopen.
    if m.outcome("open") is None:
        m.execute("open_account", "acct", 0, rid="open")
    m.execute("deposit", "acct", 1, rid="after-crash")
    digest = m.digest()
    m.close()
    m = open_master(shared, fsync="always", segment_bytes_max=SEGMENT_BYTES_MAX)
    assert m.digest() == digest == verify(shared, model)["digest"]
    assert m.query("balance", "acct") == len(present) + 1
    m.close()
