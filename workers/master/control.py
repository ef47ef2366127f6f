"""Remote-control commands of a master worker: ``celery -A workers inspect prevalence_status``.

Imported by `workers.celery` (the registry is checked by `celery inspect` in the calling
process as well as in the worker). A solo worker that is
busy in a task does not answer until the task ends, so `prevalence status` never depends
on this command: it reads the status documents in Redis (`workers.client.monitor`).
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command


@inspect_command()
def prevalence_status(state: Any) -> dict[str, Any]:
    """Return this master's status document (the same one published to Redis)."""
    from workers.master import runtime

    current = runtime.get()
    if current is None:
        return {"error": "this worker runs no prevalence master (not started, or stopped)"}
    return current.status_document()
