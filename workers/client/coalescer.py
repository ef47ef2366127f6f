"""Write coalescing: concurrent single writes of one process sent as one batch per master.

A web server has many threads each sending one write. One Celery round trip and one
journal sync per write caps it at a few hundred writes a second; a batch of N costs one
round trip and one sync. `Coalescer` gathers the writes that arrive within `linger_s` of
the first (up to `batch_max`) and sends one ``prevalence.execute_many`` per target (a
master, or the shared queue), handing each caller its own outcome, as Kafka's producer
does with ``linger.ms``.

Batches are pipelined, at most `in_flight_max` per target (Kafka's
``max.in.flight.requests``): a master is one solo worker, so one batch running and one
waiting in its queue keep it busy. While every slot of a target is taken, its writes keep
gathering, and the whole gathering leaves as the next batch when a reply frees a slot:
under load the batches grow instead of queueing up one small batch per linger.

Every write carries a request id (the caller's key, else a fresh UUID), so a batch that is
redelivered after a worker died applies once. A batch refused as a whole (one item with
wrong arguments is checked before anything is written) is sent again item by item, so only
the bad item fails.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

#: Most writes in one batch (the master accepts up to 10,000).
BATCH_MAX_DEFAULT = 1000
#: Batches in flight at once per target (module docstring).
IN_FLIGHT_PER_TARGET = 2
#: Threads that send batches and wait for their replies (shared by all targets).
SENDER_THREADS = 8

#: Put on the queue by a sender whose batch was answered: a slot is free again.
_WAKE = object()


class Coalescer:
    """Gathers single writes into batches for one `Client` (module docstring).

    Args:
        client: the `Client` whose ``_send`` and ``_wait`` carry the batches.
        linger_s: how long the first write of a batch waits for others (seconds).
        batch_max: most writes in one batch.
        in_flight_max: most batches awaiting their reply at once, per target.
    """

    def __init__(self, client: Any, linger_s: float, batch_max: int = BATCH_MAX_DEFAULT,
                 in_flight_max: int = IN_FLIGHT_PER_TARGET) -> None:
        if batch_max < 1 or in_flight_max < 1:
            raise ValueError(f"batch_max and in_flight_max must be >= 1, got {batch_max}, "
                             f"{in_flight_max}")
        self.client = client
        self.linger_s = linger_s
        self.batch_max = batch_max
        self.in_flight_max = in_flight_max
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: dict[str | None, int] = {}
        self._senders = ThreadPoolExecutor(max_workers=SENDER_THREADS, thread_name_prefix="prevalence-batch")
        self.batches = 0  # sent so far (for tests and metrics)
        self.waiting = 0  # writes gathered and not sent yet (set by the gathering thread)
        self._thread = threading.Thread(target=self._run, name="prevalence-coalescer", daemon=True)
        self._thread.start()

    def submit(self, tx: str, args: list, *, master: str | None, key: str | None,
               timeout_s: float) -> Future:
        """Queue one write; the future resolves to its outcome document."""
        if self._closed.is_set():
            raise RuntimeError("this client's coalescer is closed")
        future: Future = Future()
        self._queue.put((master, [tx, list(args), key or str(uuid.uuid4())], timeout_s, future))
        return future

    def close(self) -> None:
        """Send what is pending, wait for every reply, stop the threads."""
        self._closed.set()
        self._queue.put(None)
        self._thread.join(timeout=60)
        self._senders.shutdown(wait=True)

    # -- the gathering thread --------------------------------------------------------------

    def _run(self) -> None:
        pending: dict[str | None, list] = {}    # target -> writes not sent yet, in order
        oldest: dict[str | None, float] = {}    # target -> when its oldest pending write came
        closing = False
        while True:
            # Send each target's pending writes that are due (lingered, a full batch, or
            # closing) when one of its slots is free.
            now = time.monotonic()
            for target in list(pending):
                items = pending[target]
                due = closing or len(items) >= self.batch_max or now >= oldest[target] + self.linger_s
                if not due or not self._take_slot(target):
                    continue
                batch, rest = items[:self.batch_max], items[self.batch_max:]
                if rest:
                    pending[target] = rest  # already waited: due again at the next free slot
                else:
                    del pending[target], oldest[target]
                self.batches += 1
                self.waiting -= len(batch)
                self._senders.submit(self._send_batch, target, batch)
            if closing and not pending:
                return
            # Wait for a write, a freed slot, or the next linger deadline of a target that
            # has a free slot (a target without one waits for its _WAKE).
            waits = [oldest[t] + self.linger_s - now for t in pending if self._slot_free(t)]
            try:
                if not waits:
                    item = self._queue.get()
                elif min(waits) > 0:
                    item = self._queue.get(timeout=min(waits))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                continue
            if item is None:
                closing = True
            elif item is not _WAKE:
                pending.setdefault(item[0], []).append(item)
                oldest.setdefault(item[0], time.monotonic())
                self.waiting += 1

    def _slot_free(self, target: str | None) -> bool:
        with self._lock:
            return self._in_flight.get(target, 0) < self.in_flight_max

    def _take_slot(self, target: str | None) -> bool:
        with self._lock:
            if self._in_flight.get(target, 0) >= self.in_flight_max:
                return False
            self._in_flight[target] = self._in_flight.get(target, 0) + 1
            return True

    def _send_batch(self, target: str | None, items: list) -> None:
        try:
            self._send(target, items)
        finally:
            with self._lock:
                self._in_flight[target] -= 1
            self._queue.put(_WAKE)

    def _send(self, master: str | None, items: list) -> None:
        from workers.client import ClientError, RequestRefused

        timeout_s = max(item[2] for item in items)
        payload = [item[1] for item in items]
        try:
            reply = self.client._wait(
                self.client._send("prevalence.execute_many", [payload, None], master=master),
                timeout_s, f"batch of {len(payload)} coalesced writes")
        except ClientError as exc:
            for item in items:
                item[3].set_exception(exc)
            return
        except Exception as exc:  # noqa: BLE001 - hand every caller the failure, never hang them
            for item in items:
                item[3].set_exception(exc)
            return
        if "outcomes" not in reply:
            if len(items) > 1 and reply.get("error_type") not in ("NotReady",):
                # Refused as a whole because of one item: each on its own, so only it fails.
                for item in items:
                    self._send(master, [item])
                return
            error = RequestRefused(reply.get("error") or "batch refused", reply.get("error_type"))
            for item in items:
                item[3].set_exception(error)
            return
        for item, outcome in zip(items, reply["outcomes"]):
            doc = dict(outcome, master=reply.get("master"), rid=item[1][2])
            doc.setdefault("error", None)
            doc.setdefault("error_type", None)
            doc.setdefault("duplicate", False)
            item[3].set_result(doc)
