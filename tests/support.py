"""Helpers shared by the engine and cluster tests: an injectable clock, opening a master."""

from __future__ import annotations

from workers.models.ledger import model as ledger
from workers.prevalence import Master

#: The name of the master a single-master test opens.
NAME = "solo"


class FakeClock:
    """An injectable wall clock in ms; tests move it by hand (even backwards), and several
    masters of one test may share it."""

    def __init__(self, start_ms: int = 1_700_000_000_000):
        self.ms = start_ms

    def __call__(self) -> int:
        return self.ms


def open_master(shared, name: str = NAME, *, model=ledger, **kw) -> Master:
    """Open master `name` of `model` (the ledger) on folder `shared`, ``fsync="never"``
    unless told otherwise; every other keyword goes to `Master.open`."""
    kw.setdefault("fsync", "never")
    return Master.open(model, str(shared), name, **kw)


def open_member(shared, name: str, **kw) -> Master:
    """`open_master` for a multi-master test: covered segments are collected at once
    (``gc_grace_s=0``) so the tests reach garbage collection without waiting."""
    kw.setdefault("gc_grace_s", 0)
    return open_master(shared, name, **kw)
