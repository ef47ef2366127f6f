"""Issue 10's benchmarks: how long a client waits for the committed answer, and how many
first answers the committed order reverses, with and without key affinity.

    python -m benchmarks.bench_committed            # about two minutes on 2 cores
    python -m benchmarks.bench_committed --quick    # smoke run

Three real masters (solo Celery workers) and beat syncing every 1 s, on a private
redis-server. Prints one JSON line per result on stdout (progress on stderr):

- ``committed_wait_latency``: a deposit sent to a random master with
  ``Client.execute(..., wait="committed")``, from send until the committed answer arrives,
  samples spread over the beat phase by random gaps. p50 and p99 in ms; target p99 <=
  2 sync intervals + 200 ms (the record commits once every other master has read it and
  written a later record, at their next sync, and this master has read those at its own).
- ``reversed_outcomes_without_affinity`` / ``..._with_affinity``: a mixed workload of
  single-account withdrawals and cross-account transfers on a few accounts, sent in waves
  to the masters at once; a first answer is *reversed* when the committed outcome's status
  differs (ok <-> refused); ``*_value_changed`` counts the same status with another value
  (a balance that others' writes, ordered first, changed).
  Without affinity each write goes to a random master; with it, every write goes to the
  master its source account's `route_key` picks. Counted separately for single-key
  writes (withdrawals) and transfers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_celery import emit, log, make_app, percentile  # noqa: E402


def latency(cluster: Any, client: Any, samples: int, rng: random.Random) -> None:
    client.execute("open_account", "lat", 0, master="alpha")
    cluster.wait_converged(60)
    waits_ms = []
    for i in range(samples):
        time.sleep(rng.uniform(0, 1.0))  # spread over the beat phase
        t0 = time.perf_counter()
        client.execute("deposit", "lat", 1, master=rng.choice(cluster.masters), wait="committed", timeout_s=30)
        waits_ms.append((time.perf_counter() - t0) * 1000)
        if (i + 1) % 20 == 0:
            log(f"committed wait: {i + 1}/{samples}")
    p99 = percentile(waits_ms, 0.99)
    emit({"bench": "committed_wait_latency", "unit": "ms", "samples": samples,
          "p50": round(percentile(waits_ms, 0.5), 1), "p99": round(p99, 1),
          "max": round(max(waits_ms), 1), "sync_interval_s": 1.0,
          "target": "p99 <= 2 sync intervals + 200 ms = 2200 ms", "met": p99 <= 2200})


def reversals(cluster: Any, client: Any, waves: int, rng: random.Random, *, affinity: bool) -> dict:
    accounts = [f"acc-{'aff' if affinity else 'rnd'}-{i}" for i in range(4)]
    client.execute_many([("open_account", [a, 60]) for a in accounts], master="alpha")
    cluster.wait_converged(60)
    stats = {"withdraw": [0, 0, 0], "transfer": [0, 0, 0]}  # kind -> [writes, reversed, value changed]
    for _ in range(waves):
        sent = []
        for _ in range(6):
            src, dst = rng.sample(accounts, 2)
            if rng.random() < 0.5:
                kind, args = "withdraw", [src, rng.randint(5, 25)]
            else:
                kind, args = "transfer", [src, dst, rng.randint(5, 25)]
            master = client.route(src) if affinity else rng.choice(cluster.masters)
            sent.append((kind, client.app.send_task("prevalence.execute", args=[kind, args],
                                                    queue=f"master.{master}")))
        for kind, result in sent:
            first = result.get(timeout=60, interval=0.02)
            final = first if first.get("committed") else client.wait_committed(first, 60)
            stats[kind][0] += 1
            if first["status"] != final["status"]:
                stats[kind][1] += 1  # ok <-> refused: reversed
            elif first["value"] != final["value"]:
                stats[kind][2] += 1  # same outcome, another balance (others' writes ordered first)
        # Top up so that refusals stay possible but not certain.
        client.execute_many([("deposit", [a, 30]) for a in accounts], master="alpha")
    name = "reversed_outcomes_with_affinity" if affinity else "reversed_outcomes_without_affinity"
    line = {"bench": name, "unit": "writes", "waves": waves,
            "withdrawals": stats["withdraw"][0], "withdrawals_reversed": stats["withdraw"][1],
            "withdrawals_value_changed": stats["withdraw"][2],
            "transfers": stats["transfer"][0], "transfers_reversed": stats["transfer"][1],
            "transfers_value_changed": stats["transfer"][2]}
    emit(line)
    return line


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_committed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    from workers.client import Client
    from workers.local.cluster import LocalCluster, start_broker

    rng = random.Random(10)
    with tempfile.TemporaryDirectory(prefix="bench-committed-") as root:
        broker = start_broker(Path(root) / "run")
        cluster = LocalCluster(Path(root), broker, sync_interval="1s", snapshot_interval="10m",
                               loglevel="warning")
        try:
            log(f"broker {broker.kind} at {broker.url}; starting three masters and beat")
            cluster.start_masters()
            cluster.start_beat()
            client = Client(make_app(cluster), timeout_s=60)
            emit({"bench": "_meta", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  "broker": broker.kind, "quick": args.quick})
            latency(cluster, client, 20 if args.quick else 120, rng)
            time.sleep(3)  # statuses published: members_up sees all three
            for affinity in (False, True):
                reversals(cluster, client, 4 if args.quick else 25, rng, affinity=affinity)
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
