"""Local processes: spawn with a log file in a session of their own, poll with deadlines.

Helpers shared by `workers.local.broker` and `workers.local.cluster` (and the tests).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.1


class ClusterError(Exception):
    """Raised when a local process fails to start or a wait passes its deadline."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `port` on `host` could be bound a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


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


def ping(url: str) -> bool:
    """True when a Redis server answers PING at `url` (short timeouts)."""
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


def spawn(command: list[str], log_path: Path | None, *, env: dict[str, str],
           cwd: Path | None) -> subprocess.Popen:
    """Start `command` with stdout+stderr appended to `log_path`, in a new session (so a
    terminal's Ctrl-C reaches only the supervisor)."""
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


def pythonpath(env: dict[str, str]) -> str:
    """PYTHONPATH for a child: the project first, so `workers` imports without installing."""
    parts = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))
