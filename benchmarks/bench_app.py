"""Issue 11's benchmarks: what an application gets from followers, write coalescing and the
lean query task, side by side with what a Celery user would build instead (a Celery task
writing PostgreSQL, or PostgreSQL straight from the app).

    python -m benchmarks.bench_app            # about 6 minutes on 2 cores
    python -m benchmarks.bench_app --quick    # smoke run, about 2 minutes
    python -m benchmarks.bench_app --only reads,writes   # groups: query reads writes lag

One run starts a private redis-server (the embedded fakeredis server if the binary is
missing, flagged in every line), one master (a real ``celery worker -P solo``,
``fsync=always``) and one PostgreSQL worker (`benchmarks.pg_worker`, also a solo worker,
same Redis, same Celery settings), and uses the machine's PostgreSQL (``--pg-dsn``,
default ``host=127.0.0.1 port=5432 dbname=test``: the run creates its own table of 1000
accounts and drops it at the end; PostgreSQL lines say ``skipped`` when it cannot connect).
JSON lines on stdout, progress on stderr:

- ``celery_query_vs_noop``: ``prevalence.query`` of a balance against ``prevalence.ping``
  (touches nothing) on the same worker, queue and settings; waves of 200 tasks, each
  collected with one native join; the two take turns wave by wave in a rotating order and
  the ratio is total over total (target >= 0.95). ``celery_query_many``: balances read
  per second through ``prevalence.query_many`` batches of 100.
- ``app_reads_follower_vs_postgres``: point reads (balance by account id, random among
  1000) per second from an in-process follower (``Follower.query``, committed view,
  following every 100 ms), from PostgreSQL straight from this process (psycopg 3, one
  connection, a prepared ``SELECT balance ... WHERE id = $1``), through a Celery task that
  runs that SELECT (waves of 200), and through ``prevalence.query`` (waves of 200), in
  interleaved rounds of equal time, rotating order; rates are medians over rounds, the
  ratios medians of per-round ratios (target: follower >= 100x direct PostgreSQL).
- ``app_writes_coalesced_vs_postgres_task``: durable single transfers from 64 caller
  threads, each sending one transfer and waiting for its answer, again and again: through
  ``Client(coalesce_ms=2)`` to the master (``fsync=always``), against a Celery task that
  runs the transfer in PostgreSQL (one transaction: guarded debit, credit, COMMIT with
  ``synchronous_commit=on``) sent by the same 64 threads through the same Redis. Phases
  of equal length alternate; writes/s (median over phases) and latency from call to answer
  (p50, p99 over every write) per side (target: ours >= 10x).
- ``follower_lag``: a deposit answered by the master until ``Follower.wait_for(record)``
  returns, for followers following every 100 ms and every 1 s, in the committed view (a
  record is committed once the master has published a frontier past it, at its next sync:
  beat sends sync every 1 s, as in a deployment's default) and in the latest view (visible
  once read). All four followers wait on the same writes; random gaps spread the writes
  over the beat and follow phases. ``wait_for`` polls every 20 ms (its default).

The first line (``_meta``) has the date, commit, command and load average; the last
(``_meta_end``) the load average at the end: a busy machine depresses absolute figures.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: python benchmarks/bench_app.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_celery import _check, emit, make_app, percentile, pipelined  # noqa: E402

ACCOUNTS = 1000
INITIAL_BALANCE = 10**12  # no transfer of 1 can exhaust it
PG_DSN_DEFAULT = "host=127.0.0.1 port=5432 dbname=test"
CALLERS = 64
COALESCE_MS = 2.0
WINDOW = 200
GROUPS = ("query", "reads", "writes", "lag")


def log(text: str) -> None:
    print(f"[bench_app] {text}", file=sys.stderr, flush=True)


def account_ids() -> list[str]:
    return [f"acct-{i:04d}" for i in range(ACCOUNTS)]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> tuple[str | None, bool | None]:
    """The commit of this tree and whether anything tracked differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        return None, None
    return commit or None, bool(dirty)


# -- PostgreSQL ------------------------------------------------------------------------------


class PgTable:
    """The run's own table of accounts in the machine's PostgreSQL (created, then dropped)."""

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.dsn = dsn
        self.name = f"bench_app_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            self.server_version = conn.execute("SHOW server_version").fetchone()[0]
            conn.execute(f"CREATE TABLE {self.name} (id text PRIMARY KEY, balance bigint NOT NULL)")
            with conn.cursor().copy(f"COPY {self.name} (id, balance) FROM STDIN") as copy:
                for account in account_ids():
                    copy.write_row((account, INITIAL_BALANCE))
            conn.execute(f"VACUUM ANALYZE {self.name}")

    def total(self) -> int:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return int(conn.execute(f"SELECT sum(balance) FROM {self.name}").fetchone()[0])

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {self.name}")


class PgWorker:
    """`benchmarks.pg_worker` as a real ``celery worker -P solo`` subprocess."""

    def __init__(self, root: Path, broker_url: str, table: PgTable) -> None:
        from benchmarks import pg_worker
        from workers.local.processes import pythonpath, spawn

        env = os.environ.copy()
        env.update(CELERY_BROKER_URL=broker_url, BENCH_PG_DSN=table.dsn, BENCH_PG_TABLE=table.name)
        env["PYTHONPATH"] = pythonpath(env)
        self.log_path = root / "log" / "pg-worker.log"
        self.process = spawn([sys.executable, "-m", "celery", "-A", "benchmarks.pg_worker",
                              "worker", "-P", "solo", "-Q", pg_worker.QUEUE, "-n", "pg@%h",
                              "-l", "warning", "--without-mingle", "--without-gossip"],
                             self.log_path, env=env, cwd=root)
        self.app = pg_worker.make_app(broker_url)
        # Up once it answers a read (the first one opens its connection).
        try:
            reply = self.app.send_task("pg.read_balance", args=["acct-0000"], queue=pg_worker.QUEUE)
            _check(reply.get(timeout=60))
        except Exception:
            self.stop()
            log(f"the PostgreSQL worker did not answer; its log: {self.log_path}")
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- (d) the query task against the no-op ---------------------------------------------------


def bench_query_vs_noop(app: Any, *, rounds: int, turns: int, broker_kind: str) -> None:
    """Query vs no-op through Celery, interleaved wave by wave (module doc)."""
    queue = "master.alpha"
    ids = account_ids()
    calls: dict[str, tuple[str, Callable[[int], list]]] = {
        "noop": ("prevalence.ping", lambda i: []),
        "query": ("prevalence.query", lambda i: ["balance", [ids[i % ACCOUNTS]]]),
    }
    for task, args_of in calls.values():  # warm both paths
        pipelined(app, task, args_of, 2 * WINDOW, WINDOW, queue)
    steps = list(calls)
    spent: dict[str, list[float]] = {step: [] for step in steps}
    for r in range(rounds):
        seconds = dict.fromkeys(steps, 0.0)
        for t in range(turns):
            shift = (r * turns + t) % len(steps)
            for step in steps[shift:] + steps[:shift]:
                task, args_of = calls[step]
                seconds[step] += WINDOW / pipelined(app, task, args_of, WINDOW, WINDOW, queue)
        for step in steps:
            spent[step].append(seconds[step])
        log(f"query vs no-op round {r + 1}/{rounds}: ratio {seconds['noop'] / seconds['query']:.3f}")
    total = rounds * turns * WINDOW
    query_per_s, noop_per_s = total / sum(spent["query"]), total / sum(spent["noop"])
    ratio = query_per_s / noop_per_s
    emit({"bench": "celery_query_vs_noop", "unit": "tasks/s", "query_per_s": round(query_per_s),
          "noop_per_s": round(noop_per_s), "ratio": round(ratio, 3),
          "ratio_per_round": [round(n / q, 3) for q, n in zip(spent["query"], spent["noop"])],
          "target": 0.95, "meets_target": ratio >= 0.95, "window": WINDOW,
          "tasks_per_step": total, "rounds": rounds, "broker": broker_kind,
          "worker": "1 solo worker, prefetch 1, acks_late, task events on, loglevel WARNING",
          "loadavg": loadavg()})

    # Several reads in one task: balances per second through query_many batches of 100.
    batch = [["balance", [ids[i]]] for i in range(100)]
    rates = [100 * pipelined(app, "prevalence.query_many", lambda i: [batch], 100, 10, queue)
             for _ in range(3)]
    emit({"bench": "celery_query_many", "unit": "reads/s", "reads_per_s": round(statistics.median(rates)),
          "runs": [round(r) for r in rates], "batch": 100, "single_query_tasks_per_s": round(query_per_s),
          "broker": broker_kind, "loadavg": loadavg()})


# -- (a) reads -------------------------------------------------------------------------------


class FollowerReads:
    name = "follower"

    def __init__(self, follower: Any) -> None:
        self.query = follower.query
        self.ids = account_ids()
        self.i = 0

    def run(self, budget_s: float) -> tuple[int, float]:
        query, ids, n = self.query, self.ids, 0
        started = time.perf_counter()
        while True:
            for _ in range(1000):
                query("balance", ids[(self.i + n) % ACCOUNTS])
                n += 1
            elapsed = time.perf_counter() - started
            if elapsed >= budget_s:
                self.i += n
                return n, elapsed


class PgDirectReads:
    name = "postgres_direct"

    def __init__(self, table: PgTable) -> None:
        import psycopg

        self.conn = psycopg.connect(table.dsn, autocommit=True)
        self.cursor = self.conn.cursor()
        self.sql = f"SELECT balance FROM {table.name} WHERE id = %s"
        self.ids = account_ids()
        self.i = 0

    def run(self, budget_s: float) -> tuple[int, float]:
        cursor, sql, ids, n = self.cursor, self.sql, self.ids, 0
        started = time.perf_counter()
        while True:
            for _ in range(50):
                cursor.execute(sql, (ids[(self.i + n) % ACCOUNTS],), prepare=True)
                cursor.fetchone()
                n += 1
            elapsed = time.perf_counter() - started
            if elapsed >= budget_s:
                self.i += n
                return n, elapsed

    def close(self) -> None:
        self.conn.close()


class CeleryReads:
    """Waves of `WINDOW` read tasks until the budget is spent."""

    def __init__(self, name: str, app: Any, task: str, args_of: Callable[[int], list],
                 queue: str) -> None:
        self.name, self.app, self.task, self.args_of, self.queue = name, app, task, args_of, queue

    def run(self, budget_s: float) -> tuple[int, float]:
        n = 0
        started = time.perf_counter()
        while True:
            pipelined(self.app, self.task, lambda i: self.args_of(n + i), WINDOW, WINDOW, self.queue)
            n += WINDOW
            elapsed = time.perf_counter() - started
            if elapsed >= budget_s:
                return n, elapsed


def bench_reads(follower: Any, app: Any, pg: PgTable | None, pg_app: Any, *, rounds: int,
                round_s: float, broker_kind: str) -> None:
    from benchmarks.harness import run_interleaved

    ids = account_ids()
    expected = INITIAL_BALANCE
    got = follower.query("balance", ids[0])
    if got != expected:
        raise RuntimeError(f"follower reads {got} for {ids[0]}, expected {expected}")
    contenders: list[Any] = [FollowerReads(follower),
                             CeleryReads("prevalence_query_task", app, "prevalence.query",
                                         lambda i: ["balance", [ids[i % ACCOUNTS]]], "master.alpha")]
    if pg is not None:
        contenders += [PgDirectReads(pg),
                       CeleryReads("postgres_celery_task", pg_app, "pg.read_balance",
                                   lambda i: [ids[i % ACCOUNTS]], "pg")]
    for contender in contenders:  # warm up (connections, prepared statements, caches)
        contender.run(0.05)
    rates = run_interleaved(contenders, rounds, round_s)
    line: dict[str, Any] = {"bench": "app_reads_follower_vs_postgres", "unit": "reads/s",
                            **{f"{name}_per_s": round(statistics.median(r)) for name, r in rates.items()}}
    if pg is not None:
        per_round = [f / p for f, p in zip(rates["follower"], rates["postgres_direct"])]
        ratio = statistics.median(per_round)
        line.update(ratio_vs_postgres_direct=round(ratio, 1),
                    ratio_per_round=[round(x, 1) for x in per_round],
                    ratio_vs_postgres_celery_task=round(statistics.median(
                        [f / p for f, p in zip(rates["follower"], rates["postgres_celery_task"])]), 1),
                    target=100, meets_target=ratio >= 100, postgres=pg.server_version)
    else:
        line.update(postgres="skipped: no connection (see --pg-dsn)")
    line.update(rounds=rounds, round_s=round_s, accounts=ACCOUNTS, follower_view=follower.view,
                what="balance by account id; follower: Follower.query in this process; "
                     "postgres_direct: psycopg 3, prepared SELECT by primary key, one connection; "
                     "*_task: one Celery task per read, waves of 200",
                broker=broker_kind, loadavg=loadavg())
    for contender in contenders:
        getattr(contender, "close", lambda: None)()
    emit(line)


# -- (b) writes ------------------------------------------------------------------------------


def _callers(send: Callable[[random.Random], None], seconds: float, seed: int
             ) -> tuple[int, float, list[float], list[str]]:
    """`CALLERS` threads call `send` back to back for `seconds`; returns (writes, elapsed
    s, latencies ms, errors). A write still in flight at the deadline is waited for."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def caller(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        mine: list[float] = []
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                send(rng)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            mine.append((time.perf_counter() - started) * 1000)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(CALLERS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return len(latencies), time.perf_counter() - started, latencies, errors


def _pair(rng: random.Random) -> tuple[str, str]:
    src, dst = rng.sample(range(ACCOUNTS), 2)
    return f"acct-{src:04d}", f"acct-{dst:04d}"


def bench_writes(app: Any, pg: PgTable | None, pg_app: Any, *, rounds: int, phase_s: float,
                 broker_kind: str) -> None:
    from workers.client import Client

    client = Client(app, timeout_s=60, coalesce_ms=COALESCE_MS)

    def ours(rng: random.Random) -> None:
        src, dst = _pair(rng)
        outcome = client.execute_outcome("transfer", src, dst, 1, master="alpha")
        if outcome["status"] != "ok":
            raise RuntimeError(f"transfer {src}->{dst}: {outcome}")

    def postgres(rng: random.Random) -> None:
        src, dst = _pair(rng)
        reply = pg_app.send_task("pg.transfer", args=[src, dst, 1], queue="pg").get(timeout=60)
        if reply["status"] != "ok":
            raise RuntimeError(f"pg transfer {src}->{dst}: {reply}")

    sides: dict[str, Callable[[random.Random], None]] = {"ours": ours}
    if pg is not None:
        sides["postgres_celery_task"] = postgres
    for side, send in sides.items():  # warm up: connections, prepared statements
        _callers(send, min(1.0, phase_s), seed=0)
    batches_before = client._coalescer.batches
    rates: dict[str, list[float]] = {side: [] for side in sides}
    latencies: dict[str, list[float]] = {side: [] for side in sides}
    errors: dict[str, list[str]] = {side: [] for side in sides}
    ours_writes = 0
    order = list(sides)
    for r in range(rounds):
        for side in order[r % len(order):] + order[:r % len(order)]:
            writes, elapsed, lat, errs = _callers(sides[side], phase_s, seed=r + 1)
            rates[side].append(writes / elapsed)
            latencies[side] += lat
            errors[side] += errs
            if side == "ours":
                ours_writes += writes
        log(f"writes round {r + 1}/{rounds}: " + "; ".join(
            f"{side} {rates[side][-1]:.0f}/s" for side in sides))
    batches = client._coalescer.batches - batches_before
    client.close()

    def figures(side: str) -> dict[str, Any]:
        lat = latencies[side]
        return {"per_s": round(statistics.median(rates[side])),
                "per_s_per_phase": [round(x) for x in rates[side]],
                "p50_ms": round(percentile(lat, 0.5), 2) if lat else None,
                "p99_ms": round(percentile(lat, 0.99), 2) if lat else None,
                "writes": len(lat), "errors": len(errors[side]),
                **({"first_error": errors[side][0]} if errors[side] else {})}

    line: dict[str, Any] = {"bench": "app_writes_coalesced_vs_postgres_task", "unit": "writes/s",
                            "ours": {**figures("ours"), "coalesce_ms": COALESCE_MS,
                                     "batches": batches,
                                     "mean_batch": round(ours_writes / batches, 1) if batches else None,
                                     "fsync": "always"}}
    if pg is not None:
        per_phase = [o / p for o, p in zip(rates["ours"], rates["postgres_celery_task"])]
        ratio = statistics.median(per_phase)
        line.update(postgres_celery_task={**figures("postgres_celery_task"),
                                          "synchronous_commit": "on", "postgres": pg.server_version},
                    ratio=round(ratio, 1), ratio_per_round=[round(x, 1) for x in per_phase],
                    target=10, meets_target=ratio >= 10)
    else:
        line.update(postgres_celery_task="skipped: no connection (see --pg-dsn)")
    line.update(callers=CALLERS, rounds=rounds, phase_s=phase_s,
                what="transfer of 1 between two random accounts of 1000 (guarded debit + "
                     "credit), each caller waiting for its answer before the next; latency "
                     "from call to answer",
                workers="one solo worker each, same private Redis, prefetch 1, acks_late",
                broker=broker_kind, loadavg=loadavg())
    emit(line)


def check_totals(app: Any, pg: PgTable | None) -> None:
    """Transfers move money, never make it: both totals are unchanged."""
    from workers.client import Client

    total = Client(app, timeout_s=60).query("total", master="alpha")
    expected = ACCOUNTS * INITIAL_BALANCE
    if total != expected:
        raise RuntimeError(f"the master's total is {total}, expected {expected}")
    if pg is not None and pg.total() != expected:
        raise RuntimeError(f"PostgreSQL's total is {pg.total()}, expected {expected}")


# -- (c) follower lag ------------------------------------------------------------------------


def bench_lag(cluster: Any, app: Any, *, samples: int, broker_kind: str) -> None:
    from workers.client import Client
    from workers.models.ledger import model
    from workers.prevalence import Follower

    client = Client(app, timeout_s=60)
    client.execute("open_account", "lag", 0, master="alpha")
    followers = {(view, interval_s): Follower.open(model, str(cluster.shared_dir), view=view,
                                                   follow_interval_s=interval_s)
                 for view in ("committed", "latest") for interval_s in (0.1, 1.0)}
    lags_ms: dict[tuple[str, float], list[float]] = {key: [] for key in followers}
    timeouts = dict.fromkeys(followers, 0)
    rng = random.Random(11)
    try:
        for i in range(samples):
            time.sleep(rng.uniform(0, 1.0))  # spread writes over the beat and follow phases
            outcome = client.execute_outcome("deposit", "lag", 1, master="alpha")
            answered = time.perf_counter()
            if outcome["status"] != "ok":
                raise RuntimeError(f"deposit refused: {outcome}")

            def wait(key: tuple[str, float]) -> None:
                if followers[key].wait_for(outcome["record"], timeout_s=30):
                    lags_ms[key].append((time.perf_counter() - answered) * 1000)
                else:
                    timeouts[key] += 1

            waiters = [threading.Thread(target=wait, args=(key,)) for key in followers]
            for t in waiters:
                t.start()
            for t in waiters:
                t.join(60)
            if (i + 1) % 10 == 0:
                log(f"follower lag: {i + 1}/{samples}")
    finally:
        for follower in followers.values():
            follower.close()
    for (view, interval_s), lags in lags_ms.items():
        emit({"bench": "follower_lag", "unit": "ms", "view": view,
              "follow_interval_ms": round(interval_s * 1000),
              "p50_ms": round(percentile(lags, 0.5), 1) if lags else None,
              "p99_ms": round(percentile(lags, 0.99), 1) if lags else None,
              "max_ms": round(max(lags), 1) if lags else None, "samples": len(lags),
              "timeouts": timeouts[view, interval_s], "sync_interval_s": 1.0,
              "wait_for_poll_ms": 20, "broker": broker_kind, "loadavg": loadavg()})


# -- the run ---------------------------------------------------------------------------------


def open_accounts(app: Any) -> str:
    """Open the accounts on alpha (one batch); return the last record's token."""
    from workers.client import Client

    outcomes = Client(app, timeout_s=120).execute_many(
        [("open_account", [a, INITIAL_BALANCE]) for a in account_ids()], master="alpha")
    bad = [o for o in outcomes if o["status"] != "ok"]
    if bad:
        raise RuntimeError(f"opening accounts failed: {bad[0]}")
    return outcomes[-1]["record"]


def main(argv: list[str] | None = None) -> int:
    from workers.local.cluster import Broker, LocalCluster, start_broker

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--dir", help="working folder (default: a temp dir)")
    parser.add_argument("--pg-dsn", default=os.environ.get("BENCH_PG_DSN", PG_DSN_DEFAULT),
                        help=f"PostgreSQL connection string (default {PG_DSN_DEFAULT!r}, or $BENCH_PG_DSN)")
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups: " + ",".join(GROUPS))
    args = parser.parse_args(argv)
    only = {g.strip() for g in args.only.split(",") if g.strip()}
    unknown = only - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; known: {', '.join(GROUPS)}")
    quick = args.quick
    query_rounds, query_turns = (2, 4) if quick else (12, 5)
    read_rounds, read_round_s = (4, 0.25) if quick else (12, 0.5)
    write_rounds, write_phase_s = (2, 2.0) if quick else (6, 4.0)
    lag_samples = 12 if quick else 80

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-app-"))
    commit, dirty = git_commit()
    broker = start_broker(root / "run")
    if broker.warning:
        log(broker.warning)
    pg: PgTable | None = None
    pg_note = None
    try:
        pg = PgTable(args.pg_dsn)
    except Exception as exc:  # noqa: BLE001 - the peer is optional: say why it is missing
        pg_note = f"{type(exc).__name__}: {exc}".strip()
        log(f"PostgreSQL unavailable, its lines are skipped: {pg_note}")
    emit({"bench": "_meta", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "git_commit": commit, "uncommitted_changes": dirty,
          "command": " ".join(["python -m benchmarks.bench_app", *(argv if argv is not None else sys.argv[1:])]),
          "python": sys.version.split()[0], "broker": broker.kind, "quick": quick,
          "postgres": pg.server_version if pg else f"skipped: {pg_note}",
          "cpus": os.cpu_count(), "loadavg_start": loadavg()})
    base_url = broker.url.rsplit("/", 1)[0]
    pg_worker = None
    try:
        if only & {"query", "reads", "writes"}:
            # One master, fsync=always, no beat (nothing else to sync with); its own database.
            cluster = LocalCluster(root / "app", Broker(f"{base_url}/2", broker.kind),
                                   masters=("alpha",), loglevel="warning", sync_interval="1h",
                                   snapshot_interval="7d", env={"PREVALENCE_FSYNC": "always"})
            try:
                cluster.start_masters()
                app = make_app(cluster)
                last = open_accounts(app)
                if pg is not None and only & {"reads", "writes"}:
                    pg_worker = PgWorker(root, f"{base_url}/3", pg)
                pg_app = pg_worker.app if pg_worker else None
                if "query" in only:
                    log("query task vs no-op task through Celery ...")
                    bench_query_vs_noop(app, rounds=query_rounds, turns=query_turns,
                                        broker_kind=broker.kind)
                if "reads" in only:
                    from workers.client import Client
                    from workers.models.ledger import model
                    from workers.prevalence import Follower

                    # Publish a frontier past the accounts (no beat here), so the committed
                    # view shows them.
                    Client(app, timeout_s=60).sync("alpha")
                    log("reads: follower vs PostgreSQL vs Celery tasks ...")
                    with Follower.open(model, str(cluster.shared_dir), follow_interval_s=0.1) as follower:
                        if not follower.wait_for(last, timeout_s=30):
                            raise RuntimeError(f"the follower did not reach {last}: {follower.status()}")
                        bench_reads(follower, app, pg, pg_app, rounds=read_rounds,
                                    round_s=read_round_s, broker_kind=broker.kind)
                if "writes" in only:
                    log(f"writes: {CALLERS} callers, coalescing client vs PostgreSQL task ...")
                    bench_writes(app, pg, pg_app, rounds=write_rounds, phase_s=write_phase_s,
                                 broker_kind=broker.kind)
                    check_totals(app, pg)
            finally:
                if pg_worker is not None:
                    pg_worker.stop()
                cluster.stop(stop_broker=False)
        if "lag" in only:
            log("follower lag behind the writer, beat syncing every 1 s ...")
            lag_cluster = LocalCluster(root / "lag", Broker(f"{base_url}/4", broker.kind),
                                       masters=("alpha",), loglevel="warning", sync_interval="1s",
                                       snapshot_interval="7d")
            try:
                lag_cluster.start_masters()
                lag_cluster.start_beat(loglevel="warning")
                bench_lag(lag_cluster, make_app(lag_cluster), samples=lag_samples,
                          broker_kind=broker.kind)
            finally:
                lag_cluster.stop(stop_broker=False)
    finally:
        broker.stop()
        if pg is not None:
            pg.drop()
    emit({"bench": "_meta_end", "loadavg_end": loadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
