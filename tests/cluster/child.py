"""A master in a child process that SIGKILLs itself at the N-th hit of a fault point.

    python -m tests.cluster.child SHARED NAME POINT N WRITES

Prints "ack <rid>" (flushed) for every acknowledged transaction, "ready" after opening.
"""

import os
import signal
import sys
import time

from tests.support import test_model
from workers.prevalence import Master, Rejected


def main():
    shared, name, point, n, writes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    hits = {"n": 0}

    def fault(p):
        if p == point:
            hits["n"] += 1
            if hits["n"] >= n:
                os.kill(os.getpid(), signal.SIGKILL)

    m = Master.open(test_model(), shared, name, fsync="always", fault=fault, gc_grace_s=0,
                    segment_bytes_max=400)
    print("ready", flush=True)
    for _ in range(5):
        m.sync()
        if m.joined:
            break
    for i in range(writes):
        rid = f"{name}-{i}"
        try:
            m.execute("deposit", "acct", 1, rid=rid)
        except Rejected:
            pass
        print(f"ack {rid}", flush=True)
        m.sync()
        if i % 3 == 2:
            m.snapshot()
    # Linger, syncing, so that steps that need the peers' progress (GC) are reached too.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        m.sync()
        m.snapshot()
        time.sleep(0.01)
    m.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
