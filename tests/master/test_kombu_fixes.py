"""The guard around kombu's restore of un-acknowledged messages through a closed connection."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from kombu.transport import redis as kombu_redis

from workers.master import kombu_fixes


def _qos(client):
    qos = kombu_redis.QoS.__new__(kombu_redis.QoS)
    qos.channel = SimpleNamespace(connection=SimpleNamespace(client=client))
    qos._delivered = {"tag": object()}
    return qos


def test_restoring_through_a_detached_connection_is_skipped_with_a_warning(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(kombu_redis.QoS, "restore_unacked", lambda self, client=None: calls.append(client))
    monkeypatch.setattr(kombu_fixes, "_installed", False)
    assert kombu_fixes.install() and kombu_fixes.install()  # idempotent
    with caplog.at_level(logging.WARNING, logger="workers.master.kombu_fixes"):
        assert _qos(client=None).restore_unacked() is None
    assert calls == [] and "1 un-acknowledged message(s)" in caplog.text
    # A live connection, or an explicit client, goes to kombu's own code.
    _qos(client=SimpleNamespace(hostname="127.0.0.1")).restore_unacked()
    _qos(client=None).restore_unacked(client="explicit")
    assert calls == [None, "explicit"]
    monkeypatch.setattr(kombu_fixes, "_installed", False)
