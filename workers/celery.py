"""The Celery application: ``celery -A workers worker|beat|flower`` finds `app` here.

Importing this module reads and validates the environment (`workers.settings`) and raises
`workers.settings.SettingsError`, naming the variable, on a bad value; in the ``celery``
command itself (worker, beat, Flower) it prints that one line and exits with status 78
instead, which the deploy units treat as "do not restart". It does not import
the engine: beat, Flower and clients never load a model. Only a worker runs a master, and
`workers.master.lifecycle.MasterStep` opens it when the worker starts.
"""

from __future__ import annotations

import os
import sys

from celery import Celery

from workers.celeryconfig import celery_settings
from workers.settings import SettingsError, load_settings
from workers.master.lifecycle import EXIT_CONFIG, MasterStep
# Registers the `prevalence_status` inspect command: the worker answers it, and
# `celery inspect` checks the name against the registry in the calling process too.
import workers.master.control  # noqa: E402,F401

def _running_the_celery_command() -> bool:
    """Whether this process is ``celery ...`` (worker, beat, Flower), not a client."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return (spec is not None and spec.name == "celery.__main__") or os.path.basename(sys.argv[0]) == "celery"


try:
    settings = load_settings()
except SettingsError as exc:
    if not _running_the_celery_command():
        raise  # a client or the CLI reports it in its own words
    # A worker, beat or Flower: one line naming the variable, and the exit status that
    # tells a supervisor not to restart (systemd's RestartPreventExitStatus=78).
    print(f"prevalence: bad setting: {exc}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)

app = Celery("workers", include=["workers.master.tasks"])
app.conf.update(celery_settings(settings))
app.steps["worker"].add(MasterStep)

__all__ = ["app", "settings"]
