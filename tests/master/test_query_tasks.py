"""The query tasks in process: `prevalence.query` and `prevalence.query_many` run through
Celery's own tracer (``Task.apply``) on a real master opened in a temp folder, and the
client's `query_many` through a stand-in app that runs each sent task the same way (no
broker, no worker process; tests/e2e/test_query_many.py runs real workers)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from workers.client import Client, RequestRefused, TransactionRejected, raise_for_outcome
from workers.master import runtime, tasks
from workers.models.ledger import model as ledger
from workers.prevalence import Master, Model


def _model_with_a_failing_query() -> Model:
    model = Model("ledger-plus", lambda: {"accounts": {}})
    model.transaction(ledger.transactions["open_account"], name="open_account")
    model.query(ledger.queries["balance"], name="balance")

    @model.query
    def broken(root):
        raise ZeroDivisionError("the query's own bug")

    @model.query
    def known(root, account_id: str):
        return {account_id} if account_id in root["accounts"] else set()

    return model


@pytest.fixture
def master(tmp_path):
    """A sole master of the ledger (plus a query that raises) installed as this process's
    runtime, with account "a" holding 7."""
    opened = Master.open(_model_with_a_failing_query(), str(tmp_path / "shared"), "alpha",
                         fsync="never")
    opened.execute("open_account", "a", 7)
    runtime.install(SimpleNamespace(name="alpha", master=opened))
    yield opened
    runtime.uninstall()
    opened.close()


def _run(task, *args):
    result = task.apply(args=list(args))
    assert result.successful(), result.traceback
    return result.get()


def test_a_query_answers_its_value_and_master_and_nothing_a_write_carries(master):
    assert _run(tasks.query, "balance", ["a"]) == {"status": "ok", "value": 7, "master": "alpha"}
    assert _run(tasks.query, "balance", ["nobody"]) == {
        "status": "rejected", "value": None, "error": "no account 'nobody'", "error_type": "Rejected",
        "master": "alpha"}


def test_a_query_value_that_is_not_a_json_scalar_is_converted_to_builtins(master):
    assert _run(tasks.query, "known", ["a"])["value"] == ["a"]  # a set: JSON has none


@pytest.mark.parametrize("name, args, error_type, text", [
    ("nosuch", [], "UnknownQuery", "no query 'nosuch'"),
    ("balance", [], "BadArguments", "missing a required argument"),
    ("balance", ["a", "b"], "BadArguments", "too many"),
    ("", [], "BadRequest", "non-empty string"),
    ("balance", "a", "BadRequest", "must be a list"),
])
def test_a_malformed_query_is_refused_with_a_clear_error(master, name, args, error_type, text):
    out = _run(tasks.query, name, args)
    assert out["status"] == "error" and out["error_type"] == error_type, out
    assert text in out["error"] and out["master"] == "alpha"


def test_a_query_that_raises_is_reported_and_logged_with_its_task_id(master, caplog):
    with caplog.at_level(logging.WARNING, logger="workers.master.tasks"):
        result = tasks.query.apply(args=["broken", []])
    out = result.get()
    assert out["status"] == "error" and out["error_type"] == "QueryFailed"
    assert "ZeroDivisionError: the query's own bug" in out["error"]
    assert result.id in caplog.text


def test_query_many_answers_every_call_in_order_and_a_bad_call_fails_alone(master):
    reply = _run(tasks.query_many, [["balance", ["a"]], ["nosuch", []], ["balance", ["b", 1]],
                                    "junk", ["broken", []], ["known", ["a"]], ["balance", ["b"]]])
    assert reply["master"] == "alpha"
    outcomes = reply["outcomes"]
    assert [o["status"] for o in outcomes] == ["ok", "error", "error", "error", "error", "ok", "rejected"]
    assert [o.get("error_type") for o in outcomes] == [
        None, "UnknownQuery", "BadArguments", "BadRequest", "QueryFailed", None, "Rejected"]
    assert [o["value"] for o in outcomes] == [7, None, None, None, None, ["a"], None]


def test_query_many_refuses_a_batch_that_is_not_a_list_or_too_large(master):
    assert _run(tasks.query_many, "balance")["error_type"] == "BadRequest"
    too_many = [["balance", ["a"]]] * (tasks.QUERY_BATCH_ITEMS_MAX + 1)
    out = _run(tasks.query_many, too_many)
    assert out["status"] == "error" and "at most" in out["error"]
    assert len(_run(tasks.query_many, too_many[1:])["outcomes"]) == tasks.QUERY_BATCH_ITEMS_MAX


class _InProcessApp:
    """Stands in for the client's Celery app: each sent task runs at once through Celery's
    tracer in this process (the master installed by the `master` fixture answers)."""

    conf = SimpleNamespace(broker_url="memory://")

    def __init__(self) -> None:
        self.sent: list[tuple[str, list]] = []

    def send_task(self, name, args=(), kwargs=None, queue=None, task_id=None, **options):
        self.sent.append((name, list(args)))
        task = {"prevalence.query": tasks.query, "prevalence.query_many": tasks.query_many}[name]
        return task.apply(args=list(args), kwargs=kwargs or {})


def test_client_query_many_sends_one_task_and_gives_each_call_its_outcome(master):
    app = _InProcessApp()
    client = Client(app)
    outcomes = client.query_many([("balance", ["a"]), ("balance", ("nobody",)), ("nosuch", [])])
    assert app.sent == [("prevalence.query_many",
                         [[["balance", ["a"]], ["balance", ["nobody"]], ["nosuch", []]]])]
    assert [o["master"] for o in outcomes] == ["alpha"] * 3
    assert raise_for_outcome(outcomes[0]) == 7
    with pytest.raises(TransactionRejected, match="no account 'nobody'"):
        raise_for_outcome(outcomes[1])
    with pytest.raises(RequestRefused, match="no query 'nosuch'"):
        raise_for_outcome(outcomes[2])


def test_client_query_many_raises_when_the_batch_is_refused_as_a_whole(master):
    client = Client(_InProcessApp())
    with pytest.raises(RequestRefused, match="at most"):
        client.query_many([("balance", ["a"])] * (tasks.QUERY_BATCH_ITEMS_MAX + 1))


def test_client_query_returns_the_value_or_raises_the_refusal(master):
    client = Client(_InProcessApp())
    assert client.query("balance", "a") == 7
    assert client.query_outcome("balance", "a")["master"] == "alpha"
    with pytest.raises(RequestRefused) as refused:
        client.query("balance")
    assert refused.value.error_type == "BadArguments"
    assert not isinstance(refused.value, TransactionRejected)
