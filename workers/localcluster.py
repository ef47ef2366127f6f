"""A local cluster on one machine: broker, masters, beat and Flower as subprocesses.

Used by `prevalence demo`, the Celery-tier tests and the benchmarks. Every process runs
with its own log file under ``<root>/log`` and in its own session, so that Ctrl-C in the
terminal reaches only the supervisor, which then stops the others in order: masters with
SIGTERM (warm shutdown: finish the task in hand, sync, snapshot, release the lease), then
beat and Flower, then the broker it started.

Like systemd's ``Restart=on-failure`` in a deployment, a supervisor thread restarts any
process that exits on its own (a worker can die on a broker outage: kombu 5.7 sometimes
raises while closing a lost Redis connection), except after a configuration refusal.

Broker choice (`start_broker`): the given URL; else a private ``redis-server`` on a free
loopback port when the binary exists; else the embedded fakeredis server
(`workers.embedded_redis`), with a warning that it keeps nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: Deadlines (seconds) for the supervisor's waits; every wait polls, none sleeps blindly.
BROKER_START_S = 15.0
MASTER_START_S = 60.0
STOP_S = 60.0
POLL_S = 0.1
#: The supervisor restarts a process that exited on its own after this long (seconds).
RESTART_DELAY_S = 1.0
#: Exit status of a refusal to start for bad configuration: never restarted.
EXIT_CONFIG = 78


class ClusterError(Exception):
    """Raised when a local process fails to start or a wait passes its deadline."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], deadline_s: float, what: str,
               poll_s: float = POLL_S, on_timeout: Callable[[], str] | None = None) -> Any:
    """Poll `predicate` until it returns a truthy value or `deadline_s` seconds pass.

    Returns the value; raises `ClusterError` naming `what` (plus `on_timeout()`) otherwise.
    """
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            extra = on_timeout() if on_timeout else ""
            raise ClusterError(f"timed out after {deadline_s:g} s waiting for {what}"
                               + (f"\n{extra}" if extra else ""))
        time.sleep(poll_s)


def _ping(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5,
                                         socket_connect_timeout=0.5).ping())
    except Exception:  # not up yet
        return False


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file (for error messages)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return f"--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


class Broker:
    """The Redis the local cluster uses: external, a private redis-server, or embedded."""

    def __init__(self, url: str, kind: str, process: subprocess.Popen | None = None,
                 command: list[str] | None = None, log_path: Path | None = None) -> None:
        self.url = url
        self.kind = kind  # "external" | "redis-server" | "embedded"
        self.process = process
        self.command = command
        self.log_path = log_path

    @property
    def warning(self) -> str | None:
        if self.kind == "embedded":
            return ("WARNING: no CELERY_BROKER_URL and no redis-server binary: using the "
                    "embedded fakeredis server. It keeps nothing on disk and is slower; "
                    "fine for this demo, never for a deployment.")
        return None

    def stop(self) -> None:
        """Stop the broker if this supervisor started it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        """Stop and start a broker this supervisor owns, on the same port (tests)."""
        if self.command is None:
            raise ClusterError("cannot restart an external broker")
        self.stop()
        self.process = _spawn(self.command, self.log_path, env=os.environ.copy(),
                              cwd=self.log_path.parent if self.log_path else None)
        wait_until(lambda: _ping(self.url), BROKER_START_S, f"{self.kind} at {self.url}",
                   on_timeout=lambda: tail(self.log_path) if self.log_path else "")


def _spawn(command: list[str], log_path: Path | None, *, env: dict[str, str],
           cwd: Path | None) -> subprocess.Popen:
    out: Any = subprocess.DEVNULL
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")
    try:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=str(cwd) if cwd else None, start_new_session=True)
    finally:
        if log_path is not None:
            out.close()


def start_broker(run_dir: Path, url: str | None = None, *, prefer: str | None = None) -> Broker:
    """Start (or adopt) the broker; see the module doc for the order of preference.

    `prefer` forces "redis-server" or "embedded" (tests). Raises `ClusterError` when the
    broker does not answer PING before the deadline.
    """
    if url and prefer is None:
        if not _ping(url):
            raise ClusterError(f"CELERY_BROKER_URL={url} does not answer PING")
        return Broker(url, "external")
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    binary = shutil.which("redis-server")
    kind = prefer or ("redis-server" if binary else "embedded")
    if kind == "redis-server":
        if not binary:
            raise ClusterError("redis-server is not on PATH")
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(run_dir), "--loglevel", "warning"]
    else:
        command = [sys.executable, "-m", "workers.embedded_redis", "--port", str(port)]
    log_path = run_dir / f"{kind}.log"
    env = os.environ.copy()
    env["PYTHONPATH"] = _pythonpath(env)
    process = _spawn(command, log_path, env=env, cwd=run_dir)
    broker = Broker(f"redis://127.0.0.1:{port}/0", kind, process, command, log_path)
    wait_until(lambda: _ping(broker.url) or process.poll() is not None, BROKER_START_S,
               f"{kind} on port {port}", on_timeout=lambda: tail(log_path))
    if process.poll() is not None:
        raise ClusterError(f"{kind} exited at start\n{tail(log_path)}")
    return broker


def _pythonpath(env: dict[str, str]) -> str:
    parts = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


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
            "PYTHONPATH": _pythonpath(env),
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
            process = _spawn(command, self.log_dir / f"{label}.log", env=self.env(master),
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
                    self.processes[label] = _spawn(command, self.log_dir / f"{label}.log",
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
        from workers.monitor import MonitorUnavailable, read_status_documents

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
        """The cluster view of `workers.monitor` for this cluster."""
        from config.settings import parse_duration_s
        from workers.monitor import cluster_view
        from workers.prevalence import read_all_progress

        return cluster_view(self.broker.url, self.shared_dir,
                            sync_interval_s=parse_duration_s("PREVALENCE_SYNC_INTERVAL",
                                                             self.sync_interval,
                                                             minimum_s=0, maximum_s=1e9),
                            read_progress=lambda shared: read_all_progress(str(shared)))

    def wait_converged(self, deadline_s: float = 60.0, model: Any = None) -> dict:
        """Wait until every master reports converged and, when `model` is given, their
        digest equals `verify`'s. Returns the view (with ``verify`` added)."""
        from workers.prevalence import verify

        last: dict = {}

        def converged() -> Any:
            view = self.view()
            last["view"] = view
            if not view["converged"] or set(view["masters"]) != set(self.masters_running()):
                return None
            if model is not None:
                report = verify(str(self.shared_dir), model)
                view["verify"] = report
                digests = {doc.get("digest") for doc in view["masters"].values()}
                if digests != {report["digest"]}:
                    return None
            return view

        return wait_until(converged, deadline_s, "convergence", poll_s=0.25,
                          on_timeout=lambda: str(last.get("view", {}).get("verdict")))

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
