"""Properties of recovery (DESIGN §2, invariants 1, 4, 5), stated directly.

* Replay reproduces the live state.
* Snapshot + tail equals a full replay from the initial state (`verify`).
* Any truncation or single-byte flip of a journal file either recovers every fully
  written record before the damage -- and nothing else -- or refuses with Corruption or
  LostRecords, leaving every file as it was. It recovers only when the damage is a torn
  tail past everything the master published (a torn tail is a record nobody saw).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from workers.models.ledger import model as ledger
from workers.prevalence import verify
from workers.prevalence.errors import Corruption, LostRecords, PrevalenceError, Rejected

from tests.support import open_master
from .helpers import frames, journal_bytes, segments

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ACCOUNTS = ["a", "b", "c"]
account = st.sampled_from(ACCOUNTS + ["nobody"])
rid = st.none() | st.sampled_from([f"req-{i}" for i in range(6)])
op = st.one_of(
    st.tuples(st.just("open_account"), st.tuples(st.sampled_from(ACCOUNTS), st.integers(-5, 100)), rid),
    st.tuples(st.just("deposit"), st.tuples(account, st.integers(-5, 60)), rid),
    st.tuples(st.just("withdraw"), st.tuples(account, st.integers(0, 150)), rid),
    st.tuples(st.just("transfer"), st.tuples(account, account, st.integers(0, 150)), rid),
)
ops = st.lists(op, max_size=30)
batch_or_op = st.one_of(op.map(lambda o: [o]), st.lists(op, min_size=2, max_size=6))


def run(m, steps) -> None:
    """Execute each step: a single op with `execute`, several with one `execute_many`."""
    for step in steps:
        if len(step) == 1:
            tx, args, r = step[0]
            try:
                m.execute(tx, *args, rid=r)
            except Rejected:
                pass
        else:
            m.execute_many([(tx, list(args), r) for tx, args, r in step])


def live(m) -> tuple:
    return m.query("balances"), m.digest(), m.seq


@SETTINGS
@given(steps=st.lists(batch_or_op, max_size=25), fsync=st.sampled_from(["never", "always"]),
       key=st.sampled_from([None, b"k"]), segment_bytes_max=st.sampled_from([200, 64 * 1024]))
def test_replay_reproduces_the_live_state(steps, fsync, key, segment_bytes_max):
    with tempfile.TemporaryDirectory() as shared:
        kw = dict(fsync=fsync, cluster_key=key, segment_bytes_max=segment_bytes_max)
        m = open_master(shared, **kw)
        run(m, steps)
        before = live(m)
        outcomes = {r: m.outcome(r) for r in (f"req-{i}" for i in range(6))}
        m.close()
        m = open_master(shared, **kw)
        assert live(m) == before
        assert {r: m.outcome(r) for r in outcomes} == outcomes
        assert verify(shared, ledger, cluster_key=key)["digest"] == before[1]
        m.close()


@SETTINGS
@given(first=st.lists(batch_or_op, max_size=15), tail=st.lists(batch_or_op, max_size=15),
       snapshots=st.integers(1, 2))
def test_snapshot_plus_tail_equals_a_full_replay(first, tail, snapshots):
    with tempfile.TemporaryDirectory() as shared:
        m = open_master(shared, segment_bytes_max=300)
        run(m, first)
        for _ in range(snapshots):
            m.snapshot()
            run(m, tail[:len(tail) // snapshots])
        run(m, tail[len(tail) // snapshots * snapshots:])
        before = live(m)
        m.close()
        m = open_master(shared, segment_bytes_max=300)
        assert m.snapshot_frontier >= 0  # recovery did start from the snapshot
        assert live(m) == before
        ref = verify(shared, ledger)
        assert ref["base"] == "initial state" and ref["deterministic"]
        assert ref["digest"] == before[1]
        m.close()


# -- damage ------------------------------------------------------------------------

BUILD_STEPS = [
    ("open_account", ("a", 100), None), ("open_account", ("b", 5), "o-b"), ("deposit", ("a", 7), "d1"),
    ("withdraw", ("b", 50), "w1"),  # rejected: still a record
    ("transfer", ("a", "b", 30), "t1"), ("open_account", ("a", 1), None),  # rejected
    ("deposit", ("nobody", 1), "d2"), ("transfer", ("b", "a", 35), "t2"), ("withdraw", ("a", 3), None),
    ("deposit", ("b", 11), "d3"), ("transfer", ("a", "b", 1), "t3"), ("withdraw", ("b", 12), "w2"),
    ("deposit", ("a", 2), None), ("transfer", ("b", "a", 4), "t4"),
]


class Built:
    """An intact journal in several segments (and maybe a snapshot), with every prefix's
    state, left by a kill -9: its last segment has no seal, and its progress file says
    what the last publication said (seq 0, or the snapshot's)."""

    def __init__(self, root: str, key: bytes | None, snap_at: int | None):
        self.shared = os.path.join(root, "intact")
        self.key = key
        self.snap_at = snap_at or 0  # the last seq the snapshot covers (0: no snapshot)
        m = open_master(self.shared, cluster_key=key, segment_bytes_max=250, journal_reserve_bytes=0)
        self.after = {0: (m.query("balances"), m.digest())}  # seq -> state after it
        for tx, args, r in BUILD_STEPS:
            try:
                m.execute(tx, *args, rid=r)
            except Rejected:
                pass
            self.after[m.seq] = (m.query("balances"), m.digest())
            if m.seq == snap_at:
                m.snapshot()
        self.last_seq = m.seq
        m.crash()  # published so far: seq snap_at (the snapshot publishes progress), else 0
        self.segments = []  # (first seq, file name, size, frames)
        for first, path in segments(self.shared):
            with open(path, "rb") as f:
                data = f.read()
            self.segments.append((first, os.path.basename(path), len(data), frames(data, key)))
        assert len(self.segments) >= 3 and self.last_seq == len(BUILD_STEPS)
        # Recovery reads from the segment holding the first seq the snapshot lacks.
        self.first_read = max(i for i, s in enumerate(self.segments) if s[0] <= self.snap_at + 1)


SNAP_AT = [None, 3, 8, len(BUILD_STEPS)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    return {(key, snap): Built(str(root / f"{key.decode() if key else 'plain'}-{snap}"), key, snap)
            for key in (None, b"k") for snap in SNAP_AT}


damage = st.one_of(
    st.tuples(st.just("truncate"), st.integers(1, 10 ** 6), st.just(0)),
    st.tuples(st.just("flip"), st.integers(0, 10 ** 6), st.integers(1, 255)),
)


def _only_torn_tails_moved(now: dict, damaged: dict) -> bool:
    """Every file is as damaged, except a tail moved to `<segment>.torn-<offset>`."""
    for name, data in damaged.items():
        if now.get(name) == data:
            continue
        torn = [n for n in now if n.startswith(name + ".torn-")]
        if len(torn) != 1 or now[name] + now[torn[0]] != data:
            return False
    return True


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([None, b"k"]), snap_at=st.sampled_from(SNAP_AT),
       which=st.just(-1) | st.integers(0, 10), hit=damage)  # -1: the last segment, often
def test_truncation_or_flipped_byte_recovers_exactly_the_intact_prefix_or_refuses(built, key, snap_at, which, hit):
    b = built[key, snap_at]
    which = len(b.segments) - 1 if which == -1 else which % len(b.segments)
    first, name, size, spans = b.segments[which]
    is_last = which == len(b.segments) - 1
    kind, amount, mask = hit
    with tempfile.TemporaryDirectory() as root:
        shared = os.path.join(root, "shared")
        shutil.copytree(b.shared, shared)
        path = os.path.join(shared, "masters", "solo", "journal", name)
        # Damage the file; find the first record it damaged (or removed) and whether it is
        # a torn tail (nothing valid after it) or valid records follow it.
        if kind == "truncate":
            new_size = size - 1 - (amount % size)  # 0 .. size-1
            with open(path, "r+b") as f:
                f.truncate(new_size)
            intact = sum(1 for _s, e in spans if e <= new_size)
            tail_only = is_last
        else:
            pos = amount % size
            with open(path, "r+b") as f:
                f.seek(pos)
                byte = f.read(1)[0]
                f.seek(pos)
                f.write(bytes([byte ^ mask]))
            intact = next(i for i, (s, e) in enumerate(spans) if s <= pos < e)
            tail_only = is_last and intact == len(spans) - 1
        first_damaged = first + intact
        if which < b.first_read:
            expected = b.last_seq  # a segment the snapshot covers: never read again
        elif tail_only and first_damaged > b.snap_at:
            # A torn tail after everything published (the snapshot, the progress file):
            # nobody can have seen it. Recovered: the intact prefix.
            expected = first_damaged - 1
        else:
            expected = None  # valid records follow, or the snapshot is ahead: must refuse
        damaged = journal_bytes(shared)
        try:
            m = open_master(shared, cluster_key=key, segment_bytes_max=250)
        except PrevalenceError as exc:
            # Refused: nothing truncated but a torn tail set aside, and the error says where.
            assert isinstance(exc, (Corruption, LostRecords)), exc
            assert _only_torn_tails_moved(journal_bytes(shared), damaged)
            assert expected is None or which < b.first_read, f"refused a recoverable journal: {exc}"
            event("refused")
            return
        # Opened: only a damaged *tail* may be dropped, and exactly the intact prefix is kept.
        assert expected is not None, "opened although valid records follow the damage"
        event("recovered everything" if expected == b.last_seq else "recovered the intact prefix")
        balances, digest = b.after[expected]
        assert (m.seq, m.query("balances"), m.digest()) == (expected, balances, digest)
        m.close()
        if which >= b.first_read:
            boundary = spans[intact - 1][1] if intact else 0
            assert os.path.getsize(path) == boundary
            torn = [n for n in os.listdir(os.path.dirname(path)) if ".torn-" in n]
            assert torn == ([f"{name}.torn-{boundary:020d}"] if len(damaged[name]) > boundary else [])


class Crashed:
    """A journal left by a kill -9: records, then the writer's reserved zeros."""

    RESERVE = 2048

    def __init__(self, root: str):
        self.shared = os.path.join(root, "crashed")
        m = open_master(self.shared, journal_reserve_bytes=self.RESERVE)
        for tx, args, r in BUILD_STEPS:
            try:
                m.execute(tx, *args, rid=r)
            except Rejected:
                pass
        self.last_seq, self.state = m.seq, (m.query("balances"), m.digest())
        m.crash()
        [(_first, self.path)] = segments(self.shared)
        with open(self.path, "rb") as f:
            self.data = f.read()
        self.end = frames(self.data)[-1][1]  # where the records end and the zeros begin
        assert len(self.data) > self.end


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    return Crashed(str(tmp_path_factory.mktemp("crashed")))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hit=damage)
def test_damage_inside_the_reserved_zeros_keeps_every_record(crashed, hit):
    """Reserved space holds no record: truncating it or flipping a byte in it loses nothing;
    a flipped byte makes a torn tail (set aside), zeros alone are simply written over."""
    c = crashed
    kind, amount, mask = hit
    zeros = len(c.data) - c.end
    with tempfile.TemporaryDirectory() as root:
        shared = os.path.join(root, "shared")
        shutil.copytree(c.shared, shared)
        path = os.path.join(shared, os.path.relpath(c.path, c.shared))
        with open(path, "r+b") as f:
            if kind == "truncate":
                f.truncate(c.end + amount % zeros)
            else:
                f.seek(c.end + amount % zeros)
                f.write(bytes([mask]))
        m = open_master(shared)
        assert (m.seq, m.query("balances"), m.digest()) == (c.last_seq, *c.state)
        torn = [n for n in os.listdir(os.path.dirname(path)) if ".torn-" in n]
        assert torn == ([f"{os.path.basename(path)}.torn-{c.end:020d}"] if kind == "flip" else [])
        m.execute("open_account", "after-crash", 1)
        m.close()
        m = open_master(shared)
        assert m.seq == c.last_seq + 1 and m.query("balance", "after-crash") == 1
        m.close()


probe_op = st.one_of(
    st.tuples(st.just("stamp"), st.just(())),
    st.tuples(st.just("draw"), st.just(())),
    st.tuples(st.just("add"), st.tuples(st.integers(-3, 3) | st.just("x"))),  # "x": TypeError after a mutation
    st.tuples(st.just("refuse"), st.just(("no",))),
)


@SETTINGS
@given(steps=st.lists(st.tuples(probe_op, rid), max_size=20), cut=st.integers(0, 20),
       clock_steps=st.lists(st.integers(-2_000, 2_000), min_size=20, max_size=20))
def test_time_randomness_and_failures_replay_identically(steps, cut, clock_steps):
    from workers.prevalence.errors import TransactionFailed
    from tests.support import FakeClock
    from .helpers import probe
    with tempfile.TemporaryDirectory() as shared:
        wall = FakeClock()
        m = open_master(shared, model=probe, now_ms=wall)
        for i, ((tx, args), r) in enumerate(steps):
            if i == cut:
                m.snapshot()
            wall.ms += clock_steps[i]  # the wall clock wanders, backwards too
            try:
                m.execute(tx, *args, rid=r)
            except (Rejected, TransactionFailed):
                pass
        before = (m.query("log"), m.query("n"), m.digest(), m.seq)
        m.close()
        m = open_master(shared, model=probe, now_ms=FakeClock(wall.ms - 10_000))
        assert (m.query("log"), m.query("n"), m.digest(), m.seq) == before
        assert verify(shared, probe)["digest"] == before[2]
        m.close()
