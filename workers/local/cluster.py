"""A local cluster on one machine: broker, masters, beat and Flower as subprocesses.

Used by `prevalence demo`, the Celery-tier tests and the benchmarks. Every process runs
with its own log file under ``<root>/log`` and in its own session, so that Ctrl-C in the
terminal reaches only the supervisor, which then stops the others in order: masters with
SIGTERM (warm shutdown: finish the task in hand, sync, snapshot, release the lease), then
beat and Flower, then the broker it started.

Like systemd's ``Restart=on-failure`` in a deployment, a supervisor thread restarts any
process that exits on its own (a worker whose journal sync failed exits on purpose, and
so may one that hits a bug), except after a configuration refusal.

The broker comes from `workers.local.broker.start_broker` (re-exported here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from workers.local.broker import Broker, start_broker
# A master's refusal to start for bad configuration: the supervisor never restarts it.
from workers.master.lifecycle import EXIT_CONFIG
from workers.local.processes import (POLL_S, ClusterError, free_port, pythonpath, spawn, tail,
                               wait_until)

__all__ = ["LocalCluster", "Broker", "start_broker", "ClusterError", "wait_until", "tail",
           "free_port"]

#: Deadlines (seconds) for the supervisor's waits; every wait polls, none sleeps blindly.
MASTER_START_S = 60.0
STOP_S = 60.0
#: The supervisor restarts a process that exited on its own after this long (seconds).
RESTART_DELAY_S = 1.0


class LocalCluster:
    """Masters, beat and Flower of one local cluster (see module doc).

    Args:
        root: working folder; holds ``shared/`` (unless `shared_dir`), ``log/``, ``run/``.
        broker: the `Broker` to use.
        masters: master names.
        sync_interval / snapshot_interval: PREVALENCE_* values for every process.
        env: extra environment for every process.
    """

    def __init__(self, root: Path, broker: Broker, *, masters: tuple[str, ...] = ("alpha", "beta", "gamma"),
                 shared_dir: Path | None = None, sync_interval: str = "1s",
                 snapshot_interval: str = "1m", env: dict[str, str] | None = None,
                 loglevel: str = "info") -> None:
        self.root = Path(root).resolve()
        self.broker = broker
        self.masters = tuple(masters)
        self.shared_dir = Path(shared_dir).resolve() if shared_dir else self.root / "shared"
        self.log_dir = self.root / "log"
        self.run_dir = self.root / "run"
        self.sync_interval = sync_interval
        self.snapshot_interval = snapshot_interval
        self.extra_env = dict(env or {})
        self.loglevel = loglevel
        self.processes: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, tuple[list[str], str | None]] = {}
        self.flower_url: str | None = None
        # Supervision, as systemd's Restart=on-failure does in a deployment: a process
        # that exits on its own (not stopped or killed through this object) is started
        # again after RESTART_DELAY_S, except on exit status 78 (bad configuration).
        self.restarts: dict[str, int] = {}
        self._intended_stop: set[str] = set()
        self._supervising = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lock = threading.RLock()
        for folder in (self.shared_dir, self.log_dir, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # -- environment -----------------------------------------------------------------

    def env(self, master: str | None = None) -> dict[str, str]:
        """The environment of a cluster process (and of a CLI aimed at this cluster)."""
        env = os.environ.copy()
        env.update({
            "CELERY_BROKER_URL": self.broker.url,
            "PREVALENCE_SHARED_DIR": str(self.shared_dir),
            "PREVALENCE_SYNC_INTERVAL": self.sync_interval,
            "PREVALENCE_SNAPSHOT_INTERVAL": self.snapshot_interval,
            "PYTHONPATH": pythonpath(env),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        env.pop("PREVALENCE_MASTER", None)
        if master:
            env["PREVALENCE_MASTER"] = master
        return env

    def _start(self, label: str, command: list[str], master: str | None = None) -> subprocess.Popen:
        with self._lock:
            old = self.processes.get(label)
            if old is not None and old.poll() is None:
                raise ClusterError(f"{label} is already running (pid {old.pid})")
            process = spawn(command, self.log_dir / f"{label}.log", env=self.env(master),
                             cwd=self.run_dir)
            self.processes[label] = process
            self.commands[label] = (command, master)
            self._intended_stop.discard(label)
        self._ensure_supervisor()
        return process

    def _ensure_supervisor(self) -> None:
        if self._supervisor is None:
            self._supervising.set()
            self._supervisor = threading.Thread(target=self._supervise, name="supervisor",
                                                daemon=True)
            self._supervisor.start()

    def _supervise(self) -> None:
        exited_at: dict[str, float] = {}
        while self._supervising.is_set():
            with self._lock:
                for label, process in list(self.processes.items()):
                    code = process.poll()
                    if code is None or label in self._intended_stop or code == EXIT_CONFIG:
                        exited_at.pop(label, None)
                        continue
                    first = exited_at.setdefault(label, time.monotonic())
                    if time.monotonic() - first < RESTART_DELAY_S:
                        continue
                    exited_at.pop(label, None)
                    command, master = self.commands[label]
                    with open(self.log_dir / f"{label}.log", "ab") as log:
                        log.write(f"\n[supervisor] {label} exited with status {code}; "
                                  "restarting it\n".encode())
                    self.processes[label] = spawn(command, self.log_dir / f"{label}.log",
                                                   env=self.env(master), cwd=self.run_dir)
                    self.restarts[label] = self.restarts.get(label, 0) + 1
            time.sleep(POLL_S)

    # -- masters -----------------------------------------------------------------------

    def master_command(self, name: str, *extra: str) -> list[str]:
        # --without-mingle/--without-gossip: a master needs neither (state is in the
        # folder), and mingle delays every start by a second of waiting for replies.
        return [sys.executable, "-m", "celery", "-A", "workers", "worker", "-P", "solo",
                "-n", f"{name}@%h", "-l", self.loglevel, "--without-mingle", "--without-gossip",
                *extra]

    def start_master(self, name: str, *, wait: bool = True, extra: tuple[str, ...] = ()
                     ) -> subprocess.Popen:
        """Start master `name`; with `wait`, return once it reports itself in Redis."""
        process = self._start(name, self.master_command(name, *extra), master=name)
        if wait:
            self.wait_master_up(name)
        return process

    def wait_master_up(self, name: str, deadline_s: float = MASTER_START_S) -> dict:
        """Wait until the running process of `name` reports that it consumes its queues."""
        from workers.client.monitor import MonitorUnavailable, read_status_documents

        process = self.processes[name]

        def up() -> Any:
            if process.poll() is not None:
                raise ClusterError(f"master {name} exited with status {process.returncode}\n"
                                   + tail(self.log_dir / f"{name}.log"))
            try:
                doc = read_status_documents(self.broker.url).get(name)
            except MonitorUnavailable:
                return None
            if (doc and doc.get("pid") == process.pid and doc.get("consuming")
                    and doc.get("state") in ("ready", "joining")):
                return doc
            return None

        return wait_until(up, deadline_s, f"master {name} to start",
                          on_timeout=lambda: tail(self.log_dir / f"{name}.log"))

    def start_masters(self) -> None:
        """Start every master in parallel and wait for each to come up."""
        for name in self.masters:
            self.start_master(name, wait=False)
        for name in self.masters:
            self.wait_master_up(name)

    def stop_process(self, label: str, sig: int | None = signal.SIGTERM,
                     deadline_s: float = STOP_S) -> int | None:
        """Send `sig` (None: already sent) and wait for the process to exit; SIGKILL after
        the deadline. Never signals twice: a second SIGTERM would cut a warm shutdown."""
        with self._lock:
            self._intended_stop.add(label)
            process = self.processes.get(label)
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        if sig is not None:
            process.send_signal(sig)
        try:
            return process.wait(deadline_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def kill_master(self, name: str) -> None:
        """kill -9 the master's process (no shutdown at all) and reap it. The supervisor
        leaves it down until `start_master` is called again."""
        with self._lock:
            self._intended_stop.add(name)
            process = self.processes[name]
        process.kill()
        process.wait()

    # -- beat and flower ---------------------------------------------------------------

    def start_beat(self, label: str = "beat", loglevel: str = "info") -> subprocess.Popen:
        """Start a beat with its own schedule file (two beats may run at once)."""
        schedule = self.run_dir / f"{label}-schedule"
        return self._start(label, [sys.executable, "-m", "celery", "-A", "workers", "beat",
                                   "-l", loglevel, "-s", str(schedule)])

    def start_flower(self, port: int | None = None) -> str:
        """Start Flower on 127.0.0.1 and return its URL once it answers /healthcheck."""
        import urllib.request

        port = port or free_port()
        self._start("flower", [sys.executable, "-m", "celery", "-A", "workers", "flower",
                               "--address=127.0.0.1", f"--port={port}"])
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/healthcheck", timeout=1) as reply:
                    return reply.status == 200
            except OSError:
                return False

        wait_until(healthy, 60.0, "Flower", poll_s=0.25,
                   on_timeout=lambda: tail(self.log_dir / "flower.log"))
        self.flower_url = url
        return url

    # -- convergence -------------------------------------------------------------------

    def view(self) -> dict:
        """The cluster view of `workers.client.monitor` for this cluster."""
        from workers.settings import parse_duration_s
        from workers.client.monitor import cluster_view
        from workers.prevalence import read_all_progress
        from workers.prevalence.cluster.lease import read_all_holders
        from workers.prevalence.cluster.membership import read_retired

        return cluster_view(self.broker.url, self.shared_dir,
                            sync_interval_s=parse_duration_s("PREVALENCE_SYNC_INTERVAL",
                                                             self.sync_interval,
                                                             minimum_s=0, maximum_s=1e9),
                            read_progress=lambda shared: read_all_progress(str(shared)),
                            read_retired=lambda shared: read_retired(str(shared)),
                            read_leases=lambda shared: read_all_holders(str(shared)))

    def wait_converged(self, deadline_s: float = 60.0, model: Any = None) -> dict:
        """Wait until every master reports converged and, when `model` is given, their
        digest equals `verify`'s. Returns the view (with ``verify`` added)."""
        from workers.prevalence import verify

        last: dict = {"why": "not evaluated yet"}

        def converged() -> Any:
            view = self.view()
            last["view"] = view
            running = set(self.masters_running())
            if not view["converged"]:
                last["why"] = view["verdict"]
                return None
            if set(view["masters"]) != running:
                last["why"] = (f"reporting masters {sorted(view['masters'])} are not the "
                               f"running ones {sorted(running)}")
                return None
            if model is not None:
                report = verify(str(self.shared_dir), model)
                view["verify"] = report
                digests = {doc.get("digest") for doc in view["masters"].values()}
                if digests != {report["digest"]}:
                    last["why"] = (f"masters' digests {sorted(digests)} differ from verify's "
                                   f"{report['digest']} (verify errors: {report['errors']})")
                    return None
            return view

        return wait_until(converged, deadline_s, "convergence", poll_s=0.25,
                          on_timeout=lambda: last["why"])

    def masters_running(self) -> list[str]:
        return [n for n in self.masters
                if n in self.processes and self.processes[n].poll() is None]

    # -- shutdown ----------------------------------------------------------------------

    def stop(self, *, stop_broker: bool = True) -> dict[str, int | None]:
        """Stop everything this supervisor started: masters (SIGTERM, in parallel), then
        beat, Flower, and the broker. Returns each process's exit status."""
        statuses: dict[str, int | None] = {}
        self._supervising.clear()
        if self._supervisor is not None:
            self._supervisor.join(5)
            self._supervisor = None
        masters = [n for n in self.processes if n in self.masters]
        for name in masters:
            self._intended_stop.add(name)
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name in masters:
            statuses[name] = self.stop_process(name, sig=None)
        for label in list(self.processes):
            if label not in statuses:
                statuses[label] = self.stop_process(label)
        if stop_broker:
            self.broker.stop()
        return statuses
