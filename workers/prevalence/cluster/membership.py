"""Membership: founding, retirements (operator-written under ``cluster/``).

* The first master to start in an empty folder **founds** the cluster: it creates
  ``cluster/founder`` exclusively (O_EXCL, reliable on NFSv3+) with its name. Every other
  master joins, and must be counted by the founder (among all others) before it writes.
* ``cluster/retired/<name>`` holds the **cut**: the last seq of that master that counts.
  Members stop counting it in the frontier once they have read up to the cut, and ignore
  its records past it. A retired master refuses to start under that name.

Both are small files (`smallfile`: kind ``founder`` / ``retired``, the master they are
about, signed with the cluster key). A retirement that fails its checks (garbage,
unsigned on a keyed cluster, about another master than its name) is not obeyed, by any
master alike, and is reported naming the file; a founder file that fails them stops a
joiner with an error naming it. Older releases wrote the founder as a line of text and
retirements unsigned: both still read without a cluster key.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Annotated

import msgspec

from .. import files, journal, smallfile
from ..durable import fsync_dir
from ..errors import BadFile, LeaseHeld, PrevalenceError
from . import folder
from .lease import Lease

log = logging.getLogger("prevalence.membership")

FOUNDER_KIND = "founder"
RETIRED_KIND = "retired"


class Founder(msgspec.Struct, kw_only=True):
    """What ``cluster/founder`` holds."""

    kind: str = ""
    master: str


class Retirement(msgspec.Struct, kw_only=True):
    """What ``cluster/retired/<name>`` holds."""

    kind: str = ""
    master: str = ""
    cut: Annotated[int, msgspec.Meta(ge=0)]  # the last seq of the master that counts
    retired_at: float = 0.0                  # wall time, for people (never for ordering)


def _legacy_founder(data: bytes) -> Founder:
    """An older release's founder file: the name on a line of text."""
    try:
        name = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError("not ASCII text") from None
    if not folder.NAME_RE.match(name):
        raise ValueError(f"{name[:80]!r} is not a master name")
    return Founder(master=name)


def claim_founder(shared: str, name: str, key: bytes | None = None) -> str:
    """Return the founder's name, making it `name` if nobody has founded yet.

    Raises:
        BadFile: the founder file is there but does not parse (naming it).
    """
    path = folder.founder_path(shared)
    # ``cluster/retired/`` is made with the cluster, long before any retirement, so that no
    # member ever looks for it while it is missing (on NFS a failed lookup can hide a folder
    # made later for up to a minute; `files.list_dir` also copes with a cluster founded by
    # an older release, by listing ``cluster/`` until the folder shows).
    files.make_dirs(folder.cluster_dir(shared), folder.retired_dir(shared), what="cluster folder")
    try:
        fd = files.create_file(path, what="founder file")
    except FileExistsError:
        for _ in range(50):
            founder = read_founder(shared, key)
            if founder:
                return founder
            time.sleep(0.02)  # created but not yet written by the winner
        # Still empty after a second: its creator died between create and write. Nobody
        # can have started as founder from it, so it is safe to found again.
        if not folder.list_masters(shared) or folder.list_masters(shared) == [name]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return claim_founder(shared, name, key)
        raise PrevalenceError(f"{path} exists but is empty while other masters exist: a founder died "
                              "while founding. Write the founder's name into it") from None
    try:
        os.write(fd, smallfile.encode(FOUNDER_KIND, Founder(kind=FOUNDER_KIND, master=name), key))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))
    return name


def read_founder(shared: str, key: bytes | None = None) -> str | None:
    """The founder's name; None while there is none (or it is being written).

    Raises:
        BadFile: the founder file does not parse, or is unsigned on a keyed cluster.
    """
    path = folder.founder_path(shared)
    raw = files.read_small(path, "founder file")
    if not raw:
        return None
    founder = smallfile.decode(raw, path, kind=FOUNDER_KIND, type_=Founder, key=key, legacy=_legacy_founder)
    if not folder.NAME_RE.match(founder.master):
        raise BadFile(f"founder file names {founder.master[:80]!r}, which is not a master name", path=path)
    return founder.master


def read_retirement(shared: str, name: str, key: bytes | None = None) -> int | None:
    """The cut of master `name`'s retirement, or None when it is not retired.

    Raises:
        BadFile: its retirement file fails its checks (it is then obeyed by nobody).
    """
    path = folder.retired_path(shared, name)
    raw = files.read_small(path, "retirement file")
    if raw is None:
        return None
    return smallfile.decode(raw, path, kind=RETIRED_KIND, type_=Retirement, key=key, master=name).cut


def read_retirements(shared: str, key: bytes | None = None) -> tuple[dict[str, int], list[BadFile]]:
    """(name -> cut of every valid retirement, the retirement files that failed their checks)."""
    out: dict[str, int] = {}
    bad: list[BadFile] = []
    for name in files.list_dir(folder.retired_dir(shared), "retirements folder"):
        if name.startswith(".") or not folder.NAME_RE.match(name):
            continue
        path = folder.retired_path(shared, name)
        try:
            raw = files.read_small(path, "retirement file")
            if raw is None:
                continue
            retirement = smallfile.decode(raw, path, kind=RETIRED_KIND, type_=Retirement, key=key, master=name)
        except BadFile as exc:
            bad.append(BadFile(f"{exc}. It is not obeyed; write it again with `prevalence retire` (with the "
                               "cluster key) or remove it", path=path))
            continue
        out[name] = retirement.cut
    return out, bad


def read_retired(shared: str, key: bytes | None = None) -> dict[str, int]:
    """name -> cut (last seq that counts) for every retired master. A retirement file that
    fails its checks is left out and logged (`read_retirements` returns them)."""
    retired, bad = read_retirements(shared, key)
    for exc in bad:
        log.error("%s", exc)
    return retired


def last_written_seq(shared: str, name: str, key: bytes | None = None) -> int:
    """The last complete record's seq in a master's journal (0 when it has none)."""
    from .reader import JournalReader
    segments = journal.list_segments(folder.journal_dir(shared, name))
    if not segments:
        return 0
    reader = JournalReader(shared, name, segments[-1][0] - 1, 0, key)
    last = segments[-1][0] - 1
    while True:
        res = reader.read_new(records_max=100_000)
        if res.records:
            last = res.records[-1].seq
        if res.error is not None:
            raise res.error
        if not res.records:
            return last


def retire(shared: str, name: str, *, force: bool = False, key: bytes | None = None) -> dict:
    """Retire a master at a cut = the last record in its journal. Operator action.

    Refuses while the master's lease is fresh (it is alive) unless `force`.
    """
    folder.check_name(name)
    if not files.is_dir(folder.master_dir(shared, name), "master folder"):
        raise PrevalenceError(f"no master {name!r} in {shared}")
    if os.path.lexists(folder.retired_path(shared, name)):
        raise PrevalenceError(f"master {name!r} is already retired")
    if not force:
        try:
            Lease(shared, name, key=key).check_free(
                advice="Retire only a master that is gone for good: stop that process first (its lease "
                       "is released on a clean stop, or goes stale one TTL after its heartbeat stops), "
                       "or pass --force if you know it is dead")
        except LeaseHeld as exc:
            raise PrevalenceError(f"refusing to retire a live master: {exc}") from None
    cut = last_written_seq(shared, name, key)
    files.make_dirs(folder.cluster_dir(shared), folder.retired_dir(shared), what="cluster folder")
    retirement = Retirement(kind=RETIRED_KIND, master=name, cut=cut, retired_at=time.time())
    folder.publish(folder.retired_path(shared, name), smallfile.encode(RETIRED_KIND, retirement, key))
    return {"master": name, "cut": cut, "retired_at": retirement.retired_at}
