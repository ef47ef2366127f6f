"""Micro-benchmark of the change-tracked containers, side by side in one run: a plain
dict/list (no tracking), the pure-Python implementation (`_tracked_py`) and the C one
(`_tracked_c`, skipped with a note when the extension is not built).

    python -m benchmarks.bench_tracked                  # the load figures with 1,000,000 users
    python -m benchmarks.bench_tracked --users 100000   # quicker

Per operation (ns, best of --repeat runs of --ops operations, the Python loop included;
the tracked columns apply records of 100 operations, each committed as a sole master does,
see `_micro`; the cyclic GC on, as when applying records): dict set of an existing key,
dict set of a new key and its pop (the pair), list append, list item set, Struct attribute
set, the record bracket alone (begin_record + finish_record + end_record, the cost every
transaction pays), and undo_to per entry.

Loading: a nested state of --users users, each ``{"name", "email", "balance", "tags":
[str, str], "orders": [{"sku", "qty"}]}``, encoded with msgspec MessagePack; then
decoded and converted, each with the GC paused as recovery does (`codec.gc_paused`).
Each conversion gets its own freshly decoded copy, converted as `convert(s)` (the argument
left as it was: a copy) and as `convert(s, adopt=True)` (handed over, as recovery does with
a decoded snapshot: the C implementation retypes it in place, the Python one copies
anyway). "load" = decode + convert.

Opening a master: the same state in a snapshot file's bytes, through the steps recovery
takes (`workers.prevalence.cluster.recovery`), each timed.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

import msgspec

from workers.prevalence import _tracked_py

try:
    from workers.prevalence import _tracked_c
except ImportError as exc:  # pragma: no cover - a machine without a compiler
    _tracked_c = None
    print(f"note: the C implementation is not built ({exc}); only Python is measured", file=sys.stderr)


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        best = min(best, fn())
    return best


class _Plain:
    """The untracked baseline: a plain dict/list, no record."""

    name = "plain"

    @staticmethod
    def begin_record(log):
        pass

    @staticmethod
    def finish_record():
        pass

    @staticmethod
    def end_record():
        pass

    @staticmethod
    def convert(value):
        return value


def _impls():
    out = [("plain", None), ("python", _tracked_py)]
    if _tracked_c is not None:
        out.append(("c", _tracked_c))
    return out


PER_RECORD = 100  # operations per record in the micro runs


def _micro(impl, ops: int, repeat: int) -> dict[str, float]:
    """ns per operation for each measured operation.

    Each run applies records of `PER_RECORD` operations, each bracketed like
    `Model.apply` (begin_record, the operations, finish_record, end_record) and then
    committed (``log.forget_before(log.mark())``, as a sole master does), so the figures
    include making and freeing the undo entries; the plain column runs the bare loop.
    """
    t = impl or _Plain
    keys = [f"key-{i}" for i in range(PER_RECORD)]
    records = max(1, ops // PER_RECORD)
    n = records * PER_RECORD
    log = impl.UndoLog() if impl else None
    new_dict = (lambda: impl.convert({})) if impl else dict
    new_list = (lambda: impl.convert([])) if impl else list
    begin, finish, end = t.begin_record, t.finish_record, t.end_record

    def timed(body, setup=None):
        """ns per operation of `records` records, each `body()` (PER_RECORD operations)."""
        def run():
            if setup is not None:
                setup()
            start = time.perf_counter()
            if log is None:
                for _ in range(records):
                    body()
            else:
                forget, mark = log.forget_before, log.mark
                for _ in range(records):
                    begin(log)
                    body()
                    finish()
                    end()
                    forget(mark())
            return (time.perf_counter() - start) * 1e9 / n
        return _best(run, repeat)

    out = {}
    d = new_dict()
    begin(log)
    for k in keys:
        d[k] = 0
    end()

    def set_existing():
        for k in keys:
            d[k] = 1
    out["dict d[k] = v (existing key)"] = timed(set_existing)

    def set_then_pop():
        e = new_dict()
        for k in keys:
            e[k] = 1
        pop = e.pop
        for k in reversed(keys):
            pop(k)
    out["dict d[k] = v new key, then pop it (pair)"] = timed(set_then_pop) * 2

    def append():
        ap = new_list().append
        for k in keys:
            ap(k)
    out["list append"] = timed(append)

    lst = new_list()
    begin(log)
    lst.extend(range(PER_RECORD))
    end()
    idx = list(range(PER_RECORD))

    def list_set():
        for i in idx:
            lst[i] = i
    out["list lst[i] = v"] = timed(list_set)

    if impl is not None:
        class Account(impl.Struct):
            name: str
            qty: int = 0
    else:
        class Account(msgspec.Struct):
            name: str
            qty: int = 0
    acc = Account("a")

    def struct_set():
        for i in idx:
            acc.qty = i
    out["Struct s.attr = v"] = timed(struct_set)

    def bracket():
        start = time.perf_counter()
        for _ in range(n):
            begin(log)
            finish()
            end()
        return (time.perf_counter() - start) * 1e9 / n
    out["record bracket (begin+finish+end)"] = _best(bracket, repeat)

    if impl is not None:
        big = [f"big-{i}" for i in range(n)]

        def undo():
            target = new_dict()
            begin(log)
            mark = log.mark()
            for k in big:
                target[k] = 1
            end()
            start = time.perf_counter()
            log.undo_to(mark)
            return (time.perf_counter() - start) * 1e9 / n
        out["undo_to, per entry (dict sets)"] = _best(undo, repeat)
    return out


def _state(users: int) -> dict:
    return {"users": {f"u{i}": {"name": f"user {i}", "email": f"user{i}@example.com",
                                "balance": (i * 7919) % 100_000, "tags": [f"t{i % 10}", "vip"],
                                "orders": [{"sku": f"sku-{i % 200:03d}", "qty": 1 + i % 5}]}
                      for i in range(users)}}


def _load(impl, data: bytes, adopt: bool) -> tuple[float, float]:
    """(decode s, convert s) of one fresh copy, the GC paused as recovery does."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        plain = msgspec.msgpack.decode(data)
        decoded = time.perf_counter()
        state = impl.convert(plain, adopt=adopt)
        converted = time.perf_counter()
    finally:
        gc.enable()
    del plain, state
    gc.collect()
    return decoded - start, converted - decoded


def _recovery_bytes(state: dict) -> bytes:
    """A snapshot file's bytes holding `state`, as a master writes it."""
    from workers.prevalence import codec, snapshot
    body = snapshot.SnapshotBody(master="alpha", model="bench", frontier=1, cursors={"alpha": 1}, clock=1,
                                 members=["alpha"], digest=codec.digest_of(state, {}),
                                 root=msgspec.Raw(msgspec.msgpack.encode(state)), dedup={})
    return snapshot.encode_snapshot(body, None)


def _recovery(impl, data: bytes) -> dict[str, float]:
    """Seconds of each step recovery takes to open a master from a snapshot's bytes
    (`Recovery._load_base`): check and decode the file, decode the root and make it
    tracked (handed over, `convert(adopt=True)`) with the GC paused, then frozen,
    recompute the digest, and what `Replica.reset` then does."""
    from workers.prevalence import codec, snapshot
    gc.collect()
    out = {}
    start = time.perf_counter()
    body = snapshot.decode_snapshot(data, "<bench>", None)
    out["check + decode the file"] = time.perf_counter() - start
    start = time.perf_counter()
    with codec.gc_paused():
        root = snapshot.decode_root(body, Any)
        out["decode the root"] = time.perf_counter() - start
        start = time.perf_counter()
        root = impl.convert(root, adopt=True)
        gc.freeze()
    out["convert (adopt), freeze"] = time.perf_counter() - start
    start = time.perf_counter()
    assert codec.digest_of(root, body.dedup) == body.digest
    out["recompute the digest"] = time.perf_counter() - start
    start = time.perf_counter()
    with codec.gc_paused():
        state = impl.convert(root)
    out["Replica.reset (keeps the root)"] = time.perf_counter() - start
    assert state is root
    gc.unfreeze()
    del root, state, body
    gc.collect()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000, help="users in the loaded state")
    parser.add_argument("--ops", type=int, default=200_000, help="operations per micro run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per micro figure (best kept)")
    args = parser.parse_args(argv)

    impls = _impls()
    print(f"Python {sys.version.split()[0]}; C implementation: {'built' if _tracked_c else 'NOT built'}")
    print(f"\nper operation, ns (best of {args.repeat} x {args.ops} ops, loop included)")
    results = {name: _micro(impl, args.ops, args.repeat) for name, impl in impls}
    names = [name for name, _ in impls]
    print(f"  {'operation':38}" + "".join(f"{n:>10}" for n in names))
    for op in results["python"]:
        row = "".join(f"{results[n][op]:10.0f}" if op in results[n] else f"{'-':>10}" for n in names)
        print(f"  {op:38}{row}")

    print(f"\nloading {args.users:,} users (GC paused), seconds")
    data = msgspec.msgpack.encode(_state(args.users))
    print(f"  snapshot of the state: {len(data) / 1e6:.0f} MB of MessagePack")
    print(f"  {'implementation':28}{'decode':>10}{'convert':>10}{'load':>10}")
    for name, impl in impls:
        if impl is None:
            continue
        for adopt in (False, True):
            dec, conv = _load(impl, data, adopt)
            label = f"{name}, convert(s{', adopt=True' if adopt else ''})"
            print(f"  {label:28}{dec:10.2f}{conv:10.2f}{dec + conv:10.2f}")

    print(f"\nopening a master from a snapshot of {args.users:,} users (the recovery path), seconds")
    data = _recovery_bytes(msgspec.msgpack.decode(data))
    steps = {name: _recovery(impl, data) for name, impl in impls if impl is not None}
    names = list(steps)
    print(f"  {'step':32}" + "".join(f"{n:>10}" for n in names))
    for step in steps[names[0]]:
        print(f"  {step:32}" + "".join(f"{steps[n][step]:10.2f}" for n in names))
    print(f"  {'total':32}" + "".join(f"{sum(steps[n].values()):10.2f}" for n in names))


if __name__ == "__main__":
    main()
