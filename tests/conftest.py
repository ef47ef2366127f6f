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


def pytest_generate_tests(metafunc):
    # A test marked `faultfs` runs twice: on a local folder, and with each master behind a
    # faultfs host of its own (tests/faultfs). tests/cluster/conftest.py does it for the
    # tests it also runs on two ledgers.
    if (metafunc.definition.get_closest_marker("faultfs") and "state_model" not in metafunc.fixturenames
            and "tmp_path" in metafunc.fixturenames):
        metafunc.parametrize("shared_fs", ["local", "faultfs"], indirect=True)


@pytest.fixture(autouse=True)
def shared_fs(request):
    """``local``, or (the ``faultfs`` variant) the `Hosts` through which every master of this
    test reaches its folder: `tests.support.open_master` routes each master name to a FUSE
    mount of its own, with the NFS-like faults on (`tests.faultfs.hosts.NFS_LIKE`). Where
    FUSE cannot be used, that variant skips with one line saying why. Every mount is
    unmounted afterwards, also when the test fails."""
    kind = getattr(request, "param", "local")
    if kind == "local":
        yield kind
        return
    from tests import support
    from tests.faultfs.hosts import Hosts
    from tests.faultfs.mount import FuseUnavailable, why_unavailable
    reason = why_unavailable()
    if reason:
        pytest.skip(f"faultfs not run: {reason}")
    tmp_path = request.getfixturevalue("tmp_path")
    hosts = Hosts(tmp_path, request.getfixturevalue("tmp_path_factory").mktemp("hosts"))
    key = os.path.realpath(tmp_path)
    support.HOSTS[key] = hosts
    try:
        try:
            hosts.mount_for("(first host)")  # mount one now: a FUSE that cannot mount skips here
        except FuseUnavailable as exc:
            pytest.skip(f"faultfs not run: {exc}")
        hosts.host_of.clear()
        yield hosts
    finally:
        support.HOSTS.pop(key, None)
        hosts.stop()
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
