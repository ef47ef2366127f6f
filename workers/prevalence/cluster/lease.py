"""The lease: one process per master name (invariant 10).

``masters/<name>/lease`` is a small file (`smallfile`, kind ``lease``, signed with the
cluster key) naming the holder: host, boot id, pid, the pid's start time, a token unique
to this claim, and a heartbeat (wall time). A claim is refused while the lease is fresh:

* same host and boot: fresh while that pid is alive with the same start time, so a
  restart after kill -9 takes over at once (no waiting for a TTL);
* another host: fresh while its heartbeat is younger than `lease_ttl_s`. A heartbeat more
  than one TTL ahead of this host's clock is not believed (a wrong clock, or a forged
  file would otherwise hold the name for ever): the file's modification time, stamped by
  the file server when it was last rewritten, stands in for it.

Two processes on one host racing to claim are serialised by a local `flock` (local locks
are reliable; NFS locks are not). A lease that does not parse is never taken over: the
claim is refused with an error naming it (remove it once no process holds the name).

**Fencing a zombie owner.** A holder rewrites its heartbeat every third of the TTL. It
counts its lease as valid for half the TTL after the moment it last wrote it, measured on
its own monotonic clock (`monotonic_s`, which also counts a suspended machine): a process
paused (SIGSTOP, a VM freeze) past that point writes and acknowledges nothing until it
has re-checked the lease file and its journal (`check_held`, the journal writer's guard,
run before each write and again before the write is acknowledged). A new owner never
appends to the previous owner's files: it seals the previous owner's last segment at what
it read and starts a segment of its own (`recovery`), so a zombie's late write lands past
a seal, where no reader looks, and is never acknowledged. Every heartbeat also looks for
such a seal, or a removed segment or folder: the holder then stops (`lost`).

The remaining window, stated: (1) clocks of two hosts more than half a TTL apart let a
claimer see a live lease as stale; (2) a holder paused between its last check and the
moment its answer leaves the process has written a record the new owner read at takeover
(it was durable before the pause): the answer is true; (3) a holder that resumes exactly
while another host is claiming (between that host's staleness check and its write of the
lease) can renew and go on for at most one heartbeat period (a third of the TTL) before
it sees the seal on its segment: writes acknowledged in that period are past the seal and
are lost, and readers report the bytes found there. No lease on a shared folder without
an atomic compare-and-swap closes (3); the fencing makes it loud and bounded.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from typing import Callable

import msgspec

from .. import files, smallfile
from ..errors import BadFile, LeaseHeld, LeaseLost, StorageError
from . import folder

log = logging.getLogger("prevalence.lease")

LEASE_TTL_S_DEFAULT = 30.0
LEASE_KIND = "lease"
#: A holder counts its lease as valid for this fraction of the TTL after its last write.
HOLDER_VALIDITY_FRACTION = 0.5

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)

#: Seconds on a clock that never goes back and counts a suspended machine too
#: (``CLOCK_BOOTTIME`` on Linux; ``time.monotonic`` elsewhere). A `Lease` takes the one
#: found here when it is made (its `clock_s`), so tests can replace it before they open a
#: master. (A partial of the C function: it is read twice on every write.)
monotonic_s = functools.partial(time.clock_gettime, _BOOTTIME) if _BOOTTIME is not None else time.monotonic


class LeaseFile(msgspec.Struct, kw_only=True):
    """What a lease file holds."""

    kind: str = ""           # LEASE_KIND ("" in a lease of an older release)
    master: str = ""
    host: str
    boot_id: str = ""
    pid: int
    pid_start: str | None = None
    heartbeat: float         # wall time (s) of the last rewrite, by the holder's clock
    token: str = ""          # unique to one claim ("" in a lease of an older release)


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
    if pid <= 0:
        return False
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
    """The lease of one master name, held by this process once `claim` returned.

    Args:
        key: the cluster key the lease file is signed with (None: unsigned).
    """

    def __init__(self, shared: str, name: str, *, lease_ttl_s: float = LEASE_TTL_S_DEFAULT,
                 key: bytes | None = None):
        self.shared = shared
        self.name = name
        self.path = folder.lease_path(shared, name)
        self.lease_ttl_s = lease_ttl_s
        self.key = key
        self.lost: str | None = None
        #: Set by the master: why its journal shows that another process took the name
        #: over (a seal on the segment it writes, a removed segment or folder), or None.
        self.fence: Callable[[], str | None] = lambda: None
        #: Set by the master: called with (modification time in ns of the lease file just
        #: written, `clock_s()` just before the write) -- the shared folder's clock.
        self.on_written: Callable[[int, float], None] | None = None
        #: The monotonic clock this lease measures its validity with (`monotonic_s`).
        self.clock_s: Callable[[], float] = monotonic_s
        #: `clock_s()` reading from which on the holder re-checks the lease before it writes
        #: or acknowledges. Public for the journal writer, which inlines the fast path of
        #: `check_held` (``lost is None and clock_s() < valid_until_s``) on every append.
        self.valid_until_s = float("-inf")
        self._lock = threading.RLock()     # the heartbeat thread vs the writer's guard
        self._local_lock = None
        self._stop = threading.Event()
        self._thread = None
        self._me = {"host": socket.gethostname(), "boot_id": boot_id(), "pid": os.getpid(),
                    "pid_start": pid_start(os.getpid())}
        self.token = secrets.token_hex(8)

    # -- reading -------------------------------------------------------------------------

    def read(self) -> LeaseFile | None:
        """The lease file, or None when there is none.

        Raises:
            BadFile: it does not parse, is unsigned or badly signed with a key, or names
                another master (naming the file).
        """
        data = files.read_small(self.path, "lease")
        if data is None:
            return None
        return smallfile.decode(data, self.path, kind=LEASE_KIND, type_=LeaseFile, key=self.key,
                                master=self.name)

    def _is_mine(self, other: LeaseFile) -> bool:
        if other.token:
            return other.token == self.token
        return other.pid == self._me["pid"] and other.host == self._me["host"]  # an older release's lease

    def _describe(self, other: LeaseFile, age_s: float, future_s: float = 0.0,
                  advice: str = "Stop that process first, or pick another master name") -> str:
        if future_s:
            beat = (f"heartbeat {future_s:.0f} s in the future by this host's clock -- a wrong clock or a forged "
                    f"file; not believed: the file was last rewritten {age_s:.1f} s ago")
        else:
            beat = f"heartbeat {age_s:.1f} s ago"
        return (f"master {self.name!r} is held by pid {other.pid} on host {other.host!r} ({beat}, lease TTL "
                f"{self.lease_ttl_s:.0f} s). {advice}")

    # -- claiming ------------------------------------------------------------------------

    def claim(self) -> None:
        """Take the name or raise LeaseHeld (BadFile for a lease that does not parse).
        Starts the heartbeat thread."""
        key = hashlib.sha256(os.path.abspath(self.path).encode()).hexdigest()[:16]
        lock_path = os.path.join(tempfile.gettempdir(), f"prevalence-lease-{key}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = ""
            try:
                other = self.read()
                holder = f" (pid {other.pid})" if other else ""
            except BadFile:
                pass
            raise LeaseHeld(f"master {self.name!r} is already open in another process on this host{holder}; "
                            f"its local lock {lock_path} is held. Stop that process first") from None
        self._local_lock = fd
        try:
            self.check_free()
            files.make_dirs(os.path.dirname(self.path), what="master folder")
            self._write()
        except BaseException:
            self._release_local()
            raise
        self._thread = threading.Thread(target=self._heartbeat_loop, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def check_free(self, advice: str = "Stop that process first, or pick another master name") -> None:
        """Raise LeaseHeld when a claim would be refused now (module docstring); claims
        nothing. A lease naming this very process (same host, boot and pid) counts as free,
        as a stale one does. `advice` ends the message: what the caller should do next.

        Raises:
            LeaseHeld: held by a live process. BadFile: the lease does not parse; it is not
                taken over, since nobody can tell who holds it.
        """
        try:
            other = self.read()
        except BadFile as exc:
            raise BadFile(f"{exc}. A lease that cannot be read is never taken over: remove it once you are "
                          "sure no process holds this master name", path=self.path) from None
        if other is None:
            return
        age_s = time.time() - other.heartbeat
        future_s = 0.0
        if age_s < -self.lease_ttl_s:
            future_s = -age_s
            try:
                # `read` has just reopened the file by path, which revalidated its
                # attributes with the server (close-to-open): this is the server's mtime,
                # not one cached up to a minute ago (acregmax).
                age_s = time.time() - os.lstat(self.path).st_mtime
            except FileNotFoundError:
                return  # released meanwhile
        same_host = other.host == self._me["host"] and other.boot_id == self._me["boot_id"]
        if same_host:
            if other.pid != os.getpid() and _alive(other.pid, other.pid_start):
                raise LeaseHeld(self._describe(other, age_s, future_s, advice))
        elif age_s < self.lease_ttl_s:
            raise LeaseHeld(self._describe(other, age_s, future_s, advice))
        log.info("taking over stale lease of %s (pid %s on %s, heartbeat %.1f s ago)",
                 self.name, other.pid, other.host, age_s)

    def _write(self) -> None:
        """Write our heartbeat; the lease counts as ours for half a TTL from before the write."""
        started = self.clock_s()
        body = LeaseFile(kind=LEASE_KIND, master=self.name, host=self._me["host"], boot_id=self._me["boot_id"],
                         pid=self._me["pid"], pid_start=self._me["pid_start"], heartbeat=time.time(),
                         token=self.token)
        mtime_ns = folder.publish(self.path, smallfile.encode(LEASE_KIND, body, self.key))
        self.valid_until_s = started + self.lease_ttl_s * HOLDER_VALIDITY_FRACTION
        if self.on_written is not None:
            self.on_written(mtime_ns, started)

    # -- holding -------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.lease_ttl_s / 3):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Rewrite the heartbeat, unless another process has taken the name over (then the
        lease is `lost`): the lease file names another claim, it vanished with the folder,
        or the journal shows a takeover (`fence`)."""
        with self._lock:
            if self.lost:
                return
            if self.clock_s() >= self.valid_until_s:
                self._recheck()
                return
            try:
                other = self.read()
            except BadFile as exc:
                # Not a claim (a new owner writes a valid lease): rewrite ours over it.
                log.error("%s; rewriting this holder's lease over it", exc)
            else:
                if other is None:
                    self.lose(f"the lease file of {self.name!r} ({self.path}) vanished: the master's folder was "
                              "deleted or moved")
                    return
                if not self._is_mine(other):
                    self.lose(f"lease of {self.name!r} was taken over by pid {other.pid} on {other.host!r}")
                    return
            fenced = self.fence()
            if fenced:
                self.lose(fenced)
                return
            try:
                self._write()
            except StorageError as exc:
                log.error("lease heartbeat of %s failed: %s", self.name, exc)

    def check_held(self) -> None:
        """The journal writer's guard: raise LeaseLost unless this process may still write.

        Cheap while the lease is within its validity (one clock read). Past it (this
        process was paused, or its heartbeats failed), re-check the lease file and the
        journal before anything is written or acknowledged (module docstring).
        """
        if self.lost is None and self.clock_s() < self.valid_until_s:
            return
        with self._lock:
            if self.lost is None and self.clock_s() >= self.valid_until_s:
                self._recheck()
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def holds(self) -> bool:
        """`check_held` as a question: may this process still write in its folder?"""
        try:
            self.check_held()
        except LeaseLost:
            return False
        return True

    def _recheck(self) -> None:
        """Our lease may have expired: confirm the file still names this claim and no new
        owner has sealed our segment, then renew it; otherwise it is lost."""
        try:
            other = self.read()
        except BadFile as exc:
            self.lose(f"{exc}; this process cannot confirm it still holds {self.name!r}")
            return
        if other is None:
            self.lose(f"the lease file of {self.name!r} ({self.path}) vanished: the master's folder was deleted "
                      "or moved")
            return
        if not self._is_mine(other):
            self.lose(f"lease of {self.name!r} was taken over by pid {other.pid} on {other.host!r} while this "
                      "process was paused past its lease")
            return
        fenced = self.fence()
        if fenced:
            self.lose(fenced)
            return
        try:
            self._write()
        except StorageError as exc:
            self.lose(f"the lease of {self.name!r} expired and could not be renewed: {exc}")

    def lose(self, why: str) -> None:
        """This process no longer holds the name: it writes and acknowledges nothing more."""
        if self.lost is None:
            self.lost = f"{why}; this process stopped taking writes (restart the master to recover)"
            log.error("%s", self.lost)

    # -- releasing -----------------------------------------------------------------------

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
                other = self.read()
            except BadFile:
                other = None
            if other is not None and self._is_mine(other):
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        self._release_local()

    def abandon(self) -> None:
        """Stop heartbeating without removing the lease (tests: simulate a crash or a pause)."""
        self._stop.set()
        self._release_local()


# -- liveness, for operators ------------------------------------------------------------

#: How far past one heartbeat period a lease of another host may be before status names
#: its holder down: the heartbeat write's own latency (an NFS round trip) plus the clock
#: difference between this host and the holder or the file server, whichever agrees
#: better (`holder_state`; deploy/README.md: keep clocks within 1 s with NTP).
HEARTBEAT_SLACK_S = 2.0


def heartbeat_period_s(lease_ttl_s: float = LEASE_TTL_S_DEFAULT) -> float:
    """How often a holder rewrites its lease (`Lease._heartbeat_loop`), in seconds."""
    return lease_ttl_s / 3


def holder_state(shared: str, name: str, *, key: bytes | None = None,
                 lease_ttl_s: float = LEASE_TTL_S_DEFAULT, now_s: float | None = None) -> dict:
    """Whether master `name`'s process is alive, judged by its lease alone (for status).

    Returns a dict: ``lease`` is ``"alive"``, ``"down"`` (the process is gone or its
    heartbeat stopped), ``"released"`` (no lease file: stopped cleanly, or never started)
    or ``"unreadable"``; ``why`` says so in a sentence; ``host``, ``pid`` and
    ``heartbeat_age_s`` when the file names them.

    On this host (same host name and boot id) the holder is down as soon as its pid is
    gone: no waiting. On another host it is down once its last heartbeat is older than one
    heartbeat period (a third of the TTL) plus `HEARTBEAT_SLACK_S` by both clocks that
    date it: the holder's own (the time it wrote in the lease) and the file server's (the
    lease file's modification time). A heartbeat fresh by either is alive, so a clock
    difference between two hosts (or between a host and the file server) never names a
    live holder down; a dead holder's heartbeat ages by both (one more than a TTL in the
    future is not believed: the server's stamp alone dates it). Not guaranteed: a holder
    whose heartbeat thread is starved for that long (a machine paused or swapping) is
    named down although it may resume; its lease is not taken over before the TTL.
    Reads only; raises nothing for a bad file (it is reported as ``unreadable``).
    """
    now_s = time.time() if now_s is None else now_s
    path = folder.lease_path(shared, name)
    try:
        got = files.read_small_stat(path, "lease")
        lease = None if got is None else smallfile.decode(
            got[0], path, kind=LEASE_KIND, type_=LeaseFile, key=key, master=name)
    except (BadFile, StorageError) as exc:
        return {"lease": "unreadable", "why": f"its lease cannot be read: {exc}"}
    if lease is None:
        return {"lease": "released", "why": "it holds no lease (stopped cleanly, or never started)"}
    # The heartbeat's age by the fresher of the two stamps (docstring); a heartbeat more
    # than a TTL in the future is not believed, as a claim does not believe it.
    holder_age_s, server_age_s = now_s - lease.heartbeat, now_s - got[1].st_mtime
    age_s = server_age_s if holder_age_s < -lease_ttl_s else min(holder_age_s, server_age_s)
    out = {"host": lease.host, "pid": lease.pid, "heartbeat_age_s": round(age_s, 1)}
    holder = f"pid {lease.pid} on host {lease.host!r}"
    if lease.host == socket.gethostname():
        if lease.boot_id and lease.boot_id != boot_id():
            return {**out, "lease": "down", "why": f"its lease names {holder}, and that host has rebooted since"}
        if not _alive(lease.pid, lease.pid_start):
            return {**out, "lease": "down", "why": f"its process ({holder}, named by its lease) is gone"}
        return {**out, "lease": "alive", "why": f"{holder} is running"}
    period_s = heartbeat_period_s(lease_ttl_s)
    if age_s > period_s + HEARTBEAT_SLACK_S:
        return {**out, "lease": "down",
                "why": f"no heartbeat from {holder} for {age_s:.0f} s (one is written every {period_s:.0f} s)"}
    return {**out, "lease": "alive", "why": f"{holder} wrote its heartbeat {max(age_s, 0.0):.0f} s ago"}


def read_all_holders(shared: str, key: bytes | None = None,
                     lease_ttl_s: float = LEASE_TTL_S_DEFAULT) -> dict[str, dict]:
    """`holder_state` of every master folder in `shared`."""
    now_s = time.time()
    return {name: holder_state(shared, name, key=key, lease_ttl_s=lease_ttl_s, now_s=now_s)
            for name in folder.list_masters(shared)}
