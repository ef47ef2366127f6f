"""Celery-tier benchmarks: what the engine costs on top of Celery's own round trip.

    python benchmarks/bench_celery.py            # a few minutes on 2 cores
    python benchmarks/bench_celery.py --quick    # smoke run, under a minute
    (or python -m benchmarks.bench_celery)

Prints one JSON line per result on stdout (progress on stderr):

- ``celery_execute_vs_noop``: durable transactions per second through Celery to one
  master (``prevalence.execute`` of a deposit, ``fsync=always``, acks_late, prefetch 1,
  the journal sync overlapped with Celery's result handling: ``PREVALENCE_SYNC_OVERLAP=on``,
  the default) against ``prevalence.ping`` (touches nothing) on the same broker, queue,
  worker and settings. Requests are sent in waves of ``window`` and each wave is collected
  with one native join, so the figure is the worker's throughput, not one client's latency.
  The three workers (this one and the two below) run side by side and every (worker, task)
  pair takes its turn wave by wave in a rotating order; ``ratio`` is total over total
  (target >= 0.8), ``ratio_per_round`` shows the spread.
- ``disk_sync_latency``: what one durable commit waits for on this disk (pwrite into
  reserved space + fdatasync, spaced as commits are in the worker), same run.
- ``celery_execute_vs_noop_overlap_off``: the same ratio with ``PREVALENCE_SYNC_OVERLAP=off``
  (the sync completes before the task returns); ``celery_sync_overlap_gain``: durable
  execute/s with the overlap over without it, in the same turns.
- ``celery_execute_vs_noop_fsync_never``: the same ratio on a master with
  ``PREVALENCE_FSYNC=never``: the engine's CPU cost alone, so the durable ratio splits
  into engine and disk.
- ``celery_execute_many``: items per second of ``prevalence.execute_many`` batches of
  ``batch`` deposits (one fsync per batch), pipelined the same way.
- ``celery_replication_lag``: a deposit committed on alpha until a query on beta sees it,
  with beat sending sync every 1 s; random gaps between samples spread them over the sync
  phase. p50/p99 in ms. Beta is polled through Celery every 10 ms, which adds a few ms.

Broker: a private redis-server on a free loopback port (the embedded fakeredis server if
the binary is missing, flagged in the lines). Workers log at WARNING, so logging does not
flatter the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/bench_celery.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def log(text: str) -> None:
    print(f"[bench_celery] {text}", file=sys.stderr, flush=True)


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def make_app(cluster: Any) -> Any:
    from celery import Celery

    from workers.celeryconfig import celery_settings
    from workers.settings import load_settings

    env = {k: v for k, v in cluster.env().items() if k.startswith(("PREVALENCE_", "CELERY_"))}
    app = Celery("bench-client", set_as_current=False)
    app.conf.update(celery_settings(load_settings(env, use_env_file=False)))
    return app


def pipelined(app: Any, task: str, args_of: Any, count: int, window: int, queue: str) -> float:
    """Send `count` tasks in waves of `window`, each wave collected with one native join
    (one pub/sub drain for the wave); return tasks per second, first send to last reply."""
    from celery.result import ResultSet

    started = time.perf_counter()
    for first in range(0, count, window):
        wave = [app.send_task(task, args=args_of(i), queue=queue)
                for i in range(first, min(count, first + window))]
        for reply in ResultSet(wave).join_native(timeout=120, interval=0.001):
            _check(reply)
    return count / (time.perf_counter() - started)


def _check(reply: Any) -> None:
    if isinstance(reply, dict) and reply.get("status") not in (None, "ok"):
        raise RuntimeError(f"benchmark request failed: {reply}")
    if isinstance(reply, dict) and "outcomes" in reply:
        bad = [o for o in reply["outcomes"] if o["status"] != "ok"]
        if bad:
            raise RuntimeError(f"benchmark batch item failed: {bad[0]}")


#: The three workers measured side by side: (variant, environment, note).
VARIANTS = (
    ("", {}, None),
    ("overlap_off", {"PREVALENCE_SYNC_OVERLAP": "off"},
     "the journal sync completes before the task returns"),
    ("fsync_never", {"PREVALENCE_FSYNC": "never"},
     "engine CPU only: the journal is not synced per commit"),
)


def bench_throughput(apps: dict[str, Any], *, rounds: int, count: int, window: int,
                     broker_kind: str) -> None:
    """Execute vs no-op on each variant's worker (one solo worker each, all up at once).

    The machine's drift is larger than the effects measured, so the steps (variant x
    execute|no-op) take turns wave by wave (`window` tasks), in a rotating order, and each
    rate is total tasks over total time. A round is ``count // window`` turns; the
    per-round ratios show the spread.
    """
    queue = "master.alpha"
    for app in apps.values():
        _check(app.send_task("prevalence.execute", args=["open_account", ["bench", 0]],
                             queue=queue).get(timeout=60))
        # Warm both paths (connections, result subscriptions, the worker's caches).
        pipelined(app, "prevalence.ping", lambda i: [], 200, window, queue)
        pipelined(app, "prevalence.execute", lambda i: ["deposit", ["bench", 1]], 200, window, queue)
    calls = {"noop": ("prevalence.ping", lambda i: []),
             "execute": ("prevalence.execute", lambda i: ["deposit", ["bench", 1]])}
    steps = [(variant, kind) for variant in apps for kind in calls]
    seconds: dict[tuple[str, str], list[float]] = {step: [] for step in steps}  # per round
    turns = max(1, count // window)
    for r in range(rounds):
        spent = dict.fromkeys(steps, 0.0)
        for t in range(turns):
            shift = (r * turns + t) % len(steps)
            for variant, kind in steps[shift:] + steps[:shift]:
                task, args_of = calls[kind]
                spent[variant, kind] += window / pipelined(apps[variant], task, args_of, window,
                                                           window, queue)
        for step in steps:
            seconds[step].append(spent[step])
        log(f"round {r + 1}/{rounds}: " + "; ".join(
            f"{variant or 'overlap_on'} execute {turns * window / spent[variant, 'execute']:.0f}/s "
            f"no-op {turns * window / spent[variant, 'noop']:.0f}/s" for variant in apps))

    def rate(step: tuple[str, str]) -> float:
        return rounds * turns * window / sum(seconds[step])

    notes = {variant: note for variant, _env, note in VARIANTS}
    for variant in apps:
        ratio = rate((variant, "execute")) / rate((variant, "noop"))
        per_round = [n / e for e, n in zip(seconds[variant, "execute"], seconds[variant, "noop"])]
        emit({"bench": "celery_execute_vs_noop" + (f"_{variant}" if variant else ""),
              "unit": "tasks/s",
              "execute_per_s": round(rate((variant, "execute"))),
              "noop_per_s": round(rate((variant, "noop"))),
              "ratio": round(ratio, 3), "ratio_per_round": [round(x, 3) for x in per_round],
              **({"target": 0.8, "meets_target": ratio >= 0.8} if not variant else
                 {"note": notes[variant]}),
              "fsync": "never" if variant == "fsync_never" else "always",
              "sync_overlap": variant == "", "window": window,
              "tasks_per_step": rounds * turns * window, "rounds": rounds, "broker": broker_kind,
              "worker": "1 solo worker, prefetch 1, acks_late, loglevel WARNING"})
    if "" in apps and "overlap_off" in apps:
        gain = rate(("", "execute")) / rate(("overlap_off", "execute"))
        per_round = [off / on for on, off in zip(seconds["", "execute"], seconds["overlap_off", "execute"])]
        emit({"bench": "celery_sync_overlap_gain", "unit": "ratio", "ratio": round(gain, 3),
              "ratio_per_round": [round(x, 3) for x in per_round],
              "what": "durable execute/s with the sync overlapped over the same with it inline, "
                      "in the same turns"})


def bench_sync_latency(folder: Path, *, samples: int, gap_s: float = 0.002) -> None:
    """What one durable commit waits for on this disk: ``pwrite`` of a record-sized buffer
    into reserved space + ``fdatasync``, ``samples`` times, spaced by ``gap_s`` of busy CPU
    as commits are in a worker (a tight loop of syncs runs faster than spaced ones)."""
    path = folder / "sync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, bytes(1 << 20), 0)
        os.fsync(fd)
        lat = []
        for i in range(samples):
            started = time.perf_counter()
            os.pwrite(fd, b"x" * 120, i * 120)
            os.fdatasync(fd)
            lat.append((time.perf_counter() - started) * 1e6)
            spin = time.perf_counter()
            while time.perf_counter() - spin < gap_s:
                pass
    finally:
        os.close(fd)
        path.unlink()
    emit({"bench": "disk_sync_latency", "unit": "us", "median_us": round(statistics.median(lat)),
          "mean_us": round(statistics.fmean(lat)), "p90_us": round(percentile(lat, 0.9)),
          "samples": samples, "gap_ms": gap_s * 1000,
          "what": "pwrite 120 B into reserved space + fdatasync, in the benchmark's folder"})


def bench_execute_many(app: Any, *, batches: int, batch: int, window: int,
                       broker_kind: str) -> None:
    items = [["deposit", ["bench", 1]] for _ in range(batch)]
    rates = []
    for _ in range(3):
        per_s = pipelined(app, "prevalence.execute_many", lambda i: [items], batches, window,
                          "master.alpha")
        rates.append(per_s * batch)
    emit({"bench": "celery_execute_many", "unit": "items/s",
          "items_per_s": round(statistics.median(rates)), "runs": [round(r) for r in rates],
          "batch": batch, "batches_per_run": batches, "fsync": "always", "window": window,
          "broker": broker_kind})


def bench_lag(cluster: Any, app: Any, *, samples: int, broker_kind: str) -> None:
    rng = random.Random(11)
    _check(app.send_task("prevalence.execute", args=["open_account", ["lag", 0]],
                         queue="master.alpha").get(timeout=60))
    cluster.wait_converged(60)
    lags_ms = []
    for i in range(samples):
        time.sleep(rng.uniform(0, 1.0))  # spread commits over the sync phase
        reply = app.send_task("prevalence.execute", args=["deposit", ["lag", 1]],
                              queue="master.alpha").get(timeout=60, interval=0.001)
        _check(reply)
        committed = time.perf_counter()
        expected = reply["value"]
        while True:
            seen = app.send_task("prevalence.query", args=["balance", ["lag"]],
                                 queue="master.beta").get(timeout=60, interval=0.001)
            if seen["value"] is not None and seen["value"] >= expected:
                break
            time.sleep(0.01)
        lags_ms.append((time.perf_counter() - committed) * 1000)
    emit({"bench": "celery_replication_lag", "unit": "ms", "sync_interval_s": 1.0,
          "p50_ms": round(percentile(lags_ms, 0.5), 1),
          "p99_ms": round(percentile(lags_ms, 0.99), 1),
          "max_ms": round(max(lags_ms), 1), "samples": samples, "broker": broker_kind})


def main(argv: list[str] | None = None) -> int:
    from workers.local.cluster import LocalCluster, start_broker

    parser = argparse.ArgumentParser(description="Celery-tier benchmarks (JSON lines)")
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--dir", help="working folder (default: a temp dir)")
    args = parser.parse_args(argv)
    # Many short interleaved rounds: fsync latency and CPU contention drift within seconds,
    # and only close pairs cancel that drift (as in the engine benchmarks).
    rounds, count, window = (2, 400, 200) if args.quick else (12, 1000, 200)
    batches, batch = (5, 1000) if args.quick else (20, 1000)
    samples = 8 if args.quick else 40

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-celery-"))
    broker = start_broker(root / "run")
    if broker.warning:
        log(broker.warning)
    emit({"bench": "_meta", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "python": sys.version.split()[0], "broker": broker.kind, "quick": args.quick,
          "loadavg_start": [round(x, 2) for x in os.getloadavg()],
          "cpus": os.cpu_count()})
    try:
        # One master per variant for throughput, all up at once (idle ones wait on Redis):
        # the shared queue is not involved, nothing syncs. Each on its own database.
        base_url = broker.url.rsplit("/", 1)[0]
        from workers.local.cluster import Broker

        clusters, apps = [], {}
        for index, (variant, env, _note) in enumerate(VARIANTS):
            cluster = LocalCluster(root / (variant or "overlap_on"),
                                   Broker(f"{base_url}/{2 + index}", broker.kind),
                                   masters=("alpha",), loglevel="warning", sync_interval="1h",
                                   snapshot_interval="7d", env=env)
            cluster.start_masters()
            clusters.append(cluster)
            apps[variant] = make_app(cluster)
        log("throughput: execute vs no-op through Celery, "
            f"{len(apps)} workers side by side ...")
        bench_throughput(apps, rounds=rounds, count=count, window=window,
                         broker_kind=broker.kind)
        log("execute_many ...")
        bench_execute_many(apps[""], batches=batches, batch=batch, window=4,
                           broker_kind=broker.kind)
        for cluster in clusters:
            cluster.stop(stop_broker=False)
        bench_sync_latency(root, samples=100 if args.quick else 400)

        log("replication lag through beat (sync every 1 s) ...")
        lag_broker_url = base_url + "/1"
        lag_cluster = LocalCluster(root / "two", Broker(lag_broker_url, broker.kind),
                                   masters=("alpha", "beta"), loglevel="warning",
                                   sync_interval="1s", snapshot_interval="7d")
        lag_cluster.start_masters()
        lag_cluster.start_beat(loglevel="warning")
        bench_lag(lag_cluster, make_app(lag_cluster), samples=samples, broker_kind=broker.kind)
        lag_cluster.stop(stop_broker=False)
    finally:
        broker.stop()
    # A busy machine depresses both sides of a ratio alike, but not the absolute figures.
    emit({"bench": "_meta_end", "loadavg_end": [round(x, 2) for x in os.getloadavg()]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
