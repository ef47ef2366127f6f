"""Helpers for multi-master tests: sync to quiescence, check convergence (opening members and
the clock are in `tests.support`)."""

from __future__ import annotations

from workers.prevalence import verify


def sync_until_quiet(masters, rounds_max: int = 20) -> int:
    """Sync every master in turn until a full round applies and ticks nothing."""
    for rounds in range(1, rounds_max + 1):
        busy = False
        for m in masters:
            r = m.sync()
            if any(r["applied"].values()) or r["ticked"] or not r["joined"]:
                busy = True
        if not busy:
            return rounds
    raise AssertionError(f"cluster not quiet after {rounds_max} rounds: " +
                         "; ".join(f"{m.name}: {m.status()}" for m in masters))


def assert_converged(shared, masters):
    statuses = [m.status() for m in masters]
    for s in statuses:
        assert s["tentative"] == 0, s
        assert not s["peer_errors"] and not s["held"], s
    cursors = [{k: v for k, v in s["cursors"].items() if k in {m.name for m in masters}} for s in statuses]
    assert all(c == cursors[0] for c in cursors), cursors
    ref = verify(str(shared), masters[0].model)
    assert ref["deterministic"]
    digests = {s["master"]: s["digest"] for s in statuses}
    assert set(digests.values()) == {ref["digest"]}, (digests, ref)
    return ref
