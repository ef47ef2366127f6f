"""A peer's bad files stop that peer only, fast, with an error naming the file (issue 9,
items 6, 8, 10 and 11).

Every test here has a healthy third master, `gamma`, that keeps writing: the cluster
must go on reading it while the damaged peer is held with an error.
"""

from __future__ import annotations

import os
import shutil

import msgspec
import pytest

from workers.prevalence import codec, errors, journal
from workers.prevalence.cluster import folder

from tests.support import open_member
from .helpers import assert_converged, sync_until_quiet


def three(tmp_path, **kw):
    a = open_member(tmp_path, "alpha", **kw)
    a.execute("open_account", "x", 0)
    b = open_member(tmp_path, "beta", **kw)
    c = open_member(tmp_path, "gamma", **kw)
    sync_until_quiet([a, b, c])
    return a, b, c


def next_segment_of(shared, name: str, seq: int) -> str:
    return os.path.join(folder.journal_dir(str(shared), name), journal.format_segment_name(seq + 1))


def still_reads_gamma(a, c) -> None:
    """alpha goes on reading the healthy peer."""
    before = a.status()["cursors"]["gamma"]
    c.execute("deposit", "x", 1)
    report = a.sync()
    assert report["applied"].get("gamma") == 1
    assert a.status()["cursors"]["gamma"] == before + 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["symlink-to-dev-zero", "fifo", "sparse-5-gib", "directory"])
def test_a_hostile_segment_of_one_peer_stops_that_peer_only_with_an_error_naming_it(tmp_path, kind):
    a, b, c = three(tmp_path)
    b.execute("deposit", "x", 1)
    b.close()
    planted = next_segment_of(tmp_path, "beta", b.seq)
    if kind == "symlink-to-dev-zero":
        os.symlink("/dev/zero", planted)
    elif kind == "fifo":
        os.mkfifo(planted)
    elif kind == "directory":
        os.mkdir(planted)
    else:
        with open(planted, "wb") as f:
            f.truncate(5 << 30)
    report = a.sync()
    assert planted in report["errors"]["beta"]
    assert a.status()["cursors"]["beta"] == b.seq  # everything before the planted file was read
    still_reads_gamma(a, c)
    a.close(), c.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["symlink-to-dev-zero", "fifo", "sparse-5-gib"])
def test_a_hostile_progress_file_of_one_peer_is_reported_naming_it_and_never_blocks(tmp_path, kind):
    a, b, c = three(tmp_path)
    b.close()
    path = folder.progress_path(str(tmp_path), "beta")
    os.unlink(path)
    if kind == "symlink-to-dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        with open(path, "wb") as f:
            f.truncate(5 << 30)
    a.sync()
    status = a.status()
    assert status["lag"]["beta"] is None  # unknown, not a hang
    assert path in (status["last_error"] or "")
    still_reads_gamma(a, c)
    a.close(), c.close()


# -- item 8: nesting depth -------------------------------------------------------------------

DEEP = 100_000


def deep_record_payload(master: str, seq: int, hlc: int) -> bytes:
    """A record whose single argument is a list nested DEEP levels: valid MessagePack."""
    head = codec.encode_record(codec.Record(master, seq, hlc, "", "deposit", ("PLACEHOLDER",)))
    placeholder = msgspec.msgpack.encode("PLACEHOLDER")
    return head.replace(placeholder, b"\x91" * DEEP + b"\x90")


@pytest.mark.timeout(120)
def test_a_peer_record_nested_too_deep_is_corruption_naming_the_file_and_a_newcomer_still_opens(tmp_path):
    a, b, c = three(tmp_path)
    b.close()
    planted = next_segment_of(tmp_path, "beta", b.seq)
    with open(planted, "wb") as f:
        f.write(journal.frame(deep_record_payload("beta", b.seq + 1, b.own_horizon + 1), None))
    report = a.sync()
    assert planted in report["errors"]["beta"]
    still_reads_gamma(a, c)
    d = open_member(tmp_path, "delta")  # reads every journal at its first sync
    assert planted in d.sync()["errors"]["beta"]
    for m in (a, c, d):
        m.close()


# -- item 10: an old segment planted under the next segment's name ---------------------------

@pytest.mark.parametrize("reserve", [0, 4096], ids=["no-reserve (NFS)", "reserve"])
def test_an_old_signed_segment_replayed_under_the_next_name_is_named_at_once(tmp_path, reserve):
    key = b"cluster-key"
    a, b, c = three(tmp_path, cluster_key=key, segment_bytes_max=400, journal_reserve_bytes=reserve)
    for _ in range(12):
        b.execute("deposit", "x", 1)
    sync_until_quiet([a, b, c])
    segs = journal.list_segments(folder.journal_dir(str(tmp_path), "beta"))
    assert len(segs) >= 3
    b.execute("deposit", "x", 1)  # a record alpha has not read yet, in beta's current segment
    # An old, validly signed segment copied under the name the owner will roll to next.
    planted = next_segment_of(tmp_path, "beta", b.seq)
    shutil.copyfile(segs[0][1], planted)
    report = a.sync()
    assert planted in report["errors"].get("beta", ""), report
    still_reads_gamma(a, c)
    for m in (a, b, c):
        m.close()


# -- item 11: stray folders, a deleted master folder -----------------------------------------

def test_a_stray_empty_folder_under_masters_is_not_a_member(tmp_path):
    a = open_member(tmp_path, "alpha")
    a.execute("open_account", "x", 0)
    b = open_member(tmp_path, "beta")
    sync_until_quiet([a, b])
    os.makedirs(folder.master_dir(str(tmp_path), "stray"))
    a.execute("deposit", "x", 1)
    b.execute("deposit", "x", 2)
    sync_until_quiet([a, b])
    for m in (a, b):
        assert "stray" not in m.status()["counted"]
        assert m.status()["tentative"] == 0  # everything committed
    assert_converged(tmp_path, [a, b])
    a.close(), b.close()


def test_a_master_whose_folder_was_deleted_stops_acknowledging_and_its_peers_say_why(tmp_path):
    a = open_member(tmp_path, "alpha")
    a.execute("open_account", "x", 0)
    b = open_member(tmp_path, "beta")
    sync_until_quiet([a, b])
    shutil.rmtree(folder.master_dir(str(tmp_path), "beta"))
    b.sync()  # its next sync notices, at the latest
    with pytest.raises(errors.NotReady, match="beta"):
        b.execute("deposit", "x", 1)
    assert "beta" in (b.status()["last_error"] or "")
    a.execute("deposit", "x", 1)
    report = a.sync()
    assert "beta" in report["errors"] and "folder" in report["errors"]["beta"]
    b.close()
    a.close()
