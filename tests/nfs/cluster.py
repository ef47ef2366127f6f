"""A test cluster on the NFS lab: one master per guest, all on one shared folder reached through
the same NFS version, plus the checks every scenario ends with (DESIGN section 6: when every
master reports ``tentative == 0`` and the same cursors, their digests are equal and equal to
``verify``'s; and no acknowledged transaction is lost).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .remote import DriverGone, RemoteGuest, in_parallel

#: Masters' options on NFS: durable commits (production), and a lease TTL short enough that
#: nothing in the tier waits long for one.
MASTER_OPTIONS = {"fsync": "always", "lease_ttl_s": 30.0}
CONVERGE_S_MAX = 90.0


@dataclass
class Member:
    guest: RemoteGuest
    name: str
    options: dict = field(default_factory=dict)
    open: bool = False

    def call(self, op: str, **kw):
        return self.guest.request(op, master=self.name, **kw)


class NfsCluster:
    """Masters of one test, on ``/run/nfs/<mount>/<cluster>`` in their guests."""

    def __init__(self, mount: str, cluster: str, guests: list[RemoteGuest]):
        self.mount = mount
        self.cluster = cluster
        self.guests = guests
        self.members: list[Member] = []
        self.acked: dict[str, str] = {}   # request id -> status when acknowledged

    # -- membership --------------------------------------------------------------------

    def open(self, guest: RemoteGuest, name: str, *, deadline_s: float = 60.0, **options) -> Member:
        opts = dict(MASTER_OPTIONS, **options)
        guest.request("open", mount=self.mount, cluster=self.cluster, master=name, deadline_s=deadline_s, **opts)
        member = next((m for m in self.members if m.name == name), None)
        if member is None:
            member = Member(guest, name, opts)
            self.members.append(member)
        member.guest, member.options, member.open = guest, opts, True
        return member

    def reopen(self, member: Member, *, deadline_s: float = 60.0) -> None:
        """Open a member again in its guest's current driver (after a kill -9)."""
        self.open(member.guest, member.name, deadline_s=deadline_s, **member.options)

    def live(self) -> list[Member]:
        return [m for m in self.members if m.open]

    # -- work ----------------------------------------------------------------------------

    def execute(self, member: Member, tx: str, *args, rid: str | None = None) -> dict:
        out = member.call("execute", tx=tx, args=list(args), rid=rid)
        if rid is not None:
            self.acked[rid] = out["status"]
        return out

    def sync_all(self, members=None) -> list[dict]:
        members = members or self.live()
        return in_parallel([lambda m=m: m.call("sync") for m in members])

    def sync_until_joined(self, deadline_s: float = 60.0) -> None:
        end = time.monotonic() + deadline_s
        while True:
            reports = self.sync_all()
            if all(r["joined"] for r in reports):
                return
            if time.monotonic() > end:
                raise AssertionError(f"not every master joined within {deadline_s:.0f} s: {reports}")

    def retire(self, operator: RemoteGuest, name: str) -> dict:
        """`prevalence retire NAME` run on host `operator`, through NFS."""
        return operator.request("retire", mount=self.mount, cluster=self.cluster, name=name)

    def workload(self, member: Member, **kw) -> dict:
        """Run a workload on `member`; every acknowledged transaction lands in `acked`.
        Returns the driver's counts, or ``{"killed": True}`` if the driver died (was killed)."""
        def on_event(ev):
            self.acked[ev["ack"]] = ev["status"]
        try:
            return member.call("workload", on_event=on_event, deadline_s=kw.pop("deadline_s", 120.0), **kw)
        except DriverGone:
            member.open = False
            return {"killed": True}

    # -- convergence -----------------------------------------------------------------

    def converge(self, members=None, *, deadline_s: float = CONVERGE_S_MAX) -> list[dict]:
        """Sync every member (all at once, round after round) until each reports nothing
        tentative and they all hold the same cursors for one another. Returns their statuses.

        Bounded by `deadline_s`, not by a number of rounds: how long NFS takes to show one
        master's files to another is exactly what is under test.
        """
        members = members or self.live()
        names = {m.name for m in members}
        end = time.monotonic() + deadline_s
        rounds = 0
        while True:
            rounds += 1
            reports = self.sync_all(members)
            statuses = in_parallel([lambda m=m: m.call("status") for m in members])
            cursors = [{k: v for k, v in s["cursors"].items() if k in names} for s in statuses]
            quiet = not any(any(r["applied"].values()) or r["ticked"] for r in reports)
            if (quiet and all(s["tentative"] == 0 and s["joined"] for s in statuses)
                    and all(c == cursors[0] for c in cursors)):
                return statuses
            if time.monotonic() > end:
                raise AssertionError(f"no convergence after {rounds} rounds ({deadline_s:.0f} s): "
                                     + "\n".join(f"{s['master']}: tentative={s['tentative']} cursors={s['cursors']} "
                                                 f"errors={s['peer_errors']} held={s['held']} "
                                                 f"last_error={s['last_error']}" for s in statuses))
            time.sleep(0.1)

    def assert_converged(self, members=None, *, verifier: Member | None = None) -> dict:
        """Converge, then check DESIGN section 6's sentence and that nothing acknowledged is
        lost. Returns `verify`'s answer (computed in a guest, through NFS)."""
        members = members or self.live()
        statuses = self.converge(members)
        for s in statuses:
            assert s["tentative"] == 0, s
            assert not s["peer_errors"], (s["master"], s["peer_errors"])
            assert not {m: h for m, h in s["held"].items() if not h.startswith("retired")}, (s["master"], s["held"])
        verifier = verifier or members[0]
        ref = verifier.guest.request("verify", mount=self.mount, cluster=self.cluster)
        assert ref["deterministic"], ref
        assert not ref["errors"], ref["errors"]
        digests = {s["master"]: s["digest"] for s in statuses}
        assert set(digests.values()) == {ref["digest"]}, (digests, ref)
        self.assert_nothing_acknowledged_lost(members)
        return ref

    def assert_nothing_acknowledged_lost(self, members) -> None:
        """Every acknowledged request id has a committed outcome on every member, the same
        record everywhere (its final status may differ from the tentative answer: a rebase
        can refuse a withdrawal that passed tentatively, DESIGN section 3)."""
        rids = sorted(self.acked)
        if not rids:
            return
        answers = in_parallel([lambda m=m: m.call("outcomes", rids=rids) for m in members])
        for m, outcomes in zip(members, answers):
            lost = [rid for rid in rids if outcomes.get(rid) is None]
            assert not lost, f"{m.name} has no outcome for {len(lost)} acknowledged requests, e.g. {lost[:5]}"
            uncommitted = [rid for rid in rids if not outcomes[rid]["committed"]]
            assert not uncommitted, f"{m.name}: {len(uncommitted)} outcomes not committed, e.g. {uncommitted[:5]}"
        first = answers[0]
        for m, outcomes in zip(members[1:], answers[1:]):
            differ = [rid for rid in rids if outcomes[rid] != first[rid]]
            assert not differ, f"{m.name} and {members[0].name} disagree on {differ[:5]}"

    # -- teardown ----------------------------------------------------------------------

    def close_all(self) -> None:
        for m in self.live():
            try:
                m.call("close", deadline_s=30.0)
            finally:
                m.open = False
