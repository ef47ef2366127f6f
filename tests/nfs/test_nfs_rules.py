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


def xfail_on_v41(request, cluster, reason: str) -> None:
    """Strict xfail on NFSv4.1 only: the NFSv3 client revalidates the cached negative lookup
    at once here (its directory's change shows in the reply attributes), so the same test
    passes on v3 and must keep passing."""
    if cluster.mount == "v4.1":
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
