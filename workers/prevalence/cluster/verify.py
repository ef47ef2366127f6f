"""`verify`: the reference state, computed offline from the shared folder alone.

Invariant 4: committed state equals the result of applying all records, sorted by
``(hlc, master, seq)``, to the initial state, skipping a record whose request id already
appeared earlier in that order. `verify` computes exactly that -- from the initial state
when every journal still starts at seq 1, else from the newest snapshot whose cursors
every journal still covers -- and replays twice to catch a non-deterministic transaction
(invariant 8).
"""

from __future__ import annotations

from typing import Any, Callable

from .. import codec, journal, tracked
from ..codec import Record
from ..errors import Corruption
from ..model import Context, Model
from ..snapshot import decode_root, list_snapshots, load_snapshot
from . import folder, membership
from .reader import JournalReader


def _journals_cover(shared: str, masters: list[str], cursors: dict) -> bool:
    for m in masters:
        segments = journal.list_segments(folder.journal_dir(shared, m))
        if segments and segments[0][0] > cursors.get(m, 0) + 1:
            return False
    return True


def _choose_base(shared: str, model: Model, masters: list[str], key: bytes | None,
                 cuts: dict[str, int] | None = None):
    if _journals_cover(shared, masters, {}):
        return "initial state", model.root_factory, {}, {}
    snaps = sorted((f, p, m) for m in masters for f, p in list_snapshots(folder.snapshots_dir(shared, m)))
    for frontier, path, m in reversed(snaps):
        try:
            body = load_snapshot(path, key, master=m)
        except (Corruption, OSError):
            continue
        if cuts is not None and any(int(seq) > cuts.get(p, 0) for p, seq in body.cursors.items()):
            continue  # it has applied records past the cut
        if _journals_cover(shared, masters, body.cursors):
            return (f"snapshot {path}", lambda body=body: decode_root(body, model.state_type),
                    dict(body.cursors), body.dedup)
    raise Corruption("no base to verify from: journals no longer start at seq 1 and no snapshot's "
                     "cursors are covered by the remaining journals", path=shared)


#: Records between two progress lines of a replay (`verify`'s `say`).
PROGRESS_EVERY = 1_000_000


def verify(shared_dir: str, model: Model, *, cluster_key: bytes | None = None,
           cuts: dict[str, int] | None = None,
           say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compute the reference digest of the folder's records (see module docstring).

    `cuts` (master -> last seq that counts; `backup` uses it) limits the records to a
    cut: masters not named are left out, records past their cut ignored (and what lies
    after the cut, a torn tail being written, is not an error).

    Returns a dict: ``digest``, ``records`` (real records per master), ``ticks``,
    ``duplicates`` (records skipped: their request id appeared earlier), ``base``, ``errors`` (per master: where reading stopped and why),
    ``deterministic`` (two replays agreed), ``last_hlc``.

    `say` (None: silent) is called with a line of progress: each journal read, and every
    `PROGRESS_EVERY` records of each of the two replays.
    """
    masters = folder.list_masters(shared_dir)
    if cuts is not None:
        masters = [m for m in masters if m in cuts]
    retired = membership.read_retired(shared_dir, cluster_key)
    base, make_root, cursors, dedup0 = _choose_base(shared_dir, model, masters, cluster_key, cuts)
    records: list = []
    errors: dict[str, str] = {}
    counts: dict[str, int] = {}
    ticks = 0
    for m in masters:
        reader = JournalReader(shared_dir, m, cursors.get(m, 0), 0, cluster_key)
        got = []
        while True:
            res = reader.read_new(records_max=200_000)
            got += res.records
            if cuts is not None and got and got[-1].seq >= cuts[m]:
                break  # the cut is reached: what follows does not count
            if res.error is not None:
                errors[m] = str(res.error)
                break
            if res.torn is not None:
                errors[m] = f"torn tail (not written yet): {res.torn}"
                break
            if not res.records:
                break
        cut = retired.get(m)
        if cuts is not None:
            cut = cuts[m] if cut is None else min(cut, cuts[m])
        if cut is not None:
            got = [r for r in got if r.seq <= cut]
        unknown = next((r for r in got if r.tx != codec.TICK and r.tx not in model.transactions), None)
        if unknown is not None:
            errors[m] = f"seq {unknown.seq} names unknown transaction {unknown.tx!r}; stopped there"
            got = got[:got.index(unknown)]
        counts[m] = sum(1 for r in got if r.tx != codec.TICK)
        ticks += len(got) - counts[m]
        records += got
        if say is not None:
            say(f"read the journal of {m}: {counts[m]:,} records" + (f" (stopped: {errors[m]})" if m in errors else ""))
    records.sort(key=Record.key.fget)
    digests = []
    for replay in (1, 2):
        root = model.new_state(make_root())
        dedup = dict(dedup0)  # entries are replaced, never mutated
        ctx, log = Context(), tracked.UndoLog()
        duplicates = 0  # records answered as duplicates of an earlier request id

        def full_apply(rec):
            nonlocal duplicates
            if "duplicate_of" in model.apply(root, dedup, rec, ctx, log):
                duplicates += 1

        # As replay applies them (`Model.replay`): the loop in C, records with a request
        # id through the full `apply` (which tells duplicates), entries forgotten as it goes.
        for start in range(0, len(records), PROGRESS_EVERY):
            chunk = records[start:start + PROGRESS_EVERY]
            tracked.apply_records(log, chunk, model.transactions, root, ctx, full_apply,
                                  None, None, None, True)  # watch, marks, tentative, forget
            if say is not None and start + len(chunk) < len(records):
                say(f"replay {replay} of 2: {start + len(chunk):,} of {len(records):,} records and ticks")
        digests.append(codec.digest_of(root, dedup))
        if say is not None:
            say(f"replay {replay} of 2 done: {sum(counts.values()):,} records and {ticks:,} ticks from {base}")
    return {"digest": digests[0], "deterministic": digests[0] == digests[1], "records": counts,
            "total": sum(counts.values()), "duplicates": duplicates, "ticks": ticks, "base": base, "errors": errors,
            "last_hlc": records[-1].hlc if records else 0, "masters": masters, "retired": retired}
