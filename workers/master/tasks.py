"""The Celery tasks of a master: thin wrappers that check arguments, call one engine
method and return plain data.

Outcome documents (what `execute` returns, and each item of `execute_many` in short)::

    {"status": "ok" | "rejected" | "error",
     "value": <result, JSON builtins>, "error": str | None, "error_type": str | None,
     "master": <name of the master that answered>, "rid": <request id>,
     "duplicate": bool,   # True: the request id had already been applied; recorded outcome
     "committed": bool,   # False: tentative, a rebase may still change it (see `outcome`)
     "record": "master:seq" | None}   # the journal record that carries it

Queries answer a shorter document, ``{"status", "value", "master"}`` (plus ``error`` and
``error_type`` when not ok): a query writes nothing, so it has no request id, record or
committed flag (`query`, `query_many`).

A refused or failed transaction is an outcome, not a task failure: the caller gets a
clear error, the task succeeds (no retry, the message is acknowledged) and Flower shows
its result led by ``REJECTED: <error>`` or ``FAILED: ...`` (`workers.master.verdicts`). A
task fails (raises) only on a bug, after logging the task id.

Idempotence: the request id (`rid`) is the client's key when given, else the Celery task
id, so a message redelivered after a crash (same task id) applies once. For a batch the
item ids are ``<key or task id>:<index>`` unless an item carries its own.

Routing is chosen by the sender (`workers.client`): `prevalence.write` lets any master
answer, ``master.<name>`` picks one; `broadcast_sync` and `broadcast_snapshot` are
broadcast, and each master answers them with a `sync` / `snapshot` task of its own (see
the comment above `broadcast_sync` and `workers.celeryconfig`).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from workers.master import runtime, verdicts
from workers.celery import app

logger = logging.getLogger("workers.master.tasks")

#: Largest batch accepted by `execute_many` (items): bounded so one message cannot hold a
#: worker (and the broadcast syncs behind it) for minutes.
BATCH_ITEMS_MAX = 10_000
#: Longest request id accepted (characters).
RID_CHARS_MAX = 200
#: A joining master is not ready for writes; the task is retried this often, this long.
NOT_READY_RETRY_S = 0.5
NOT_READY_RETRIES_MAX = 240


def _outcome(status: str, *, value: Any = None, error: str | None = None,
             error_type: str | None = None, rid: str | None = None,
             duplicate: bool = False, committed: bool = False,
             record: str | None = None) -> dict[str, Any]:
    current = runtime.get()
    return {"status": status, "value": runtime.plain(value), "error": error,
            "error_type": error_type, "master": current.name if current else None,
            "rid": rid, "duplicate": duplicate, "committed": committed, "record": record}


def _bad_request(message: str, rid: str | None = None) -> dict[str, Any]:
    return _outcome("error", error=message, error_type="BadRequest", rid=rid)


def _check_call(name: Any, args: Any, what: str) -> str | None:
    """Return an error message when a (name, args) pair is malformed, else None."""
    if not isinstance(name, str) or not name:
        return f"the {what} name must be a non-empty string, got {name!r}"
    if not isinstance(args, (list, tuple)):
        return f"the arguments of {what} {name!r} must be a list, got {type(args).__name__}"
    return None


def _check_rid(rid: Any) -> str | None:
    if rid is None:
        return None
    if not isinstance(rid, str) or not rid or len(rid) > RID_CHARS_MAX:
        return f"a request key must be a string of 1..{RID_CHARS_MAX} characters, got {rid!r}"
    return None


def _item_outcome(out: Any, tx: Any) -> dict[str, Any]:
    """An engine outcome dict (``status``, ``value``, ``error``, maybe ``duplicate_of``) as
    the short outcome of a batch item: ``status`` and ``value``; ``error`` and
    ``error_type`` only when not ok; ``duplicate: true`` only when it is one. A transaction
    that raised is reported as ``TransactionFailed``. (A 1000-item reply stays small:
    master and request ids are implied by the batch and the item's position.)"""
    status = out.get("status")
    item: dict[str, Any] = {"status": status, "value": runtime.plain(out.get("value")),
                            "committed": bool(out.get("committed")), "record": out.get("record")}
    if status == "rejected":
        item.update(error=out.get("error"), error_type="Rejected")
    elif status != "ok":
        item.update(error=f"transaction {tx!r} raised {out.get('error')}",
                    error_type="TransactionFailed")
    if "duplicate_of" in out:
        item["duplicate"] = True
    return item


def _from_engine(out: Any, tx: Any, rid: str | None) -> dict[str, Any]:
    """An engine outcome dict as a full outcome document (module doc)."""
    item = _item_outcome(out, tx)
    return _outcome(str(item["status"]), value=item["value"], error=item.get("error"),
                    error_type=item.get("error_type"), rid=rid,
                    duplicate=item.get("duplicate", False), committed=item["committed"],
                    record=out.get("record"))


def _refused(exc: Exception, rid: str | None) -> dict[str, Any]:
    """An outcome document for a request the engine refused before writing anything."""
    return _outcome("error", error=str(exc), error_type=type(exc).__name__, rid=rid)


def _retry_not_ready(task: Any, exc: Exception, rid: str | None) -> dict[str, Any]:
    """Put the task back (same task id, so same request id) while the master is joining;
    after `NOT_READY_RETRIES_MAX` attempts give the caller an error outcome instead."""
    if task.request.retries >= NOT_READY_RETRIES_MAX:
        return _outcome("error", error=f"master not ready after "
                        f"{NOT_READY_RETRIES_MAX * NOT_READY_RETRY_S:.0f} s: {exc}",
                        error_type=type(exc).__name__, rid=rid)
    raise task.retry(exc=exc, countdown=NOT_READY_RETRY_S)


class OutcomeTask(app.Task):
    """A task whose result is an outcome document (or a batch of them): a refused or
    failed outcome leads its result in Flower with a verdict (`workers.master.verdicts`);
    the task still succeeds, the document is unchanged."""

    Request = "workers.master.verdicts:VerdictRequest"

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        verdicts.note(task_id, retval)


@app.task(name="prevalence.execute", bind=True, acks_late=True, base=OutcomeTask,
          max_retries=NOT_READY_RETRIES_MAX)
def execute(self: Any, tx: str, args: list | None = None, key: str | None = None) -> dict:
    """Apply one transaction on this master; idempotent on ``key`` or the task id.

    Args: ``tx`` the transaction name, ``args`` its positional arguments (a list), ``key``
    an optional client request key. Returns an outcome document (module doc). A request
    id the master already knows is not applied again: its recorded outcome comes back
    with ``duplicate: true``.
    """
    from workers.prevalence import errors

    args = [] if args is None else args
    rid = key or self.request.id
    problem = _check_call(tx, args, "transaction") or _check_rid(key)
    if problem:
        return _bad_request(problem, rid)
    current = runtime.require()
    try:
        [out] = current.master.execute_many([(tx, list(args), rid)])
    except errors.NotReady as exc:
        # A joining master takes no writes yet; put the task back (same id, same rid).
        return _retry_not_ready(self, exc, rid)
    except errors.PrevalenceError as exc:
        if not isinstance(exc, errors.RequestError):
            logger.error("prevalence.execute[%s] %s on %s failed: %s", self.request.id, tx,
                         current.name, exc)
        return _refused(exc, rid)
    return _from_engine(out, tx, rid)


@app.task(name="prevalence.execute_many", bind=True, acks_late=True, base=OutcomeTask,
          max_retries=NOT_READY_RETRIES_MAX)
def execute_many(self: Any, items: list, key: str | None = None) -> dict:
    """Apply a batch of transactions with one fsync; each item is idempotent on its id.

    Args: ``items`` a list of ``[tx, args]`` or ``[tx, args, rid]``; ``key`` an optional
    batch key (item ids default to ``<key or task id>:<index>``). Returns
    ``{"master": name, "outcomes": [item outcome, ...]}`` in item order (see `_item_outcome`),
    or a single outcome
    document with ``status: error`` when the batch is refused as a whole (malformed, an
    unknown transaction, arguments that do not fit): then nothing is applied.
    """
    from workers.prevalence import errors

    base = key or self.request.id
    problem = _check_rid(key)
    if problem:
        return _bad_request(problem)
    if not isinstance(items, (list, tuple)):
        return _bad_request(f"items must be a list of [tx, args(, rid)], got "
                            f"{type(items).__name__}")
    if len(items) > BATCH_ITEMS_MAX:
        return _bad_request(f"a batch holds at most {BATCH_ITEMS_MAX} items, got {len(items)}; "
                            "split it")
    calls: list[tuple[str, list, str]] = []
    for index, item in enumerate(items):
        if not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
            return _bad_request(f"item {index} must be [tx, args] or [tx, args, rid], "
                                f"got {item!r:.80}")
        rid = item[2] if len(item) == 3 and item[2] is not None else f"{base}:{index}"
        problem = _check_call(item[0], item[1], "transaction") or _check_rid(rid)
        if problem:
            return _bad_request(f"item {index}: {problem}")
        calls.append((item[0], list(item[1]), rid))

    current = runtime.require()
    try:
        results = current.master.execute_many(calls)
    except errors.NotReady as exc:
        return _retry_not_ready(self, exc, None)
    except errors.PrevalenceError as exc:
        if not isinstance(exc, errors.RequestError):
            logger.error("prevalence.execute_many[%s] on %s failed: %s", self.request.id,
                         current.name, exc)
        return _refused(exc, None)
    return {"master": current.name,
            "outcomes": [_item_outcome(out, tx) for out, (tx, _args, _rid) in zip(results, calls)]}


@app.task(name="prevalence.query", acks_late=True)
def query(name: str, args: list | None = None) -> dict:
    """Run a query on this master's current (possibly tentative) state.

    Returns a query outcome: ``{"status": "ok", "value": ..., "master": name}``; with
    ``status: "rejected"`` (``error``, ``error_type: "Rejected"``) when the query refused
    (raised `Rejected`, e.g. the ledger's balance of no account); or with ``status:
    "error"``, ``error`` and ``error_type`` (``BadRequest``, ``UnknownQuery``,
    ``BadArguments``, ``QueryFailed``) when refused.

    Lean on purpose (the no-op task is its yardstick, benchmarks/bench_app.py): no
    request id, record or committed flag (a query writes nothing), JSON scalars are
    returned as they are, and nothing is imported unless something fails. Celery
    reprs every result for its task events, so a short document is a cheap one too.
    """
    current = runtime.require()
    try:
        value = _run_query(current.master, name, args)
    except Exception as exc:  # the Celery boundary: refused, or the model's query raised
        return _query_failed(exc, name, current.name, query.request.id)
    return {"status": "ok", "value": runtime.plain(value), "master": current.name}


#: Most queries in one `query_many` (items): a batch of reads is answered in one task,
#: while the syncs and writes queued behind it wait, and its reply is one Redis value.
QUERY_BATCH_ITEMS_MAX = 1000


@app.task(name="prevalence.query_many", acks_late=True)
def query_many(calls: list) -> dict:
    """Run several queries in one task, on one state: nothing is applied between them.

    Args: ``calls`` a list of ``[name, args]`` (at most `QUERY_BATCH_ITEMS_MAX`).
    Returns ``{"master": name, "outcomes": [...]}``, one per call in order: ``{"status":
    "ok", "value": ...}`` or ``{"status": "error", "value": null, "error", "error_type"}``
    (a bad call fails alone: queries change nothing, so the others still answer). A
    malformed or oversized batch is one query outcome with ``status: error`` instead.
    """
    if not isinstance(calls, (list, tuple)):
        return _query_refused(f"calls must be a list of [name, args], got {type(calls).__name__}")
    if len(calls) > QUERY_BATCH_ITEMS_MAX:
        return _query_refused(f"a query batch holds at most {QUERY_BATCH_ITEMS_MAX} calls, got "
                              f"{len(calls)}; split it")
    current = runtime.require()
    master = current.master
    plain = runtime.plain
    outcomes: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        try:
            if not isinstance(call, (list, tuple)) or len(call) != 2:
                raise _BadRequest(f"call {index} must be [name, args], got {call!r:.80}")
            value = _run_query(master, call[0], call[1])
        except Exception as exc:  # the Celery boundary: this call fails alone
            doc = _query_failed(exc, call[0] if isinstance(call, (list, tuple)) and call else None,
                                current.name, query_many.request.id)
            del doc["master"]
            outcomes.append(doc)
            continue
        outcomes.append({"status": "ok", "value": plain(value)})
    return {"master": current.name, "outcomes": outcomes}


class _BadRequest(Exception):
    """Raised inside a query task for a malformed call (reported as ``BadRequest``)."""


def _run_query(master: Any, name: Any, args: Any) -> Any:
    """Check one query call and run it on `master`. The engine's `Master.query` finds the
    function; the arity is checked first (a cheap comparison when it fits) so that a wrong
    call is a clear BadArguments, not a TypeError from inside the query."""
    if args is None:
        args = []
    problem = _check_call(name, args, "query")
    if problem:
        raise _BadRequest(problem)
    model = master.model
    model.query_fn(name)  # UnknownQuery, naming the known queries
    model.check_arguments(name, args, is_query=True)
    return master.query(name, *args)


def _query_failed(exc: Exception, name: Any, master: str, task_id: str | None) -> dict[str, Any]:
    """The outcome of a query that did not answer: refused (a malformed call, an unknown
    name, wrong arguments) or raised by the model's query code (logged with the task id)."""
    from workers.prevalence import errors

    if isinstance(exc, _BadRequest):
        return _query_refused(str(exc), master)
    if isinstance(exc, errors.Rejected):
        # A query refuses as a transaction does ("no account 'x'"): rejected, not an error.
        return {"status": "rejected", "value": None, "error": str(exc), "error_type": "Rejected",
                "master": master}
    if isinstance(exc, errors.PrevalenceError):
        return _query_refused(str(exc), master, type(exc).__name__)
    logger.warning("query task %s: query %r on %s raised %s: %s", task_id, name, master,
                   type(exc).__name__, exc)
    return _query_refused(f"query {name!r} raised {type(exc).__name__}: {exc}", master,
                          "QueryFailed")


def _query_refused(message: str, master: str | None = None,
                   error_type: str = "BadRequest") -> dict[str, Any]:
    return {"status": "error", "value": None, "error": message, "error_type": error_type,
            "master": master}


# Sync and snapshot. Beat (and `prevalence sync` without --master) broadcasts a small
# request, `broadcast_sync` / `broadcast_snapshot`, which every master receives with one task
# id; each master answers it by queueing the real `sync` / `snapshot` task on its own queue,
# master.<name>, with an id of its own (``<request id>.<master>``). So every master's sync
# and snapshot is a task of its own in Flower, with its own result (Flower keys tasks by id:
# a broadcast's recipients would all share one row). A broadcast is at-most-once per worker
# and never redelivered: no acks_late, and no stored result (every master would overwrite
# the same key); an aimed `sync` stores its result only when the sender asks for it.

#: Largest repr of a sync report in Flower and the log (characters; Celery's default, 1024,
#: cuts a report of a cluster with more than a few masters).
REPORT_REPR_CHARS_MAX = 4096
#: Bounded retries when a master queues its own task (the broker was just reachable: the
#: broadcast came through it).
OWN_TASK_SEND_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.2,
                              "interval_max": 0.5}


def _queue_own(trigger: Any, kind: str, task: Any) -> dict:
    """Answer a broadcast request on this master: queue its own `task` (kind "sync" or
    "snapshot") on master.<name>, unless one it queued earlier has not started yet."""
    from workers.celeryconfig import master_queue

    current = runtime.require()
    queued = current.own_task_due(kind)
    if queued is not None:
        return {"master": current.name, "queued": None,
                "skipped": f"{task.name} {queued} is queued and has not started yet"}
    own_id = f"{trigger.request.id or uuid.uuid4()}.{current.name}"
    try:
        task.apply_async(task_id=own_id, queue=master_queue(current.name),
                         retry=True, retry_policy=OWN_TASK_SEND_RETRY_POLICY)
    except Exception as exc:  # the Celery boundary: the broker went away just now
        logger.error("%s[%s] on %s could not queue %s %s: %s: %s", trigger.name, trigger.request.id,
                     current.name, task.name, own_id, type(exc).__name__, exc)
        return {"master": current.name, "queued": None, "error": f"{type(exc).__name__}: {exc}"}
    current.own_task_sent(kind, own_id)
    return {"master": current.name, "queued": own_id}


@app.task(name="prevalence.broadcast_sync", bind=True, acks_late=False, ignore_result=True)
def broadcast_sync(self: Any) -> dict:
    """Every master: queue this master's own `prevalence.sync` (see the comment above)."""
    return _queue_own(self, "sync", sync)


@app.task(name="prevalence.broadcast_snapshot", bind=True, acks_late=False, ignore_result=True)
def broadcast_snapshot(self: Any) -> dict:
    """Every master: queue this master's own `prevalence.snapshot`."""
    return _queue_own(self, "snapshot", snapshot)


@app.task(name="prevalence.sync", bind=True, acks_late=False, ignore_result=True,
          resultrepr_maxsize=REPORT_REPR_CHARS_MAX)
def sync(self: Any) -> dict:
    """Catch up with the other masters' journals, publish this master's status and return
    the readable report of `workers.master.reports.sync_report` (frontier as a time, lag
    per peer, tentative, rebases, reversed outcomes, digest)."""
    from workers.prevalence import errors

    current = runtime.require()
    current.own_task_started("sync")
    try:
        report = current.master.sync()
    except errors.PrevalenceError as exc:
        logger.error("prevalence.sync[%s] on %s failed: %s", self.request.id, current.name, exc)
        report = {"error": str(exc), "error_type": type(exc).__name__}
    return current.record_sync(report, self.request.id)


@app.task(name="prevalence.snapshot", bind=True, acks_late=False, ignore_result=True,
          resultrepr_maxsize=REPORT_REPR_CHARS_MAX)
def snapshot(self: Any) -> dict:
    """Write a snapshot of this master's state; returns its frontier (ISO time) and path
    (`workers.master.reports.snapshot_report`)."""
    from workers.master.reports import snapshot_report
    from workers.prevalence import errors

    current = runtime.require()
    current.own_task_started("snapshot")
    started = time.perf_counter()
    try:
        path = current.master.snapshot()
    except errors.PrevalenceError as exc:
        logger.error("prevalence.snapshot[%s] on %s failed: %s", self.request.id,
                     current.name, exc)
        return {"master": current.name, "error": str(exc), "error_type": type(exc).__name__}
    frontier = getattr(current.master, "snapshot_frontier", None)
    return snapshot_report(current.name, path, {"snapshot_frontier": frontier},
                           (time.perf_counter() - started) * 1000)


@app.task(name="prevalence.outcome", acks_late=False, base=OutcomeTask)
def outcome(key: str) -> dict:
    """The recorded outcome of request `key` on this master, with ``committed``.

    Send it to the master that answered the write: another master knows the outcome only
    once it has read the record. ``status: "unknown"`` when this master has not seen it.
    """
    problem = _check_rid(key) if key else "a request key is required"
    if problem:
        return _bad_request(problem, key)
    current = runtime.require()
    doc = current.master.outcome(key)
    if doc is None:
        return _outcome("unknown", error=f"master {current.name!r} knows no request {key!r} (not "
                        "written yet, or its record not read here yet)", error_type="UnknownRequest",
                        rid=key)
    error_type = {"rejected": "Rejected", "error": "TransactionFailed"}.get(doc["status"])
    return _outcome(doc["status"], value=doc.get("value"), error=doc.get("error"), error_type=error_type,
                    rid=key, committed=bool(doc.get("committed")), record=doc.get("record"))


@app.task(name="prevalence.status", acks_late=False)
def status() -> dict:
    """This master's status document (send it to ``master.<name>``)."""
    return runtime.require().status_document()


@app.task(name="prevalence.ping", acks_late=True)
def ping() -> dict:
    """Answer at once without touching the state: a round trip through the broker to
    this master (health checks, and the no-op baseline of benchmarks/bench_celery.py)."""
    current = runtime.get()
    return {"master": current.name if current else None}
