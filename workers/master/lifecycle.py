"""Master lifecycle inside a Celery worker: the `MasterStep` bootstep.

Start (before the worker consumes anything):
  1. refuse any pool but solo (a prefork child would hold its own copy of the state);
  2. read the settings and the cluster key, import the model;
  3. consume ``master.<name>`` and the broadcast queue whatever ``-Q`` said (`create`);
  4. open the master: claim the lease, recover from snapshot + journals, join if new;
  5. sync once (a worker that was down missed every broadcast) and publish its status.

Warm shutdown (SIGTERM; the consumer has stopped and the task in hand has finished):
  sync, snapshot, publish a final "stopped" status and close, which releases the lease.
Cold shutdown (SIGQUIT) only closes: the task in hand was interrupted, and recovery at the
next start replays what reached the journal.

A start-up failure is logged as one clear line and ends the worker with exit status 78
(EX_CONFIG: bad settings, wrong pool, a retired name, a damaged own journal or lost
records: restarting cannot help, an operator must act) or 75 (EX_TEMPFAIL: the lease is
held by a live process, or the folder is unreachable: try again later), so a supervisor
can tell the two apart.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import bootsteps
from celery.signals import worker_ready

logger = logging.getLogger("workers.master.lifecycle")

EXIT_CONFIG = getattr(os, "EX_CONFIG", 78)
EXIT_TEMPFAIL = getattr(os, "EX_TEMPFAIL", 75)


class MasterStep(bootsteps.StartStopStep):
    """Opens this worker's master at start and closes it at shutdown (see module doc)."""

    label = "PrevalenceMaster"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.runtime: Any = None

    def create(self, worker: Any) -> None:
        from workers.celeryconfig import BROADCAST_NAME, master_queue
        from workers.celery import settings

        # This master's own queue and the broadcasts are not optional, whatever -Q said.
        # (Done here, before the banner, so that the banner lists them; a missing
        # PREVALENCE_MASTER is reported by start().)
        queues = worker.app.amqp.queues
        names = [BROADCAST_NAME] + ([master_queue(settings.master)] if settings.master else [])
        for name in names:
            # Look the queue up (by alias for the broadcast, whose real name is a unique
            # bcast.<uuid>; created on demand for master.<name>) and add the object itself:
            # select_add(<str>) would replace the fanout Broadcast with a plain queue.
            queue = queues[name]
            if queue.name not in queues.consume_from:
                queues.select_add(queue)
        return None

    # -- start ---------------------------------------------------------------------------

    def start(self, worker: Any) -> None:
        from workers.settings import SettingsError
        from workers.master import kombu_fixes

        kombu_fixes.install()  # a Redis restart must not kill the worker (see there)
        try:
            self._start(worker)
        except SettingsError as exc:
            self._fail(f"bad setting: {exc}", EXIT_CONFIG)
        except _StartRefused as exc:
            self._fail(str(exc), exc.exit_status)

    def _start(self, worker: Any) -> None:
        from celery.concurrency.solo import TaskPool as SoloPool

        from workers.celeryconfig import WRITE_QUEUE
        from workers.master import runtime
        from workers.celery import settings

        # Step 1: one process, one copy of the state.
        pool_cls = worker.pool_cls
        if not (isinstance(pool_cls, type) and issubclass(pool_cls, SoloPool)):
            pool_name = getattr(pool_cls, "__module__", str(pool_cls)).rsplit(".", 1)[-1]
            raise _StartRefused(
                f"a prevalence master needs the solo pool, not {pool_name!r}: any other pool "
                "runs tasks in several threads or child processes, each with its own copy "
                "of the state. Start it with `-P solo` (concurrency is one by design; "
                "run more masters to scale).", EXIT_CONFIG)

        # Step 2: settings, key and model, all validated before anything is opened.
        name = settings.require_master()
        shared_dir = settings.require_shared_dir()
        cluster_key = settings.read_cluster_key()
        model = settings.load_model()

        # Step 3: queues (master.<name> and the broadcast were added by create()).
        queues = worker.app.amqp.queues
        if WRITE_QUEUE not in queues.consume_from:
            logger.info("prevalence: master %s does not consume the shared queue %s "
                        "(-Q); it takes only writes aimed at it", name, WRITE_QUEUE)
        if not worker.hostname.startswith(f"{name}@"):
            logger.warning("prevalence: node name %r does not start with %r; run one node "
                           "name per master, e.g. -n %s@%%h", worker.hostname, name, name)

        # Step 4: lease, recovery, join.
        from workers.prevalence import Master, errors

        # Overlap each write's journal sync with Celery's own work on the task: only where
        # the result backend publishes a result after the sync (workers.master.results).
        from workers.master.results import SettlingRedisBackend

        overlap = (settings.sync_overlap and settings.fsync == "always"
                   and isinstance(worker.app.backend, SettlingRedisBackend))
        logger.info("prevalence: opening master %s in %s (fsync=%s, sync overlap %s, model %s)",
                    name, shared_dir, settings.fsync, "on" if overlap else "off",
                    settings.model_path)
        try:
            master = Master.open(model, str(shared_dir), name, fsync=settings.fsync,
                                 cluster_key=cluster_key,
                                 journal_reserve_bytes=settings.journal_reserve_bytes,
                                 deferred_sync=overlap)
        except errors.RetiredMaster as exc:
            raise _StartRefused(f"master {name} is retired and cannot start under that "
                                f"name: {exc}", EXIT_CONFIG) from exc
        except (errors.LostRecords, errors.Corruption) as exc:
            # Restarting cannot help: an operator must look (see the message).
            raise _StartRefused(f"master {name} cannot start until an operator acts: {exc}",
                                EXIT_CONFIG) from exc
        except errors.LeaseHeld as exc:
            raise _StartRefused(f"master {name} is already running elsewhere: {exc}",
                                EXIT_TEMPFAIL) from exc
        except errors.PrevalenceError as exc:
            raise _StartRefused(f"master {name} could not be opened: {exc}",
                                EXIT_TEMPFAIL) from exc
        except OSError as exc:
            raise _StartRefused(f"master {name} could not be opened: {exc}",
                                EXIT_TEMPFAIL) from exc

        current = runtime.MasterRuntime(settings, master, worker.hostname)
        runtime.install(current)
        self.runtime = current

        # Step 5: catch up with what was written while this master was down.
        try:
            report = master.sync()
        except errors.PrevalenceError as exc:
            logger.error("prevalence: first sync of %s failed: %s (the master runs on; "
                         "status shows the error)", name, exc)
            report = {"error": str(exc)}
        current.state = "running"
        current.record_sync(report, task_id=None)
        logger.info("prevalence: master %s is up: %s", name,
                    _brief(current.status_document()))

    def _fail(self, message: str, exit_status: int) -> None:
        logger.error("prevalence: worker refuses to start: %s", message)
        # SystemExit (not an Exception) makes WorkController stop with this exit status.
        raise SystemExit(exit_status)

    # -- stop ----------------------------------------------------------------------------

    def stop(self, worker: Any) -> None:
        self._close(warm=True)

    def terminate(self, worker: Any) -> None:
        self._close(warm=False)

    def shutdown(self, worker: Any) -> None:
        self._close(warm=False)

    def _close(self, *, warm: bool) -> None:
        from workers.master import runtime
        from workers.prevalence import errors

        current = runtime.uninstall()
        self.runtime = None
        if current is None:
            return
        name = current.name
        current.state = "stopping"
        if warm:
            # Warm shutdown: the task in hand has finished. Sync, so that what the others
            # wrote is read and our horizon published; snapshot, so the next start is fast.
            for what in ("sync", "snapshot"):
                try:
                    getattr(current.master, what)()
                except errors.PrevalenceError as exc:
                    logger.error("prevalence: %s of %s at shutdown failed: %s", what, name, exc)
        final = current.status_document()
        try:
            current.master.close()
        except errors.PrevalenceError as exc:
            logger.error("prevalence: closing %s failed: %s", name, exc)
        # The last word in Redis: stopped on purpose, as of this state.
        current.state = final["state"] = "stopped"
        current.publish_document(final)
        logger.info("prevalence: master %s closed (%s shutdown); lease released", name,
                    "warm" if warm else "cold")


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    """The consumer is up: say so in the status document (tools wait for it)."""
    from workers.master import runtime

    current = runtime.get()
    if current is not None:
        current.consuming = True
        current.publish()


class _StartRefused(Exception):
    """Raised inside `MasterStep.start` for a refusal with its exit status."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def _brief(document: dict[str, Any]) -> str:
    keys = ("state", "seq", "frontier", "tentative", "digest")
    return ", ".join(f"{k}={document.get(k)}" for k in keys if k in document)
