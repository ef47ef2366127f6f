"""The peer of benchmarks/bench_app.py: what a Celery user would build instead, a Celery
task that reads or writes PostgreSQL.

    celery -A benchmarks.pg_worker worker -P solo -Q pg --without-mingle --without-gossip

Environment: ``CELERY_BROKER_URL`` (the benchmark's private Redis: broker and result
backend), ``BENCH_PG_DSN`` (libpq connection string) and ``BENCH_PG_TABLE`` (the table
bench_app created: ``id text primary key, balance bigint``).

Celery settings are the masters' where they matter to cost (`workers.celeryconfig`): JSON
only, acknowledge after the task ran, prefetch 1, task events on (sent and received). One
connection per worker process, opened at the first task; statements are prepared
(psycopg's ``prepare=True``). A transfer is one transaction at ``synchronous_commit=on``:
a guarded debit (``UPDATE ... WHERE id = %s AND balance >= %s``; no row means refused,
rolled back) and a credit, then COMMIT, which waits for the WAL flush.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

QUEUE = "pg"


def make_app(broker_url: str) -> Celery:
    """A Celery app for the PostgreSQL tasks on `broker_url` (the worker's, and the
    benchmark's own client app)."""
    app = Celery("pg-bench", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        result_backend=broker_url,
        result_expires=3600,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=QUEUE,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_transport_options={"visibility_timeout": 3600},
    )
    return app


app = make_app(os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))

_conn: Any = None


def _connection() -> Any:
    """This worker's connection (one per solo worker), with synchronous_commit on."""
    global _conn
    if _conn is None:
        import psycopg

        _conn = psycopg.connect(os.environ["BENCH_PG_DSN"], autocommit=True)
        _conn.execute("SET synchronous_commit = on")
    return _conn


def _table() -> str:
    name = os.environ["BENCH_PG_TABLE"]
    if not name.isidentifier():
        raise ValueError(f"BENCH_PG_TABLE must be a plain identifier, got {name!r}")
    return name


@app.task(name="pg.read_balance", acks_late=True)
def read_balance(account: str) -> dict:
    """``SELECT balance`` by primary key; an outcome like the masters' query answer."""
    row = _connection().execute(f"SELECT balance FROM {_table()} WHERE id = %s", (account,),
                                prepare=True).fetchone()
    return {"status": "ok", "value": row[0] if row else None}


@app.task(name="pg.transfer", acks_late=True)
def transfer(src: str, dst: str, amount: int) -> dict:
    """Move `amount` from `src` to `dst` in one durable transaction, refusing an overdraft
    (the ledger's transfer); returns the source's new balance or ``status: rejected``."""
    conn = _connection()
    table = _table()
    try:
        with conn.transaction():  # BEGIN ... COMMIT; rolled back by any exception
            row = conn.execute(f"UPDATE {table} SET balance = balance - %s WHERE id = %s AND "
                               "balance >= %s RETURNING balance", (amount, src, amount),
                               prepare=True).fetchone()
            if row is None:
                raise _Refused(f"insufficient funds in {src!r} (or no such account)")
            credited = conn.execute(f"UPDATE {table} SET balance = balance + %s WHERE id = %s",
                                    (amount, dst), prepare=True)
            if credited.rowcount != 1:
                raise _Refused(f"no account {dst!r}")
    except _Refused as exc:
        return {"status": "rejected", "value": None, "error": str(exc)}
    return {"status": "ok", "value": row[0]}


class _Refused(Exception):
    """Raised inside a transfer to roll it back (an overdraft, or no such account)."""
