"""The driver that runs inside a UML guest of the NFS tier: masters on the guest's NFS mounts,
driven by the test process over one TCP connection inside the lab's namespace.

    python -B -m tests.nfs.guest_driver SERVER PORT GUEST INCARNATION

Protocol: JSON lines. The driver connects (retrying for `CONNECT_S_MAX`), says hello
``{"hello": GUEST, "incarnation": N, "pid": PID}``, then answers requests
``{"id": K, "op": OP, "args": {...}}`` one at a time, in order: zero or more
``{"id": K, "event": {...}}`` lines (a workload streams each acknowledged transaction as
it happens), then ``{"id": K, "done": true, "result": ...}`` or
``{"id": K, "done": true, "error": {"type": ..., "message": ...}}``.

Exit status (the guest's init loop reads it): 0 the host said ``quit``; 1 ``reset`` (start a
fresh driver); 3 the host is gone (connection refused for `CONNECT_S_MAX`, or closed):
the guest powers off. A driver killed with SIGKILL (``kill`` op, or an armed fault point)
is started again by the init loop: that is a master killed -9 and restarted on its host.

Everything is bounded: a workload runs at most `ops` transactions and `duration_s_max`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import traceback

from workers.models.ledger import model
from workers.prevalence import Master, Rejected, retire, verify
from workers.prevalence.errors import PrevalenceError

CONNECT_S_MAX = 30.0
#: Where each NFS version is mounted in the guest (tests/nfs/guest_init.sh, lab.MOUNTS).
MOUNT_ROOT = "/run/nfs"

log = logging.getLogger("nfs-driver")


#: Mount name "local": a folder on the guest's local ext4 disk when the lab gave it one
#: (`NfsLab(local_disk_mb=...)`), else on its tmpfs: the benchmarks' local-folder baseline;
#: only masters of this one guest can share it.
LOCAL_ROOT = "/run/local"


def shared_path(mount: str, cluster: str) -> str:
    """The shared folder of test cluster `cluster` on the mount of version `mount`."""
    if "/" in cluster or cluster.startswith(".") or "/" in mount:
        raise ValueError(f"bad mount/cluster {mount!r}/{cluster!r}")
    if mount == "local":
        return os.path.join(LOCAL_ROOT, cluster)
    return os.path.join(MOUNT_ROOT, mount, cluster)


class Driver:
    def __init__(self, conn: socket.socket, guest: str, incarnation: int):
        self.conn = conn
        self.rfile = conn.makefile("rb")
        self.guest = guest
        self.incarnation = incarnation
        self.masters: dict[str, Master] = {}
        self.armed: dict[str, tuple[str, int]] = {}  # master -> (fault point, hits left)
        self.workers: dict[str, subprocess.Popen] = {}  # Celery workers started here, by master

    # -- channel ---------------------------------------------------------------------

    def send(self, obj: dict) -> None:
        self.conn.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    def serve(self) -> int:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        self.send({"hello": self.guest, "incarnation": self.incarnation, "pid": os.getpid(), "boot_id": boot_id})
        while True:
            line = self.rfile.readline()
            if not line:
                return 3
            req = json.loads(line)
            rid, op, args = req["id"], req["op"], req.get("args", {})
            if op == "quit":
                self._close_all()
                self.send({"id": rid, "done": True, "result": None})
                return 0
            if op == "reset":
                self._close_all()
                self.send({"id": rid, "done": True, "result": None})
                return 1
            try:
                result = getattr(self, f"op_{op}")(lambda ev: self.send({"id": rid, "event": ev}), **args)
                self.send({"id": rid, "done": True, "result": result})
            except (PrevalenceError, OSError, ValueError, KeyError, TypeError) as exc:
                # Reported to the test, which decides; the driver goes on.
                self.send({"id": rid, "done": True, "error": {
                    "type": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc(limit=8)}})

    def _close_all(self) -> None:
        for name in list(self.workers):
            self.op_stop_worker(None, name, signal_name="SIGKILL", deadline_s=10.0)
        for m in self.masters.values():
            try:
                m.close()
            except (PrevalenceError, OSError) as exc:
                log.error("closing %s: %s", m.name, exc)
        self.masters.clear()

    # -- faults ----------------------------------------------------------------------

    def _fault(self, name: str):
        def fault(point: str) -> None:
            armed = self.armed.get(name)
            if armed is not None and armed[0] == point:
                left = armed[1] - 1
                if left <= 0:
                    os.kill(os.getpid(), signal.SIGKILL)
                self.armed[name] = (point, left)
        return fault

    def op_arm(self, emit, master: str, point: str, hits: int = 1):
        """SIGKILL this driver at the `hits`-th time `master` reaches fault `point`."""
        self.armed[master] = (point, hits)

    def op_kill(self, emit):
        """kill -9 of this driver (its masters die as they are: nothing flushed, leases left)."""
        os.kill(os.getpid(), signal.SIGKILL)

    # -- masters ---------------------------------------------------------------------

    def op_open(self, emit, mount: str, cluster: str, master: str, **options):
        m = Master.open(model, shared_path(mount, cluster), master, fault=self._fault(master), **options)
        self.masters[master] = m
        return _status(m)

    def op_close(self, emit, master: str):
        self.masters.pop(master).close()

    def op_execute(self, emit, master: str, tx: str, args: list, rid: str | None = None):
        m = self.masters[master]
        try:
            value = m.execute(tx, *args, rid=rid)
            return {"status": "ok", "value": value}
        except Rejected as exc:
            return {"status": "rejected", "error": str(exc)}

    def op_sync(self, emit, master: str):
        return self.masters[master].sync()

    def op_snapshot(self, emit, master: str):
        return self.masters[master].snapshot()

    def op_status(self, emit, master: str):
        return _status(self.masters[master])

    def op_query(self, emit, master: str, q: str, args: list = ()):
        return self.masters[master].query(q, *args)

    def op_outcomes(self, emit, master: str, rids: list):
        m = self.masters[master]
        return {rid: m.outcome(rid) for rid in rids}

    def op_verify(self, emit, mount: str, cluster: str):
        return verify(shared_path(mount, cluster), model)

    def op_retire(self, emit, mount: str, cluster: str, name: str):
        return retire(shared_path(mount, cluster), name)

    def op_rmdir(self, emit, mount: str, cluster: str, sub: str):
        """Remove an empty folder of the cluster (to make the layout of an older release)."""
        if sub.startswith("/") or ".." in sub.split("/"):
            raise ValueError(f"bad folder {sub!r}")
        os.rmdir(os.path.join(shared_path(mount, cluster), sub))

    # -- Celery workers (the Celery variant: one master worker per guest) -------------

    def op_mkdir(self, emit, mount: str, cluster: str):
        """Create the shared folder (a worker refuses to start without it)."""
        os.makedirs(shared_path(mount, cluster), exist_ok=True)

    def op_spawn_worker(self, emit, master: str, env: dict, log_path: str):
        """Start ``celery -A workers worker -P solo`` for `master` (the deployment's command
        line) with `env` added; its output goes to `log_path` (on the host, via hostfs)."""
        if master in self.workers and self.workers[master].poll() is None:
            raise ValueError(f"worker {master} already runs here (pid {self.workers[master].pid})")
        full = dict(os.environ, **env, PREVALENCE_MASTER=master, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-P", "solo", "-n", f"{master}@%h",
               "-l", "info", "--without-mingle", "--without-gossip"]
        with open(log_path, "ab") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=full)
        self.workers[master] = p
        return p.pid

    def op_stop_worker(self, emit, master: str, signal_name: str = "SIGTERM", deadline_s: float = 60.0):
        """Signal the worker and wait for it to exit (SIGKILL after `deadline_s`); its exit status."""
        p = self.workers.pop(master)
        if p.poll() is None:
            p.send_signal(getattr(signal, signal_name))
            try:
                p.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        return p.returncode

    # -- measurements (benchmarks/bench_nfs.py; never asserted on by tests) ----------

    def op_bench_write(self, emit, master: str, n: int, batch: int = 1, account: str = "bench"):
        """`n` deposits, one `execute` each (batch 1) or `execute_many` of `batch`; seconds."""
        m = self.masters[master]
        t = time.perf_counter()
        if batch <= 1:
            for _ in range(n):
                m.execute("deposit", account, 1)
        else:
            for start in range(0, n, batch):
                m.execute_many([("deposit", (account, 1), None)] * min(batch, n - start))
        return time.perf_counter() - t

    def op_bench_idle_syncs(self, emit, master: str, rounds: int):
        """Durations (s) of `rounds` syncs with nothing new to read."""
        m = self.masters[master]
        out = []
        for _ in range(rounds):
            t = time.perf_counter()
            m.sync()
            out.append(time.perf_counter() - t)
        return out

    def op_bench_catch_up(self, emit, master: str, peer: str, seq: int, deadline_s: float = 120.0):
        """Sync until `peer`'s records up to `seq` are read: seconds, syncs, records applied."""
        m = self.masters[master]
        t = time.perf_counter()
        applied = syncs = 0
        while m.status(digest=False)["cursors"].get(peer, 0) < seq:
            if time.perf_counter() - t > deadline_s:
                break
            applied += sum(m.sync()["applied"].values())
            syncs += 1
        return {"seconds": time.perf_counter() - t, "syncs": syncs, "applied": applied}

    def op_lag_write(self, emit, master: str, n: int, spacing_s: float, start_at: float):
        """From wall time `start_at`, one deposit every `spacing_s`; [seq, wall time of the
        answer] for each (guest clocks are the host's: UML reads the host's clock)."""
        m = self.masters[master]
        out = []
        for i in range(n):
            delay = start_at + i * spacing_s - time.time()
            if delay > 0:
                time.sleep(delay)
            m.execute("deposit", "bench", 1)
            out.append([m.seq, time.time()])
        return out

    def op_lag_read(self, emit, master: str, peer: str, interval_s: float, until_seq: int,
                    deadline_s: float = 120.0):
        """Sync every `interval_s` until `peer`'s seq `until_seq` is read; [seq, wall time
        first seen] for each record of `peer` (a record seen in one sync is stamped with the
        end of that sync)."""
        m = self.masters[master]
        seen = []
        last = m.status(digest=False)["cursors"].get(peer, 0)
        end = time.monotonic() + deadline_s
        next_sync = time.monotonic()
        while last < until_seq and time.monotonic() < end:
            delay = next_sync - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_sync += interval_s
            m.sync()
            now = time.time()
            cur = m.peers[peer].applied_seq if peer in m.peers else 0
            seen += [[s, now] for s in range(last + 1, cur + 1)]
            last = max(last, cur)
        return seen

    def op_lag_local(self, emit, writer: str, reader: str, n: int, spacing_s: float, interval_s: float):
        """`op_lag_write` and `op_lag_read` at once on two masters of this driver (the local
        folder baseline: both on one guest), the reader in a thread."""
        import threading
        box = {}
        start_at = time.time() + 0.5
        seq0 = self.masters[writer].seq
        t = threading.Thread(target=lambda: box.update(seen=self.op_lag_read(
            emit, reader, writer, interval_s, seq0 + n, deadline_s=n * spacing_s + 30)))
        t.start()
        written = self.op_lag_write(emit, writer, n, spacing_s, start_at)
        t.join(n * spacing_s + 60)
        return {"written": written, "seen": box.get("seen", [])}

    def op_status_loop(self, emit, master: str, duration_s: float):
        """Call `status()` (which reads every peer's progress) for `duration_s`; count the
        errors by errno (or error type) instead of stopping at the first: the engine's own view."""
        m = self.masters[master]
        end = time.monotonic() + min(duration_s, 60.0)
        calls, errors, first = 0, {}, None
        while time.monotonic() < end:
            calls += 1
            try:
                m.status(digest=False)
            except (OSError, PrevalenceError) as exc:
                kind = str(exc.errno) if isinstance(exc, OSError) else type(exc).__name__
                errors[kind] = errors.get(kind, 0) + 1
                first = first or traceback.format_exc(limit=6)
        return {"calls": calls, "errors": errors, "first_error": first}

    def op_publish_loop(self, emit, master: str, account: str, duration_s: float):
        """Deposit and sync in a loop for `duration_s`: every sync republishes the progress
        file (temp + rename over the old one)."""
        m = self.masters[master]
        end = time.monotonic() + min(duration_s, 60.0)
        n = 0
        while time.monotonic() < end:
            m.execute("deposit", account, 1)
            m.sync()
            n += 1
        return n

    def op_workload(self, emit, master: str, seed: int, ops: int, accounts: list, amount_max: int = 40,
                    sync_interval_s: float = 0.1, snapshot_interval_s: float | None = None,
                    pause_s: float = 0.0, duration_s_max: float = 60.0, kill_after_ops: int | None = None,
                    kill_point: str | None = None, deposit_share: float = 0.1):
        """Run `ops` transactions of the ledger (withdraw and transfer, which do not commute,
        and a few deposits) with a sync every `sync_interval_s` and, if asked, a snapshot
        every `snapshot_interval_s`. Streams ``{"ack": rid, "status": ...}`` for each
        transaction as soon as `execute` has returned (durable: fsync=always).

        `kill_after_ops`: after that many transactions, SIGKILL this driver -- at once
        (`kill_point` None) or at the next time the master reaches fault `kill_point`.
        """
        m = self.masters[master]
        rng = random.Random(seed)
        started = time.monotonic()
        next_sync = started + sync_interval_s
        next_snap = started + snapshot_interval_s if snapshot_interval_s else None
        counts = {"ok": 0, "rejected": 0, "syncs": 0, "rebases": 0, "snapshots": 0}
        for i in range(ops):
            if time.monotonic() - started > duration_s_max:
                break
            if kill_after_ops is not None and i == kill_after_ops:
                if kill_point is None:
                    os.kill(os.getpid(), signal.SIGKILL)
                self.armed[master] = (kill_point, 1)
            rid = f"{master}.{self.incarnation}.{seed}.{i}"
            r = rng.random()
            a = rng.choice(accounts)
            amount = rng.randint(1, amount_max)
            if r < deposit_share:
                tx, args = "deposit", (a, amount)
            elif r < (1 + deposit_share) / 2:
                tx, args = "withdraw", (a, amount)
            else:
                b = rng.choice([x for x in accounts if x != a])
                tx, args = "transfer", (a, b, amount)
            try:
                m.execute(tx, *args, rid=rid)
                status = "ok"
            except Rejected:
                status = "rejected"
            counts[status] += 1
            emit({"ack": rid, "status": status})
            now = time.monotonic()
            if now >= next_sync:
                report = m.sync()
                counts["syncs"] += 1
                counts["rebases"] += bool(report and report["rebased"])
                next_sync = now + sync_interval_s
            if next_snap is not None and now >= next_snap:
                m.snapshot()
                counts["snapshots"] += 1
                next_snap = now + snapshot_interval_s
            if pause_s:
                time.sleep(pause_s)
        counts["elapsed_s"] = round(time.monotonic() - started, 3)
        return counts


def _status(m: Master) -> dict:
    s = m.status()
    s["segments"] = sorted(n for n in os.listdir(os.path.join(m.shared, "masters", m.name, "journal"))
                           if n.endswith(".log")) if os.path.isdir(os.path.join(m.shared, "masters", m.name,
                                                                                  "journal")) else []
    return s


def connect(host: str, port: int) -> socket.socket | None:
    end = time.monotonic() + CONNECT_S_MAX
    while time.monotonic() < end:
        try:
            return socket.create_connection((host, port), timeout=5)
        except OSError:
            time.sleep(0.2)
    return None


def main(argv: list[str]) -> int:
    host, port, guest, incarnation = argv[0], int(argv[1]), argv[2], int(argv[3])
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {guest}.{incarnation} %(name)s %(message)s")
    conn = connect(host, port)
    if conn is None:
        log.error("no test process at %s:%d for %.0f s: powering off", host, port, CONNECT_S_MAX)
        return 3
    conn.settimeout(None)  # requests come when the test is ready; EOF means it is gone
    try:
        return Driver(conn, guest, incarnation).serve()
    except (ConnectionError, BrokenPipeError):
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
