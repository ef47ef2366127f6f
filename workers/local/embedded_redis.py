"""An embedded Redis stand-in for the quick start: fakeredis[lua]'s TcpFakeServer.

    python -m workers.local.embedded_redis --port 6390

It speaks the Redis protocol well enough for Celery workers, beat, broadcasts, results
and Flower (Lua is needed: kombu's Redis transport calls EVALSHA). It keeps everything in
this process's memory and nothing on disk: fine for a demo, never for a deployment.
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        from fakeredis import TcpFakeServer
        import lupa  # noqa: F401  (without Lua, workers crash on EVALSHA)
    except ImportError as exc:
        print(f"embedded_redis: {exc}. Install it with: pip install 'fakeredis[lua]'",
              file=sys.stderr)
        return 2
    server = TcpFakeServer((args.host, args.port), server_type="redis")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"embedded_redis: listening on {args.host}:{args.port} (in memory only)", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
