"""The example web service (examples/webapp) on a real local cluster: two masters and beat
(real `celery worker -P solo` processes), the Flask app in Werkzeug's threaded HTTP server
on a free loopback port, driven over HTTP with urllib. Reads come from the app's in-process
follower, writes go through the coalescing client, and every write is read back at once."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

pytest.importorskip("flask", reason="the example needs Flask: pip install -e '.[example]'")

from examples.webapp import create_app  # noqa: E402
from tests.e2e.conftest import make_client  # noqa: E402
from tests.e2e.helpers import converge  # noqa: E402
from workers.client import Client  # noqa: E402
from workers.models.ledger import model  # noqa: E402
from workers.prevalence import Follower  # noqa: E402

pytestmark = pytest.mark.celery


class Service:
    """The example app served on 127.0.0.1 (a free port), with an HTTP client for it."""

    def __init__(self, cluster, view: str) -> None:
        from werkzeug.serving import make_server

        self.follower = Follower.open(model, str(cluster.shared_dir), view=view,
                                      follow_interval_s=0.05)
        self.client = Client(make_client(cluster).app, timeout_s=60, coalesce_ms=2)
        self.server = make_server("127.0.0.1", 0, create_app(self.follower, self.client),
                                  threaded=True)
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def call(self, method: str, path: str, body: object = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def balance(self, account: str) -> int | None:
        status, doc = self.call("GET", f"/accounts/{account}")
        return doc["balance"] if status == 200 else None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()
        self.follower.close()


@pytest.fixture
def two_masters(make_cluster):
    cluster = make_cluster(masters=("alpha", "beta"))
    cluster.start_masters()
    cluster.start_beat()
    return cluster


@pytest.mark.parametrize("view", ["latest", "committed"])
def test_the_service_reads_its_own_writes_and_answers_each_error_clearly(two_masters, view):
    service = Service(two_masters, view)
    try:
        status, opened = service.call("POST", "/accounts", {"account": "ann", "initial": 100})
        assert status == 201 and opened["visible"] is True, opened
        assert opened["balance"] == 100 and opened["record"].split(":")[0] in ("alpha", "beta")
        assert service.call("POST", "/accounts", {"account": "bob"})[0] == 201
        # Every write answered is in the very next read (read your writes), in either view.
        for i in range(1, 6):
            status, moved = service.call("POST", "/transfers", {"from": "ann", "to": "bob", "amount": 1})
            assert (status, moved["balance"], moved["visible"]) == (200, 100 - i, True), moved
            assert (service.balance("ann"), service.balance("bob")) == (100 - i, i)

        # The model refuses: 409, and nothing changed.
        status, refused = service.call("POST", "/transfers", {"from": "bob", "to": "ann", "amount": 10**6})
        assert status == 409 and "insufficient funds" in refused["error"]
        status, refused = service.call("POST", "/accounts/nobody/deposits", {"amount": 1})
        assert status == 409 and "no account 'nobody'" in refused["error"]
        assert service.call("POST", "/accounts", {"account": "ann"})[0] == 409  # exists
        # Malformed requests: 400, nothing sent.
        for path, body, text in [("/transfers", {"from": "ann", "to": "bob", "amount": "1"}, "amount"),
                                 ("/transfers", {"from": "ann", "amount": 1}, "to must be"),
                                 ("/accounts/ann/deposits", {"amount": 0}, "at least 1"),
                                 ("/accounts/ann/deposits", [1], "JSON object")]:
            status, bad = service.call("POST", path, body)
            assert status == 400 and text in bad["error"], (path, bad)
        status, bad = service.call("POST", "/accounts/ann/deposits", raw=b"{not json")
        assert status == 400
        assert service.call("GET", "/accounts/nobody")[0] == 404
        assert service.call("GET", "/accounts/ann?after=not-a-token")[0] == 400
        assert (service.balance("ann"), service.balance("bob")) == (95, 5)

        # A retried write with the same Idempotency-Key applies once.
        key = {"Idempotency-Key": f"web-{view}-1"}
        first = service.call("POST", "/accounts/bob/deposits", {"amount": 7}, headers=key)
        again = service.call("POST", "/accounts/bob/deposits", {"amount": 7}, headers=key)
        assert first[0] == again[0] == 200 and first[1]["balance"] == again[1]["balance"] == 12
        assert service.balance("bob") == 12
        # ?after= waits for a record named by another process's answer.
        status, read = service.call("GET", f"/accounts/bob?after={first[1]['record']}")
        assert (status, read["balance"]) == (200, 12)
        status, doc = service.call("GET", "/status")
        assert status == 200 and doc["view"] == view and doc["last_error"] is None
    finally:
        service.close()


def test_concurrent_requests_are_coalesced_and_each_caller_reads_its_own_writes(two_masters):
    service = Service(two_masters, "latest")
    callers, deposits = 24, 4
    failures: list[str] = []

    def caller(i: int) -> None:
        account = f"c{i}"
        status, doc = service.call("POST", "/accounts", {"account": account})
        if status != 201:
            failures.append(f"{account}: open answered {status} {doc}")
            return
        for n in range(1, deposits + 1):
            status, doc = service.call("POST", f"/accounts/{account}/deposits", {"amount": 10})
            seen = service.balance(account)
            if status != 200 or doc["balance"] != 10 * n or seen != 10 * n:
                failures.append(f"{account}: deposit {n} answered {status} {doc}, then read {seen}")

    try:
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not failures, failures[:5]
        batches = service.client._coalescer.batches
        assert batches < callers * (deposits + 1)  # some writes travelled together
        # Once the cluster has converged, the follower's state is the committed state.
        view = converge(two_masters)
        service.follower.sync()
        assert service.follower.digest() == view["verify"]["digest"]
    finally:
        service.close()
