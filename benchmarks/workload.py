"""The ledger workload every contender runs: the same accounts, the same seeded transfers.

Accounts are opened before any timing starts, with a balance so large that no transfer in
the workload can overdraw: every contender does the same work (check, debit, credit) and
none of it is a refusal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SEED = 20261127
ACCOUNT_COUNT = 1000
INITIAL_BALANCE = 10**12
TRANSFER_AMOUNT_MAX = 100


def account_id(index: int) -> str:
    """Return the id of account ``index``: fixed width, so text order is numeric order."""
    return f"acct-{index:07d}"


@dataclass(frozen=True)
class Workload:
    """A fixed list of accounts and a fixed, seeded list of transfers between them.

    ``transfers`` is cycled by the contenders: operation ``i`` is ``transfers[i % len]``.
    """

    account_ids: tuple[str, ...]
    transfers: tuple[tuple[str, str, int], ...]
    initial_balance: int = INITIAL_BALANCE

    def transfer(self, i: int) -> tuple[str, str, int]:
        return self.transfers[i % len(self.transfers)]

    def transfer_batch(self, start: int, count: int) -> list[tuple[str, str, int]]:
        n = len(self.transfers)
        return [self.transfers[(start + k) % n] for k in range(count)]

    def query_keys(self, count: int, seed: int = SEED + 1) -> list[str]:
        rng = random.Random(seed)
        ids = self.account_ids
        return [ids[rng.randrange(len(ids))] for _ in range(count)]


def make_workload(
    account_count: int = ACCOUNT_COUNT, transfer_count: int = 200_000, seed: int = SEED
) -> Workload:
    """Build the workload: ``account_count`` accounts, ``transfer_count`` seeded transfers."""
    rng = random.Random(seed)
    ids = tuple(account_id(i) for i in range(account_count))
    transfers = []
    for _ in range(transfer_count):
        src = rng.randrange(account_count)
        dst = rng.randrange(account_count - 1)
        if dst >= src:
            dst += 1
        transfers.append((ids[src], ids[dst], rng.randint(1, TRANSFER_AMOUNT_MAX)))
    return Workload(ids, tuple(transfers))
