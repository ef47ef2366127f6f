"""NFS figures: what real NFS clients cost the engine, against a local folder, in one run.

    python benchmarks/bench_nfs.py               # about 3 minutes on 2 cores (root)
    python benchmarks/bench_nfs.py --quick       # about 1.5 minutes
    python benchmarks/bench_nfs.py --markdown    # the README table instead of JSON lines
    python benchmarks/bench_nfs.py --mounts v4.1 --defaults-only   # a part of it
    python benchmarks/bench_nfs.py > run.jsonl && python benchmarks/bench_nfs.py --from run.jsonl

Runs on the NFS tier's lab (`tests/nfs/lab.py`: nfs-ganesha in a private network namespace,
User-Mode Linux guests as the NFS clients; needs root and `bin/install-test-packages nfs`). Every
figure is measured inside the guests, so the NFS ones and the local-folder baseline (the
same guest kernel, on a local ext4 disk whose image file sits on the same host disk as the
NFS export) pay the same virtualisation cost. These are figures of
this lab, not of a production network: the server is on the same machine (no network
latency to speak of) and backed by the same disk.

One JSON line per result on stdout (progress on stderr), ``mount`` in every line:
``local`` (ext4 on the guest's own disk), ``v4.1``, ``v3``; ``options`` for the mount-option variants.

- ``durable_execute``: deposits per second, one ``execute`` each, ``fsync=always``.
- ``idle_sync``: one ``sync()`` with nothing new (median, p90, ms): the price of each beat
  tick on an idle cluster (listing every journal, reopening, reading progress).
- ``sync_apply``: records per second one ``sync()`` applies from a peer's journal
  (`records` written by the peer with ``execute_many``, read by the other master's syncs).
- ``lag``: a commit on one master until another master, syncing every `interval`, has
  read it (p50, p99, ms).
- ``new_journal_folder``: how long a member needs to read a new member's first records,
  per option set (~30 s on NFSv4.1 with the default lookupcache before the engine
  discovered folders by listing their parent, issue 12; the next sync since).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.nfs.lab import LabUnavailable, NfsLab, remove_stale_labs, why_unavailable  # noqa: E402
from tests.nfs.remote import Hub, RemoteGuest, in_parallel  # noqa: E402

#: Option sets compared by `new_journal_folder` and `lag` (each boots the guests again).
OPTION_SETS = ["", "lookupcache=positive", "actimeo=1"]


def log(msg: str) -> None:
    print(f"[bench_nfs {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Bench:
    def __init__(self, guests: list[RemoteGuest], quick: bool, options: str):
        self.g = guests
        self.quick = quick
        self.options = options
        self.n = 0

    def cluster(self) -> str:
        self.n += 1
        return f"bench{os.getpid()}_{self.n}"

    def pair(self, mount: str):
        """Two masters, a (founder, account opened) and b (joined): on two guests for NFS,
        on one guest for the local folder."""
        c = self.cluster()
        ga, gb = (self.g[0], self.g[0]) if mount == "local" else (self.g[0], self.g[1])
        opts = {"fsync": "always", "gc_grace_s": 60.0}
        ga.request("open", mount=mount, cluster=c, master="a", **opts)
        ga.request("execute", master="a", tx="open_account", args=["bench", 0])
        gb.request("open", mount=mount, cluster=c, master="b", **opts)
        end = time.monotonic() + 120
        while True:
            ra = ga.request("sync", master="a")
            rb = gb.request("sync", master="b")
            if ra["joined"] and rb["joined"]:
                break
            if time.monotonic() > end:
                raise RuntimeError("b did not join")
        # The first records of b: make sure a reads them before timing anything.
        gb.request("execute", master="b", tx="deposit", args=["bench", 1])
        seq_b = gb.request("status", master="b")["seq"]
        ga.request("bench_catch_up", master="a", peer="b", seq=seq_b, deadline_s=90)
        return c, ga, gb

    def close(self, ga, gb) -> None:
        for g, m in ((ga, "a"), (gb, "b")):
            g.request("close", master=m)

    def durable_execute(self, mount: str) -> None:
        c, ga, gb = self.pair(mount)
        n = 300 if self.quick else 1000
        secs = ga.request("bench_write", master="a", n=n, deadline_s=300)
        emit({"bench": "durable_execute", "mount": mount, "options": self.options, "n": n,
              "tx_per_s": round(n / secs, 1)})
        # Idle syncs on b once it has read everything.
        seq = ga.request("status", master="a")["seq"]
        gb.request("bench_catch_up", master="b", peer="a", seq=seq)
        rounds = 50 if self.quick else 200
        d = gb.request("bench_idle_syncs", master="b", rounds=rounds, deadline_s=300)
        emit({"bench": "idle_sync", "mount": mount, "options": self.options, "rounds": rounds,
              "median_ms": round(statistics.median(d) * 1e3, 2), "p90_ms": round(pct(d, 0.9) * 1e3, 2)})
        # Apply rate: a writes a backlog in batches, b reads it with its syncs.
        records = 20_000 if self.quick else 100_000
        ga.request("bench_write", master="a", n=records, batch=1000, deadline_s=600)
        seq = ga.request("status", master="a")["seq"]
        r = gb.request("bench_catch_up", master="b", peer="a", seq=seq, deadline_s=600)
        emit({"bench": "sync_apply", "mount": mount, "options": self.options, "records": r["applied"],
              "syncs": r["syncs"], "records_per_s": round(r["applied"] / r["seconds"], 1)})
        self.close(ga, gb)

    def lag(self, mount: str, interval_s: float) -> None:
        c, ga, gb = self.pair(mount)
        n = 20 if self.quick else 50
        spacing = max(0.13, interval_s * 0.37)   # not a multiple of the interval: spread the phases
        if mount == "local":
            out = ga.request("lag_local", writer="a", reader="b", n=n, spacing_s=spacing, interval_s=interval_s,
                             deadline_s=n * spacing + 120)
            written, seen = out["written"], out["seen"]
        else:
            seq0 = ga.request("status", master="a")["seq"]
            start_at = time.time() + 1.0
            written, seen = in_parallel([
                lambda: ga.request("lag_write", master="a", n=n, spacing_s=spacing, start_at=start_at,
                                   deadline_s=n * spacing + 120),
                lambda: gb.request("lag_read", master="b", peer="a", interval_s=interval_s,
                                   until_seq=seq0 + n, deadline_s=n * spacing + 60),
            ], deadline_s=n * spacing + 180)
        seen_at = dict((s, t) for s, t in seen)
        lags = [seen_at[s] - t for s, t in written if s in seen_at]
        emit({"bench": "lag", "mount": mount, "options": self.options, "interval_ms": int(interval_s * 1000),
              "samples": len(lags), "p50_ms": round(pct(lags, 0.5) * 1e3, 1),
              "p99_ms": round(pct(lags, 0.99) * 1e3, 1), "missed": n - len(lags)})
        self.close(ga, gb)

    def new_journal_folder(self, mount: str, deadline_s: float = 70.0) -> None:
        """a founds; b announces (no journal yet) and a looks for b's journal; b joins and
        writes: how long until a reads b's first record."""
        c = self.cluster()
        ga, gb = self.g[0], self.g[1]
        ga.request("open", mount=mount, cluster=c, master="a", fsync="always")
        ga.request("execute", master="a", tx="open_account", args=["x", 1])
        gb.request("open", mount=mount, cluster=c, master="b", fsync="always")
        ga.request("sync", master="a")
        while not gb.request("sync", master="b")["joined"]:
            ga.request("sync", master="a")
        gb.request("execute", master="b", tx="deposit", args=["x", 1])
        seq = gb.request("status", master="b")["seq"]
        t = time.monotonic()
        r = ga.request("bench_catch_up", master="a", peer="b", seq=seq, deadline_s=deadline_s)
        took = time.monotonic() - t
        emit({"bench": "new_journal_folder", "mount": mount, "options": self.options,
              "seconds": round(took, 2), "syncs": r["syncs"], "gave_up": took >= deadline_s})
        self.close(ga, gb)


def run_lab(options: str, quick: bool, full: bool, only: list[str] | None = None) -> None:
    lab = NfsLab(guests=2, local_disk_mb=256 if full else 0)
    hub = None
    try:
        lab.start()
        hub = Hub(lab.listener)
        guests = [RemoteGuest(hub, g, log_tail=g.log_tail) for g in lab.boot_guests(extra_mount_opts=options)]
        in_parallel([lambda g=g: g.connection(deadline_s=90) for g in guests])
        b = Bench(guests, quick, options or "defaults")
        mounts = ["local", "v4.1", "v3"] if full else ["v4.1", "v3"]
        mounts = [m for m in mounts if only is None or m in only]
        for mount in mounts:
            if full:
                log(f"{options or 'defaults'}: writes, idle syncs, apply rate on {mount}")
                b.durable_execute(mount)
            for interval in ((0.1, 1.0) if full else (0.1,)):
                log(f"{options or 'defaults'}: lag at {interval} s syncs on {mount}")
                b.lag(mount, interval)
            if mount != "local":
                log(f"{options or 'defaults'}: new journal folder discovery on {mount}")
                b.new_journal_folder(mount)
        for g in guests:
            g.request("quit", deadline_s=10)
    finally:
        if hub is not None:
            hub.stop()
        lab.stop()


def markdown(lines: list[dict]) -> str:
    rows = ["| Figure | Mount | Options | Value |", "|---|---|---|---|"]
    for ln in lines:
        b = ln["bench"]
        if b == "durable_execute":
            v = f"{ln['tx_per_s']:,} tx/s"
        elif b == "idle_sync":
            v = f"median {ln['median_ms']} ms, p90 {ln['p90_ms']} ms"
        elif b == "sync_apply":
            v = f"{ln['records_per_s']:,.0f} records/s ({ln['records']:,} records, {ln['syncs']} syncs)"
        elif b == "lag":
            b = f"lag, sync every {ln['interval_ms']} ms"
            v = f"p50 {ln['p50_ms']} ms, p99 {ln['p99_ms']} ms ({ln['samples']} samples)"
        elif b == "new_journal_folder":
            v = f"{ln['seconds']} s{' (gave up)' if ln['gave_up'] else ''}"
        else:
            continue
        rows.append(f"| {b} | {ln['mount']} | {ln['options']} | {v} |")
    return "\n".join(rows)


def _heading(meta: dict) -> str:
    return (f"NFS figures, `python benchmarks/bench_nfs.py` on {meta['date']} (commit {meta['commit']}, "
            f"load average {meta['load_average']:.2f} at the start{', --quick' if meta.get('quick') else ''}):\n")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--from", dest="from_file", metavar="JSONL", help="render a saved run as the table")
    p.add_argument("--mounts", default=None, help="only these mounts, comma-separated (local, v4.1, v3)")
    p.add_argument("--defaults-only", action="store_true", help="skip the mount-option variants")
    a = p.parse_args(argv)
    only = a.mounts.split(",") if a.mounts else None
    if only and set(only) - {"local", "v4.1", "v3"}:
        p.error(f"--mounts: unknown mount(s) {sorted(set(only) - {'local', 'v4.1', 'v3'})}")
    if a.from_file:
        lines = [json.loads(x) for x in open(a.from_file) if x.strip()]
        print(_heading(lines[0]))
        print(markdown(lines[1:]))
        return 0
    reason = why_unavailable()
    if reason:
        print(f"bench_nfs: cannot run: {reason}", file=sys.stderr)
        return 2
    remove_stale_labs()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"bench": "_meta", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "load_average": os.getloadavg()[0], "quick": a.quick}
    lines: list[dict] = [meta]
    real_stdout = sys.stdout
    if a.markdown:
        class Collect:
            def write(self, s):
                for part in s.splitlines():
                    if part.strip():
                        lines.append(json.loads(part))
            def flush(self):
                pass
        sys.stdout = Collect()
    else:
        emit(meta)
    try:
        for i, options in enumerate(OPTION_SETS[:1] if a.defaults_only else OPTION_SETS):
            try:
                run_lab(options, a.quick, full=(i == 0), only=only)
            except LabUnavailable as exc:
                print(f"bench_nfs: lab failed ({options or 'defaults'}): {exc}", file=sys.stderr)
                return 2
    finally:
        sys.stdout = real_stdout
    if a.markdown:
        print(_heading(meta))
        print(markdown(lines[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
