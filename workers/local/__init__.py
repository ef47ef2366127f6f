"""Tooling for one machine, never deployed: a local cluster (broker, masters, beat, Flower as
subprocesses) for the demo and the tests, the broker it starts (a private ``redis-server`` or
the embedded fakeredis stand-in), and the demo itself. Deployed code never imports it.
"""
