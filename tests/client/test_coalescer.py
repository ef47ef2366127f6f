"""The coalescer in process, against a stand-in client whose replies the test releases:
how writes are gathered into batches, how many batches wait for replies at once, and what
each caller gets (tests/e2e/test_coalescing.py runs it against real workers)."""

from __future__ import annotations

import threading
import time

import pytest

from workers.client import RequestRefused
from workers.client.coalescer import Coalescer

WAIT_S = 10.0


class _Master:
    """Stands in for the client: records each batch sent; answers it when the test opens
    that batch's gate (or at once when `gated` is False). A deposit of "bad" refuses the
    whole batch, as the master does for arguments that do not fit."""

    def __init__(self, gated: bool = True) -> None:
        self.gated = gated
        self.sent: list[tuple[str | None, list]] = []
        self.gates: list[threading.Event] = []
        self.changed = threading.Condition()

    def _send(self, task, args, master=None, **options):
        assert task == "prevalence.execute_many"
        gate = threading.Event()
        if not self.gated:
            gate.set()
        with self.changed:
            self.sent.append((master, args[0]))
            self.gates.append(gate)
            self.changed.notify_all()
        return gate, master, args[0]

    def _wait(self, handle, timeout_s, what):
        gate, master, items = handle
        assert gate.wait(WAIT_S), f"the test never answered {what}"
        if len(items) > 1 and any(item[1] == ["bad"] for item in items):
            return {"status": "error", "error": "deposit() missing an argument", "error_type": "BadArguments"}
        if items[0][1] == ["bad"]:
            return {"status": "error", "error": "deposit() missing an argument", "error_type": "BadArguments"}
        return {"master": master or "any", "outcomes": [
            {"status": "ok", "value": item[1][-1], "committed": False, "record": f"m:{i}"}
            for i, item in enumerate(items)]}

    def wait_sent(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.sent) >= count, WAIT_S), self.sent

    def wait_gathered(self, coalescer: Coalescer, count: int) -> None:
        """Wait until the gathering thread holds `count` writes it has not sent (polls)."""
        deadline = time.monotonic() + WAIT_S
        while coalescer.waiting != count:
            assert time.monotonic() < deadline, (coalescer.waiting, count)
            time.sleep(0.001)

    def sizes(self) -> list[int]:
        return [len(items) for _master, items in self.sent]


def test_writes_arriving_while_every_slot_is_taken_leave_together_when_one_frees():
    stub = _Master()
    coalescer = Coalescer(stub, linger_s=0.0, in_flight_max=2)
    first = coalescer.submit("deposit", ["a", 1], master=None, key=None, timeout_s=WAIT_S)
    stub.wait_sent(1)
    second = coalescer.submit("deposit", ["a", 2], master=None, key=None, timeout_s=WAIT_S)
    stub.wait_sent(2)
    later = [coalescer.submit("deposit", ["a", n], master=None, key=None, timeout_s=WAIT_S)
             for n in range(3, 53)]
    stub.wait_gathered(coalescer, 50)
    assert stub.sizes() == [1, 1]  # both slots taken: the 50 wait and keep gathering
    stub.gates[0].set()
    stub.wait_sent(3)
    assert stub.sizes() == [1, 1, 50]
    for gate in stub.gates:
        gate.set()
    assert first.result(WAIT_S)["value"] == 1 and second.result(WAIT_S)["value"] == 2
    assert [f.result(WAIT_S)["value"] for f in later] == list(range(3, 53))
    coalescer.close()
    assert coalescer.batches == 3


def test_a_batch_holds_at_most_batch_max_writes_and_the_rest_follows_in_order():
    stub = _Master()
    coalescer = Coalescer(stub, linger_s=0.0, batch_max=10, in_flight_max=1)
    futures = [coalescer.submit("deposit", ["a", 0], master="alpha", key=None, timeout_s=WAIT_S)]
    stub.wait_sent(1)
    futures += [coalescer.submit("deposit", ["a", n], master="alpha", key=None, timeout_s=WAIT_S)
                for n in range(1, 26)]
    stub.wait_gathered(coalescer, 25)
    for count in (2, 3, 4):
        stub.gates[count - 2].set()
        stub.wait_sent(count)
    stub.gates[-1].set()
    assert stub.sizes() == [1, 10, 10, 5]
    assert [item[1][1] for _m, items in stub.sent for item in items] == list(range(26))
    assert [f.result(WAIT_S)["value"] for f in futures] == list(range(26))
    coalescer.close()


def test_each_target_has_its_own_slots():
    stub = _Master()
    coalescer = Coalescer(stub, linger_s=0.0, in_flight_max=1)
    coalescer.submit("deposit", ["a", 1], master="alpha", key=None, timeout_s=WAIT_S)
    stub.wait_sent(1)
    beta = coalescer.submit("deposit", ["a", 2], master="beta", key=None, timeout_s=WAIT_S)
    stub.wait_sent(2)  # alpha's unanswered batch does not hold beta's back
    assert [m for m, _items in stub.sent] == ["alpha", "beta"]
    stub.gates[1].set()
    assert beta.result(WAIT_S)["master"] == "beta"
    stub.gates[0].set()
    coalescer.close()


def test_each_caller_gets_its_own_outcome_with_its_request_id():
    stub = _Master(gated=False)
    coalescer = Coalescer(stub, linger_s=0.01)
    mine = coalescer.submit("deposit", ["a", 7], master="alpha", key="order-7", timeout_s=WAIT_S)
    other = coalescer.submit("deposit", ["a", 8], master="alpha", key=None, timeout_s=WAIT_S)
    doc = mine.result(WAIT_S)
    assert doc["rid"] == "order-7" and doc["value"] == 7 and doc["master"] == "alpha"
    assert doc["error"] is None and doc["duplicate"] is False and doc["record"]
    assert other.result(WAIT_S)["rid"] not in (None, "order-7")  # a fresh UUID
    coalescer.close()


def test_a_batch_refused_because_of_one_item_is_resent_item_by_item_and_only_it_fails():
    stub = _Master()
    coalescer = Coalescer(stub, linger_s=0.0, in_flight_max=1)
    first = coalescer.submit("deposit", ["a", 1], master=None, key=None, timeout_s=WAIT_S)
    stub.wait_sent(1)
    good = coalescer.submit("deposit", ["a", 2], master=None, key=None, timeout_s=WAIT_S)
    bad = coalescer.submit("deposit", ["bad"], master=None, key=None, timeout_s=WAIT_S)
    stub.wait_gathered(coalescer, 2)
    stub.gated = False
    stub.gates[0].set()
    assert first.result(WAIT_S)["value"] == 1
    assert good.result(WAIT_S)["value"] == 2
    with pytest.raises(RequestRefused) as refused:
        bad.result(WAIT_S)
    assert refused.value.error_type == "BadArguments"
    assert stub.sizes() == [1, 2, 1, 1]
    coalescer.close()


def test_close_sends_what_is_pending_and_waits_for_the_replies():
    stub = _Master(gated=False)
    coalescer = Coalescer(stub, linger_s=5.0)  # would linger long: close does not wait for it
    futures = [coalescer.submit("deposit", ["a", n], master=None, key=None, timeout_s=WAIT_S)
               for n in range(5)]
    coalescer.close()
    assert all(f.done() for f in futures)
    assert [f.result()["value"] for f in futures] == list(range(5))
    with pytest.raises(RuntimeError, match="closed"):
        coalescer.submit("deposit", ["a", 1], master=None, key=None, timeout_s=WAIT_S)
