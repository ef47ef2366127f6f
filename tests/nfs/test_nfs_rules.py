"""The NFS rules of DESIGN section 4, checked on real NFS clients: what one master writes,
another discovers by its next syncs -- however the other's client caches attributes and
lookups. Each test here runs without the harness's workarounds.

A "few syncs" below is a liveness bound, not a timing: a reader that reopens by path and
lists directories sees another client's fsynced bytes and new names at once (measured:
under 0.1 s); a reader that trusts a cached lookup waits for the directory attribute cache
to expire (25 to 60 s). The bound (`FEW_SYNCS_S`) sits far between the two.
"""

from __future__ import annotations

import time

import pytest

from .conftest import MOUNT_OPTS

pytestmark = pytest.mark.nfs

FEW_SYNCS_S = 5.0


def _reads_within(member, peer: str, seq: int, deadline_s: float = FEW_SYNCS_S) -> bool:
    end = time.monotonic() + deadline_s
    while True:
        member.call("sync")
        if member.call("status")["cursors"].get(peer, 0) >= seq:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.1)


def negative_lookups_cached() -> bool:
    """Whether the guests cache negative lookups (the default, ``lookupcache=all``): the
    two folder bugs below show only then (``NFS_TIER_MOUNT_OPTS=lookupcache=positive``)."""
    return not any(o in MOUNT_OPTS for o in ("lookupcache=positive", "lookupcache=pos", "lookupcache=none"))


def xfail_on_v41(request, cluster, reason: str) -> None:
    """Strict xfail on NFSv4.1 only: the NFSv3 client revalidates the cached negative lookup
    at once here (its directory's change shows in the reply attributes), so the same test
    passes on v3 and must keep passing."""
    if cluster.mount == "v4.1" and negative_lookups_cached():
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


NEW_JOURNAL_DIR_BUG = (
    "engine bug: workers/prevalence/journal.py list_segments (called by cluster/reader.py "
    "JournalReader._read) lists masters/<peer>/journal by path; when the peer created that folder "
    "after this client looked for it (a joiner gets its journal only when its join completes), "
    "the NFSv4.1 client answers ENOENT from its cached negative lookup for ~30 s (acdirmin), so "
    "the peer's records stay unread. Fix: on ENOENT, list masters/<peer>/ (the parent) and retry")


def test_journal_directory_created_after_a_peer_looked_is_found_by_listing(request, nfs_cluster):
    c = nfs_cluster
    xfail_on_v41(request, c, NEW_JOURNAL_DIR_BUG)
    g0, g1, _g2 = c.guests
    a = c.open(g0, "a")
    c.execute(a, "open_account", "x", 10)
    b = c.open(g1, "b")          # joining: masters/b/ exists, masters/b/journal/ not yet
    a.call("sync")               # a acknowledges b, and looks for b's journal: not there
    deadline = time.monotonic() + 30
    while not b.call("sync")["joined"]:   # b completes its join: creates journal/
        assert time.monotonic() < deadline, "b never joined"
        a.call("sync")
    c.execute(b, "deposit", "x", 5, rid="b-deposit")   # durable on the server when it returns
    seq_b = b.call("status")["seq"]
    assert _reads_within(a, "b", seq_b), (
        f"a did not read b's records up to seq {seq_b} within {FEW_SYNCS_S} s: "
        f"{a.call('status')['cursors']}")


RETIRED_FOLDER_BUG = (
    "engine bug: workers/prevalence/cluster/membership.py read_retired (called by "
    "cluster/syncing.py Syncing.sync, step 1) lists cluster/retired by path; a member that "
    "looked before the first retirement created that folder gets ENOENT from its cached negative "
    "lookup for ~30 s (NFSv3 and v4.1), so the retired master keeps holding its frontier back. "
    "Fix: create cluster/retired/ when founding (membership.claim_founder), and list cluster/ "
    "on ENOENT")


def test_retirement_is_seen_by_members_that_looked_before_the_retired_folder_existed(request, nfs_cluster):
    c = nfs_cluster
    if negative_lookups_cached():
        request.applymarker(pytest.mark.xfail(strict=True, reason=RETIRED_FOLDER_BUG))
    g0, g1, g2 = c.guests
    a = c.open(g0, "a")
    c.execute(a, "open_account", "x", 10)
    b = c.open(g1, "b")
    gone = c.open(g2, "gone")
    c.sync_until_joined()          # (with the harness's listing of the journal folders)
    gone.call("close")
    gone.open = False
    c.execute(a, "deposit", "x", 1)
    c.sync_all([a, b])             # both look for cluster/retired: not there yet
    # The operator retires `gone` from a third host: neither a nor b wrote the folder.
    g2.request("retire", mount=c.mount, cluster=c.cluster, name="gone")
    end = time.monotonic() + FEW_SYNCS_S
    while True:
        c.sync_all([a, b])
        seen = [m.call("status")["retired"] for m in (a, b)]
        if all("gone" in r for r in seen):
            break
        assert time.monotonic() < end, f"retirement not seen within {FEW_SYNCS_S} s: {seen}"
        time.sleep(0.1)


ESTALE_PROGRESS_BUG = (
    "engine bug: workers/prevalence/cluster/folder.py read_small (used by progress.read_progress, "
    "so by Master.status, and by Master.sync for garbage collection and joining) catches only "
    "FileNotFoundError; on NFSv3 a read of a peer's progress racing with the peer's rename of a "
    "new one over it fails with ESTALE (the old file handle is gone), which escapes sync() and "
    "status(). Fix: in read_small, reopen by path on ESTALE (bounded retries), as the journal "
    "reader already does for segments")


def test_reading_a_peer_progress_while_it_is_replaced_is_not_an_error(request, nfs_cluster):
    c = nfs_cluster
    if c.mount == "v3":
        request.applymarker(pytest.mark.xfail(strict=True, reason=ESTALE_PROGRESS_BUG))
    g0, g1, _g2 = c.guests
    a = c.open(g0, "a")
    c.execute(a, "open_account", "x", 10)
    b = c.open(g1, "b")
    c.sync_until_joined()
    # a republishes its progress (temp + rename) many times a second while b reads it.
    from .remote import in_parallel
    published, reads = in_parallel([
        lambda: a.call("publish_loop", account="x", duration_s=4.0),
        lambda: b.call("status_loop", duration_s=4.0),
    ])
    assert published > 20 and reads["calls"] > 20, (published, reads)
    assert reads["errors"] == {}, reads
