"""Helpers shared by the engine and cluster tests: an injectable clock, opening a master."""

from __future__ import annotations

import os

from workers.models.ledger import model as ledger
from workers.prevalence import Master, Model, Rejected

#: The name of the master a single-master test opens.
NAME = "solo"


class FakeClock:
    """An injectable wall clock in ms; tests move it by hand (even backwards), and several
    masters of one test may share it."""

    def __init__(self, start_ms: int = 1_700_000_000_000):
        self.ms = start_ms

    def __call__(self) -> int:
        return self.ms


def test_model() -> Model:
    """The ledger the multi-master tests run on: the example (flat) one, or the same ledger
    with a nested state (`nested_ledger`) when ``PREVALENCE_TEST_MODEL=nested`` (the
    cluster tests run both: tests/cluster/conftest.py). Children the tests start inherit
    the variable."""
    return nested_ledger if os.environ.get("PREVALENCE_TEST_MODEL") == "nested" else ledger


#: Shared folders whose masters each reach them through a host of their own: real folder ->
#: `tests.faultfs.hosts.Hosts` (set by the ``faultfs`` variant of a test, tests/conftest.py).
HOSTS: dict = {}


def open_master(shared, name: str = NAME, *, model=None, **kw) -> Master:
    """Open master `name` of `model` (default `test_model()`) on folder `shared`,
    ``fsync="never"`` unless told otherwise; every other keyword goes to `Master.open`.
    In the ``faultfs`` variant of a test, the master opens the folder through the mount of
    its own host (`HOSTS`), with ``fsync="always"`` unless told otherwise: as on NFS, what a
    host has not fsynced or closed its peers do not see (faultfs never writes back on its
    own, where an NFS client would within ~30 s)."""
    hosts = HOSTS.get(os.path.realpath(str(shared)))
    if hosts is not None:
        kw.setdefault("fsync", "always")
        return hosts.open(name, lambda path: Master.open(model or test_model(), path, name, **kw))
    kw.setdefault("fsync", "never")
    return Master.open(model or test_model(), str(shared), name, **kw)


def open_member(shared, name: str, **kw) -> Master:
    """`open_master` for a multi-master test: covered segments are collected at once
    (``gc_grace_s=0``) so the tests reach garbage collection without waiting."""
    kw.setdefault("gc_grace_s", 0)
    return open_master(shared, name, **kw)


# -- the ledger again, as a user would write it with a nested state --------------------
#
# Same transaction names, arguments, outcomes and queries as `workers.models.ledger`, so
# any test written for the ledger runs on it; but each account is a dict holding a history
# list and a nested dict, changed in place, and the refusals come *after* mutating (they
# must leave no trace). No hand-written copy: rebases undo through the change log.

nested_ledger = Model("ledger", lambda: {"accounts": {}, "journal": []})


def _account(root, account_id):
    acct = root["accounts"].get(account_id)
    if acct is None:
        raise Rejected(f"no account {account_id!r}")
    return acct


@nested_ledger.transaction
def open_account(root, ctx, account_id, initial=0):
    if account_id in root["accounts"]:
        raise Rejected(f"account {account_id!r} already exists")
    if type(initial) is not int or initial < 0:
        raise Rejected(f"initial balance must be a non-negative integer, got {initial!r}")
    root["accounts"][account_id] = {"balance": initial, "history": [["open", initial]],
                                    "meta": {"opened_by": ctx.master, "moves": 0}}
    return initial


def _move(acct, what, amount):
    acct["balance"] += amount
    acct["history"].append([what, amount])
    acct["meta"]["moves"] += 1
    if len(acct["history"]) > 5:
        del acct["history"][1]  # keep the opening entry and the last four


@nested_ledger.transaction
def deposit(root, ctx, account_id, amount):
    acct = _account(root, account_id)
    if type(amount) is not int or amount <= 0:
        raise Rejected(f"amount must be a positive integer, got {amount!r}")
    _move(acct, "deposit", amount)
    return acct["balance"]


@nested_ledger.transaction
def withdraw(root, ctx, account_id, amount):
    acct = _account(root, account_id)
    if type(amount) is not int or amount <= 0:
        raise Rejected(f"amount must be a positive integer, got {amount!r}")
    _move(acct, "withdraw", -amount)
    root["journal"].append(account_id)
    if acct["balance"] < 0:  # after mutating: atomicity undoes all of the above
        raise Rejected(f"insufficient funds in {account_id!r}")
    return acct["balance"]


@nested_ledger.transaction
def transfer(root, ctx, src, dst, amount):
    a, b = _account(root, src), _account(root, dst)
    if type(amount) is not int or amount <= 0:
        raise Rejected(f"amount must be a positive integer, got {amount!r}")
    if src == dst:
        raise Rejected("source and destination are the same account")
    _move(a, "out", -amount)
    _move(b, "in", amount)
    root["journal"].append([src, dst])
    if a["balance"] < 0:
        raise Rejected(f"insufficient funds in {src!r}")
    return a["balance"]


@nested_ledger.query
def balance(root, account_id):
    acct = root["accounts"].get(account_id)
    if acct is None:
        raise Rejected(f"no account {account_id!r}")  # as the example ledger's balance
    return acct["balance"]


@nested_ledger.query
def balances(root):
    return {account_id: acct["balance"] for account_id, acct in root["accounts"].items()}


@nested_ledger.query
def total(root):
    return sum(a["balance"] for a in root["accounts"].values())
