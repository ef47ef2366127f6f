"""prevalence-multimaster: object prevalence with several masters, deployed on Celery.

The packages, by job (imports go one way, down this list):

- `workers.prevalence` — the engine: models, journal, snapshots, sync between masters
  through the shared folder. Imports nothing from Celery or from the rest of this package.
- `workers.models` — the example model (`ledger`), the default one.
- `workers.settings`, `workers.celeryconfig`, `workers.celery`, `workers.status` — what every
  side shares: the environment's settings, the Celery configuration (queues, routes, beat),
  the Celery app that ``celery -A workers worker|beat|flower`` finds, and where a master's
  status document lives in Redis.
- `workers.master` — what runs inside a master worker: tasks, the worker's lifecycle, the
  runtime holding the one `Master`, the result backend, control commands, the status
  publisher. It never imports `workers.client` or `workers.local`.
- `workers.client` — what talks to a cluster from outside: the Python client, the
  ``prevalence`` command line, the operators' cluster view. It never imports the engine,
  except for the commands that read the folder itself (``verify``, ``status`` without Redis).
- `workers.local` — tooling for one machine, never deployed: the local cluster behind the
  demo and the tests, its broker, the embedded Redis stand-in.

This module imports nothing, so that importing the engine never pulls Celery in.
"""
