"""``python -m benchmarks``: run the benchmarks, print one JSON line per result.

    python -m benchmarks                 # full run (~5 min), JSON lines on stdout
    python -m benchmarks --quick         # smoke run (well under a minute)
    python -m benchmarks --markdown      # run, then print the README table instead
    python -m benchmarks --from R.jsonl --markdown   # table from a saved run
    python -m benchmarks --only commit,query --out R.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks import engine, nested, sync
from benchmarks.harness import Reporter, end_line, markdown_table, meta_line, perf_counter
from benchmarks.workload import make_workload

GROUPS = {**engine.BENCHES, **sync.BENCHES, **nested.BENCHES}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run (small sizes, 2 rounds)")
    p.add_argument("--markdown", action="store_true",
                   help="print the README markdown table instead of JSON lines")
    p.add_argument("--only", default="", help="comma-separated groups: " + ",".join(GROUPS))
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    p.add_argument("--from", dest="from_file", default=None,
                   help="read JSON lines from this file instead of running (with --markdown)")
    p.add_argument("--dir", default=None,
                   help="where temp dirs go (default: the system temp dir); both sides use it")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per comparison")
    p.add_argument("--round-s", type=float, default=None, help="seconds per contender per round")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv
    if args.from_file:
        with open(args.from_file, encoding="utf-8") as f:
            lines = [json.loads(l) for l in f if l.strip()]
        print(markdown_table(lines))
        return 0
    groups = [g for g in args.only.split(",") if g] or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        print(f"unknown group(s) {unknown}; known: {list(GROUPS)}", file=sys.stderr)
        return 2
    settings = engine.Settings.make(args.quick, args.dir, args.rounds, args.round_s)
    workload = make_workload()
    rep = Reporter(print_json=not args.markdown, out_path=args.out)
    started_s = perf_counter()
    rep.emit(meta_line(args))
    try:
        for g in groups:
            rep.note(f"running {g}")
            GROUPS[g](settings, workload, rep)
        rep.emit(end_line(started_s))
    finally:
        rep.close()
    if args.markdown:
        print(markdown_table(rep.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
