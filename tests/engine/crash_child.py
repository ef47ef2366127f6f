"""One master in a child process that SIGKILLs itself at the N-th hit of a fault point.

    python -m tests.engine.crash_child SHARED POINT N WRITES [FSYNC]

Opens master `solo` of the test model (`tests.support.test_model`: the example ledger, or
the nested one under ``PREVALENCE_TEST_MODEL=nested``) (fsync=FSYNC, default always; ``deferred`` = always with
`deferred_sync`, acknowledging only after `settle`; tiny segments, no GC grace) and deposits 1 into
account `acct` WRITES times with request ids w0, w1, ...; after each acknowledged one it
prints "ack <rid>" (flushed), and every third write it snapshots and syncs (which
collects covered segments and publishes progress). Prints "done" if never killed.
"""

import os
import signal
import sys

from tests.support import test_model
from workers.prevalence import Master

SEGMENT_BYTES_MAX = 200


def main() -> None:
    shared, point, n, writes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    fsync = sys.argv[5] if len(sys.argv) > 5 else "always"
    hits = 0

    def fault(p: str) -> None:
        nonlocal hits
        if p == point:
            hits += 1
            if hits == n:
                os.kill(os.getpid(), signal.SIGKILL)

    deferred = fsync == "deferred"
    m = Master.open(test_model(), shared, "solo", fsync="always" if deferred else fsync, fault=fault,
                    gc_grace_s=0, segment_bytes_max=SEGMENT_BYTES_MAX, deferred_sync=deferred)
    if "acct" not in m.query("balances"):
        m.execute("open_account", "acct", 0, rid="open")
        print("ack open", flush=True)
    for i in range(writes):
        rid = f"w{i}"
        m.execute("deposit", "acct", 1, rid=rid)
        m.settle()  # what the Celery tier does before it publishes the result
        print(f"ack {rid}", flush=True)
        if i % 3 == 2:
            m.snapshot()
            m.sync()
    m.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
