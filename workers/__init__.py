"""prevalence-multimaster: object prevalence with several masters, deployed on Celery.

`workers.prevalence` is the engine (no Celery); `workers.celery` is the Celery app that
`celery -A workers ...` finds. This module imports nothing, so that importing the engine
never pulls Celery in.
"""
