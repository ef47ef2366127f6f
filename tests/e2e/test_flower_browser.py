"""Flower's own pages in headless Chromium: every master's sync is a row of its own, with a
readable report; a refused write says REJECTED; the worker page says Prefetch Count 1.

Three real masters, beat (sync every 0.5 s) and Flower on a free loopback port, all on the
test's Redis. Chromium renders the pages as an operator's browser would (the task list
is filled by JavaScript from Flower's datatable endpoint): ``--dump-dom`` gives the DOM the
test reads, ``--screenshot`` keeps a picture of the task list beside it (in the test's
temp folder, printed on failure). Debian's ``chromium`` (`bin/install-test-packages
browser`); without it the test skips.
"""

from __future__ import annotations

import ast
import html
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from workers.local.cluster import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (bin/install-test-packages browser)", allow_module_level=True)

pytestmark = pytest.mark.celery

#: Deadline for one Chromium run (seconds); a page takes 1-3 s here.
CHROMIUM_RUN_S = 60
#: Virtual time Chromium gives a page's scripts before it dumps the DOM (ms): the task
#: list is filled by an XHR after load.
SCRIPT_BUDGET_MS = 3000
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z(\+\d+)?$")


class Browser:
    """Headless Chromium with a profile of its own under `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.profile = folder / "chromium-profile"

    def _run(self, *args: str) -> str:
        command = [CHROMIUM, "--headless", "--disable-gpu", "--no-first-run",
                   # Chromium's sandbox refuses to run as root (CI runs the suite as root).
                   "--no-sandbox", f"--user-data-dir={self.profile}", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_RUN_S)
        assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}"
        return done.stdout

    def dom(self, url: str) -> str:
        """The page's DOM after its scripts ran."""
        return self._run(f"--virtual-time-budget={SCRIPT_BUDGET_MS}", "--dump-dom", url)

    def screenshot(self, url: str, name: str) -> Path:
        path = self.folder / name
        self._run(f"--virtual-time-budget={SCRIPT_BUDGET_MS}", "--window-size=1400,1000",
                  f"--screenshot={path}", url)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no PNG screenshot at {path}"
        return path


def page_text(dom: str) -> str:
    """The visible text of a dumped page, one space between words."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def sync_rows(dom: str) -> dict[str, tuple[str, str]]:
    """Rows of the task list that are a master's own sync: master -> (task id, worker
    page path). A row is ``<tr id=TASK-ID>`` with the task name and a worker link."""
    rows = {}
    for task_id, body in re.findall(r'<tr id="([^"]+)"[^>]*>(.*?)</tr>', dom, flags=re.S):
        worker = re.search(r'href="(/worker/([^"%]+)%40[^"]*)"', body)
        if ">prevalence.sync<" in body and worker and task_id.endswith(f".{worker.group(2)}"):
            rows.setdefault(worker.group(2), (html.unescape(task_id), html.unescape(worker.group(1))))
    return rows


def task_result(text: str) -> str:
    """The Result field of a task page's text."""
    found = re.search(r" Result (.*?) Received ", text)
    assert found, f"no Result on the task page: {text[:1500]}"
    return found.group(1)


def test_flower_shows_each_masters_sync_with_a_readable_report(make_cluster, tmp_path, capsys):
    from tests.e2e.conftest import make_client
    from tests.e2e.helpers import converge

    cluster = make_cluster()
    cluster.start_masters()
    url = cluster.start_flower()
    cluster.start_beat()
    client = make_client(cluster)
    browser = Browser(tmp_path)
    task_list = f"{url}/tasks?name=prevalence.sync"
    # Flower knows only the tasks whose events it saw: before writing, wait until it shows
    # syncs (its event capture starts a moment after its web server answers).
    wait_until(lambda: sync_rows(browser.dom(task_list)) or None, 45, "Flower to show the first syncs",
               poll_s=0.5)
    client.execute("open_account", "empty", 0, master="alpha")
    refused = client.execute_outcome("withdraw", "empty", 5, master="alpha")
    assert refused["status"] == "rejected"
    # Once both writes are committed everywhere, every later report has a frontier (before
    # anything is committed it is None) and lag 0.
    converge(cluster)

    # The task list, as rendered: a sync row of its own for every master.
    seen: dict = {}

    def every_master_has_a_row():
        seen["rows"] = sync_rows(browser.dom(task_list))
        return seen["rows"] if set(seen["rows"]) >= set(cluster.masters) else None

    rows = wait_until(every_master_has_a_row, 45, "a sync row of every master in Flower's task list",
                      poll_s=0.5, on_timeout=lambda: f"rows found: {seen.get('rows')}")
    picture = browser.screenshot(task_list, "flower-syncs.png")
    print(f"Flower's task list: {picture}")
    assert len({task_id for task_id, _ in rows.values()}) == len(cluster.masters)

    # Each row's page: that master's report, readable.
    for master in cluster.masters:
        task_id, worker_path = rows[master]
        text = page_text(browser.dom(f"{url}/task/{urllib.parse.quote(task_id)}"))
        assert " Name prevalence.sync " in text and " Status SUCCESS " in text, text[:1500]
        report = ast.literal_eval(task_result(text))
        peers = set(cluster.masters) - {master}
        assert report["master"] == master
        assert ISO_MS.match(report["frontier"]), report["frontier"]
        assert set(report["lag"]) == peers and all(isinstance(v, int) for v in report["lag"].values())
        for key in ("tentative", "rebases", "reversed", "reversed_total"):
            assert isinstance(report[key], int), (key, report)
        assert "digest" in report

    # A refused write is a successful task whose result says REJECTED, first.
    text = page_text(browser.dom(f"{url}/task/{refused['rid']}"))
    assert task_result(text).startswith(f"REJECTED: {refused['error']}"), text[:1500]

    # The worker page: one message reserved at a time, as the README says.
    text = page_text(browser.dom(f"{url}{rows['alpha'][1]}"))
    prefetch = re.search(r" Prefetch Count (\d+) ", text)
    assert prefetch, f"no Prefetch Count on the worker page: {text[:1500]}"
    assert prefetch.group(1) == "1", f"the worker page shows Prefetch Count {prefetch.group(1)}"
