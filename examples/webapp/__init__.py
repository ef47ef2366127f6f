"""A small ledger web service: reads from an in-process follower, writes through the
coalescing client (`examples.webapp.app`; run it with ``python -m examples.webapp``)."""

from examples.webapp.app import create_app

__all__ = ["create_app"]
