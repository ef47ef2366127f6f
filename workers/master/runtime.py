"""The master that this worker process runs: the one `Master` object and its bookkeeping.

A master is one solo Celery worker (DESIGN §5), so a process holds at most one
`MasterRuntime`, set by `workers.master.lifecycle.MasterStep` at start and cleared at stop. Tasks
reach it through `require()`. It also counts syncs and builds the status document that
`workers.client.monitor` publishes to Redis and the `prevalence_status` inspect command returns.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from workers.settings import Settings
from workers.master.publisher import StatusPublisher
from workers.status import status_ttl_s

logger = logging.getLogger("workers.master.runtime")

#: Exit status of a worker whose journal sync failed after a deferred commit (`settle`).
EXIT_SYNC_FAILED = getattr(os, "EX_IOERR", 74)

#: How long a sync or snapshot task this master queued for itself may wait to start before
#: it counts as lost and the next broadcast queues another: ten sync intervals, within
#: these bounds (seconds). Waiting behind a long task is normal; a flushed Redis is not.
OWN_TASK_PENDING_MIN_S = 5.0
OWN_TASK_PENDING_MAX_S = 60.0

_current: "MasterRuntime | None" = None
_lock = threading.Lock()


class NoMaster(RuntimeError):
    """Raised when a prevalence task runs in a process that runs no master.

    That happens only when a worker is started without `workers.master.lifecycle.MasterStep`
    (for example a custom app), or after the master was closed at shutdown.
    """


#: Values `plain` returns as they are: JSON scalars need no conversion (a query's typical
#: answer; msgspec.to_builtins would still cost a call and an import lookup).
_JSON_SCALARS = frozenset({int, float, str, bool, type(None)})


def plain(value: Any) -> Any:
    """Convert an engine value (msgspec structs, tuples, sets...) to JSON-ready builtins."""
    if value.__class__ in _JSON_SCALARS:
        return value
    import msgspec

    try:
        return msgspec.to_builtins(value, str_keys=True)
    except (TypeError, ValueError):
        return repr(value)


class MasterRuntime:
    """One open master plus what the Celery tier knows about it (node, syncs, Redis)."""

    def __init__(self, settings: Settings, master: Any, node: str) -> None:
        self.settings = settings
        self.name = settings.require_master()
        self.master = master
        self.node = node
        self.state = "starting"
        self.consuming = False  # set once the worker's consumer is up (worker_ready)
        self.started_at = time.time()
        self.syncs = 0
        self.last_sync: dict[str, Any] | None = None
        self.last_sync_at: float | None = None
        self.last_sync_task_id: str | None = None
        # Own sync/snapshot tasks queued for a broadcast request and not started yet:
        # kind -> (task id, monotonic time sent). See `own_task_due`.
        self.pending_own: dict[str, tuple[str, float]] = {}
        self.own_task_pending_max_s = min(OWN_TASK_PENDING_MAX_S,
                                          max(OWN_TASK_PENDING_MIN_S, 10 * settings.sync_interval_s))
        self.publisher = (StatusPublisher(settings.broker_url, self.name,
                                          status_ttl_s(settings.sync_interval_s))
                          if settings.is_redis else None)
        self.metrics = None
        if settings.metrics_address is not None:
            from workers.master.metrics import Metrics

            self.metrics = Metrics(self.name)
            master.on_sync = self.metrics.observe_fsync
            try:
                self.metrics.serve(settings.metrics_address)
            except OSError as exc:  # monitoring must never keep a master from running
                logger.error("prevalence: cannot serve the metrics of %s on %s:%d (%s); running without "
                             "them: fix PREVALENCE_METRICS_PORT (each master on a host needs its own "
                             "port)", self.name, *settings.metrics_address, exc)

    def record_sync(self, report: Any, task_id: str | None) -> dict[str, Any]:
        """Remember a sync's report (as plain data), publish the new status and return the
        task's readable report (`workers.master.reports.sync_report`)."""
        from workers.master.reports import sync_report

        self.syncs += 1
        self.last_sync = plain(report)
        self.last_sync_at = time.time()
        self.last_sync_task_id = task_id
        document = self.publish()
        self.publish_committed()
        engine_report = self.last_sync if isinstance(self.last_sync, dict) else {"report": self.last_sync}
        return sync_report(self.name, engine_report, document)

    def own_task_due(self, kind: str, now_s: float | None = None) -> str | None:
        """Whether this master should queue its own `kind` task ("sync" or "snapshot") for
        a broadcast request: None if so, else the id of the one already queued and not
        started yet (a master busy in a long task gets a request per beat tick; one
        queued task catches up with all of them). A queued task that has not started
        within `own_task_pending_max_s` counts as lost (Redis flushed): another is due."""
        pending = self.pending_own.get(kind)
        if pending is None:
            return None
        task_id, sent_at = pending
        now_s = time.monotonic() if now_s is None else now_s
        if now_s - sent_at > self.own_task_pending_max_s:
            del self.pending_own[kind]
            return None
        return task_id

    def own_task_sent(self, kind: str, task_id: str) -> None:
        """Remember that this master queued its own `kind` task `task_id`."""
        self.pending_own[kind] = (task_id, time.monotonic())

    def own_task_started(self, kind: str) -> None:
        """A `kind` task started on this master: whatever was queued is no longer pending."""
        self.pending_own.pop(kind, None)

    def status_document(self) -> dict[str, Any]:
        """The engine's status plus node, pid, state, sync count and timestamps (unix s)."""
        try:
            # The digest only once the state holds still: this runs after every sync.
            engine_status = plain(self.master.status(digest=None))
        except Exception as exc:  # status must still answer when the engine is unhappy
            engine_status = {"master": self.name, "last_error": f"status() failed: "
                             f"{type(exc).__name__}: {exc}"}
        document = dict(engine_status) if isinstance(engine_status, dict) else {}
        document.setdefault("master", self.name)
        # While running, "joining" (takes no writes yet) or "ready" is the useful state.
        if self.state == "running":
            document["state"] = "ready" if document.get("joined", True) else "joining"
        else:
            document["state"] = self.state
        document.update({
            "node": self.node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "reported_at": time.time(),
            "consuming": self.consuming,
            "syncs": self.syncs,
            "last_sync_at": self.last_sync_at,
            "last_sync_task_id": self.last_sync_task_id,
            "sync_interval_s": self.settings.sync_interval_s,
            "sync_overlap": bool(getattr(self.master, "deferred_sync", False)),
        })
        return document

    def publish(self) -> dict[str, Any]:
        """Publish the status document to Redis (best effort; see `StatusPublisher`), update
        the metrics from it and return it."""
        document = self.status_document()
        self.publish_document(document)
        if self.metrics is not None:
            report = self.last_sync if isinstance(self.last_sync, dict) else None
            journal_dir = os.path.join(self.master.shared, "masters", self.name, "journal")
            self.metrics.update(document, report, up=self.consuming and self.state == "running",
                                journal_dir=journal_dir)
        return document

    def publish_committed(self) -> None:
        """Publish the final outcomes of this master's requests committed since the last
        sync, for clients waiting on them (``Client.execute(..., wait="committed")``)."""
        documents = [plain(doc) for doc in self.master.drain_committed()]
        if documents and self.publisher is not None:
            master = self.name
            for doc in documents:
                doc["master"] = master
            self.publisher.publish_outcomes(documents)

    def publish_document(self, document: dict[str, Any]) -> None:
        """Publish a given status document (used for the final one, after close)."""
        if self.publisher is not None:
            self.publisher.publish(document)


def settle() -> None:
    """Wait until this process's master's last commit is durable (``deferred_sync``); a
    no-op when nothing is pending or no master runs here.

    If the sync failed (or settling raised anything at all), the process exits at once
    with `EXIT_SYNC_FAILED`, publishing and acknowledging nothing: whether the commit is on
    disk is unknown, so no caller may be told it happened, and this master's memory may
    hold it. The message goes back to the queue; the restarted master recovers from the
    journal and the request id makes the retry apply once (like PostgreSQL's PANIC on a
    failed fsync).
    """
    current = _current
    if current is None:
        return
    try:
        current.master.settle()
    except Exception as exc:  # noqa: BLE001 - nothing may be published after this
        logger.critical("prevalence: master %s: the journal sync of its last commit failed "
                        "(%s: %s). Exiting now without answering or acknowledging; restart "
                        "the worker to recover from the journal", current.name,
                        type(exc).__name__, exc)
        os._exit(EXIT_SYNC_FAILED)  # logging's stream and file handlers flush every record


def install(runtime: MasterRuntime) -> None:
    """Make `runtime` this process's master. Raises RuntimeError if one is already set."""
    global _current
    with _lock:
        if _current is not None:
            raise RuntimeError(f"this process already runs master {_current.name!r}; "
                               "one worker process runs one master")
        _current = runtime


def uninstall() -> MasterRuntime | None:
    """Forget this process's master and return it (None if there was none)."""
    global _current
    with _lock:
        runtime, _current = _current, None
    return runtime


def get() -> MasterRuntime | None:
    """This process's master, or None."""
    return _current


def require() -> MasterRuntime:
    """This process's master; raises `NoMaster` when there is none."""
    runtime = _current
    if runtime is None:
        raise NoMaster("this worker runs no prevalence master: it was started without "
                       "workers.master.lifecycle.MasterStep, failed to open it, or is shutting down")
    return runtime
