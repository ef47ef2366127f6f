"""`prevalence demo`: a local three-master cluster with beat and Flower, and a workload.

Steps:
  1. pick the broker (CELERY_BROKER_URL, else a private redis-server, else the embedded
     fakeredis server, with a warning) and the shared folder (``./var/shared`` by default);
  2. start masters alpha, beta and gamma (solo workers), one beat and Flower on 127.0.0.1;
  3. run a short workload: accounts opened on each master, deposits through the shared
     queue, a batch on one master, transfers aimed at each master;
  4. wait until every master reports the same records, no tentative ones and the digest
     that `verify` computes from the folder alone; print `prevalence status`;
  5. interactive: keep running until Ctrl-C; ``--unattended``: stop at once.
Everything it started is stopped on the way out (masters with SIGTERM: warm shutdown).
Exit status 0 only if the masters converged.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

CONVERGE_S = 90.0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unattended", action="store_true",
                        help="run the workload, wait for convergence, stop everything; exit "
                             "0 only if converged")
    parser.add_argument("--root", default="var", metavar="DIR",
                        help="working folder: shared/, log/, run/ go under it (default ./var)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete DIR/shared first (default: keep it; masters recover)")
    parser.add_argument("--masters", default="alpha,beta,gamma", help="comma-separated names")
    parser.add_argument("--transactions", type=int, default=60, metavar="N",
                        help="size of the workload (default 60)")
    parser.add_argument("--sync-interval", default="1s", help="PREVALENCE_SYNC_INTERVAL")
    parser.add_argument("--flower-port", type=int, default=5555,
                        help="Flower's port on 127.0.0.1 (0: any free port; default 5555)")
    parser.add_argument("--no-flower", action="store_true", help="do not start Flower")
    parser.add_argument("--embedded", action="store_true",
                        help="use the embedded fakeredis broker even if Redis is available")


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def workload(client: Any, masters: list[str], transactions: int, seed: int = 7,
             settle: Any = None) -> dict:
    """Run the demo workload through Celery; returns counts of *final* outcomes.

    Every write is answered at once (tentatively, with three masters); the counts are of
    the committed outcomes, waited for after the workload, labelled by cause ("refused: no
    account" is a transfer that reached a master before the account's record did, not an
    overdraft), plus ``changed``: first answers the committed order reversed. `settle()`,
    when given, is called once the accounts are opened (the demo waits there for
    convergence, so that later refusals are overdrafts, not unknown accounts)."""
    rng = random.Random(seed)
    run = f"{int(time.time())}"
    answers: list[dict] = []

    # Each master opens its own accounts (aimed writes: master.<name>).
    accounts = []
    for name in masters:
        for i in range(3):
            account = f"{name}-{run}-{i}"
            answers.append(client.execute_outcome("open_account", account, 100, master=name))
            accounts.append(account)
    if settle is not None:
        settle()
    # Deposits through the shared queue: whichever master is free takes each one.
    results = [client.app.send_task("prevalence.execute",
                                    args=["deposit", [rng.choice(accounts), rng.randint(1, 20)]])
               for _ in range(transactions // 2)]
    answers += [result.get(timeout=60, interval=0.02) for result in results]
    # One batch on one master: one fsync for all of it (item i's request id is KEY:i).
    batch = [("deposit", [rng.choice(accounts), 1]) for _ in range(transactions // 4)]
    key = f"demo-batch-{run}"
    for i, outcome in enumerate(client.execute_many(batch, master=masters[0], key=key)):
        answers.append(dict(outcome, rid=f"{key}:{i}", master=masters[0]))
    # Transfers aimed at every master, concurrently: some conflict, and the committed order
    # decides which pass.
    for i in range(transactions // 4):
        src, dst = rng.sample(accounts, 2)
        answers.append(client.execute_outcome("transfer", src, dst, rng.randint(1, 50),
                                              master=masters[i % len(masters)]))
    counts: dict = {"changed": 0}
    for answer in answers:
        final = answer if answer.get("committed") else client.wait_committed(answer, 60)
        label = _label(final)
        counts[label] = counts.get(label, 0) + 1
        if answer.get("status") != final.get("status"):
            counts["changed"] += 1  # reversed: ok <-> refused
    counts["_example_account"] = accounts[0]
    return counts


def _label(outcome: dict) -> str:
    """An outcome's status, with the cause of a refusal."""
    status = outcome.get("status")
    if status != "rejected":
        return str(status)
    error = outcome.get("error") or ""
    for cause in ("insufficient funds", "no account"):
        if cause in error:
            return f"refused: {cause}"
    return "refused"


def earlier_masters(shared: Path) -> list[str]:
    """Names of the masters that an earlier run left in `shared` (none for a new folder)."""
    masters = shared / "masters"
    if not masters.is_dir():
        return []
    return sorted(p.name for p in masters.iterdir() if p.is_dir() and not p.name.startswith("."))


def another_shell_hints(broker_url: str, shared_dir: Path, example: str, masters: list[str]) -> list[str]:
    """The commands the demo suggests for another shell: an ``export`` line, then CLI calls.

    They work in a fresh shell where the venv is not activated: the command is named by its
    absolute path (the console script beside this interpreter, else ``python -m``), and
    PYTHONPATH names the project, in case it is not installed in that interpreter.
    """
    from workers.local.processes import PROJECT_ROOT

    script = os.path.join(os.path.dirname(sys.executable), "prevalence")
    if os.access(script, os.X_OK):
        cli = shlex.quote(script)
    else:
        cli = f"{shlex.quote(sys.executable)} -m workers.client.cli"
    exports = {"CELERY_BROKER_URL": broker_url, "PREVALENCE_SHARED_DIR": str(shared_dir),
               "PYTHONPATH": str(PROJECT_ROOT)}
    return ["export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items()),
            f"{cli} tx deposit {shlex.quote(example)} 10 --master {masters[1]} --wait committed",
            f"{cli} query balance {shlex.quote(example)} --master {masters[0]}",
            f"{cli} status"]


def run_demo(args: argparse.Namespace) -> int:
    from workers.local.cluster import ClusterError, LocalCluster, start_broker
    from workers.local.processes import port_is_free

    root = Path(args.root).resolve()
    masters = [m.strip() for m in args.masters.split(",") if m.strip()]
    if args.fresh and (root / "shared").exists():
        _say(f"--fresh: deleting {root / 'shared'}")
        shutil.rmtree(root / "shared")
    earlier = earlier_masters(root / "shared")
    if earlier:
        _say(f"reusing the shared folder of an earlier run, {root / 'shared'} (masters "
             f"{', '.join(earlier)}): the masters recover its state and the workload adds to "
             "it. To start from an empty folder: --fresh (bin/quickstart --fresh)")
    external = os.environ.get("CELERY_BROKER_URL") if not args.embedded else None
    stopping = {"flag": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["flag"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    broker = None
    cluster = None
    converged = False
    example = "ACCOUNT"
    try:
        broker = start_broker(root / "run", external, prefer="embedded" if args.embedded else None)
        if broker.warning:
            print(broker.warning, file=sys.stderr, flush=True)
        _say(f"broker: {broker.kind} at {broker.url}")
        cluster = LocalCluster(root, broker, masters=tuple(masters),
                               sync_interval=args.sync_interval, snapshot_interval="1m")
        _say(f"shared folder: {cluster.shared_dir}   logs: {cluster.log_dir}")
        _say(f"starting masters {', '.join(masters)} (solo workers) ...")
        cluster.start_masters()
        cluster.start_beat()
        _say("beat started: sync every %s to every master (broadcast)" % args.sync_interval)
        if not args.no_flower:
            port = args.flower_port or None
            if port and not port_is_free(port):
                _say(f"port {port} is taken on 127.0.0.1; Flower gets a free port instead")
                port = None
            url = cluster.start_flower(port)
            _say(f"Flower: {url}")
        os.environ.update(cluster.env())
        from workers.client import Client
        from workers.models.ledger import model

        client = Client(timeout_s=60)
        _say(f"workload: {args.transactions} transactions on {len(masters)} masters ...")
        counts = workload(client, masters, args.transactions,
                          settle=lambda: cluster.wait_converged(CONVERGE_S))
        example = counts.pop("_example_account")
        changed = counts.pop("changed")
        _say("final (committed) outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
             + f"; {changed} first answer(s) reversed by the committed order (tentative answers: "
             "another master's write that orders first can change them; a refusal is recorded too)")
        _say("waiting for convergence ...")
        try:
            view = cluster.wait_converged(CONVERGE_S, model=model)
            converged = True
        except ClusterError as exc:
            _say(str(exc))
            view = cluster.view()
        from workers.client.monitor import render_table

        print()
        print(render_table(view))
        if converged:
            report = view["verify"]
            print(f"`prevalence verify` from the folder alone: {report['digest'][:12]} "
                  f"({report['total']} records) == every master's digest")
            total = client.query("total", master=masters[-1])
            print(f"total money on {masters[-1]}: {total} (transfers move it, never create it)")
        print()
        if cluster.flower_url:
            _say(f"Flower: {cluster.flower_url}  (workers, tasks, each master's sync report)")
        if not args.unattended and not stopping["flag"]:
            _say("cluster running. Try, in another shell (copy the export line first):")
            for line in another_shell_hints(broker.url, cluster.shared_dir, example, masters):
                print(f"    {line}")
            _say("press Ctrl-C to stop")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print()
        _say("stopping ...")
    except ClusterError as exc:
        _say(f"failed: {exc}")
        converged = False
    finally:
        if cluster is not None:
            statuses = cluster.stop(stop_broker=False)
            clean = all(code == 0 for label, code in statuses.items() if label in masters)
            _say("masters stopped (warm shutdown: synced, snapshotted, leases released)"
                 if clean else f"exit statuses: {statuses}")
        if broker is not None:
            broker.stop()
        _say("stopped")
    return 0 if converged else 1
