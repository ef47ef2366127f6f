"""Snapshots: the committed state of a master at a frontier, in one self-checking file.

Byte layout (integers little-endian)::

    offset  size  field
    0       8     magic b"PVSNAP\\x00\\x01"
    8       4     format version (FORMAT_VERSION)
    12      4     flags: bit 0 = an HMAC-SHA256 of bytes 0..end-of-body follows the body
    16      8     body length N
    24      4     CRC-32 of the body
    28      4     CRC-32 of bytes 0..27 (header checksum)
    32      N     body: MessagePack `SnapshotBody`
    32+N    32    HMAC, when flag bit 0 is set

The body carries the position (frontier and, for every member, the last seq the state
includes), the state itself and its canonical digest, which is recomputed on load.

Names: ``snapshots/<frontier>.snap`` (20 digits), so text order is frontier order.
Writing goes through `durable.publish_file`: temp name unique per host and pid, write,
fsync, rename, fsync the directory. A reader never sees a partial snapshot under its
final name.

Loading checks what the file is about (the magic says it is a snapshot; the body names
the master that wrote it and its frontier, which must match the folder and the name it
is found under) and bounds what it reads: a regular file only (`files`), whose size
matches the header's declared body length and is below `SNAPSHOT_BYTES_MAX` and the
machine's memory, checked before the body is read. A body nested deeper than the
decoder goes is corruption naming the file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import zlib
from typing import Any

import msgspec

from . import codec, files, tracked
from .codec import RequestIdEntry, depth_note
from .durable import publish_file
from .errors import BadFile, Corruption, UnsafeFile, check
from .journal import SEQ_DIGITS
from .model import PRUNE_MARK

MAGIC = b"PVSNAP\x00\x01"
FORMAT_VERSION = 1
FLAG_HMAC = 0x01
HEADER = struct.Struct("<8sIIQI")  # magic, version, flags, body length, body crc
HEADER_BYTES = HEADER.size + 4  # + header crc = 32
SNAPSHOT_SUFFIX = ".snap"
SNAPSHOT_BYTES_MAX = 64 * 1024 * 1024 * 1024


class SnapshotBody(msgspec.Struct, frozen=True):
    """What a snapshot holds."""

    master: str            # who wrote it
    model: str             # the model's name
    frontier: int          # every record with hlc <= frontier (of counted members) is in it
    cursors: dict          # member -> last seq included
    clock: int             # the writer's clock when written
    members: list          # the members counted in the frontier when it was written
    digest: str            # canonical digest of (root, dedup)
    root: msgspec.Raw      # the application state, decoded with the model's state type
    dedup: dict[str, RequestIdEntry]  # request id -> its first record and outcome (+ the prune mark)


def format_snapshot_name(frontier: int) -> str:
    check(frontier >= 0, f"snapshot frontier must be >= 0, got {frontier}")
    return f"{frontier:0{SEQ_DIGITS}d}{SNAPSHOT_SUFFIX}"


def parse_snapshot_name(name: str) -> int | None:
    if len(name) != SEQ_DIGITS + len(SNAPSHOT_SUFFIX) or not name.endswith(SNAPSHOT_SUFFIX):
        return None
    digits = name[:SEQ_DIGITS]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def list_snapshots(snap_dir: str) -> list[tuple[int, str]]:
    """(frontier, path) of every snapshot, oldest first; [] when the folder is missing.

    Raises:
        UnsafeFile: the folder is a symbolic link or not a directory.
    """
    names = files.list_dir(snap_dir, "snapshots folder")
    out = [(f, os.path.join(snap_dir, n)) for n in names
           if not n.startswith(".") and (f := parse_snapshot_name(n)) is not None]
    out.sort()
    return out


def encode_snapshot(body: SnapshotBody, key: bytes | None) -> bytes:
    raw = msgspec.msgpack.encode(body)
    flags = FLAG_HMAC if key else 0
    head = HEADER.pack(MAGIC, FORMAT_VERSION, flags, len(raw), zlib.crc32(raw))
    head += struct.pack("<I", zlib.crc32(head))
    data = head + raw
    if key:
        data += hmac.new(key, data, hashlib.sha256).digest()
    return data


def decode_snapshot(data: bytes, path: str, key: bytes | None) -> SnapshotBody:
    """Check and decode a snapshot file's bytes. Raises Corruption naming what is wrong."""
    def bad(why: str, offset: int = 0) -> Corruption:
        return Corruption(f"snapshot is damaged: {why}", path=path, offset=offset)

    if len(data) < HEADER_BYTES:
        raise bad(f"{len(data)} bytes, fewer than the {HEADER_BYTES}-byte header")
    magic, version, flags, n, crc = HEADER.unpack_from(data, 0)
    (hcrc,) = struct.unpack_from("<I", data, HEADER.size)
    if zlib.crc32(data[:HEADER.size]) != hcrc:
        raise bad("header checksum mismatch")
    if magic != MAGIC:
        raise bad(f"magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise bad(f"format version {version}, expected {FORMAT_VERSION}")
    mac_len = 32 if flags & FLAG_HMAC else 0
    if n > SNAPSHOT_BYTES_MAX or HEADER_BYTES + n + mac_len != len(data):
        raise bad(f"declared body length {n} does not match the file size {len(data)}")
    body = memoryview(data)[HEADER_BYTES:HEADER_BYTES + n]
    if zlib.crc32(body) != crc:
        raise bad("body checksum mismatch", HEADER_BYTES)
    if key is not None:
        if not mac_len:
            raise bad("no HMAC but a cluster key is configured")
        want = hmac.new(key, data[:HEADER_BYTES + n], hashlib.sha256).digest()
        if not hmac.compare_digest(want, data[HEADER_BYTES + n:]):
            raise bad("HMAC mismatch (wrong cluster key or forged snapshot)")
    try:
        decoded = msgspec.msgpack.decode(body, type=SnapshotBody)
    except msgspec.DecodeError as exc:
        raise bad(f"body does not decode: {exc}", HEADER_BYTES) from None
    except RecursionError:
        raise bad(f"body is nested deeper than the decoder goes ({depth_note()})", HEADER_BYTES) from None
    # The prune mark, a one-element array, decoded as an entry with only its hlc: give it
    # back the plain tuple `Model.apply` keeps there (so it encodes to the same bytes again).
    mark = decoded.dedup.get(PRUNE_MARK)
    if mark is not None:
        decoded.dedup[PRUNE_MARK] = (mark.hlc,)
    return decoded


def write_snapshot(snap_dir: str, body: SnapshotBody, key: bytes | None, fault=None) -> str:
    """Write a snapshot durably (`durable.publish_file`). Returns its path.

    Args:
        fault: test hook, called at ``mid-snapshot-write``, ``before-snapshot-rename``
            and ``after-snapshot-rename``.

    Raises:
        StorageError: the disk refused; the temp file is removed.
    """
    files.make_dirs(snap_dir, what="snapshots folder")
    data = encode_snapshot(body, key)
    # Check the key property twice: what we are about to publish must read back.
    decode_snapshot(data, "<snapshot being written>", key)
    final = os.path.join(snap_dir, format_snapshot_name(body.frontier))
    publish_file(final, data, fault, fault_name="snapshot")
    return final


def memory_bytes() -> int | None:
    """This machine's physical memory (None where it cannot be told): no snapshot larger
    than it can be loaded, so none larger is read."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def load_snapshot(path: str, key: bytes | None, *, master: str | None = None) -> SnapshotBody:
    """Read, check and decode a snapshot file (module docstring).

    Args:
        master: the master whose folder holds it: the body must name it.

    Raises:
        Corruption: damaged (naming what is wrong). BadFile: about another master, or a
            frontier other than its name says. UnsafeFile: not a regular file, or larger
            than a snapshot may be. OSError: as the system raised it (ENOENT ...).
    """
    fd, st = files.open_file(path, what="snapshot")
    try:
        size = st.st_size
        limit = min(SNAPSHOT_BYTES_MAX, memory_bytes() or SNAPSHOT_BYTES_MAX)
        if size > limit:
            raise UnsafeFile(f"snapshot is {size} bytes, more than the {limit} a snapshot may be here "
                                   "(this machine's memory); it was not read", path=path)
        head = files.pread_all(fd, 0, HEADER_BYTES)
        if len(head) == HEADER_BYTES:
            _magic, _version, flags, n, _crc = HEADER.unpack_from(head, 0)
            (hcrc,) = struct.unpack_from("<I", head, HEADER.size)
            mac_len = 32 if flags & FLAG_HMAC else 0
            if zlib.crc32(head[:HEADER.size]) == hcrc and HEADER_BYTES + n + mac_len != size:
                raise Corruption(f"snapshot is damaged: declared body length {n} does not match the file size "
                                 f"{size}", path=path, offset=0)
        data = files.pread_all(fd, 0, size)  # whole, not head + rest: no copy of the body
    finally:
        os.close(fd)
    body = decode_snapshot(data, path, key)
    if master is not None and body.master != master:
        raise BadFile(f"snapshot was written by master {body.master!r}, but it sits in the folder of {master!r} "
                      "(copied from another master's folder?)", path=path)
    named = parse_snapshot_name(os.path.basename(path))
    if named is not None and named != body.frontier:
        raise BadFile(f"snapshot holds frontier {body.frontier}, but its name says {named} (renamed or "
                      "copied under another name?)", path=path)
    return body


def load_state(path: str, key: bytes | None, model: Any, *, master: str | None = None
               ) -> tuple[SnapshotBody, Any]:
    """Read a snapshot for `model` and decode its state: ``(body, state)``, the state
    change-tracked unless the model opted out. What recovery and followers start from.

    Raises Corruption (naming the file) for a damaged file, a snapshot of another model,
    or a state this model's state type does not decode back to what was written.
    """
    body = load_snapshot(path, key, master=master)
    if body.model != model.name:
        raise Corruption(f"snapshot is of model {body.model!r}, not {model.name!r}", path=path)
    with codec.gc_paused():  # millions of new containers: no collections meanwhile
        root = decode_root(body, model.state_type, path)
        # The state must be what the writer encoded: its bytes are checked (CRC, HMAC with
        # a key), so encoding what was decoded must give them back. This catches a state
        # type that decodes them differently (code skew) as the digest of the state would,
        # in a third of the time (the canonical encoding sorts every dict's keys; 1M
        # nested users: 0.4 s against 1.0 s). Compared as Raw: memcmp (a memoryview
        # compares byte by byte).
        # Untyped (`Any`: a state of plain dicts and lists) the decoder builds plain data,
        # which encodes back to the writer's bytes whatever the code: nothing to catch,
        # and 15-20% of a large snapshot's load saved (writing a snapshot already checks
        # that the state reads back equal: `UnsupportedState`).
        if model.state_type is not Any and body.root != msgspec.Raw(codec.encode_record(root)):
            raise Corruption(f"the snapshot's state does not decode to what was written under "
                             f"this model's state type ({model.state_type!r}): code skew?", path=path)
        if model.tracking:
            # Handed over to tracked at once (adopt): fresh from the decoder, it is made
            # tracked in place instead of copied.
            root = tracked.convert(root, adopt=True)
    return body, root


def decode_root(body: SnapshotBody, state_type: Any, path: str | None = None) -> Any:
    """The state a snapshot holds. Raises Corruption when it does not decode."""
    try:
        return msgspec.msgpack.decode(body.root, type=state_type)
    except msgspec.DecodeError as exc:
        raise Corruption(f"snapshot state does not decode: {exc}", path=path) from None
    except RecursionError:
        raise Corruption(f"snapshot state is nested deeper than the decoder goes ({depth_note()})",
                         path=path) from None
