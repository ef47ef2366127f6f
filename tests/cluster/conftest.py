"""Every multi-master test runs twice: on the example ledger (a flat dict of balances) and
on the same ledger written with a nested state changed in place, refusing after mutating,
with no hand-written copy (`tests.support.nested_ledger`): rebases and atomic
transactions then go through the change log for real. A test bound to the flat ledger's
state says so with ``@pytest.mark.ledger_only``.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def state_model(request, monkeypatch):
    """The ledger variant of this test run (`tests.support.test_model` reads it)."""
    # Hypothesis's stateful TestCase is a unittest class, which is not parametrized: it
    # draws the variant itself.
    kind = getattr(request, "param", "ledger")
    monkeypatch.setenv("PREVALENCE_TEST_MODEL", kind)
    return kind


def pytest_generate_tests(metafunc):
    if "state_model" in metafunc.fixturenames:
        kinds = ["ledger"] if metafunc.definition.get_closest_marker("ledger_only") else ["ledger", "nested"]
        if metafunc.definition.get_closest_marker("faultfs"):
            # Once more on the flat ledger with every master behind its own faultfs host.
            metafunc.parametrize(("state_model", "shared_fs"), [(k, "local") for k in kinds] + [("ledger", "faultfs")],
                                 indirect=True, ids=[*kinds, "ledger-faultfs"])
        else:
            metafunc.parametrize("state_model", kinds, indirect=True)
