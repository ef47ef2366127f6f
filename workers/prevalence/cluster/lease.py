"""The lease: one process per master name (invariant 10).

``masters/<name>/lease`` holds host, boot id, pid, the pid's start time and a heartbeat.
A claim is refused while the lease is fresh:

* same host and boot: fresh while that pid is alive with the same start time, so a
  restart after kill -9 takes over at once (no waiting for a TTL);
* another host: fresh while its heartbeat is younger than `lease_ttl_s`.

Two processes on one host racing to claim are serialised by a local `flock` (local
locks are reliable; NFS locks are not). A holder refreshes its heartbeat every third of
the TTL and checks the file still names it; if another process took the name over (this
one was paused past the TTL), the lease is *lost* and the master stops taking writes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time

from ..errors import LeaseHeld
from . import folder

log = logging.getLogger("prevalence.lease")

LEASE_TTL_S_DEFAULT = 30.0


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def pid_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    now_start = pid_start(pid)
    if now_start is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return start is None
    return start is None or now_start == start


class Lease:
    def __init__(self, shared: str, name: str, *, lease_ttl_s: float = LEASE_TTL_S_DEFAULT):
        self.shared = shared
        self.name = name
        self.path = folder.lease_path(shared, name)
        self.lease_ttl_s = lease_ttl_s
        self.lost: str | None = None
        self._local_lock = None
        self._stop = threading.Event()
        self._thread = None
        self._me = {"host": socket.gethostname(), "boot_id": boot_id(), "pid": os.getpid(),
                    "pid_start": pid_start(os.getpid())}

    def _describe(self, other: dict, age_s: float) -> str:
        return (f"master {self.name!r} is held by pid {other.get('pid')} on host {other.get('host')!r} "
                f"(heartbeat {age_s:.1f} s ago, lease TTL {self.lease_ttl_s:.0f} s). Stop that process "
                "first, or pick another master name")

    def claim(self) -> None:
        """Take the name or raise LeaseHeld. Starts the heartbeat thread."""
        key = hashlib.sha256(os.path.abspath(self.path).encode()).hexdigest()[:16]
        lock_path = os.path.join(tempfile.gettempdir(), f"prevalence-lease-{key}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = ""
            raw = folder.read_small(self.path)
            if raw:
                try:
                    holder = f" (pid {json.loads(raw).get('pid')})"
                except ValueError:
                    pass
            raise LeaseHeld(f"master {self.name!r} is already open in another process on this host{holder}; "
                            f"its local lock {lock_path} is held. Stop that process first") from None
        self._local_lock = fd
        try:
            self.check_free()
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._write()
        except BaseException:
            self._release_local()
            raise
        self._thread = threading.Thread(target=self._heartbeat_loop, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def check_free(self) -> None:
        """Raise LeaseHeld when a claim would be refused now (module docstring); claims
        nothing. A lease naming this very process (same host, boot and pid) counts as free,
        as a stale one does."""
        raw = folder.read_small(self.path)
        if raw is None:
            return
        try:
            other = json.loads(raw)
        except ValueError:
            log.warning("lease %s is unreadable; taking it over", self.path)
            return
        age_s = time.time() - float(other.get("heartbeat", 0))
        same_host = other.get("host") == self._me["host"] and other.get("boot_id") == self._me["boot_id"]
        if same_host:
            if other.get("pid") != os.getpid() and _alive(int(other.get("pid", 0)), other.get("pid_start")):
                raise LeaseHeld(self._describe(other, age_s))
        elif age_s < self.lease_ttl_s:
            raise LeaseHeld(self._describe(other, age_s))
        log.info("taking over stale lease of %s (pid %s on %s, heartbeat %.1f s ago)",
                 self.name, other.get("pid"), other.get("host"), age_s)

    def _write(self) -> None:
        body = dict(self._me, master=self.name, heartbeat=time.time())
        folder.publish(self.path, json.dumps(body, sort_keys=True).encode())

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.lease_ttl_s / 3):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh the heartbeat, unless another process has taken the name over."""
        if self.lost:
            return
        raw = folder.read_small(self.path)
        try:
            other = json.loads(raw) if raw else None
        except ValueError:
            other = None
        if other is not None and (other.get("pid") != self._me["pid"] or other.get("host") != self._me["host"]):
            self.lost = (f"lease of {self.name!r} was taken over by pid {other.get('pid')} on "
                         f"{other.get('host')!r}; this process stopped taking writes")
            log.error("%s", self.lost)
            return
        try:
            self._write()
        except OSError as exc:
            log.error("lease heartbeat of %s failed: %s", self.name, exc)

    def _release_local(self) -> None:
        if self._local_lock is not None:
            os.close(self._local_lock)
            self._local_lock = None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if not self.lost:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._release_local()

    def abandon(self) -> None:
        """Stop heartbeating without removing the lease (tests: simulate a crash)."""
        self._stop.set()
        self._release_local()
