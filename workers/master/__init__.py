"""What runs inside a master worker (one ``celery worker -P solo`` per master, DESIGN §5).

`lifecycle` opens the master when the worker starts and closes it on warm shutdown;
`runtime` holds the one open `Master` of the process; `tasks` are the Celery tasks, each a
thin call into the engine; `results` is the result backend that publishes a write's result
only once its commit is durable; `control` answers ``celery inspect prevalence_status``;
`publisher` writes the status document to Redis after every sync; `kombu_fixes` guards a
kombu bug on broker loss. Nothing here imports the operators' tools (`workers.client`) or
the local tooling (`workers.local`).
"""
