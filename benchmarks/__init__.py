"""Benchmarks: the prevalence engine measured side by side with the store a user would
pick instead (SQLite in WAL mode) and with other Python prevalence/object stores.

Run everything with ``python -m benchmarks`` (``--quick`` for a smoke run, ``--markdown``
for the README table). Each benchmark prints one JSON line with our figure, the peer's
figure and their ratio; see ``benchmarks/README.md`` for what each line measures.

Modules:
    workload  the seeded ledger workload shared by every contender
    harness   timing, interleaved rounds, result lines, the markdown table
    peers     SQLite, coopy and ZODB contenders
    ours      adapters from the engine's public API to the harness
    engine    issue 2's benchmarks: commits, batches, replay, recovery, point queries
    sync      issue 3's benchmarks: sync apply rate, rebase cost, replication lag
    child     subprocess entry points (build a journal, time a recovery)
"""
