"""Files on the shared folder: regular files only, never followed, never blocked on, read
with bounds (DESIGN invariant 9).

The share is written by other hosts. Whatever sits where the engine expects one of its
files may be a symbolic link (to a file outside the share, to ``/dev/zero``), a FIFO, a
device, a directory, or a sparse file of many GiB. Every file the engine opens, reads or
writes there goes through this module:

* **Opening** uses ``O_NOFOLLOW`` (the kernel refuses a symbolic link as the last
  component: ELOOP) and ``O_NONBLOCK`` (opening a FIFO or a device never waits), then
  checks the *descriptor* with ``fstat``: anything but a regular file is refused with
  `UnsafeFile` naming it. The descriptor is then made blocking again (it is a regular
  file: the flag changes nothing but says what we mean).
* **Reading** compares the file's size with the limit of its kind before it allocates a
  byte, and never reads past the size it saw: a 5 GiB sparse file costs one ``fstat``.
* **Directories** are listed through a descriptor opened with ``O_DIRECTORY |
  O_NOFOLLOW``, and checked with ``lstat`` where the engine creates or enters them:
  a symbolic link where a master's folder should be is refused, never entered.
* **Creating** a file (a segment, a temp file, a torn tail's copy) uses ``O_CREAT |
  O_EXCL``, which never follows a link and never reuses what is already there.

The remaining window: a *parent* directory swapped for a symbolic link between the check
and the open (an active attacker racing the engine; the checks catch anything planted
beforehand). Closing it needs ``openat2(RESOLVE_NO_SYMLINKS)`` relative to the share's
root, which the engine does not use yet.

What the engine relies on from an NFS client (DESIGN section 4; measured on Linux NFSv3 and
v4.1 clients against nfs-ganesha, ``tests/nfs``), and what it does not:

* **Close-to-open consistency, nothing more.** Every read reopens the file by path, which
  revalidates its attributes with the server: bytes another host fsynced (or closed) before
  this open are seen. A descriptor held open, or a ``stat()`` of the path, answers from the
  attribute cache and lags appends by seconds (up to ``acregmax``, 60 s): the engine never
  decides from them whether a peer wrote more. A peer's unsynced writes are invisible until
  it closes or fsyncs; the writer fsyncs before it announces anything.
* **New names are discovered by listing, never by a lookup that may fail.** A failed lookup
  leaves a *negative* entry in the client's cache, and a name created afterwards by another
  host stays invisible to ``open()`` / ``stat()`` until the directory's attributes expire
  (``acdirmin``, 30 s; longer on NFSv4.1 when the directory's change attribute has not moved).
  A listing never caches a negative entry, and opening the folder to list it revalidates the
  folder's attributes (close-to-open applies to directories too). So `list_dir` enters a
  folder it has not seen before only after its parent's listing shows it (`_known_dirs`),
  a segment or seal is read only once its journal's listing shows it, and a small file is
  read by name only once a listing showed it, or where seeing it late is harmless (a
  master's own lease; ``cluster/founder``, there before anyone reads it). Nothing here relies
  on a positive answer being fresh either: a name listed may be gone by the time it is
  opened (ENOENT, handled as "not there").
* **Rename is atomic on the server, not in a reader's hands.** A small file published by
  temp + fsync + rename is read whole, old or new. But a reader that opened the old file
  may get ``ESTALE`` from ``fstat``/``read`` on NFSv3 (the server dropped the old inode),
  and a reader that opened a file another host deleted may too (NFSv4.1 keeps the old
  inode readable instead). `read_small` reopens by path on ``ESTALE`` (`STALE_REOPENS_MAX`
  times) and raises `StorageError` naming the file when it keeps going stale; segment
  readers treat ``ESTALE`` like ``ENOENT`` ("rotated away") and go back to the listing.
* **Silly-renamed ``.nfs*`` files** (what a client leaves in place of a file deleted while
  it had it open) start with a dot: every listing of the engine skips dot names, and a
  master's own ``.nfs*`` file is never taken for a temp file (those start ``.tmp-``).
* **No ordering by time stamps** of the server (mtime, ctime): seq and hlc order records.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import StorageError, UnsafeFile

#: The most bytes a small file (lease, progress, seal, founder, retirement) may hold.
SMALL_FILE_BYTES_MAX = 1 << 20

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = os.O_NOFOLLOW | _CLOEXEC
_SYMLINK_ERRNOS = (errno.ELOOP, errno.EMLINK)  # EMLINK: what FreeBSD says for O_NOFOLLOW
_TEMP_PREFIX = ".tmp-"
#: How many times `read_small` reopens a file by path after ``ESTALE`` before it gives up.
#: A publisher renames a new small file over the old one at most a few times a second, so
#: two stale reads in a row are already rare; six in a row mean something else is wrong.
STALE_REOPENS_MAX = 5
#: Folders this process has seen exist (see `list_dir`). A folder of the share is removed
#: only by an operator (or a test); `list_dir` forgets one as soon as it is not found.
_known_dirs: set[str] = set()


def _describe(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISREG(mode):
        return "a regular file"
    return f"a file of mode {mode:#o}"


def _lstat_kind(path: str) -> str:
    try:
        return _describe(os.lstat(path).st_mode)
    except OSError:
        return "not a regular file"


def _refuse(path: str, what: str, found: str) -> UnsafeFile:
    return UnsafeFile(f"{what} is {found}, expected a regular file; nothing on the share is followed, read or "
                      "blocked on. Remove it (it was not written by the engine)", path=path)


def open_file(path: str, flags: int = os.O_RDONLY, mode: int = 0o644, *,
              what: str = "file") -> tuple[int, os.stat_result]:
    """Open a regular file of the share: (descriptor, its fstat). See the module docstring.

    Args:
        flags: ``os.O_*`` flags; ``O_NOFOLLOW``, ``O_NONBLOCK`` and ``O_CLOEXEC`` are added.
        what: what the file is, for messages ("segment", "progress file" ...).

    Raises:
        UnsafeFile: a symbolic link, FIFO, device, directory or socket.
        OSError: as the system raised it otherwise (FileNotFoundError, EEXIST with O_EXCL ...).
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno in _SYMLINK_ERRNOS:
            raise _refuse(path, what, "a symbolic link") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR, errno.ENODEV, errno.ENOTDIR) and not flags & os.O_EXCL:
            found = _lstat_kind(path)
            if found != "a regular file":
                raise _refuse(path, what, found) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, what, _describe(st.st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def create_file(path: str, *, what: str = "file", mode: int = 0o644) -> int:
    """Create a new regular file for writing (``O_CREAT | O_EXCL``): never follows a link,
    never takes over a file that exists. Raises FileExistsError when something is there."""
    fd, _st = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, what=what)
    return fd


def pread_all(fd: int, offset: int, count: int) -> bytes:
    """Up to `count` bytes at `offset` (fewer only at the end of the file)."""
    chunks = []
    while count > 0:
        chunk = os.pread(fd, count, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        count -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_file(path: str, *, bytes_max: int, what: str, offset: int = 0,
              end: int | None = None) -> tuple[bytes, int]:
    """Bytes ``[offset, end)`` of a regular file (to its end when `end` is None), and the
    size the file had when opened. Reopens by path (NFS close-to-open consistency).

    Raises:
        UnsafeFile: not a regular file, or larger than `bytes_max`.
        OSError: FileNotFoundError (rotated away), ESTALE ...
    """
    data, st = _read_opened(path, bytes_max=bytes_max, what=what, offset=offset, end=end)
    return data, st.st_size


def _read_opened(path: str, *, bytes_max: int, what: str, offset: int = 0,
                 end: int | None = None) -> tuple[bytes, os.stat_result]:
    """`read_file`, with the whole status of the file as opened."""
    fd, st = open_file(path, what=what)
    try:
        size = st.st_size
        if size > bytes_max:
            raise UnsafeFile(f"{what} is {size} bytes, more than the {bytes_max} one may hold; it was not "
                             "read. It was not written by the engine (a sparse or planted file?)", path=path)
        stop = size if end is None else min(end, size)
        return (pread_all(fd, offset, stop - offset) if stop > offset else b""), st
    finally:
        os.close(fd)


def read_small(path: str, what: str, bytes_max: int = SMALL_FILE_BYTES_MAX) -> bytes | None:
    """A small file's bytes, or None when it does not exist (see `read_file`).

    A small file is replaced by rename while others read it: on NFS a read that opened the
    old file can fail with ``ESTALE``; the file is then reopened by path, which finds the
    new one (at most `STALE_REOPENS_MAX` times).

    Raises:
        UnsafeFile: not a regular file, or larger than `bytes_max`.
        StorageError: every reopen went stale, naming the file.
        OSError: any other error of the system.
    """
    got = read_small_stat(path, what, bytes_max)
    return None if got is None else got[0]


def read_small_stat(path: str, what: str,
                    bytes_max: int = SMALL_FILE_BYTES_MAX) -> tuple[bytes, os.stat_result] | None:
    """`read_small`, with the file's status taken through the descriptor it was read from:
    its modification time is the file server's stamp of the last write (on NFS, opening
    revalidates the attributes with the server: close-to-open consistency)."""
    for _attempt in range(STALE_REOPENS_MAX + 1):
        try:
            return _read_opened(path, bytes_max=bytes_max, what=what)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
    raise StorageError(f"reading {what} {path} failed: ESTALE on each of {STALE_REOPENS_MAX + 1} reopens by "
                       "path (the file kept being replaced or removed while it was read). Check the NFS mount "
                       "and the server; the next sync tries again")


def is_dir(path: str, what: str = "folder") -> bool:
    """True for a real directory, False when nothing is there.

    Raises:
        UnsafeFile: something else is there (a symbolic link, even to a directory).
    """
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if stat.S_ISDIR(st.st_mode):
        return True
    raise UnsafeFile(f"{what} is {_describe(st.st_mode)}, expected a directory; nothing on the share is "
                     "followed. Remove it (it was not made by the engine)", path=path)


def make_dirs(*paths: str, what: str = "folder") -> None:
    """Create each directory that is missing (parents first), refusing any that is not a
    real directory (a symbolic link where a folder should be, say)."""
    for path in paths:
        if not is_dir(path, what):
            try:
                os.makedirs(path)
            except FileExistsError:
                pass  # created meanwhile (another master making `masters/`, say): check it
            is_dir(path, what)


def list_dir(path: str, what: str = "folder") -> list[str]:
    """The names in a directory ([] when it does not exist), through a descriptor opened
    with ``O_DIRECTORY | O_NOFOLLOW``.

    A folder this process has not seen yet is looked for in its parent's listing first,
    and entered only when the listing shows it: a lookup by name that fails would leave a
    negative entry in an NFS client's cache, hiding the folder for up to a minute once
    another host creates it (a peer's ``journal/``, made when its join completes;
    ``cluster/retired/``, made by the first retirement). See the module docstring.

    Raises:
        UnsafeFile: a symbolic link or something else that is not a directory is there.
    """
    if path not in _known_dirs:
        parent, name = os.path.split(path.rstrip(os.sep))
        try:
            listed = name in _listing(parent, f"folder holding the {what}")
        except (FileNotFoundError, NotADirectoryError):
            listed = False  # the parent is not there (yet): nor is the folder
        if not listed:
            return []
    try:
        names = _listing(path, what)
    except (FileNotFoundError, NotADirectoryError):
        _known_dirs.discard(path)  # removed (by an operator): look in the parent next time
        return []
    _known_dirs.add(path)
    return names


def _listing(path: str, what: str) -> list[str]:
    """The names in a directory (`list_dir` without the discovery by the parent).

    Raises:
        FileNotFoundError, NotADirectoryError: nothing is there.
        UnsafeFile: a symbolic link or something else that is not a directory is there.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError) as exc:
        if isinstance(exc, NotADirectoryError) or os.path.lexists(path):
            is_dir(path, what)  # raises UnsafeFile naming what is there
        raise
    except OSError as exc:
        if exc.errno in _SYMLINK_ERRNOS:
            is_dir(path, what)
        raise
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def is_temp_name(name: str) -> bool:
    return name.startswith(_TEMP_PREFIX)


def temp_name(directory: str, host: str, pid: int, final_name: str) -> str:
    """The temp name `durable.publish_file` writes under: unique per host and pid."""
    return os.path.join(directory, f"{_TEMP_PREFIX}{host}-{pid}-{final_name}")


def remove_temp_files(directory: str) -> list[str]:
    """Remove the temp files (``.tmp-*``) a crash left in `directory` (litestream's
    ``removeTmpFiles``); returns their paths. Only for a folder this process owns: nobody
    else writes there (invariant 2), so no temp file in it belongs to a live writer."""
    removed = []
    for name in list_dir(directory):
        if is_temp_name(name):
            path = os.path.join(directory, name)
            try:
                os.unlink(path)  # a symbolic link is removed itself, never followed
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                raise UnsafeFile("a directory sits at a temp file's name; remove it", path=path) from None
            removed.append(path)
    return removed
