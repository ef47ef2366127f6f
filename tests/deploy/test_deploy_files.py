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


def _deploy_readme() -> str:
    return (DEPLOY / "README.md").read_text()


def test_every_documentation_path_of_the_units_is_installed_by_a_step_of_the_guide():
    guide = _deploy_readme()
    for name in UNITS:
        unit = (DEPLOY / name).read_text()
        paths = [p for line in re.findall(r"^Documentation=(.*)$", unit, re.M)
                 for p in re.findall(r"file://(\S+)", line)]
        assert paths, f"{name} has no Documentation= path"
        for path in paths:
            assert re.search(rf"^install .*{re.escape(path)}$", guide, re.M), (
                f"{name} points to {path}, which no `install` step of deploy/README.md creates")


def test_the_key_file_mode_is_the_same_in_the_guide_and_the_environment_example():
    example = (ROOT / "config" / "prevalence.env.example").read_text()
    guide = _deploy_readme()
    assert "chmod 0440 /etc/prevalence/cluster.key" in guide and "chown root:prevalence" in guide
    assert "mode 0440, owner root, group prevalence" in example
    assert "0400" not in example and "0400" not in guide


def _reason_fragments() -> list[str]:
    """The fixed text of every NOT CONVERGED reason `workers.client.monitor` can give: the
    longest literal part of each f-string added to the reasons (placeholders removed)."""
    import ast

    import workers.client.monitor as monitor

    tree = ast.parse(Path(monitor.__file__).read_text())
    fragments = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.JoinedStr, ast.Constant)) or not _is_reason(node, tree):
            continue
        parts = ([v.value for v in node.values if isinstance(v, ast.Constant)]
                 if isinstance(node, ast.JoinedStr) else [node.value])
        longest = max(parts, key=len).strip()
        if len(longest) >= 6:
            fragments.append(longest)
    return fragments


def _is_reason(node, tree) -> bool:
    import ast

    for parent in ast.walk(tree):
        if (isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute)
                and parent.func.attr == "append" and isinstance(parent.func.value, ast.Name)
                and parent.func.value.id == "reasons"):
            # The text itself, or the first operand of a concatenation ("..." + detail).
            tops = [arg.left if isinstance(arg, ast.BinOp) else arg for arg in parent.args]
            if any(node is top for top in tops):
                return True
        if isinstance(parent, ast.List) and any(node is elt for elt in parent.elts):
            return isinstance(node, ast.Constant) and "reported" in node.value
    return False


def test_the_runbook_says_what_to_do_for_every_not_converged_reason_the_code_gives():
    fragments = _reason_fragments()
    assert len(fragments) >= 10, fragments  # the parse found them
    runbook = _deploy_readme().split("### Runbook: `NOT CONVERGED` reasons", 1)[1]
    missing = [f for f in fragments if f.replace("`", "") not in runbook.replace("`", "")]
    assert not missing, f"deploy/README.md's runbook lacks {missing}"
    # The states a worker reports besides ready and running ("NAME is <state>").
    for state in ("joining", "starting", "stopping", "stopped"):
        assert f"NAME is {state}" in runbook, state
    # The reasons of a master named down by its lease (workers/prevalence/cluster/lease.py).
    from workers.prevalence.cluster import lease

    source = Path(lease.__file__).read_text()
    for why in ("is gone", "has rebooted since", "no heartbeat from"):
        assert why in source and why in runbook, why
