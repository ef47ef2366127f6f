"""Long runs, opt-in: PREVALENCE_SOAK=1 (duration PREVALENCE_SOAK_S, default 300 s)."""

import os
import random
import threading
import time

import pytest

from workers.prevalence import Rejected

from tests.support import open_member
from .helpers import assert_converged, sync_until_quiet

pytestmark = [pytest.mark.soak,
              pytest.mark.skipif(os.environ.get("PREVALENCE_SOAK") != "1", reason="soak runs are opt-in: PREVALENCE_SOAK=1")]


def test_three_masters_writing_and_syncing_for_minutes_converge_and_conserve_money(tmp_path):
    duration_s = float(os.environ.get("PREVALENCE_SOAK_S", "300"))
    masters = [open_member(tmp_path, n, fsync="always", segment_bytes_max=1 << 20) for n in ("alpha",)]
    for i in range(20):
        masters[0].execute("open_account", f"acct{i}", 1000)
    for n in ("beta", "gamma"):
        masters.append(open_member(tmp_path, n, fsync="always", segment_bytes_max=1 << 20))
    sync_until_quiet(masters)
    stop = time.monotonic() + duration_s
    errors = []

    def work(m, seed):
        rng = random.Random(seed)
        next_sync = next_snap = time.monotonic()
        try:
            while time.monotonic() < stop:
                a, b = rng.sample(range(20), 2)
                try:
                    m.execute("transfer", f"acct{a}", f"acct{b}", rng.randint(1, 300))
                except Rejected:
                    pass
                now = time.monotonic()
                if now >= next_sync:
                    m.sync()
                    next_sync = now + rng.uniform(0.005, 0.05)
                if now >= next_snap:
                    m.snapshot()
                    next_snap = now + 5
        except Exception as exc:  # surfaced below, with the master's name
            errors.append((m.name, exc))

    threads = [threading.Thread(target=work, args=(m, i)) for i, m in enumerate(masters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    sync_until_quiet(masters, rounds_max=50)
    assert_converged(tmp_path, masters)
    assert masters[0].query("total") == 20 * 1000
