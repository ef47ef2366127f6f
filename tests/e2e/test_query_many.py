"""Queries through a real worker: the lean query answer and several reads in one task."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import one_master
from workers.client import RequestRefused, raise_for_outcome

pytestmark = pytest.mark.celery


def test_query_many_reads_several_keys_in_one_task_and_a_bad_call_fails_alone(make_cluster):
    cluster, client = one_master(make_cluster, {}, "qm1")
    client.execute_many([("open_account", ["qm2", 5]), ("deposit", ["qm1", 3])], master="alpha")

    outcomes = client.query_many([("balance", ["qm1"]), ("balance", ["qm2"]), ("nosuch", []),
                                  ("balance", ["nobody"]), ("total", [])])
    assert [o["status"] for o in outcomes] == ["ok", "ok", "error", "rejected", "ok"]
    assert [o["value"] for o in outcomes] == [3, 5, None, None, 8]
    assert {o["master"] for o in outcomes} == {"alpha"}
    with pytest.raises(RequestRefused, match="no query 'nosuch'"):
        raise_for_outcome(outcomes[2])
    # Aimed at a master, and one query alone: the short answer, same values.
    assert [o["value"] for o in client.query_many([("balance", ["qm2"])], master="alpha")] == [5]
    assert client.query_outcome("balance", "qm1") == {"status": "ok", "value": 3, "master": "alpha"}
    with pytest.raises(RequestRefused, match="at most 1000"):
        client.query_many([("balance", ["qm1"])] * 1001)
