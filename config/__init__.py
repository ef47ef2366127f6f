"""Deployment configuration: the environment variables of DESIGN §6 and the Celery settings.

`config.settings` parses and validates the environment (and an optional `.env` file);
`config.celeryconfig` turns the result into Celery settings, the queues and the beat
schedule. Neither module imports the engine, and only `celeryconfig` imports kombu.
"""
