"""A fault-injecting passthrough filesystem (FUSE, through mfusepy): one mount is one NFS
client's view of a real folder, the "server". Several mounts of the same folder are several
hosts. It behaves like the Linux NFS client as tests/nfs measured it, and injects faults:

    python -m tests.faultfs.faultfs ROOT MOUNTPOINT       (run by `tests.faultfs.mount`)

Always on (what an NFS client does; each can be turned off in the fault set, see `Faults`):

* **write-behind** (``write_behind``): writes stay in this mount's memory until fsync,
  close or release; other mounts see nothing of them before (NFS hides unsynced writes
  until close). A read or truncate through this mount of a file it has unflushed writes
  for flushes them first (a host reads its own writes).
* **held descriptors and stat lag** (``attr_cache``): a read through a descriptor opened
  before another mount appended stops at the size the file had when it was opened, and
  ``fstat`` on it says that size; ``stat()`` by path says the size seen at this mount's
  last open of the file. Only a reopen by path sees appends (close-to-open consistency).
* **cached negative lookups** (``negative_lookups``): a name this mount looked up and did
  not find stays "not found" for this mount, however the other mounts create it, until
  this mount lists its directory and the listing shows the name (``"listing"``: the Linux
  NFS client replaces a cached miss with what a READDIR returns), or for good
  (``"sticky"``: what tests/nfs saw on NFSv4.1 for a peer's new ``journal/``, listings or
  not). A listing always shows the truth. Creating the name through this mount (or trying
  to: EEXIST) clears the miss, as a lookup with create intent does on NFS.
* **ESTALE** (``estale_on_replaced``): a read or fstat through a descriptor whose file
  another mount deleted, or renamed another file over, fails with ESTALE (NFSv3). Files
  this mount deleted or replaced itself stay readable (the NFS client's silly rename).

Injected on demand (counted in ``stats``):

* ``short_reads``: each read returns at most a random 1..N bytes (seeded).
* ``estale``: ``{"match": REGEX, "count": N}``: the first N reads or fstats of a freshly
  opened matching file fail with ESTALE (the file replaced between open and read).
* ``vanish``: ``{"match": REGEX, "count": N}``: the first N opens of a matching file fail
  with ENOENT (deleted between the listing and the open).
* ``eio_fsync``: ``{"match": REGEX, "count": N}``: the first N fsyncs of a matching file
  fail with EIO, and the writes that fsync was to make durable are dropped (as a failed
  writeback loses the pages).

Control: JSON lines on stdin, one answer line on stdout each: ``{"faults": {...}}`` replaces
the fault set (missing keys take their defaults), ``{"stats": true}`` returns the counters,
``{"forget": true}`` drops the cached misses and sizes. The mount is made with the kernel's
own caches off (``attr_timeout=0,entry_timeout=0,negative_timeout=0``, ``direct_io``), so
that every behaviour above is this process's, deterministic and counted.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import sys
import threading
from dataclasses import dataclass, field

import mfusepy

DEFAULTS = {
    "write_behind": True,
    "attr_cache": True,
    "negative_lookups": "listing",
    "estale_on_replaced": True,
    "short_reads": 0,
    "estale": None,
    "vanish": None,
    "eio_fsync": None,
    "seed": 0,
}


@dataclass
class Handle:
    fd: int
    path: str
    ino: int
    size_at_open: int
    pending: list = field(default_factory=list)   # (offset, bytes) not yet written to the root
    written_end: int = 0                          # end of this handle's own writes
    stale_left: int = 0                           # injected ESTALEs left for this handle


class FaultFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self._mutex = threading.RLock()
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.misses: set[str] = set()          # paths this mount looked up and did not find
        self.sizes: dict[str, int] = {}        # path -> size seen at this mount's last open
        self.own_removed: set[int] = set()     # inodes this mount deleted or replaced itself
        self.stats: dict[str, int] = {}
        self.set_faults({})

    # -- control -----------------------------------------------------------------------

    def set_faults(self, faults: dict) -> None:
        unknown = set(faults) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        with self._mutex:
            self.faults = {**DEFAULTS, **faults}
            self.rng = random.Random(self.faults["seed"])
            self.rules = {k: self._rule(self.faults[k]) for k in ("estale", "vanish", "eio_fsync")}

    @staticmethod
    def _rule(spec):
        if not spec:
            return None
        return {"match": re.compile(spec["match"]), "left": int(spec.get("count", 1))}

    def _fire(self, kind: str, path: str) -> bool:
        rule = self.rules[kind]
        if rule is None or rule["left"] <= 0 or not rule["match"].search(path):
            return False
        rule["left"] -= 1
        self._count(kind)
        return True

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def control(self, line: str) -> dict:
        msg = json.loads(line)
        with self._mutex:
            if "faults" in msg:
                self.set_faults(msg["faults"])
            if msg.get("forget"):
                self.misses.clear()
                self.sizes.clear()
            return {"ok": True, "stats": dict(self.stats)}

    # -- helpers -----------------------------------------------------------------------

    def _real(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _created(self, path: str) -> None:
        self.misses.discard(path)

    def _flush(self, h: Handle) -> None:
        for offset, data in h.pending:
            os.pwrite(h.fd, data, offset)
        h.pending.clear()
        self.sizes[h.path] = os.fstat(h.fd).st_size   # this host knows its own writes

    def _flush_path(self, path: str) -> None:
        for h in self.handles.values():
            if h.path == path and h.pending:
                self._flush(h)

    def _check_stale(self, h: Handle) -> None:
        if h.stale_left > 0:
            h.stale_left -= 1
            raise mfusepy.FuseOSError(errno.ESTALE)
        if not self.faults["estale_on_replaced"] or h.ino in self.own_removed:
            return
        try:
            ino = os.lstat(self._real(h.path)).st_ino
        except FileNotFoundError:
            ino = None
        if ino != h.ino:
            self._count("estale_replaced")
            raise mfusepy.FuseOSError(errno.ESTALE)

    def _mark_replaced(self, path: str) -> None:
        try:
            self.own_removed.add(os.lstat(self._real(path)).st_ino)
        except FileNotFoundError:
            pass

    @staticmethod
    def _attrs(st: os.stat_result) -> dict:
        return {key: getattr(st, key) for key in (
            "st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns",
            "st_mtime_ns", "st_ctime_ns")} | {"st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                                             "st_ctime": st.st_ctime_ns}

    # -- lookups and attributes --------------------------------------------------------

    def getattr(self, path, fh=None):
        with self._mutex:
            if fh is not None and fh in self.handles:
                h = self.handles[fh]
                self._check_stale(h)
                attrs = self._attrs(os.fstat(h.fd))
                if self.faults["attr_cache"]:
                    attrs["st_size"] = max(h.size_at_open, h.written_end)
                elif h.pending:
                    attrs["st_size"] = max(attrs["st_size"], h.written_end)
                return attrs
            if self.faults["negative_lookups"] and path in self.misses:
                self._count("cached_miss")
                raise mfusepy.FuseOSError(errno.ENOENT)
            try:
                st = os.lstat(self._real(path))
            except FileNotFoundError:
                if self.faults["negative_lookups"]:
                    self.misses.add(path)
                raise
            attrs = self._attrs(st)
            pending_end = max((h.written_end for h in self.handles.values() if h.path == path and h.pending),
                              default=0)
            if self.faults["attr_cache"] and path in self.sizes and st.st_size != self.sizes[path]:
                self._count("stale_size")
                attrs["st_size"] = self.sizes[path]
            attrs["st_size"] = max(attrs["st_size"], pending_end)
            return attrs

    def readdir(self, path, fh):
        names = os.listdir(self._real(path))
        if self.faults["negative_lookups"] == "listing":
            with self._mutex:
                for name in names:
                    self.misses.discard(os.path.join(path, name))
        return [".", ".."] + names

    def readlink(self, path):
        return os.readlink(self._real(path))

    def access(self, path, amode):
        if not os.access(self._real(path), amode):
            raise mfusepy.FuseOSError(errno.EACCES)
        return 0

    def statfs(self, path):
        st = os.statvfs(self._real(path))
        return {key: getattr(st, key) for key in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
            "f_frsize", "f_namemax")}

    # -- files -------------------------------------------------------------------------

    def _new_handle(self, fd: int, path: str) -> int:
        st = os.fstat(fd)
        h = Handle(fd, path, st.st_ino, st.st_size)
        if self._fire("estale", path):
            h.stale_left = 1
        self.sizes[path] = st.st_size
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = h
        return fh

    def open(self, path, flags):
        with self._mutex:
            if self._fire("vanish", path):
                raise mfusepy.FuseOSError(errno.ENOENT)
            fd = os.open(self._real(path), flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND))
            return self._new_handle(fd, path)

    def create(self, path, mode, flags=os.O_WRONLY):
        with self._mutex:
            self._created(path)   # a lookup with create intent goes to the server
            fd = os.open(self._real(path), (flags & ~os.O_APPEND) | os.O_CREAT, mode)
            return self._new_handle(fd, path)

    def read(self, path, size, offset, fh):
        with self._mutex:
            h = self.handles[fh]
            self._check_stale(h)
            if h.pending:
                self._flush(h)
            if self.faults["attr_cache"]:
                limit = max(h.size_at_open, h.written_end)
                if offset >= limit:
                    return b""
                size = min(size, limit - offset)
            if self.faults["short_reads"] and size > 1:
                short = min(size, self.rng.randint(1, self.faults["short_reads"]))
                if short < size:
                    self._count("short_read")
                size = short
            return os.pread(h.fd, size, offset)

    def write(self, path, data, offset, fh):
        with self._mutex:
            h = self.handles[fh]
            data = bytes(data)
            if self.faults["write_behind"]:
                h.pending.append((offset, data))
            else:
                os.pwrite(h.fd, data, offset)
                self.sizes[path] = os.fstat(h.fd).st_size
            h.written_end = max(h.written_end, offset + len(data))
            return len(data)

    def truncate(self, path, length, fh=None):
        with self._mutex:
            self._flush_path(path)
            if fh is not None and fh in self.handles:
                os.ftruncate(self.handles[fh].fd, length)
            else:
                os.truncate(self._real(path), length)
            self.sizes[path] = length
            for h in self.handles.values():
                if h.path == path:
                    h.written_end = min(h.written_end, length)
                    h.size_at_open = min(h.size_at_open, length)
            return 0

    def fsync(self, path, datasync, fh):
        with self._mutex:
            h = self.handles[fh]
            if self._fire("eio_fsync", h.path):
                h.pending.clear()   # the failed writeback loses the pages it was writing
                raise mfusepy.FuseOSError(errno.EIO)
            self._flush(h)
            os.fsync(h.fd)
            return 0

    def flush(self, path, fh):
        with self._mutex:
            h = self.handles.get(fh)
            if h is not None:
                self._flush(h)
            return 0

    def release(self, path, fh):
        with self._mutex:
            h = self.handles.pop(fh, None)
            if h is not None:
                try:
                    self._flush(h)
                finally:
                    os.close(h.fd)
            return 0

    # -- names -------------------------------------------------------------------------

    def mkdir(self, path, mode):
        with self._mutex:
            self._created(path)
            os.mkdir(self._real(path), mode)
            return 0

    def rmdir(self, path):
        with self._mutex:
            os.rmdir(self._real(path))
            return 0

    def unlink(self, path):
        with self._mutex:
            self._mark_replaced(path)
            os.unlink(self._real(path))
            return 0

    def rename(self, old, new):
        with self._mutex:
            self._mark_replaced(new)
            self._created(new)
            os.rename(self._real(old), self._real(new))
            return 0

    def symlink(self, target, source):
        with self._mutex:
            self._created(target)
            os.symlink(source, self._real(target))
            return 0

    def link(self, target, source):
        with self._mutex:
            self._created(target)
            os.link(self._real(source), self._real(target))
            return 0

    def chmod(self, path, mode):
        os.chmod(self._real(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.lchown(self._real(path), uid, gid)
        return 0

    def utimens(self, path, times=None):
        os.utime(self._real(path), ns=times, follow_symlinks=False)
        return 0

    def fsyncdir(self, path, datasync, fh):
        fd = os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0


def _serve_control(fs: FaultFS) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = fs.control(line)
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    root, mountpoint = argv
    fs = FaultFS(root)
    threading.Thread(target=_serve_control, args=(fs,), daemon=True).start()
    mfusepy.FUSE(fs, mountpoint, foreground=True, nothreads=True, fsname="faultfs", subtype="faultfs",
                 attr_timeout=0, entry_timeout=0, negative_timeout=0, direct_io=True, hard_remove=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
