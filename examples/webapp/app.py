"""A ledger web service in Flask: reads from an in-process follower, writes through the
coalescing client, and reads its own writes.

    GET  /accounts/<id>               {"account", "balance"}; 404 when there is none
         ?after=<master:seq>           first wait until this process's follower applied that
                                       record (a token from an earlier write's answer, given by
                                       any instance of the service)
    POST /accounts                    {"account": id, "initial": n}      -> 201
    POST /accounts/<id>/deposits      {"amount": n}                      -> 200
    POST /transfers                   {"from": id, "to": id, "amount": n} -> 200
    GET  /status                      the follower's status (computes a digest: not per read)

A write answers ``{"balance", "record", "committed", "visible"}``: ``record`` is the token
of the journal record that carries it. Before answering, the handler waits until the
follower has applied that record, so the next read through this process shows the write
(``visible: true``). If that takes longer than ``visible_timeout_s`` the write still
stands: 202 with ``visible: false``, and ``?after=<record>`` on a read waits for it.

Reads never leave the process: a follower query costs microseconds, against a round trip
through Celery (about a millisecond) or a database. Writes from the server's threads are
gathered by the client into one ``execute_many`` per master within ``coalesce_ms``, so many
concurrent requests share one round trip and one journal sync.

Writes on one account (a transfer: its source account) all go to the same master
(`Client.route`), which orders them: each answer includes the ones before it, a rebase
cannot reverse them, and a retry with the same ``Idempotency-Key`` finds the first
outcome instead of being applied, tentatively, on a master that has not read it yet.

Errors: a refusal by the model (overdraft, no such account) is 409; a malformed body or a
request the cluster refused before journaling it is 400; no answer from the cluster in
time is 504, and the write may or may not have happened: send it again with the same
``Idempotency-Key`` header and it applies once.

The follower's view decides what a read shows: ``"latest"`` (what this example's command
opens by default) shows every record it has read, tentative ones too, like a master's own
state, so a write is visible within one follow interval; ``"committed"`` shows only what
can no longer change, and a write becomes visible only once every member has read it
(about one sync interval later).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request

from workers.client import NoReply, RequestRefused, TransactionFailed, TransactionRejected, raise_for_outcome
from workers.prevalence import Rejected

#: How long a write waits for the follower to apply it before answering 202 (seconds).
VISIBLE_TIMEOUT_S_DEFAULT = 10.0
#: Longest account id accepted from a request (characters).
ACCOUNT_CHARS_MAX = 128


class BadInput(Exception):
    """Raised by a handler for a malformed request body or parameter (answered with 400)."""


def create_app(follower: Any, client: Any, *,
               visible_timeout_s: float = VISIBLE_TIMEOUT_S_DEFAULT) -> Flask:
    """The Flask application.

    Args:
        follower: an open `workers.prevalence.Follower` of the ledger, following in the
            background (``follow_interval_s``); the caller closes it.
        client: a `workers.client.Client`, best with ``coalesce_ms`` set; the caller closes it.
        visible_timeout_s: how long a write waits for the follower to show it.
    """
    app = Flask(__name__)

    @app.get("/accounts/<account>")
    def read_account(account: str):
        after = request.args.get("after")
        if after:
            try:
                seen = follower.wait_for(after, timeout_s=visible_timeout_s)
            except ValueError as exc:
                raise BadInput(f"after: {exc}") from None
            if not seen:
                return _error(503, f"record {after} is not visible here yet; try again",
                              headers={"Retry-After": "1"})
        try:
            balance = follower.query("balance", account)
        except Rejected:
            return _error(404, f"no account {account!r}")
        return jsonify(account=account, balance=balance)

    @app.post("/accounts")
    def open_account():
        body = _body()
        account = _account(body.get("account"), "account")
        initial = _amount(body.get("initial", 0), "initial", minimum=0)
        return _write(201, "open_account", account, initial, account=account)

    @app.post("/accounts/<account>/deposits")
    def deposit(account: str):
        amount = _amount(_body().get("amount"), "amount")
        return _write(200, "deposit", _account(account, "account"), amount, account=account)

    @app.post("/transfers")
    def transfer():
        body = _body()
        src = _account(body.get("from"), "from")
        dst = _account(body.get("to"), "to")
        amount = _amount(body.get("amount"), "amount")
        return _write(200, "transfer", src, dst, amount, account=src)

    @app.get("/status")
    def status():
        return jsonify(follower.status())

    @app.errorhandler(BadInput)
    def bad_input(exc: BadInput):
        return _error(400, str(exc))

    def _write(status: int, tx: str, *args: Any, account: str):
        key = request.headers.get("Idempotency-Key") or None
        try:
            # Every write on one account goes to one master (key affinity): its answers
            # come in order, and a retry with the same key meets the first outcome.
            outcome = client.execute_outcome(tx, *args, key=key, master=client.route(account))
            balance = raise_for_outcome(outcome)
        except TransactionRejected as exc:
            return _error(409, str(exc))
        except TransactionFailed as exc:
            return _error(500, str(exc))
        except RequestRefused as exc:
            return _error(400, str(exc))
        except NoReply as exc:
            return _error(504, f"{exc} Send it again with the same Idempotency-Key header.")
        # Read your writes: answer once this process's follower shows the record.
        visible = follower.wait_for(outcome["record"], timeout_s=visible_timeout_s)
        reply = jsonify(account=account, balance=balance, record=outcome["record"],
                        committed=bool(outcome.get("committed")), visible=visible)
        return reply, (status if visible else 202)

    return app


def _body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadInput("the request body must be a JSON object")
    return body


def _account(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > ACCOUNT_CHARS_MAX:
        raise BadInput(f"{field} must be an account id of 1..{ACCOUNT_CHARS_MAX} characters, "
                       f"got {value!r:.80}")
    return value


def _amount(value: Any, field: str, *, minimum: int = 1) -> int:
    if type(value) is not int or value < minimum:
        raise BadInput(f"{field} must be an integer of at least {minimum}, got {value!r:.80}")
    return value


def _error(status: int, message: str, headers: dict[str, str] | None = None):
    return jsonify(error=message), status, headers or {}
