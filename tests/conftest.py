"""Fixtures and hooks for the whole suite.

A private ``redis-server`` on a free loopback port is started once per session, when a
test first asks for it (`broker`); without the binary the tests fall back to the embedded
fakeredis server and say so plainly at the end of the run. Each test gets its own Redis
database number, so queues, fanout channels and status keys do not leak between tests.
PREVALENCE_TEST_BROKER=embedded forces the fakeredis fallback.

Check mode is on for every master (``PREVALENCE_CHECK_TRANSACTIONS=1``, below).

Every test has a time limit (pytest-timeout, ``timeout`` in pyproject.toml): a hang fails
that test fast instead of eating the run.
"""

from __future__ import annotations

import itertools
import os
import shutil

import pytest

from workers.local.broker import Broker, start_broker

# Check mode for every master the tests open, in this process and in the workers and
# children they start: each record is applied, undone and applied again, and the state
# compared each time (`workers.prevalence.replica`), so a change the undo log missed or a
# non-deterministic transaction fails the test that caused it.
os.environ.setdefault("PREVALENCE_CHECK_TRANSACTIONS", "1")

_databases = itertools.cycle(range(1, 16))
EMBEDDED_NOTE = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    note = config.stash.get(EMBEDDED_NOTE, None)
    if note:
        terminalreporter.write_line(note, yellow=True, bold=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory, request):
    # PREVALENCE_TEST_BROKER=embedded forces the fallback (to check it still works).
    kind = os.environ.get("PREVALENCE_TEST_BROKER") or (
        "redis-server" if shutil.which("redis-server") else "embedded")
    broker = start_broker(tmp_path_factory.mktemp("redis"), prefer=kind)
    if kind == "embedded":
        request.config.stash[EMBEDDED_NOTE] = (
            "NOTE: the Celery tier ran against the embedded fakeredis server, not a real "
            "Redis" + ("" if shutil.which("redis-server") else " (redis-server not found)")
            + ".")
    yield broker
    broker.stop()


@pytest.fixture
def broker(redis_server):
    """The session's Redis, on a database of this test's own."""
    import redis

    base = redis_server.url.rsplit("/", 1)[0]
    db = next(_databases)
    scoped = Broker(f"{base}/{db}", redis_server.kind, None, None, None)
    # Databases are reused after fifteen tests: start from an empty one, so no queued
    # message or status document of an earlier test leaks into this one.
    redis.Redis.from_url(scoped.url).flushdb()
    scoped.server = redis_server  # type: ignore[attr-defined]
    return scoped


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
