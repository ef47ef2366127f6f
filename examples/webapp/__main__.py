"""Run the example ledger service against a cluster (`examples.webapp.app`).

    pip install -e '.[example]'
    prevalence demo                       # in another terminal: a local cluster in ./var
    python -m examples.webapp --port 8080
    curl -X POST localhost:8080/accounts -H 'Content-Type: application/json' \\
         -d '{"account": "ann", "initial": 100}'
    curl localhost:8080/accounts/ann

It reads the same environment as the cluster's processes (`workers.settings`: the broker,
PREVALENCE_SHARED_DIR, PREVALENCE_MODEL, the cluster key), so it must run where the shared
folder is mounted. It serves with Werkzeug's threaded server; under another WSGI server
(gunicorn with ``--threads``, waitress), build the app with `create_app` once per process:
each process keeps its own follower.
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.webapp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--view", choices=("latest", "committed"), default="latest",
                        help="the follower's view (default latest: writes visible within one "
                             "follow interval; committed: only what can no longer change)")
    parser.add_argument("--follow-ms", type=float, default=50.0,
                        help="how often the follower reads the journals (default 50 ms)")
    parser.add_argument("--coalesce-ms", type=float, default=2.0,
                        help="how long concurrent writes are gathered into one batch (default 2 ms)")
    args = parser.parse_args(argv)

    from werkzeug.serving import make_server

    from examples.webapp.app import create_app
    from workers.client import Client
    from workers.prevalence import Follower
    from workers.settings import load_settings

    settings = load_settings()
    follower = Follower.open(settings.load_model(), str(settings.require_shared_dir()),
                             view=args.view, cluster_key=settings.read_cluster_key(),
                             follow_interval_s=args.follow_ms / 1000.0)
    client = Client(coalesce_ms=args.coalesce_ms)
    server = make_server(args.host, args.port, create_app(follower, client), threaded=True)
    signal.signal(signal.SIGTERM, _stop)  # as Ctrl-C: leave serve_forever, then close
    print(f"ledger service on http://{args.host}:{server.port} (follower view {args.view}, "
          f"base {follower.base})", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        client.close()
        follower.close()
    return 0


def _stop(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
