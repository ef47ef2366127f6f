"""Verdicts: a write the model refused must not look like a clean success in Flower.

A refused transaction (`Rejected`) or one that raised is an *outcome*, not a task failure:
the task succeeds, its result is the outcome document with ``status: "rejected"`` or
``"error"``, and the client contract (README, "The contract a client gets") rests on that
(no exception in the result backend, no retry, ``acks_late`` acknowledged as usual).
Celery's state for it is therefore SUCCESS, and so is Flower's.

What Flower shows as the task's result is the text of the worker's ``task-succeeded``
event. For a write whose outcome is not ok, `VerdictRequest` puts a verdict in front of
that text, so that Flower's task page (and a search for ``result:REJECTED`` in its task
list) says plainly what happened::

    REJECTED: insufficient funds in 'a': balance 10, withdrawal 100 (tentative, record
    alpha:3) {'status': 'rejected', 'value': None, ...}

The document in the result backend, which clients read, is unchanged. The verdict travels
from the task to its request in one slot (`note` / `take`): a master runs one task at a
time (solo pool, enforced at start), and Celery calls the task's ``on_success`` in the
same thread just before the request sends ``task-succeeded``.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.worker.request import Request

#: Verdict words, by outcome status (anything else that is not "ok": FAILED).
VERDICTS = {"rejected": "REJECTED", "error": "FAILED", "unknown": "UNKNOWN"}

_slot = threading.local()


def verdict(result: Any) -> str | None:
    """The verdict line for a task result, or None for one that needs none (ok outcomes,
    and results that are not outcome documents).

    An outcome document (``status`` not ok) gives ``REJECTED: <error> (<tentative or
    committed>, record <master:seq>)``; a batch (``outcomes``) with items not ok gives
    ``REJECTED 2 of 5`` (and ``FAILED n`` for items that raised).
    """
    if not isinstance(result, dict):
        return None
    outcomes = result.get("outcomes")
    if isinstance(outcomes, list):
        return _batch_verdict(outcomes)
    status = result.get("status")
    if status is None or status == "ok":
        return None
    word = VERDICTS.get(status, "FAILED")
    details = []
    if "committed" in result and result.get("record"):
        details.append("committed" if result.get("committed") else "tentative")
    if result.get("record"):
        details.append(f"record {result['record']}")
    if result.get("duplicate"):
        details.append("duplicate request: its recorded outcome")
    text = f"{word}: {result.get('error') or status}"
    return f"{text} ({', '.join(details)})" if details else text


def _batch_verdict(outcomes: list) -> str | None:
    counts: dict[str, int] = {}
    for item in outcomes:
        status = item.get("status") if isinstance(item, dict) else None
        if status != "ok":
            word = VERDICTS.get(status, "FAILED")
            counts[word] = counts.get(word, 0) + 1
    if not counts:
        return None
    return ", ".join(f"{word} {count} of {len(outcomes)}" for word, count in sorted(counts.items()))


def note(task_id: str | None, result: Any) -> None:
    """Remember the verdict of task `task_id`'s result for its ``task-succeeded`` event
    (called from the task's ``on_success``). Cheap when there is none: one dict lookup."""
    text = verdict(result)
    _slot.value = (task_id, text) if text is not None else None


def take(task_id: str | None) -> str | None:
    """The verdict noted for `task_id`, once; None if there is none."""
    noted = getattr(_slot, "value", None)
    _slot.value = None
    if noted is None or noted[0] != task_id:
        return None
    return noted[1]


class VerdictRequest(Request):
    """A task request whose ``task-succeeded`` event leads with the verdict, when the task
    noted one (module doc). Everything else is Celery's `Request`."""

    def send_event(self, type: str, **fields: Any) -> None:  # noqa: A002 - Celery's name
        if type == "task-succeeded":
            text = take(self.id)
            if text is not None:
                fields["result"] = f"{text} {fields.get('result', '')}"
        super().send_event(type, **fields)
