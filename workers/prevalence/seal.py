"""Seals: where a finished journal segment ends.

``journal/<first-seq>.seal`` is a small file (`smallfile`: kind ``seal``, the journal's
master, the first seq of the segment it seals; signed with the cluster key) holding the
``length`` of a finished segment and the CRC-32 of its bytes up to there. Two writers
publish one:

* the journal writer, when it rolls to a new segment or closes one (`writer`);
* a new owner of a master name, on the previous owner's last segment, at the length it
  read there at takeover (`cluster.recovery`): it never appends to that file.

A sealed segment **ends at its seal**. Readers never read past it, so a zombie owner's
late writes there are never read (they are reported); a sealed segment shorter than its
seal has lost durable records, and damage inside it is corruption, never a torn tail.
Every segment but the last is sealed. A reader that reads a segment from its start and
finds the seal's CRC-32 correct skips the per-frame checksums there (one C-speed pass
instead of one call per record; never with a cluster key, whose HMACs are checked per
record).

Older releases wrote ``{"length", "crc32"}`` and only read seals without a cluster key:
such a seal still reads without a key, and is ignored with one (it was never signed).
"""

from __future__ import annotations

import os
import zlib
from typing import Annotated

import msgspec

from . import files, smallfile
from .durable import publish_file
from .errors import BadFile, Corruption
from .journal import parse_segment_name, seal_path

SEAL_KIND = "seal"


class Seal(msgspec.Struct, kw_only=True, frozen=True):
    """A seal: where a finished segment ends, and the CRC-32 of its bytes up to there."""

    kind: str = ""         # SEAL_KIND ("" in a seal of an older release)
    master: str = ""       # the journal's master ("" in a seal of an older release)
    first_seq: int = 0     # the segment it seals (0 in a seal of an older release)
    length: Annotated[int, msgspec.Meta(ge=0)]
    crc32: Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]


def read_seal(segment_path: str, *, master: str | None = None, key: bytes | None = None) -> Seal | None:
    """The seal of a segment, or None when it has none.

    With a cluster key an unsigned seal of an older release is ignored (older releases
    never read seals with a key, so they never signed them); any other seal that fails
    its checks is an error.

    Raises:
        BadFile: the seal does not parse, fails its HMAC, or is about another master or
            segment (naming the seal).
    """
    path = seal_path(segment_path)
    data = files.read_small(path, "seal")
    if data is None:
        return None
    try:
        seal = smallfile.decode(data, path, kind=SEAL_KIND, type_=Seal, key=key, master=master)
    except BadFile:
        if key is not None and _legacy_unsigned_seal(data, path):
            return None
        raise
    first = parse_segment_name(os.path.basename(segment_path))
    if seal.kind and seal.first_seq != first:
        raise BadFile(f"seal is of the segment starting at seq {seal.first_seq}, expected {first} "
                      "(copied from another segment?)", path=path)
    return seal


def _legacy_unsigned_seal(data: bytes, path: str) -> bool:
    try:
        return not smallfile.decode(data, path, kind=SEAL_KIND, type_=Seal, key=None).kind
    except BadFile:
        return False


def segment_crc(fd: int, length: int, path: str) -> int:
    """CRC-32 of the first `length` bytes of an open segment, read 1 MiB at a time.

    Raises:
        Corruption: the file ends before `length` (another process cut it).
    """
    crc, offset = 0, 0
    while offset < length:
        chunk = os.pread(fd, min(1 << 20, length - offset), offset)
        if not chunk:
            raise Corruption(f"segment ends at {offset} bytes while it is being sealed at {length}: another "
                             "process cut it", path=path, offset=offset)
        crc = zlib.crc32(chunk, crc)
        offset += len(chunk)
    return crc


def write_seal(segment_path: str, length: int, crc: int, *, master: str, key: bytes | None) -> None:
    """Publish a segment's seal (`durable.publish_file`): it ends at `length` bytes."""
    first = parse_segment_name(os.path.basename(segment_path))
    seal = Seal(kind=SEAL_KIND, master=master, first_seq=first or 0, length=length, crc32=crc)
    publish_file(seal_path(segment_path), smallfile.encode(SEAL_KIND, seal, key))


def trusted_prefix(data, seal: Seal | None) -> int:
    """How many leading bytes of a segment read from offset 0 its seal vouches for."""
    if seal is None:
        return 0
    if 0 < seal.length <= len(data) and zlib.crc32(memoryview(data)[:seal.length]) == seal.crc32:
        return seal.length
    return 0
