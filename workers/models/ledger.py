"""The example model: a ledger of accounts with integer balances.

Transactions: open_account(id, initial), deposit(id, amount), withdraw(id, amount),
transfer(src, dst, amount). Withdraw and transfer refuse to overdraw with `Rejected`, as
do unknown accounts and non-positive amounts, and no balance may pass `BALANCE_MAX`
(deposit and transfer refuse with `Rejected`): every balance stays an integer any
snapshot, client or JSON consumer holds exactly. All refusals happen before any mutation.
Queries: balance(id), balances(), total().
"""

from __future__ import annotations

from workers.prevalence import Model, Rejected


def _new_state() -> dict:
    return {"accounts": {}}


#: The largest balance (2**53 - 1: exact in a JSON number, an int64 and a float64).
BALANCE_MAX = (1 << 53) - 1

model = Model("ledger", _new_state)


@model.transaction
def open_account(root, ctx, account_id: str, initial: int = 0) -> int:
    accounts = root["accounts"]
    if type(account_id) is not str or not account_id:
        raise Rejected(f"account id must be a non-empty string, got {account_id!r}")
    if account_id in accounts:
        raise Rejected(f"account {account_id!r} already exists")
    if type(initial) is not int or initial < 0:
        raise Rejected(f"initial balance must be a non-negative integer, got {initial!r}")
    if initial > BALANCE_MAX:
        raise Rejected(f"initial balance {initial} is above the largest balance {BALANCE_MAX}")
    accounts[account_id] = initial
    return initial


# The transactions below inline their checks (no helper calls): replay runs them millions
# of times, and a refusal must still come before any mutation.

@model.transaction
def deposit(root, ctx, account_id: str, amount: int) -> int:
    accounts = root["accounts"]
    balance = accounts.get(account_id)
    if balance is None:
        raise Rejected(f"no account {account_id!r}")
    if amount.__class__ is not int or amount <= 0:
        raise Rejected(f"amount must be a positive integer, got {amount!r}")
    balance += amount
    if balance > BALANCE_MAX:
        raise Rejected(f"deposit would take {account_id!r} to {balance}, above the largest balance {BALANCE_MAX}")
    accounts[account_id] = balance
    return balance


@model.transaction
def withdraw(root, ctx, account_id: str, amount: int) -> int:
    accounts = root["accounts"]
    balance = accounts.get(account_id)
    if balance is None:
        raise Rejected(f"no account {account_id!r}")
    if amount.__class__ is not int or amount <= 0:
        raise Rejected(f"amount must be a positive integer, got {amount!r}")
    if amount > balance:
        raise Rejected(f"insufficient funds in {account_id!r}: balance {balance}, withdrawal {amount}")
    accounts[account_id] = balance - amount
    return balance - amount


@model.transaction
def transfer(root, ctx, src: str, dst: str, amount: int) -> int:
    accounts = root["accounts"]
    balance = accounts.get(src)
    if balance is None:
        raise Rejected(f"no account {src!r}")
    if dst not in accounts:
        raise Rejected(f"no account {dst!r}")
    if amount.__class__ is not int or amount <= 0:
        raise Rejected(f"amount must be a positive integer, got {amount!r}")
    if src == dst:
        raise Rejected("source and destination are the same account")
    if amount > balance:
        raise Rejected(f"insufficient funds in {src!r}: balance {balance}, transfer {amount}")
    if accounts[dst] + amount > BALANCE_MAX:
        raise Rejected(f"transfer would take {dst!r} above the largest balance {BALANCE_MAX}")
    accounts[src] = balance - amount
    accounts[dst] += amount
    return balance - amount


@model.query
def balance(root, account_id: str) -> int:
    """The account's balance; refuses (`Rejected`) an account that does not exist, as
    `deposit` and `withdraw` do. `balances()` lists the accounts without refusing."""
    amount = root["accounts"].get(account_id)
    if amount is None:
        raise Rejected(f"no account {account_id!r}")
    return amount


@model.query
def balances(root) -> dict:
    return dict(root["accounts"])


@model.query
def total(root) -> int:
    return sum(root["accounts"].values())
