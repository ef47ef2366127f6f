"""Check mode (issue 9, "Also"): with ``PREVALENCE_CHECK_TRANSACTIONS=1`` every record,
a peer's too, is applied twice and compared; status says whether it is on."""

from __future__ import annotations

import random

import pytest

from workers.prevalence import Model
from workers.prevalence.errors import InvariantViolation

from tests.support import open_member


@pytest.mark.ledger_only  # its own model: one run is enough
def test_check_mode_from_the_environment_is_shown_in_status_and_catches_a_peers_wall_clock_transaction(
        tmp_path, monkeypatch):
    dice = Model("dice", lambda: {"n": 0})

    @dice.transaction
    def roll(root, ctx):
        root["n"] = random.random()  # not ctx.random: a different state on every master

    monkeypatch.setenv("PREVALENCE_CHECK_TRANSACTIONS", "0")
    a = open_member(tmp_path, "alpha", model=dice)
    monkeypatch.setenv("PREVALENCE_CHECK_TRANSACTIONS", "1")
    b = open_member(tmp_path, "beta", model=dice)
    assert a.status()["check_transactions"] is False and b.status()["check_transactions"] is True
    a.sync(); b.sync(); a.sync()
    a.execute("roll")  # unchecked here: accepted
    with pytest.raises(InvariantViolation, match=r"'roll' \(alpha:\d+\) is not deterministic"):
        b.sync()
    a.close()
    b.crash()
