"""Convergence on real NFS clients (issue 12, item 2): one master per guest, each writing the
ledger's non-commutative transactions (withdraw and transfer refuse to overdraw) at once,
syncing every 100 ms. Every scenario ends with DESIGN section 6's sentence -- every master
reports nothing tentative and the same cursors, their digests are equal and equal to
`verify`'s (computed in a guest, through NFS) -- and with every acknowledged transaction
present and committed on every master.

Each scenario runs on NFSv4.1 and on NFSv3 (`nfs_cluster` is parametrized).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .remote import DriverError, in_parallel

pytestmark = pytest.mark.nfs

ACCOUNTS = [f"acct{i}" for i in range(6)]
INITIAL = 60   # small balances: many withdrawals are refused, so order matters


def _found(c, guests, names=("m0", "m1", "m2"), **options):
    """Open the founder, its accounts, then the others; sync until every one has joined."""
    members = [c.open(guests[0], names[0], **options)]
    for a in ACCOUNTS:
        c.execute(members[0], "open_account", a, INITIAL, rid=f"open-{a}")
    for g, n in zip(guests[1:], names[1:]):
        members.append(c.open(g, n, **options))
    c.sync_until_joined()
    return members


def _workloads(c, members, ops: int, **kw):
    # Paced: ~2.5 ms per durable transaction on these clients, so without a pause a whole
    # workload would fit between two syncs and nothing would interleave.
    kw.setdefault("pause_s", 0.02)
    return in_parallel([lambda m=m, i=i: c.workload(m, seed=100 + i, ops=ops, accounts=ACCOUNTS, **kw)
                        for i, m in enumerate(members)], deadline_s=180)


def test_concurrent_non_commutative_writes_on_every_master_converge(nfs_cluster):
    c = nfs_cluster
    members = _found(c, c.guests)
    results = _workloads(c, members, ops=120, sync_interval_s=0.1)
    assert all(not r.get("killed") for r in results), results
    # The workload is what it claims: refusals happened, and records arrived out of order.
    assert sum(r["rejected"] for r in results) > 0, results
    assert sum(r["rebases"] for r in results) > 0, results
    ref = c.assert_converged()
    assert ref["records"] == {"m0": 120 + len(ACCOUNTS), "m1": 120, "m2": 120}, ref


def test_master_killed_9_while_writing_restarts_and_converges(nfs_cluster):
    c = nfs_cluster
    m0, m1, m2 = _found(c, c.guests)
    # m1's driver is SIGKILLed right after a record's fsync, before the answer (durable but
    # never acknowledged), while m0 and m2 go on writing and syncing.
    results = in_parallel([
        lambda: c.workload(m0, seed=1, ops=100, accounts=ACCOUNTS),
        lambda: c.workload(m1, seed=2, ops=100, accounts=ACCOUNTS, kill_after_ops=40, kill_point="after-fsync"),
        lambda: c.workload(m2, seed=3, ops=100, accounts=ACCOUNTS),
    ], deadline_s=180)
    assert results[1] == {"killed": True}, results[1]
    acked_before_kill = {rid for rid in c.acked if rid.startswith("m1.")}
    assert len(acked_before_kill) == 40, len(acked_before_kill)
    # Restarted at once on its host (its lease names a dead pid there): recovers from NFS.
    m1.guest.wait_restarted()
    c.reopen(m1)
    results = _workloads(c, [m0, m1, m2], ops=30)
    assert all(not r.get("killed") for r in results), results
    ref = c.assert_converged()
    # The record written but never acknowledged survived too (it was durable): 41 + 30.
    assert ref["records"]["m1"] == 71, ref


def _first_segment(status: dict) -> int:
    return int(status["segments"][0].split(".")[0]) if status["segments"] else 0


def _collect_garbage(c, members, deadline_s: float = 60.0) -> list[dict]:
    """Write once on each, then sync and snapshot until every journal lost its first segment
    (an idle cluster keeps its newest segments until the next write moves the cursors)."""
    for m in members:
        c.execute(m, "deposit", ACCOUNTS[0], 1)
    end = time.monotonic() + deadline_s
    while True:
        c.sync_all(members)
        in_parallel([lambda m=m: m.call("snapshot") for m in members])
        statuses = in_parallel([lambda m=m: m.call("status") for m in members])
        if all(_first_segment(s) > 1 for s in statuses):
            return statuses
        assert time.monotonic() < end, f"no segment collected within {deadline_s:.0f} s: " + "; ".join(
            f"{s['master']}: {s['segments']}" for s in statuses)
        time.sleep(0.3)


def test_segment_rolls_and_garbage_collection_while_the_others_read(nfs_cluster):
    c = nfs_cluster
    # Small segments roll every ~20 records; covered segments go 0.2 s after they may, and
    # snapshots every 0.5 s let them: segments vanish while the others read them.
    members = _found(c, c.guests, segment_bytes_max=2048, gc_grace_s=0.2)
    results = _workloads(c, members, ops=150, sync_interval_s=0.1, snapshot_interval_s=0.5)
    assert all(not r.get("killed") for r in results), results
    _collect_garbage(c, members)
    ref = c.assert_converged()
    assert ref["base"].startswith("snapshot"), ref["base"]


def test_master_joins_from_a_snapshot_after_collection(nfs_cluster):
    c = nfs_cluster
    g0, g1, g2 = c.guests
    m0, m1 = _found(c, [g0, g1], names=("m0", "m1"), segment_bytes_max=2048, gc_grace_s=0.2)
    _workloads(c, [m0, m1], ops=100, snapshot_interval_s=0.5)
    _collect_garbage(c, [m0, m1])
    # The journals no longer start at seq 1: the newcomer must start from a snapshot.
    m2 = c.open(g2, "m2", segment_bytes_max=2048, gc_grace_s=0.2)
    assert m2.call("status")["snapshot_frontier"] > 0
    c.sync_until_joined()
    results = _workloads(c, [m0, m1, m2], ops=40)
    assert all(not r.get("killed") for r in results), results
    c.assert_converged()


def test_retired_master_stops_holding_the_others_back(nfs_cluster):
    c = nfs_cluster
    m0, m1, m2 = _found(c, c.guests)
    _workloads(c, [m0, m1, m2], ops=40)
    c.converge()
    # m2 is stopped for good (closed: its lease released).
    m2.call("close")
    m2.open = False
    # While m2 is down and counted, the others' writes stay tentative.
    c.execute(m0, "deposit", ACCOUNTS[0], 5, rid="while-m2-down")
    c.sync_all([m0, m1])
    assert m0.call("status")["tentative"] > 0
    # The operator retires it, from another host, through NFS.
    retired = c.retire(m0.guest, "m2")
    assert retired["cut"] >= 40
    _workloads(c, [m0, m1], ops=30)
    c.assert_converged([m0, m1])
    with pytest.raises(DriverError, match="RetiredMaster"):
        c.open(m2.guest, "m2")



def test_host_power_loss_loses_nothing_acknowledged(nfs_cluster, nfs_lab):
    c = nfs_cluster
    # A short lease, so that the master may start again on its rebooted host (another boot
    # id: another host, as far as the lease knows) after 3 s instead of 30.
    m0, m1, m2 = _found(c, c.guests, lease_ttl_s=3.0)
    guest = m1.guest
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = [pool.submit(c.workload, m, seed=20 + i, ops=200, accounts=ACCOUNTS, pause_s=0.02)
                for i, m in enumerate((m0, m1, m2))]
        # Pull the plug on m1's host in the middle of its workload: whatever its kernel had
        # not sent to the server is gone; what m1 acknowledged had been fsynced (COMMIT).
        end = time.monotonic() + 60
        while sum(rid.startswith("m1.") for rid in list(c.acked)) < 40:
            assert time.monotonic() < end and not runs[1].done(), "m1 never got going"
            time.sleep(0.02)
        fresh = nfs_lab.lab.power_cycle(guest.guest)
        guest.drop_connection()   # a dead guest kernel never closes its TCP connection
        results = [r.result(timeout=180) for r in runs]
    assert results[1] == {"killed": True}, results[1]
    guest.rebooted(fresh)
    # m1 comes back on the rebooted host once its old lease (other boot) is stale.
    end = time.monotonic() + 30
    while True:
        try:
            c.reopen(m1)
            break
        except DriverError as exc:
            if exc.type != "LeaseHeld" or time.monotonic() > end:
                raise
            time.sleep(0.5)
    results = _workloads(c, [m0, m1, m2], ops=30)
    assert all(not r.get("killed") for r in results), results
    c.assert_converged()
