"""Backups (`workers.prevalence.cluster.backup`): a consistent cut, copied and verified,
from which a cluster starts again; the share treated as hostile."""

from __future__ import annotations

import importlib
import os
import shutil
import threading

import pytest

from workers.prevalence import journal, verify
from workers.prevalence.cluster import backup as backups
from workers.prevalence.cluster import folder
from workers.prevalence.cluster.backup import BackupError, backup

from tests import support
from tests.support import open_member
from .helpers import sync_until_quiet

SEGMENT_BYTES = 4096  # small segments: rolls, seals and garbage collection happen under load


def _member(shared, name):
    return open_member(shared, name, segment_bytes_max=SEGMENT_BYTES)


class _Writer:
    """One master's writer thread: deposits with request ids, syncs, snapshots now and then.
    `acked` holds the request ids whose execute returned, in order."""

    def __init__(self, master, account: str) -> None:
        self.master = master
        self.account = account
        self.acked: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set():
                rid = f"{self.master.name}-{i}"
                self.master.execute("deposit", self.account, 1, rid=rid)
                self.acked.append(rid)
                if i % 5 == 0:
                    self.master.sync()
                if i % 40 == 0:
                    self.master.snapshot()
                i += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_a_backup_taken_under_load_restores_to_a_cluster_that_verifies_equal_to_it(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    alpha, beta = _member(shared, "alpha"), _member(shared, "beta")
    sync_until_quiet([alpha, beta])  # beta joins
    alpha.execute("open_account", "a", 0, rid="open-a")
    beta.execute("open_account", "b", 0, rid="open-b")
    sync_until_quiet([alpha, beta])
    writers = [_Writer(alpha, "a"), _Writer(beta, "b")]
    for w in writers:
        w.thread.start()
    # Wait (bounded) until some segments rolled and a snapshot let garbage collection run.
    for w in writers:
        deadline = 200_000
        while len(w.acked) < 300 and w.thread.is_alive() and deadline:
            deadline -= 1
            threading.Event().wait(0.001)
    acked_before = {w.master.name: list(w.acked) for w in writers}
    lines: list[str] = []
    # (the module: `cluster.verify` is also the name of the function the package exports)
    monkeypatch.setattr(importlib.import_module("workers.prevalence.cluster.verify"), "PROGRESS_EVERY", 1)
    manifest = backup(str(shared), str(tmp_path / "bk"), support.test_model(), say=lines.append)
    for w in writers:
        w.stop.set()
        w.thread.join(60)
        assert w.error is None, w.error
    assert all(len(acked) >= 300 for acked in acked_before.values()), {m: len(a) for m, a in acked_before.items()}
    # Progress lines, a cut per master, and the copy is smaller than what it covers: the
    # journals start at the first segment a copied snapshot needs.
    assert any("journal segment" in line for line in lines) and lines[-1].startswith("backup complete")
    # The two verifications say how far they are (a large folder takes minutes); the
    # source's may start from a newer snapshot, with only a few records after it.
    for side in ("copy", "source"):
        assert any(line.startswith(f"{side}: read the journal of alpha: ") for line in lines), lines
        assert any(line.startswith(f"{side}: replay 2 of 2 done: ") for line in lines), lines
    assert any(line.startswith("copy: replay 1 of 2: 1 of ") for line in lines), "\n".join(lines)
    assert set(manifest["cuts"]) == {"alpha", "beta"}
    assert backups.read_manifest(str(tmp_path / "bk"))["digest"] == manifest["digest"]
    first_seqs = [f for f, _p in journal.list_segments(folder.journal_dir(str(tmp_path / "bk"), "alpha"))]
    assert first_seqs and first_seqs[0] > 1, "the backup copied journals no snapshot needs"
    assert not os.path.exists(folder.lease_path(str(tmp_path / "bk"), "alpha"))
    # Every write acknowledged before the backup began is inside the cut.
    for name, acked in acked_before.items():
        assert int(acked[-1].split("-")[1]) < manifest["cuts"][name]
    alpha.close()
    beta.close()

    # Restore: a fresh folder, the same master names; they converge on the backup's digest.
    restored = tmp_path / "restored"
    shutil.copytree(tmp_path / "bk", restored)
    masters = [_member(restored, "alpha"), _member(restored, "beta")]
    sync_until_quiet(masters)
    reference = verify(str(restored), support.test_model())
    assert reference["digest"] == manifest["digest"] and not reference["errors"]
    for m in masters:
        assert m.status()["tentative"] == 0 and m.digest() == manifest["digest"]
        for acked in acked_before.values():
            assert all(m.outcome(rid) is not None for rid in acked)
    # The restored cluster takes writes again.
    masters[0].execute("deposit", "a", 1, rid="after-restore")
    sync_until_quiet(masters)
    assert masters[1].outcome("after-restore")["committed"]
    for m in masters:
        m.close()


def test_a_backup_starts_over_when_a_segment_is_collected_while_it_copies(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    alpha = _member(shared, "alpha")
    alpha.execute("open_account", "a", 0)
    real = journal.read_segment
    vanished = []

    def read_segment(path, *args, **kwargs):
        if not vanished:
            vanished.append(path)
            raise FileNotFoundError(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(journal, "read_segment", read_segment)
    lines: list[str] = []
    manifest = backup(str(shared), str(tmp_path / "bk"), support.test_model(), say=lines.append)
    assert manifest["attempts"] == 2 and vanished
    assert any("changed while it was copied" in line for line in lines)
    assert manifest["digest"] == alpha.digest()
    alpha.close()


def test_a_backup_refuses_a_destination_that_is_not_empty(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    _member(shared, "alpha").close()
    (tmp_path / "bk").mkdir()
    (tmp_path / "bk" / "something").write_text("x")
    with pytest.raises(BackupError, match="not an empty folder"):
        backup(str(shared), str(tmp_path / "bk"), support.test_model())


@pytest.mark.parametrize("plant", ["symlinked segment", "damaged segment"])
def test_a_backup_of_a_hostile_or_damaged_share_stops_naming_the_file_and_leaves_nothing(tmp_path, plant):
    shared = tmp_path / "shared"
    shared.mkdir()
    alpha = _member(shared, "alpha")
    alpha.execute("open_account", "a", 0)
    for _ in range(5):
        alpha.execute("deposit", "a", 1)
    alpha.close()
    [(_first, segment)] = journal.list_segments(folder.journal_dir(str(shared), "alpha"))
    if plant == "symlinked segment":
        outside = tmp_path / "outside.log"
        shutil.copy(segment, outside)
        os.unlink(segment)
        os.symlink(outside, segment)
        expected = "symbolic link"
    else:
        data = bytearray(open(segment, "rb").read())
        data[40] ^= 0xFF  # inside the first record; later records are intact
        open(segment, "wb").write(bytes(data))
        expected = "damaged record|does not match its seal"  # closed: the segment is sealed
    with pytest.raises(Exception, match=expected) as caught:
        backup(str(shared), str(tmp_path / "bk"), support.test_model())
    assert os.path.basename(segment) in str(caught.value)
    assert not os.path.exists(tmp_path / "bk")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bk.partial")]


def test_a_retired_masters_old_snapshot_does_not_hold_the_backup_to_collected_segments(tmp_path):
    from workers.prevalence import retire

    shared = tmp_path / "shared"
    shared.mkdir()
    members = [_member(shared, n) for n in ("alpha", "beta", "gamma")]
    sync_until_quiet(members)
    members[0].execute("open_account", "a", 0)
    sync_until_quiet(members)
    gamma = members.pop()
    gamma.snapshot()
    gamma.close()
    retire(str(shared), "gamma")
    for i in range(400):
        members[i % 2].execute("deposit", "a", 1)
        if i % 50 == 49:
            sync_until_quiet(members)
            for m in members:
                m.snapshot()
    sync_until_quiet(members)
    assert journal.list_segments(folder.journal_dir(str(shared), "alpha"))[0][0] > 1, "nothing was collected"
    manifest = backup(str(shared), str(tmp_path / "bk"), support.test_model())
    assert manifest["attempts"] == 1
    digest = members[0].digest()
    for m in members:
        m.close()
    restored = [_member(tmp_path / "bk", n) for n in ("alpha", "beta")]
    sync_until_quiet(restored)
    assert digest == manifest["digest"] and {m.digest() for m in restored} == {digest}
    for m in restored:
        m.close()
