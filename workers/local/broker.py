"""The Redis a local cluster uses: external, a private redis-server, or embedded.

`start_broker` picks, in order: the given URL; a private ``redis-server`` on a free
loopback port when the binary exists; else the embedded fakeredis server
(`workers.local.embedded_redis`), with a warning that it keeps nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from workers.local.processes import ClusterError, free_port, ping, pythonpath, spawn, tail, wait_until

#: Deadline (seconds) for a broker to answer PING after start.
BROKER_START_S = 15.0


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
        self.process = spawn(self.command, self.log_path, env=os.environ.copy(),
                              cwd=self.log_path.parent if self.log_path else None)
        wait_until(lambda: ping(self.url), BROKER_START_S, f"{self.kind} at {self.url}",
                   on_timeout=lambda: tail(self.log_path) if self.log_path else "")


def start_broker(run_dir: Path, url: str | None = None, *, prefer: str | None = None) -> Broker:
    """Start (or adopt) the broker; see the module doc for the order of preference.

    `prefer` forces "redis-server" or "embedded" (tests). Raises `ClusterError` when the
    broker does not answer PING before the deadline.
    """
    if url and prefer is None:
        if not ping(url):
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
        command = [sys.executable, "-m", "workers.local.embedded_redis", "--port", str(port)]
    log_path = run_dir / f"{kind}.log"
    env = os.environ.copy()
    env["PYTHONPATH"] = pythonpath(env)
    process = spawn(command, log_path, env=env, cwd=run_dir)
    broker = Broker(f"redis://127.0.0.1:{port}/0", kind, process, command, log_path)
    wait_until(lambda: ping(broker.url) or process.poll() is not None, BROKER_START_S,
               f"{kind} on port {port}", on_timeout=lambda: tail(log_path))
    if process.poll() is not None:
        raise ClusterError(f"{kind} exited at start\n{tail(log_path)}")
    return broker
