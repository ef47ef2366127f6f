"""A Python client for the cluster: execute, query, sync and snapshot through Celery.

    from workers.client import Client
    client = Client()                                  # the app of workers.celery
    client.execute("deposit", "acct1", 10)             # any master (shared queue)
    client.execute("deposit", "acct1", 10, master="beta", key="order-42")
    client.query("balance", "acct1", master="beta")
    client.query_many([("balance", ["acct1"]), ("balance", ["acct2"])])   # one task
    client.execute_many([("deposit", ["acct1", 1]), ("withdraw", ["acct1", 1])])
    client.execute("withdraw", "acct1", 5, wait="committed")   # the final outcome
    client.execute("withdraw", "acct1", 5, route_key="acct1")  # one master per key

**Tentative and committed.** A master answers a write as soon as it has journaled and
applied it; with other masters writing at once, that answer is *tentative*: a write of
another master that orders before it (hybrid clocks, `(hlc, master, seq)`) can arrive at
the next sync and change it (two withdrawals that each passed alone, of which the committed
order refuses one). Every outcome document says ``committed: true|false``.
``wait="committed"`` waits until the record is committed and returns (or raises for) the
final outcome; ``route_key`` sends every write with the same key to the same master while
it is up, so writes on one entity are ordered by one master and a rebase cannot reverse
them.

`execute` returns the transaction's value or raises `TransactionRejected` (the model
refused), `RequestRefused` (unknown transaction, wrong arguments, unencodable values;
nothing was journaled) or `TransactionFailed` (it raised; the record stays, every master
agrees). `NoReply` means no answer within the timeout: the transaction may or may not have
committed, so retry with the same ``key`` and it applies once.

The client needs only Celery and the broker; it never imports the engine.
"""

from __future__ import annotations

import hashlib
import time
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


class BrokerUnavailable(NoReply):
    """Raised when the broker (Redis) cannot be reached: nothing was sent."""


class NotCommittedYet(NoReply):
    """Raised by a committed wait that timed out: the write was answered (tentatively) and
    stands; its final outcome is not known yet. `tentative` is that answer; ask again with
    `Client.outcome(key, wait=True)` (or ``prevalence outcome KEY --wait``)."""

    def __init__(self, message: str, tentative: dict[str, Any]) -> None:
        super().__init__(message)
        self.tentative = tentative

#: Publishing a request retries a lost broker connection this much, then gives up (kombu's
#: default retries for ~20 s, past any timeout a caller asked for).
SEND_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.25, "interval_max": 0.5}
#: A reachable broker is checked again (one PING) after this long (seconds): Celery's own
#: reconnection loop would hold a call ~20 s past its timeout when Redis is down.
BROKER_CHECK_S = 5.0
#: How often a committed wait reads the outcome key in Redis (seconds).
COMMITTED_POLL_S = 0.02
#: How often a committed wait also asks the master itself (covers a flushed Redis).
COMMITTED_ASK_MASTER_S = 1.0
#: How long the list of masters that are up is reused for `route_key` (seconds).
MEMBERS_CACHE_S = 2.0


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
        coalesce_ms: when set, single writes (`execute`, `execute_outcome`) from concurrent
            threads are gathered for up to this many milliseconds and sent as one
            ``execute_many`` per master (`workers.client.coalescer`); each caller still gets
            its own outcome. Call `close()` when done.
    """

    def __init__(self, app: Any = None, *, timeout_s: float = REPLY_TIMEOUT_S_DEFAULT,
                 coalesce_ms: float | None = None) -> None:
        if app is None:
            from workers.celery import app as default_app

            app = default_app
        self.app = app
        self.timeout_s = timeout_s
        self._redis: Any = None
        self._members: tuple[float, list[str]] = (0.0, [])
        self._broker_ok_at = -BROKER_CHECK_S
        self._coalescer = None
        if coalesce_ms is not None:
            if coalesce_ms < 0:
                raise ValueError(f"coalesce_ms must be >= 0, got {coalesce_ms!r}")
            from workers.client.coalescer import Coalescer

            self._coalescer = Coalescer(self, coalesce_ms / 1000.0)

    def close(self) -> None:
        """Stop the coalescing thread (if any); pending writes are sent first."""
        if self._coalescer is not None:
            self._coalescer.close()
            self._coalescer = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- sending -----------------------------------------------------------------------

    def _send(self, task: str, args: Sequence[Any], kwargs: dict[str, Any] | None = None,
              *, master: str | None = None, task_id: str | None = None, **options: Any) -> Any:
        from kombu.exceptions import EncodeError

        from kombu.exceptions import OperationalError

        queue = master_queue(master) if master else WRITE_QUEUE
        options.setdefault("retry_policy", SEND_RETRY_POLICY)
        self._check_broker()
        try:
            return self.app.send_task(task, args=list(args), kwargs=kwargs or {}, queue=queue,
                                      task_id=task_id, **options)
        except EncodeError as exc:
            raise RequestRefused(f"the request cannot be encoded as JSON: {exc}. Arguments "
                                 "must be strings, numbers, booleans, null, lists and "
                                 "objects with string keys", "BadArguments") from exc
        except (OperationalError, RuntimeError) as exc:
            raise BrokerUnavailable(f"cannot reach the broker at {_redact(self.app.conf.broker_url)} "
                                    f"({exc}); nothing was sent. Is Redis running?") from exc

    def _broadcast(self, task: str) -> None:
        from kombu.exceptions import OperationalError

        self._check_broker()
        try:
            self.app.send_task(task, retry_policy=SEND_RETRY_POLICY, **BROADCAST_OPTIONS)
        except (OperationalError, RuntimeError) as exc:
            raise BrokerUnavailable(f"cannot reach the broker at {_redact(self.app.conf.broker_url)} "
                                    f"({exc}); nothing was sent. Is Redis running?") from exc

    def _check_broker(self) -> None:
        """Raise `BrokerUnavailable` at once when Redis does not answer a PING (checked again
        every `BROKER_CHECK_S` while it does)."""
        url = self.app.conf.broker_url or ""
        if not url.startswith(("redis://", "rediss://", "redis+socket://")):
            return
        now = time.monotonic()
        if now - self._broker_ok_at < BROKER_CHECK_S:
            return
        from workers.status import redis_client

        try:
            redis_client(url).ping()
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            raise BrokerUnavailable(f"cannot reach the broker at {_redact(url)} ({type(exc).__name__}: "
                                    f"{exc}); nothing was sent. Is Redis running?") from exc
        self._broker_ok_at = now

    def _wait(self, result: Any, timeout_s: float | None, what: str) -> Any:
        from celery.exceptions import TimeoutError as CeleryTimeout

        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            reply = result.get(timeout=timeout_s, interval=REPLY_POLL_S, propagate=False)
        except CeleryTimeout as exc:
            _forget(result)
            raise NoReply(f"no reply to {what} within {timeout_s:g} s (task {result.id}); it "
                          "may or may not have been applied. Is a master running? Retry "
                          "with the same key to apply it exactly once.") from exc
        except (RuntimeError, OSError) as exc:  # the result store (Redis) went away meanwhile
            _forget(result)
            raise NoReply(f"lost the broker while waiting for {what} (task {result.id}: {exc}); "
                          "it may or may not have been applied: retry with the same key") from exc
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
        if self._coalescer is not None and task_id is None:
            from concurrent.futures import TimeoutError as FutureTimeout

            wait_s = self.timeout_s if timeout_s is None else timeout_s
            future = self._coalescer.submit(tx, list(args), master=master, key=key, timeout_s=wait_s)
            try:
                return future.result(timeout=wait_s + 1.0)
            except FutureTimeout as exc:
                raise NoReply(f"no reply to transaction {tx!r} within {wait_s:g} s (coalesced); it "
                              "may or may not have been applied: retry with the same key") from exc
        result = self._send("prevalence.execute", [tx, list(args), key], master=master,
                            task_id=task_id)
        return self._wait(result, timeout_s, f"transaction {tx!r}")

    def execute(self, tx: str, *args: Any, master: str | None = None, key: str | None = None,
                timeout_s: float | None = None, wait: str = "tentative", route_key: Any = None,
                on_change: Any = None) -> Any:
        """Run one transaction and return its value. Raises the `ClientError` subclasses of
        the module doc.

        Args:
            master: the master to run it (default: whichever takes it first, or the one
                `route_key` picks).
            key: a request key: a key already applied is not applied again (retry safely).
            wait: ``"tentative"`` (default) returns the master's first answer;
                ``"committed"`` waits for the final outcome (which may differ) and raises
                `NotCommittedYet` if it is not known within the timeout.
            route_key: writes with the same route key go to the same master while it is up
                (a stable hash over the masters that are up), so a rebase cannot reverse
                their order.
            on_change: with ``wait="committed"``, called as ``on_change(tentative, final)``
                (outcome documents) when the committed order reversed the first answer (its
                status changed: ok <-> refused or failed). A value that depends on other
                writes (a balance) may differ without that.
        """
        if wait not in ("tentative", "committed"):
            raise ValueError(f"wait must be 'tentative' or 'committed', got {wait!r}")
        if master is None and route_key is not None:
            master = self.route(route_key)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        outcome = self.execute_outcome(tx, *args, master=master, key=key, timeout_s=timeout_s)
        if wait == "committed" and not outcome.get("committed") and outcome.get("rid"):
            final = self.wait_committed(outcome, max(0.0, deadline - time.monotonic()))
            if on_change is not None and _changed(outcome, final):
                on_change(outcome, final)
            outcome = final
        return raise_for_outcome(outcome)

    # -- committed outcomes --------------------------------------------------------------

    def outcome(self, key: str, *, master: str | None = None, wait: bool = False,
                timeout_s: float | None = None) -> dict[str, Any]:
        """The outcome document of request `key`, with ``committed``. Asks `master` (best:
        the one that answered the write), else any master; with ``wait``, waits until it is
        committed (`NotCommittedYet` on timeout). ``status: "unknown"`` when the asked
        master has not seen the key (yet)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        doc = self._published_outcome(key)
        if doc is None:
            doc = self._wait(self._send("prevalence.outcome", [key], master=master), timeout_s,
                             f"outcome of {key!r}")
        if wait and not doc.get("committed"):
            if master is None and doc.get("master") and doc.get("status") != "unknown":
                master = doc["master"]
            doc = self.wait_committed(dict(doc, rid=key, master=master or doc.get("master")), timeout_s)
        return doc

    def wait_committed(self, answer: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Wait for the committed outcome of a write answered by `answer` (an outcome
        document with ``rid`` and ``master``); return it. The answering master publishes
        the final outcomes of its requests to Redis after each sync (read every
        `COMMITTED_POLL_S`); every `COMMITTED_ASK_MASTER_S` it is also asked directly."""
        rid, master = answer["rid"], answer.get("master")
        deadline = time.monotonic() + timeout_s
        next_ask = time.monotonic() + COMMITTED_ASK_MASTER_S
        while True:
            doc = self._published_outcome(rid)
            if doc is not None and doc.get("committed"):
                return _as_outcome(doc, rid)
            now = time.monotonic()
            if now >= next_ask:
                next_ask = now + COMMITTED_ASK_MASTER_S
                try:
                    doc = self._wait(self._send("prevalence.outcome", [rid], master=master),
                                     min(COMMITTED_ASK_MASTER_S, max(0.05, deadline - now)),
                                     f"outcome of {rid!r}")
                except NoReply:
                    doc = None
                if doc is not None and doc.get("committed"):
                    return doc
            if now >= deadline:
                raise NotCommittedYet(
                    f"the write with key {rid!r} was answered (tentatively: {answer.get('status')}) by "
                    f"{master} but is not committed after {timeout_s:g} s (a member down holds the "
                    f"frontier?). It stands; ask again: prevalence outcome {rid} --wait", answer)
            time.sleep(COMMITTED_POLL_S)

    def _published_outcome(self, rid: str) -> dict[str, Any] | None:
        """The committed outcome a master published to Redis, or None (absent, or no
        Redis to read: then the master is asked instead)."""
        import json

        from workers.status import outcome_key, redis_client

        url = self.app.conf.broker_url or ""
        if not url.startswith(("redis://", "rediss://", "redis+socket://")):
            return None
        try:
            if self._redis is None:
                self._redis = redis_client(url)
            raw = self._redis.get(outcome_key(rid))
        except Exception:  # noqa: BLE001 - Redis is a shortcut here, the master the truth
            self._redis = None
            return None
        return None if raw is None else json.loads(raw)

    # -- routing -------------------------------------------------------------------------

    def route(self, route_key: Any) -> str | None:
        """The master that writes with `route_key` go to: the highest of a stable hash of
        (master, key) over the masters that are up (rendezvous hashing: when one goes down
        only its keys move). None when no master is known to be up (then any master)."""
        members = self.members_up()
        if not members:
            return None
        key = str(route_key).encode()
        return max(members, key=lambda m: hashlib.sha256(m.encode() + b"\0" + key).digest())

    def members_up(self) -> list[str]:
        """Masters whose status document says ready and is fresh (reused for a moment)."""
        at, members = self._members
        if time.monotonic() - at < MEMBERS_CACHE_S:
            return members
        from workers.client.monitor import MonitorUnavailable, read_status_documents

        try:
            docs = read_status_documents(self.app.conf.broker_url)
        except MonitorUnavailable:
            docs = {}
        now = time.time()
        members = sorted(name for name, doc in docs.items()
                         if doc.get("state") == "ready" and doc.get("reported_at") is not None
                         and now - doc["reported_at"] < 3 * float(doc.get("sync_interval_s") or 1.0) + 2.0)
        self._members = (time.monotonic(), members)
        return members

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
        """Run a query and return its outcome: ``status``, ``value`` and which ``master``
        answered, plus ``error`` and ``error_type`` when it was refused or raised."""
        result = self._send("prevalence.query", [name, list(args)], master=master)
        return self._wait(result, timeout_s, f"query {name!r}")

    def query_many(self, calls: Iterable[Sequence[Any]], *, master: str | None = None,
                   timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Run several queries (``(name, args)`` pairs) in one task on one master, on one
        state (nothing is applied between them); at most 1000 per call.

        Returns one outcome per call, in order: ``status`` and ``value``, plus ``error``
        and ``error_type`` when that call was refused or raised (the others still answer;
        `raise_for_outcome` turns one into its value or exception) and ``master``. Raises
        `RequestRefused` when the batch itself is malformed or too large, `NoReply` on
        timeout.
        """
        payload = [[name, list(args)] for name, args in calls]
        result = self._send("prevalence.query_many", [payload], master=master)
        reply = self._wait(result, timeout_s, f"batch of {len(payload)} queries")
        if "outcomes" not in reply:
            raise_for_outcome(reply)
        return [dict(outcome, master=reply.get("master")) for outcome in reply["outcomes"]]

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
            self._broadcast("prevalence.broadcast_sync")
            return None
        result = self._send("prevalence.sync", [], master=master, ignore_result=False)
        return self._wait(result, timeout_s, f"sync of {master}")

    def snapshot(self, master: str | None = None, *, timeout_s: float | None = None
                 ) -> dict[str, Any] | None:
        """Snapshot now: broadcast to every master (None), or one master (its report)."""
        if master is None:
            self._broadcast("prevalence.broadcast_snapshot")
            return None
        result = self._send("prevalence.snapshot", [], master=master, ignore_result=False)
        return self._wait(result, timeout_s, f"snapshot of {master}")

    def status(self, master: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Ask one master for its status document through its queue (waits behind the
        task in hand; `workers.client.monitor.cluster_view` does not)."""
        result = self._send("prevalence.status", [], master=master)
        return self._wait(result, timeout_s, f"status of {master}")


def _changed(tentative: dict[str, Any], final: dict[str, Any]) -> bool:
    """Whether the committed order reversed a first answer (its status changed)."""
    return tentative.get("status") != final.get("status")


def _as_outcome(doc: dict[str, Any], rid: str) -> dict[str, Any]:
    """A published committed outcome as an outcome document (the task's shape)."""
    status = doc.get("status")
    return {"status": status, "value": doc.get("value"), "error": doc.get("error"),
            "error_type": {"rejected": "Rejected", "error": "TransactionFailed"}.get(status),
            "master": doc.get("master"), "rid": rid, "duplicate": False, "committed": True,
            "record": doc.get("record")}


def _forget(result: Any) -> None:
    """Stop waiting for a result now, while the process is alive: left to its ``__del__``,
    Celery unsubscribes at interpreter shutdown and prints a traceback."""
    try:
        result.backend.remove_pending_result(result)
    except Exception:  # noqa: BLE001 - best effort: the broker may be gone
        pass
    result.backend = None


def _redact(url: str) -> str:
    """A broker URL without its password."""
    import re

    return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url or "")
