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


def test_the_demo_says_it_reuses_a_folder_and_its_hints_work_in_a_fresh_shell(tmp_path, broker):
    import signal
    import threading

    from workers.models.ledger import model
    from workers.prevalence import Master

    # An earlier run's folder: one master's state.
    shared = tmp_path / "var" / "shared"
    shared.mkdir(parents=True)
    Master.open(model, str(shared), "alpha").close()
    env = dict(os.environ, CELERY_BROKER_URL=broker.url, PYTHONPATH=str(ROOT))
    demo = subprocess.Popen([sys.executable, "-m", "workers.client.cli", "demo", "--root",
                             str(tmp_path / "var"), "--no-flower", "--transactions", "12"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(tmp_path))
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in demo.stdout:
            lines.append(line)
            if "press Ctrl-C to stop" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(240), "".join(lines[-40:])
        text = "".join(lines)
        assert "reusing the shared folder of an earlier run" in text and "(masters alpha)" in text
        assert "--fresh" in text
        start = next(i for i, line in enumerate(lines) if "Try, in another shell" in line)
        hints = [line.strip() for line in lines[start + 1:] if line.startswith("    ")]
        export, commands = hints[0], hints[1:]
        assert export.startswith("export ") and len(commands) == 3, hints
        # A fresh shell: the venv is not on PATH, no PYTHONPATH, nothing of this process.
        bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
        for command in commands:
            done = subprocess.run(["bash", "-c", f"{export}\n{command}"], env=bare,
                                  capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
            expected = (0, 3) if command.endswith(" status") else (0,)  # 3: still settling
            assert done.returncode in expected, (command, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr
        assert "MASTER" in done.stdout and "alpha" in done.stdout
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(120)
        reader.join(30)
    assert "masters stopped (warm shutdown" in "".join(lines)
