"""The client side of the NFS tier's Celery variant, run on the host inside the lab's network
namespace (``ip netns exec NS python -m tests.nfs.celery_client ...``), where the lab's Redis
is. Configured from the environment like every process of the project (CELERY_BROKER_URL,
PREVALENCE_SHARED_DIR, ...). Prints one JSON document on stdout.

    wait-up NAME... [--deadline-s S]     every named master reports itself consuming
    load --masters a,b,c --ops N --seed S [--accounts K] [--initial V]
                                         open accounts, then N withdraw/transfer at once,
                                         aimed at each master in turn or sent to the shared
                                         write queue; prints {"acked": {key: status}}
    replay-keys --masters a,b,c KEYS_FILE
                                         send every acknowledged key again, to every master:
                                         each must come back as a duplicate (known, not
                                         applied again); prints the keys that did not
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time


def _client(timeout_s: float = 60.0):
    from celery import Celery

    from workers.celeryconfig import celery_settings
    from workers.client import Client
    from workers.settings import load_settings

    settings = load_settings(use_env_file=False)
    app = Celery("nfs-tier-client", set_as_current=False)
    app.conf.update(celery_settings(settings))
    return settings, Client(app, timeout_s=timeout_s)


def wait_up(names: list[str], deadline_s: float) -> dict:
    from workers.client.monitor import MonitorUnavailable, read_status_documents

    settings, _client_ = _client()
    end = time.monotonic() + deadline_s
    docs: dict = {}
    while time.monotonic() < end:
        try:
            docs = read_status_documents(settings.broker_url)
        except MonitorUnavailable:
            docs = {}
        if all(docs.get(n, {}).get("consuming") and docs[n].get("state") == "ready" for n in names):
            return {"up": True}
        time.sleep(0.2)
    return {"up": False, "documents": {n: docs.get(n) for n in names}}


def load(masters: list[str], ops: int, seed: int, accounts: int, initial: int) -> dict:
    _settings, client = _client()
    names = [f"acct{i}" for i in range(accounts)]
    outcomes = client.execute_many([("open_account", [n, initial], f"open-{n}") for n in names],
                                   master=masters[0])
    acked = {f"open-{n}": o["status"] for n, o in zip(names, outcomes)}
    # Every master must know the accounts before it is sent transfers on them.
    end = time.monotonic() + 60
    for m in masters:
        while names[-1] not in client.query("balances", master=m):
            if time.monotonic() > end:
                return {"error": f"{m} never saw the accounts", "acked": acked}
            time.sleep(0.2)
    rng = random.Random(seed)
    sent = []
    for i in range(ops):
        a = rng.choice(names)
        b = rng.choice([n for n in names if n != a])
        amount = rng.randint(1, 40)
        tx, args = (("withdraw", [a, amount]) if rng.random() < 0.5 else ("transfer", [a, b, amount]))
        key = f"k{seed}-{i}"
        target = None if i % 4 == 3 else masters[i % len(masters)]   # aimed, and the shared queue
        sent.append((key, tx, args, client._send("prevalence.execute", [tx, args, key], master=target)))
    takers = {}
    failures = []
    for key, tx, args, result in sent:
        try:
            out = client._wait(result, 120, f"{tx} {key}")
        except Exception as exc:  # noqa: BLE001 -- not acknowledged: reported, not counted
            failures.append(f"{key}: {type(exc).__name__}: {exc}")
            continue
        if out.get("status") in ("ok", "rejected"):
            acked[key] = {"status": out["status"], "tx": tx, "args": args}
            takers[out.get("master")] = takers.get(out.get("master"), 0) + 1
        else:
            failures.append(f"{key}: {out}")
    return {"acked": acked, "takers": takers, "failures": failures}


def replay_keys(masters: list[str], keys_file: str) -> dict:
    _settings, client = _client()
    acked = json.load(open(keys_file))
    items = [(v["tx"], v["args"], k) for k, v in acked.items() if isinstance(v, dict)]
    not_known = {}
    for m in masters:
        outcomes = []
        for start in range(0, len(items), 500):
            outcomes += client.execute_many(items[start:start + 500], master=m)
        missing = [it[2] for it, o in zip(items, outcomes) if not o.get("duplicate")]
        if missing:
            not_known[m] = missing
    return {"checked": len(items), "not_known": not_known}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.nfs.celery_client")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait-up")
    w.add_argument("names", nargs="+")
    w.add_argument("--deadline-s", type=float, default=120.0)
    ld = sub.add_parser("load")
    ld.add_argument("--masters", required=True)
    ld.add_argument("--ops", type=int, default=60)
    ld.add_argument("--seed", type=int, default=1)
    ld.add_argument("--accounts", type=int, default=6)
    ld.add_argument("--initial", type=int, default=60)
    rk = sub.add_parser("replay-keys")
    rk.add_argument("--masters", required=True)
    rk.add_argument("keys_file")
    a = p.parse_args(argv)
    if a.cmd == "wait-up":
        out = wait_up(a.names, a.deadline_s)
    elif a.cmd == "load":
        out = load(a.masters.split(","), a.ops, a.seed, a.accounts, a.initial)
    else:
        out = replay_keys(a.masters.split(","), a.keys_file)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
