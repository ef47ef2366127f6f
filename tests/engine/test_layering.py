"""Layers import one way: the engine never pulls in Celery (STYLE: Layout)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import workers.prevalence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINE_DIR = os.path.dirname(os.path.abspath(workers.prevalence.__file__))
ENGINE_MODULES = ["codec", "journal", "snapshot", "clock", "model", "errors"]
CELERY_SIDE = ("celery", "kombu", "redis", "fakeredis", "flower")


def test_importing_the_engine_in_a_fresh_interpreter_does_not_import_celery():
    code = ("import sys, workers.prevalence, workers.models.ledger\n"
            f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {CELERY_SIDE!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"the engine imported {proc.stdout.strip()}"


def _imports(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
    return out


def test_engine_modules_import_nothing_of_sync_or_celery():
    for name in ENGINE_MODULES:
        imports = _imports(os.path.join(ENGINE_DIR, f"{name}.py"))
        bad = {i for i in imports if "cluster" in i or i.split(".")[0] in CELERY_SIDE or i.startswith("workers")}
        assert not bad, f"engine module {name}.py imports {sorted(bad)}"
