"""The deployment files say what the code does: the environment example loads, the
Procfile runs the documented cluster, and the systemd units are valid units.

(The compose file needs a Docker engine, which these machines do not run.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import workers.settings
from workers.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = ("prevalence-master@.service", "prevalence-beat.service", "prevalence-flower.service")


def _documented_variables() -> set[str]:
    return set(re.findall(r"^((?:PREVALENCE|CELERY)_[A-Z_]+)$", workers.settings.__doc__, re.M))


def test_the_environment_example_sets_every_documented_variable_and_loads(tmp_path):
    example = ROOT / "config" / "prevalence.env.example"
    assigned = set(re.findall(r"^([A-Z_]+)=", example.read_text(), re.M))
    # Per instance (the unit sets it) or the file itself: not in the file.
    missing = _documented_variables() - assigned - {"PREVALENCE_MASTER", "PREVALENCE_ENV_FILE"}
    assert not missing, f"config/prevalence.env.example does not show {sorted(missing)}"
    key = tmp_path / "cluster.key"
    key.write_text("k" * 32)
    settings = load_settings({"PREVALENCE_ENV_FILE": str(example),
                              "PREVALENCE_CLUSTER_KEY_FILE": str(key)}, cwd=tmp_path)
    assert (settings.fsync, settings.sync_overlap, settings.journal_reserve_bytes) == ("always", True, None)
    assert settings.broker_url == "redis://redis.internal:6379/0"


def test_the_procfile_runs_three_solo_masters_one_beat_and_flower_on_loopback():
    entries = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert sorted(entries) == ["alpha", "beat", "beta", "flower", "gamma"]
    for name in ("alpha", "beta", "gamma"):
        command = entries[name]
        assert f"PREVALENCE_MASTER={name}" in command and "-P solo" in command
        assert f"-n {name}@%h" in command
    assert "--address=127.0.0.1" in entries["flower"]


def test_the_master_unit_states_its_non_default_settings():
    unit = (DEPLOY / "prevalence-master@.service").read_text()
    for setting in ("-P solo", "KillSignal=SIGTERM", "TimeoutStopSec=", "RestartPreventExitStatus=78"):
        assert setting in unit, setting


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_systemd_units_verify(tmp_path):
    celery = Path(sys.executable).with_name("celery")
    for name in UNITS:
        text = (DEPLOY / name).read_text().replace("/opt/prevalence/.venv/bin/celery", str(celery))
        (tmp_path / name).write_text(text)
    units = [str(tmp_path / "prevalence-master@alpha.service"), str(tmp_path / UNITS[1]),
             str(tmp_path / UNITS[2])]
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    # Users, folders and the environment file belong to the target host; the unit syntax,
    # directives and values are what is checked here.
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if line.strip() and "prevalence" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
