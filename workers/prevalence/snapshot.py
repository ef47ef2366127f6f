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
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import zlib
from typing import Any

import msgspec

from .codec import RequestIdEntry, depth_note
from .durable import publish_file
from .errors import Corruption, StorageError, check
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
    """(frontier, path) of every snapshot, oldest first; [] when the folder is missing."""
    try:
        names = os.listdir(snap_dir)
    except FileNotFoundError:
        return []
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
        StorageError: the disk refused; a temp file may be left behind.
    """
    os.makedirs(snap_dir, exist_ok=True)
    data = encode_snapshot(body, key)
    # Check the key property twice: what we are about to publish must read back.
    decode_snapshot(data, "<snapshot being written>", key)
    final = os.path.join(snap_dir, format_snapshot_name(body.frontier))
    try:
        publish_file(final, data, fault, fault_name="snapshot")
    except OSError as exc:
        raise StorageError(f"writing snapshot {final} failed: {exc}") from exc
    return final


def load_snapshot(path: str, key: bytes | None) -> SnapshotBody:
    with open(path, "rb") as f:
        data = f.read()
    return decode_snapshot(data, path, key)


def decode_root(body: SnapshotBody, state_type: Any, path: str | None = None) -> Any:
    """The state a snapshot holds. Raises Corruption when it does not decode."""
    try:
        return msgspec.msgpack.decode(body.root, type=state_type)
    except msgspec.DecodeError as exc:
        raise Corruption(f"snapshot state does not decode: {exc}", path=path) from None
    except RecursionError:
        raise Corruption(f"snapshot state is nested deeper than the decoder goes ({depth_note()})",
                         path=path) from None
