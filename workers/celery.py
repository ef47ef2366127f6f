"""The Celery application: ``celery -A workers worker|beat|flower`` finds `app` here.

Importing this module reads and validates the environment (`workers.settings`) and raises
`workers.settings.SettingsError`, naming the variable, on a bad value. It does not import
the engine: beat, Flower and clients never load a model. Only a worker runs a master, and
`workers.master.lifecycle.MasterStep` opens it when the worker starts.
"""

from __future__ import annotations

from celery import Celery

from workers.celeryconfig import celery_settings
from workers.settings import load_settings
from workers.master.lifecycle import MasterStep
# Registers the `prevalence_status` inspect command: the worker answers it, and
# `celery inspect` checks the name against the registry in the calling process too.
import workers.master.control  # noqa: E402,F401

settings = load_settings()

app = Celery("workers", include=["workers.master.tasks"])
app.conf.update(celery_settings(settings))
app.steps["worker"].add(MasterStep)

__all__ = ["app", "settings"]
