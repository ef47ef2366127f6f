"""A Python client for the cluster: execute, query, sync and snapshot through Celery.

    from workers.client import Client
    client = Client()                                  # the app of workers.celery
    client.execute("deposit", "acct1", 10)             # any master (shared queue)
    client.execute("deposit", "acct1", 10, master="beta", key="order-42")
    client.query("balance", "acct1", master="beta")
    client.execute_many([("deposit", ["acct1", 1]), ("withdraw", ["acct1", 1])])

`execute` returns the transaction's value or raises `TransactionRejected` (the model
refused), `RequestRefused` (unknown transaction, wrong arguments, unencodable values;
nothing was journaled) or `TransactionFailed` (it raised; the record stays, every master
agrees). `NoReply` means no answer within the timeout: the transaction may or may not have
committed, so retry with the same ``key`` and it applies once.

The client needs only Celery and the broker; it never imports the engine.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from workers.celeryconfig import BROADCAST_OPTIONS, WRITE_QUEUE, master_queue

#: How long a call waits for its reply by default, in seconds.
REPLY_TIMEOUT_S_DEFAULT = 30.0
#: How often a waiting call polls when the backend cannot push (seconds).
REPLY_POLL_S = 0.02


class ClientError(Exception):
    """Root of the errors a `Client` raises."""


class TransactionRejected(ClientError):
    """Raised when the model refused the transaction (`Rejected`); its outcome is recorded."""


class RequestRefused(ClientError):
    """Raised when a master refused the request before journaling anything: unknown name,
    arguments that do not fit, unencodable values, malformed request, not ready.

    `error_type` is the engine's (or the task's) error class name.
    """

    def __init__(self, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type


class TransactionFailed(ClientError):
    """Raised when the transaction raised; the record is journaled and replays alike."""


class NoReply(ClientError):
    """Raised when no reply came within the timeout. The request may or may not have been
    applied: retry with the same key to apply it exactly once."""


def raise_for_outcome(outcome: dict[str, Any]) -> Any:
    """Return an outcome document's value, or raise the `ClientError` it describes."""
    status = outcome.get("status")
    if status == "ok":
        return outcome.get("value")
    message = outcome.get("error") or f"request failed with status {status!r}"
    if status == "rejected":
        raise TransactionRejected(message)
    if outcome.get("error_type") == "TransactionFailed":
        raise TransactionFailed(message)
    raise RequestRefused(message, outcome.get("error_type"))


class Client:
    """Sends requests to the masters through Celery and waits for their replies.

    Args:
        app: the Celery app (default: `workers.celery.app`).
        timeout_s: default reply timeout for every call.
    """

    def __init__(self, app: Any = None, *, timeout_s: float = REPLY_TIMEOUT_S_DEFAULT) -> None:
        if app is None:
            from workers.celery import app as default_app

            app = default_app
        self.app = app
        self.timeout_s = timeout_s

    # -- sending -----------------------------------------------------------------------

    def _send(self, task: str, args: Sequence[Any], kwargs: dict[str, Any] | None = None,
              *, master: str | None = None, task_id: str | None = None, **options: Any) -> Any:
        from kombu.exceptions import EncodeError

        queue = master_queue(master) if master else WRITE_QUEUE
        try:
            return self.app.send_task(task, args=list(args), kwargs=kwargs or {}, queue=queue,
                                      task_id=task_id, **options)
        except EncodeError as exc:
            raise RequestRefused(f"the request cannot be encoded as JSON: {exc}. Arguments "
                                 "must be strings, numbers, booleans, null, lists and "
                                 "objects with string keys", "BadArguments") from exc

    def _wait(self, result: Any, timeout_s: float | None, what: str) -> Any:
        from celery.exceptions import TimeoutError as CeleryTimeout

        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            reply = result.get(timeout=timeout_s, interval=REPLY_POLL_S, propagate=False)
        except CeleryTimeout as exc:
            raise NoReply(f"no reply to {what} within {timeout_s:g} s (task {result.id}); it "
                          "may or may not have been applied. Is a master running? Retry "
                          "with the same key to apply it exactly once.") from exc
        if result.failed():
            raise RequestRefused(f"{what} failed on the worker (task {result.id}): "
                                 f"{type(reply).__name__}: {reply}", "TaskFailed")
        return reply

    # -- writes ------------------------------------------------------------------------

    def execute_outcome(self, tx: str, *args: Any, master: str | None = None,
                        key: str | None = None, timeout_s: float | None = None,
                        task_id: str | None = None) -> dict[str, Any]:
        """Run one transaction and return its outcome document (never raises for a
        refusal; raises `NoReply` on timeout and `RequestRefused` when unencodable)."""
        result = self._send("prevalence.execute", [tx, list(args), key], master=master,
                            task_id=task_id)
        return self._wait(result, timeout_s, f"transaction {tx!r}")

    def execute(self, tx: str, *args: Any, master: str | None = None, key: str | None = None,
                timeout_s: float | None = None) -> Any:
        """Run one transaction on `master` (default: whichever master takes it first) and
        return its value. ``key`` makes retries safe: a key already applied is not applied
        again. Raises the `ClientError` subclasses of the module doc."""
        return raise_for_outcome(self.execute_outcome(tx, *args, master=master, key=key,
                                                      timeout_s=timeout_s))

    def execute_many(self, items: Iterable[Sequence[Any]], *, master: str | None = None,
                     key: str | None = None, timeout_s: float | None = None
                     ) -> list[dict[str, Any]]:
        """Run a batch (items ``(tx, args)`` or ``(tx, args, key)``) with one fsync.

        Returns one outcome per item, in order: ``status`` and ``value``, plus ``error`` and
        ``error_type`` when not ok and ``duplicate`` when the item's id had already been
        applied. Raises `RequestRefused` if the batch is
        refused as a whole (then nothing was applied), `NoReply` on timeout.
        """
        payload = []
        for tx, args, *rest in items:
            payload.append([tx, list(args), *rest[:1]])
        result = self._send("prevalence.execute_many", [payload, key], master=master)
        reply = self._wait(result, timeout_s, f"batch of {len(payload)}")
        if "outcomes" not in reply:
            raise_for_outcome(reply)
        return reply["outcomes"]

    # -- reads -------------------------------------------------------------------------

    def query_outcome(self, name: str, *args: Any, master: str | None = None,
                      timeout_s: float | None = None) -> dict[str, Any]:
        """Run a query and return its outcome document (the value and which master)."""
        result = self._send("prevalence.query", [name, list(args)], master=master)
        return self._wait(result, timeout_s, f"query {name!r}")

    def query(self, name: str, *args: Any, master: str | None = None,
              timeout_s: float | None = None) -> Any:
        """Run a query on `master` (default: any master) and return its value. The value
        reflects that master's live state: its own writes at once, others' after a sync."""
        return raise_for_outcome(self.query_outcome(name, *args, master=master,
                                                    timeout_s=timeout_s))

    # -- operations --------------------------------------------------------------------

    def sync(self, master: str | None = None, *, timeout_s: float | None = None
             ) -> dict[str, Any] | None:
        """Sync now. With `master`, wait for and return its report; without, broadcast to
        every master and return None at once (broadcasts have no reply)."""
        if master is None:
            self.app.send_task("prevalence.sync", **BROADCAST_OPTIONS)
            return None
        result = self._send("prevalence.sync", [], master=master, ignore_result=False)
        return self._wait(result, timeout_s, f"sync of {master}")

    def snapshot(self, master: str | None = None, *, timeout_s: float | None = None
                 ) -> dict[str, Any] | None:
        """Snapshot now: broadcast to every master (None), or one master (its report)."""
        if master is None:
            self.app.send_task("prevalence.snapshot", **BROADCAST_OPTIONS)
            return None
        result = self._send("prevalence.snapshot", [], master=master, ignore_result=False)
        return self._wait(result, timeout_s, f"snapshot of {master}")

    def status(self, master: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Ask one master for its status document through its queue (waits behind the
        task in hand; `workers.client.monitor.cluster_view` does not)."""
        result = self._send("prevalence.status", [], master=master)
        return self._wait(result, timeout_s, f"status of {master}")
