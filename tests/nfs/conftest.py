"""Fixtures of the real-NFS tier (marker ``nfs``): one lab per session (namespace, nfs-ganesha,
three UML guests each mounting the export with NFSv4.1 and NFSv3), a fresh cluster folder per
test, on each version in turn.

The lab costs a few seconds to boot and is shared by every test; each test gets fresh
driver processes in the guests (its finalizer resets them) and a folder of its own. Where the
lab cannot run (not root, packages missing and not installable) every test of the tier
skips with the same one-line reason. Whatever the lab started is stopped by process group
when the session ends, also after failures and on SIGTERM.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import signal

import pytest

from .cluster import NfsCluster
from .lab import LabUnavailable, NfsLab, remove_stale_labs, why_unavailable
from .remote import Hub, RemoteGuest, in_parallel

GUESTS = 3
#: Extra NFS mount options for every guest mount (default: none, the production defaults),
#: e.g. NFS_TIER_MOUNT_OPTS=lookupcache=positive to run the tier with that option.
MOUNT_OPTS = os.environ.get("NFS_TIER_MOUNT_OPTS", "")
#: NFS versions every scenario runs on (both are mounted in every guest).
VERSIONS = ["v4.1", "v3"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Report every test the lab could not run at one place, so that ``-ra`` folds them into
    one line (pytest otherwise prints one line per test function)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and isinstance(rep.longrepr, tuple) and SKIP_MARK in str(rep.longrepr[2]):
        rep.longrepr = (__file__, 1, rep.longrepr[2])


SKIP_MARK = "NFS tier not run: "


class Lab:
    """What the tests get: the lab, the hub and a handle per guest."""

    def __init__(self, lab: NfsLab, hub: Hub, guests: list[RemoteGuest]):
        self.lab = lab
        self.hub = hub
        self.guests = guests


@pytest.fixture(scope="session")
def nfs_lab():
    reason = why_unavailable()
    if reason:
        pytest.skip(SKIP_MARK + reason)
    remove_stale_labs()
    # Redis inside the namespace too, for the Celery variant (tests/nfs/test_celery.py).
    lab = NfsLab(guests=GUESTS, with_redis=shutil.which("redis-server") is not None)
    hub = None
    # A SIGTERM (CI's stop, a timeout wrapper) must still run the teardown below.
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    atexit.register(lab.stop)
    try:
        lab.start()
        hub = Hub(lab.listener)
        booted = lab.boot_guests(extra_mount_opts=MOUNT_OPTS)
        guests = [RemoteGuest(hub, g, log_tail=g.log_tail) for g in booted]
        in_parallel([lambda g=g: g.connection(deadline_s=90.0) for g in guests])
    except LabUnavailable as exc:
        if hub is not None:
            hub.stop()
        lab.stop()
        pytest.skip(f"{SKIP_MARK}the lab did not start: {str(exc).splitlines()[0]}")
    except BaseException:
        if hub is not None:
            hub.stop()
        lab.stop()
        raise
    try:
        yield Lab(lab, hub, guests)
    finally:
        for g in guests:
            try:
                g.request("quit", deadline_s=10.0)
            except Exception:  # noqa: BLE001 -- teardown goes on whatever a guest answers
                pass
        hub.stop()
        lab.stop()
        if signal.getsignal(signal.SIGTERM) is _raise_on_sigterm:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


@pytest.fixture(params=VERSIONS)
def nfs_cluster(request, nfs_lab):
    """A cluster folder of this test's own on the export, reached through one NFS version;
    the guests' drivers are reset afterwards (masters closed, fresh processes)."""
    # Unique per test and parameter (a long name is cut, so the digest keeps them apart).
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', request.node.originalname)[:60]}-{request.param}-{digest}"
    cluster = NfsCluster(request.param, name, nfs_lab.guests)
    yield cluster
    in_parallel([lambda g=g: g.restart_driver(deadline_s=60.0) for g in nfs_lab.guests])
