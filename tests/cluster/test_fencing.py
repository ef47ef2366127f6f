"""Zombie writers (issue 9, item 2; DESIGN invariant 10).

Master `alpha` on host A is paused (SIGSTOP) past its lease TTL; host B takes the stale
lease over and acknowledges writes; A resumes. A new owner never appends to the previous
owner's files, and an owner whose lease may have expired by its own monotonic clock writes
and acknowledges nothing until it has re-checked the lease: B's acknowledged records are
never overwritten.

Host A and host B are two `Master` objects of this process here: A is frozen by stopping
its heartbeat (``lease.abandon()``, which also drops the local lock a second host would
not see) and by moving the monotonic clock the lease reads past the TTL.
"""

from __future__ import annotations

import pytest

from workers.prevalence import errors, verify
from workers.prevalence.cluster import lease as lease_module


from tests.support import open_member, test_model as model_under_test

from .helpers import sync_until_quiet

TTL_S = 10.0


class Monotonic:
    """An injectable monotonic clock in seconds (the one a lease measures its TTL with)."""

    def __init__(self):
        self.s = 1000.0

    def __call__(self) -> float:
        return self.s


@pytest.fixture
def mono(monkeypatch):
    clock = Monotonic()
    monkeypatch.setattr(lease_module, "monotonic_s", clock, raising=False)
    return clock


def open_alpha(shared, **kw):
    return open_member(shared, "alpha", fsync="always", lease_ttl_s=TTL_S, **kw)


def reopened_balance(shared) -> int:
    m = open_alpha(shared)
    try:
        assert m.digest() == verify(str(shared), model_under_test())["digest"]
        return m.query("balance", "x")
    finally:
        m.close()


def test_a_zombie_owner_refuses_to_write_after_a_pause_longer_than_its_lease(tmp_path, mono):
    a = open_alpha(tmp_path)
    a.execute("open_account", "x", 1)
    a.lease.abandon()      # host A freezes: no more heartbeats ...
    mono.s += 6 * TTL_S    # ... for longer than the lease TTL
    b = open_alpha(tmp_path)  # host B takes the stale lease over
    assert b.execute("deposit", "x", 10) == 11  # acknowledged by B
    with pytest.raises(errors.NotReady, match="alpha"):
        a.execute("deposit", "x", 100)  # host A resumes
    b.close()
    a.close()
    assert reopened_balance(tmp_path) == 11


@pytest.mark.parametrize("paused_at", ["before-write", "after-write"])
def test_a_zombie_paused_inside_a_write_never_overwrites_the_new_owners_records(tmp_path, mono, paused_at):
    """The window no lease closes: A passed its lease check and is paused just before (or
    just after) its write reaches the disk. Its record lands past the seal the new owner
    put on A's segment (or is read by the new owner at takeover); A does not acknowledge it."""
    taken_over = []

    def pause(point):
        if point == paused_at and len(taken_over) == 0 and a_ref:
            a_ref[0].lease.abandon()
            mono.s += 6 * TTL_S
            b = open_alpha(tmp_path)
            b.execute("deposit", "x", 10)
            taken_over.append(b)

    a_ref = []
    a = open_alpha(tmp_path, fault=pause)
    a.execute("open_account", "x", 1)
    a_ref.append(a)
    with pytest.raises(errors.NotReady, match="alpha"):
        a.execute("deposit", "x", 100)
    assert taken_over, f"the write never reached {paused_at!r}"
    b = taken_over[0]
    b.execute("deposit", "x", 1000)
    expected = b.query("balance", "x")
    assert expected in (1011, 1111)  # A's record counts only if B read it at takeover
    b.close()
    a.close()
    assert reopened_balance(tmp_path) == expected


def test_a_new_owner_starts_a_segment_of_its_own_and_seals_the_previous_one(tmp_path):
    from workers.prevalence import journal, seal
    from workers.prevalence.cluster import folder
    a = open_alpha(tmp_path, journal_reserve_bytes=0)
    a.execute("open_account", "x", 1)
    a.crash()
    b = open_alpha(tmp_path, journal_reserve_bytes=0)
    b.execute("deposit", "x", 1)
    segs = journal.list_segments(folder.journal_dir(str(tmp_path), "alpha"))
    assert [first for first, _p in segs] == [1, 2]
    assert b.writer.path == segs[1][1]
    seal = seal.read_seal(segs[0][1], master="alpha")
    assert seal is not None and seal.length == __import__("os").path.getsize(segs[0][1])
    b.close()


def test_a_zombie_that_closes_after_the_takeover_writes_nothing_in_the_folder(tmp_path, mono):
    from workers.prevalence import journal
    from workers.prevalence.cluster import folder
    a = open_alpha(tmp_path)
    a.execute("open_account", "x", 1)
    a.lease.abandon()
    mono.s += 6 * TTL_S
    b = open_alpha(tmp_path)
    b.execute("deposit", "x", 10)
    jdir = folder.journal_dir(str(tmp_path), "alpha")
    before = {n: open(f"{jdir}/{n}", "rb").read() for n in sorted(__import__("os").listdir(jdir))}
    progress = open(folder.progress_path(str(tmp_path), "alpha"), "rb").read()
    a.close()  # host A resumes and shuts down: no seal over the new owner's, no progress
    after = {n: open(f"{jdir}/{n}", "rb").read() for n in sorted(__import__("os").listdir(jdir))}
    assert after == before
    assert open(folder.progress_path(str(tmp_path), "alpha"), "rb").read() == progress
    assert journal.list_segments(jdir)[-1][1] == b.writer.path
    b.close()
    assert reopened_balance(tmp_path) == 11


def test_a_holder_whose_segment_was_sealed_by_a_new_owner_stops_at_its_next_heartbeat(tmp_path, mono):
    """The race no lease file settles: A renews its lease just as B claims it (B's claim is
    overwritten). B has sealed A's segment, and A's next heartbeat sees that seal."""
    from workers.prevalence.cluster import folder
    a = open_alpha(tmp_path)
    a.execute("open_account", "x", 1)
    a.lease.abandon()
    mine = open(folder.lease_path(str(tmp_path), "alpha"), "rb").read()
    mono.s += 6 * TTL_S
    b = open_alpha(tmp_path)
    with open(folder.lease_path(str(tmp_path), "alpha"), "wb") as f:
        f.write(mine)  # A's renewal lands over B's claim: the lease file names A again
    a.lease.heartbeat()
    assert a.lease.lost and "sealed" in a.lease.lost
    with pytest.raises(errors.NotReady, match="sealed"):
        a.execute("deposit", "x", 100)
    a.close()
    b.close()


def test_a_closed_master_and_its_state_are_freed(tmp_path):
    """Regression: the recovered state is frozen out of the cyclic collector's sight, and
    the lease held the master's fencing check as a bound method (a cycle), so a closed
    master was never freed: a process opening masters one after another (a test runner,
    the NFS tier's guest driver) ran out of memory."""
    import gc
    import weakref

    a, b = open_member(tmp_path, "alpha"), open_member(tmp_path, "beta")
    sync_until_quiet([a, b])
    a.execute("open_account", "x", 10)
    sync_until_quiet([a, b])
    b.execute("deposit", "x", 5)
    sync_until_quiet([a, b])
    replicas = [weakref.ref(m.replica) for m in (a, b)]  # the state lives as long as its replica
    masters = [weakref.ref(a), weakref.ref(b)]
    a.close()
    b.close()
    del a, b
    gc.collect()
    assert [r() for r in masters] == [None, None]
    assert [r() for r in replicas] == [None, None]
