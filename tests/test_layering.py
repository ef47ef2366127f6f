"""Layers import one way (STYLE: Layout; the package map in `workers/__init__.py`).

The engine never pulls in Celery; code that runs in a master never imports the operators'
tools or the local tooling; the client, beat and Flower never load the engine.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "workers"
CELERY_SIDE = ("celery", "kombu", "redis", "fakeredis", "flower")


def _fresh_modules(code: str) -> set[str]:
    """The modules loaded by `code` in a fresh interpreter (no .env, no environment)."""
    code += "\nprint(','.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", "import sys\n" + code], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.strip().split(","))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, at top level or inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from workers import client`
    return out


def _offenders(folder: Path, forbidden, allowed=()) -> dict[str, list[str]]:
    bad = {}
    for path in sorted(folder.rglob("*.py")):
        hits = sorted(i for i in _imports(path) if any(i == f or i.startswith(f + ".") for f in forbidden)
                      and (path.relative_to(ROOT).as_posix(), i) not in allowed)
        if hits:
            bad[path.relative_to(ROOT).as_posix()] = hits
    return bad


def test_importing_the_engine_in_a_fresh_interpreter_does_not_import_celery():
    loaded = _fresh_modules("import workers.prevalence, workers.models.ledger")
    assert not {m for m in loaded if m.split(".")[0] in CELERY_SIDE}


def test_the_engine_imports_nothing_but_itself_and_the_standard_library_and_msgspec():
    engine = PACKAGE / "prevalence"
    others = ("workers.master", "workers.client", "workers.local", "workers.celery",
              "workers.celeryconfig", "workers.settings", "workers.status", "workers.models")
    assert _offenders(engine, CELERY_SIDE + others) == {}


def test_the_engines_base_modules_know_nothing_of_sync():
    # The package's __init__ re-exports the public names of both halves; every other module
    # directly under workers/prevalence is the single-process engine.
    modules = sorted(p for p in (PACKAGE / "prevalence").glob("*.py") if p.name != "__init__.py")
    assert len(modules) >= 8, [p.name for p in modules]
    for path in modules:
        bad = {i for i in _imports(path) if i.startswith("workers.prevalence.cluster")}
        assert not bad, f"engine module {path.name} imports {sorted(bad)}"


def test_code_that_runs_in_a_master_never_imports_the_operators_tools_or_local_tooling():
    assert _offenders(PACKAGE / "master", ("workers.client", "workers.local")) == {}


def test_deployed_code_never_needs_the_local_tooling():
    # `prevalence demo` is the one door into it, imported only when that command runs.
    allowed = {("workers/client/cli.py", "workers.local.demo"),
               ("workers/client/cli.py", "workers.local.demo.run_demo"),
               ("workers/client/cli.py", "workers.local.demo.add_demo_arguments")}
    for folder in ("prevalence", "master", "client", "models"):
        assert _offenders(PACKAGE / folder, ("workers.local",), allowed) == {}, folder
    for path in PACKAGE.glob("*.py"):
        assert not {i for i in _imports(path) if i.startswith("workers.local")}, path.name


def test_the_import_walker_sees_top_level_function_level_and_relative_imports():
    assert {"workers.master.lifecycle.MasterStep", "workers.master.control"} <= _imports(PACKAGE / "celery.py")
    assert "workers.prevalence.verify" in _imports(PACKAGE / "client" / "cli.py")  # inside a function
    assert any(i.startswith("workers.prevalence.") for i in _imports(PACKAGE / "prevalence" / "__init__.py"))


def test_the_client_never_imports_the_engine_or_the_master_runtime():
    bad = {i for i in _imports(PACKAGE / "client" / "__init__.py")
           if i.startswith(("workers.prevalence", "workers.master"))}
    assert not bad


def test_importing_the_app_the_tasks_and_the_client_does_not_import_the_engine():
    loaded = _fresh_modules("import workers.celery, workers.master.tasks, workers.client")
    assert "workers.prevalence" not in loaded
