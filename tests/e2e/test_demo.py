"""The quick start's demo, unattended: workload, convergence, everything stopped, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.celery

ROOT = Path(__file__).resolve().parents[2]


def test_the_unattended_demo_converges_stops_everything_and_exits_0(tmp_path, broker):
    env = dict(os.environ, CELERY_BROKER_URL=broker.url, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "workers.client.cli", "demo", "--unattended",
                           "--root", str(tmp_path / "var"), "--flower-port", "0",
                           "--transactions", "24"],
                          env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CONVERGED: 3 master(s)" in done.stdout
    assert "== every master's digest" in done.stdout
    assert "Flower: http://127.0.0.1:" in done.stdout
    assert "masters stopped (warm shutdown" in done.stdout
    assert (tmp_path / "var" / "shared" / "masters" / "alpha").is_dir()
    # Everything it started is gone (it adopted the external broker and left it running):
    # no process still works in the demo's folder.
    assert _processes_in(tmp_path) == []


def _processes_in(folder: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(folder)):
            found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:120]!r}")
    return found
