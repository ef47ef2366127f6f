"""Membership: founding, retirements (operator-written under ``cluster/``).

* The first master to start in an empty folder **founds** the cluster: it creates
  ``cluster/founder`` exclusively (O_EXCL, reliable on NFSv3+) with its name. Every other
  master joins, and must be counted by the founder (among all others) before it writes.
* ``cluster/retired/<name>`` holds the **cut**: the last seq of that master that counts.
  Members stop counting it in the frontier once they have read up to the cut, and ignore
  its records past it. A retired master refuses to start under that name.
"""

from __future__ import annotations

import json
import os
import time

from .. import journal
from ..durable import fsync_dir
from ..errors import PrevalenceError
from . import folder
from .lease import Lease
from ..errors import LeaseHeld


def claim_founder(shared: str, name: str) -> str:
    """Return the founder's name, making it `name` if nobody has founded yet."""
    path = folder.founder_path(shared)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        for _ in range(50):
            raw = folder.read_small(path)
            if raw:
                return raw.decode().strip()
            time.sleep(0.02)  # created but not yet written by the winner
        # Still empty after a second: its creator died between create and write. Nobody
        # can have started as founder from it, so it is safe to found again.
        if not folder.list_masters(shared) or folder.list_masters(shared) == [name]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return claim_founder(shared, name)
        raise PrevalenceError(f"{path} exists but is empty while other masters exist: a founder died "
                              "while founding. Write the founder's name into it") from None
    try:
        os.write(fd, name.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))
    return name


def read_founder(shared: str) -> str | None:
    raw = folder.read_small(folder.founder_path(shared))
    return raw.decode().strip() if raw else None


def read_retired(shared: str) -> dict[str, int]:
    """name -> cut (last seq that counts) for every retired master."""
    try:
        names = os.listdir(folder.retired_dir(shared))
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        if name.startswith(".") or not folder.NAME_RE.match(name):
            continue
        raw = folder.read_small(folder.retired_path(shared, name))
        if raw:
            out[name] = int(json.loads(raw)["cut"])
    return out


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
    if not os.path.isdir(folder.master_dir(shared, name)):
        raise PrevalenceError(f"no master {name!r} in {shared}")
    if os.path.exists(folder.retired_path(shared, name)):
        raise PrevalenceError(f"master {name!r} is already retired")
    if not force:
        try:
            Lease(shared, name).check_free()
        except LeaseHeld as exc:
            raise PrevalenceError(f"refusing to retire a live master: {exc}. Stop it first, or pass --force") from None
    cut = last_written_seq(shared, name, key)
    os.makedirs(folder.retired_dir(shared), exist_ok=True)
    body = {"master": name, "cut": cut, "retired_at": time.time()}
    folder.publish(folder.retired_path(shared, name), json.dumps(body).encode())
    return body
