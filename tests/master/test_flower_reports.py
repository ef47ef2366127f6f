"""What Flower shows, in process: each master's own sync and snapshot task, their readable
reports, and the verdict that leads a refused write's result. The tasks run through
Celery's tracer (``Task.apply``) on a real master in a temp folder; no broker, no worker
(tests/e2e/test_flower.py and test_flower_browser.py run real workers and Flower)."""

from __future__ import annotations

import re

import pytest

from workers.master import runtime, tasks, verdicts
from workers.master.reports import hlc_iso
from workers.models.ledger import model as ledger
from workers.prevalence import Master
from workers.settings import load_settings

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z(\+\d+)?$")


@pytest.fixture
def master(tmp_path):
    """Master alpha of the ledger, installed as this process's runtime (no Redis)."""
    settings = load_settings({"PREVALENCE_MASTER": "alpha", "CELERY_BROKER_URL": "memory://",
                              "PREVALENCE_SHARED_DIR": str(tmp_path)}, use_env_file=False)
    opened = Master.open(ledger, str(tmp_path), "alpha", fsync="never")
    current = runtime.MasterRuntime(settings, opened, "alpha@test")
    current.state = "running"
    runtime.install(current)
    yield current
    runtime.uninstall()
    opened.close()


@pytest.fixture
def sent(monkeypatch):
    """The own tasks a master queues (captured instead of sent to a broker)."""
    calls: list[tuple[str, dict]] = []
    for task in (tasks.sync, tasks.snapshot):
        monkeypatch.setattr(task, "apply_async",
                            lambda *a, _name=task.name, **kw: calls.append((_name, kw)))
    return calls


def _run(task, **options):
    result = task.apply(**options)
    assert result.successful(), result.traceback
    return result.get()


def test_a_broadcast_sync_request_queues_this_masters_own_sync_under_an_id_of_its_own(master, sent):
    reply = _run(tasks.broadcast_sync, task_id="tick-1")
    assert reply == {"master": "alpha", "queued": "tick-1.alpha"}
    [(name, options)] = sent
    assert name == "prevalence.sync"
    assert options["task_id"] == "tick-1.alpha" and options["queue"] == "master.alpha"


def test_a_master_queues_one_sync_at_a_time_until_it_has_started(master, sent):
    _run(tasks.broadcast_sync, task_id="tick-1")
    skipped = _run(tasks.broadcast_sync, task_id="tick-2")
    assert skipped["queued"] is None and "tick-1.alpha" in skipped["skipped"]
    _run(tasks.sync, task_id="tick-1.alpha")  # the queued sync runs
    assert _run(tasks.broadcast_sync, task_id="tick-3")["queued"] == "tick-3.alpha"
    assert [options["task_id"] for _, options in sent] == ["tick-1.alpha", "tick-3.alpha"]


def test_a_queued_sync_that_never_starts_counts_as_lost_after_the_bound(master, sent):
    _run(tasks.broadcast_sync, task_id="tick-1")
    task_id, sent_at = master.pending_own["sync"]
    assert master.own_task_due("sync", now_s=sent_at + master.own_task_pending_max_s / 2) == task_id
    assert master.own_task_due("sync", now_s=sent_at + master.own_task_pending_max_s + 1) is None


def test_a_broadcast_snapshot_request_queues_this_masters_own_snapshot(master, sent):
    assert _run(tasks.broadcast_snapshot, task_id="s-1") == {"master": "alpha", "queued": "s-1.alpha"}
    assert sent[0][0] == "prevalence.snapshot"


def test_the_sync_report_reads_as_times_counts_and_the_digest(master):
    master.master.execute("open_account", "a", 10)
    report = _run(tasks.sync, task_id="t.alpha")
    assert list(report)[:9] == ["master", "frontier", "lag", "tentative", "rebased", "rebases",
                                "reversed", "reversed_total", "digest"]
    assert report["master"] == "alpha"
    assert ISO_MS.match(report["frontier"]), report["frontier"]
    assert report["frontier"] == hlc_iso(report["frontier_hlc"])
    assert report["lag"] == {} and report["tentative"] == 0 and report["reversed"] == 0
    assert report["applied"] == {}
    # A sole master's state holds still after one sync: the next report carries the digest.
    assert _run(tasks.sync)["digest"] == master.master.status()["digest"]


def test_the_snapshot_report_gives_its_frontier_as_a_time_and_its_path(master):
    master.master.execute("open_account", "a", 10)
    master.master.sync()
    report = _run(tasks.snapshot)
    assert report["master"] == "alpha" and report["path"].endswith(".snap")
    assert report["frontier"] == hlc_iso(report["frontier_hlc"]) and ISO_MS.match(report["frontier"])


def test_hlc_iso_shows_the_physical_time_and_a_nonzero_logical_counter():
    ms = 1_764_549_662_123  # 2025-12-01T00:41:02.123Z
    assert hlc_iso(ms << 16) == "2025-12-01T00:41:02.123Z"
    assert hlc_iso((ms << 16) + 2) == "2025-12-01T00:41:02.123Z+2"
    assert hlc_iso(0) is None and hlc_iso(None) is None and hlc_iso(True) is None


def test_a_refused_write_leads_its_flower_result_with_the_verdict(master):
    master.master.execute("open_account", "a", 10)
    ok = _run(tasks.execute, args=["deposit", ["a", 1]])
    assert ok["status"] == "ok" and verdicts.verdict(ok) is None
    refused = _run(tasks.execute, args=["withdraw", ["a", 100]])
    # The document is the client's contract: unchanged, and the task succeeded.
    assert refused["status"] == "rejected" and refused["error_type"] == "Rejected"
    state = "committed" if refused["committed"] else "tentative"
    assert verdicts.verdict(refused) == f"REJECTED: {refused['error']} ({state}, record {refused['record']})"


def test_a_batch_with_refused_items_says_how_many():
    outcomes = [{"status": "ok"}, {"status": "rejected"}, {"status": "rejected"}, {"status": "error"}]
    assert verdicts.verdict({"master": "alpha", "outcomes": outcomes}) == "FAILED 1 of 4, REJECTED 2 of 4"
    assert verdicts.verdict({"master": "alpha", "outcomes": [{"status": "ok"}]}) is None


def test_the_verdict_reaches_only_the_succeeded_event_of_its_own_task():
    sent_events: list[tuple[str, dict]] = []

    class Recording(verdicts.VerdictRequest):
        def __init__(self, task_id):
            self._id = task_id

        id = property(lambda self: self._id)

    def base_send(self, type, **fields):
        sent_events.append((type, fields))

    original = verdicts.Request.send_event
    verdicts.Request.send_event = base_send
    try:
        verdicts.note("t1", {"status": "rejected", "error": "no", "record": "alpha:3", "committed": True})
        Recording("t2").send_event("task-succeeded", result="{...}")   # another task: untouched
        verdicts.note("t1", {"status": "rejected", "error": "no", "record": "alpha:3", "committed": True})
        Recording("t1").send_event("task-started")                      # not the success event
        Recording("t1").send_event("task-succeeded", result="{...}")
        Recording("t1").send_event("task-succeeded", result="{...}")   # taken once
    finally:
        verdicts.Request.send_event = original
    assert [fields.get("result") for _, fields in sent_events] == [
        "{...}", None, "REJECTED: no (committed, record alpha:3) {...}", "{...}"]
