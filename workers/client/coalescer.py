"""Write coalescing: concurrent single writes of one process sent as one batch per master.

A web server has many threads each sending one write. One Celery round trip and one
journal sync per write caps it at a few hundred writes a second; a batch of N costs one
round trip and one sync. `Coalescer` gathers the writes that arrive within `linger_s` of
the first (up to `batch_max`), sends one ``prevalence.execute_many`` per target master (or
the shared queue), and hands each caller its own outcome, as Kafka's producer does with
``linger.ms``. Batches are pipelined: the next one is gathered while earlier ones are in
flight.

Every write carries a request id (the caller's key, else a fresh UUID), so a batch that is
redelivered after a worker died applies once. A batch refused as a whole (one item with
wrong arguments is checked before anything is written) is sent again item by item, so only
the bad item fails.
"""

from __future__ import annotations

import queue
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

#: Most writes in one batch (the master accepts up to 10,000).
BATCH_MAX_DEFAULT = 1000
#: Batches in flight at once (waiting for their replies).
IN_FLIGHT_MAX = 8


class Coalescer:
    """Gathers single writes into batches for one `Client` (module docstring)."""

    def __init__(self, client: Any, linger_s: float, batch_max: int = BATCH_MAX_DEFAULT) -> None:
        self.client = client
        self.linger_s = linger_s
        self.batch_max = batch_max
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._senders = ThreadPoolExecutor(max_workers=IN_FLIGHT_MAX, thread_name_prefix="prevalence-batch")
        self._thread = threading.Thread(target=self._run, name="prevalence-coalescer", daemon=True)
        self._thread.start()
        self.batches = 0  # sent so far (for tests and metrics)

    def submit(self, tx: str, args: list, *, master: str | None, key: str | None,
               timeout_s: float) -> Future:
        """Queue one write; the future resolves to its outcome document."""
        if self._closed.is_set():
            raise RuntimeError("this client's coalescer is closed")
        future: Future = Future()
        self._queue.put((master, [tx, list(args), key or str(uuid.uuid4())], timeout_s, future))
        return future

    def close(self) -> None:
        self._closed.set()
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._senders.shutdown(wait=True)

    # -- the gathering thread --------------------------------------------------------------

    def _run(self) -> None:
        import time

        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.linger_s
            while len(batch) < self.batch_max:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # close after this batch
                    break
                batch.append(item)
            groups: dict[str | None, list] = {}
            for item in batch:
                groups.setdefault(item[0], []).append(item)
            for master, items in groups.items():
                self.batches += 1
                self._senders.submit(self._send, master, items)

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
