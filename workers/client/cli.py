"""The `prevalence` command line.

    prevalence status [--json]                       the cluster, from Redis (or the folder)
    prevalence tx NAME ARG... [--master M] [--key K] [--wait committed] [--route-key K] [--json]
    prevalence outcome KEY [--master M] [--wait] [--json]   a request's (final) outcome
    prevalence query NAME ARG... [--master M] [--json]
    prevalence sync [--master M]                     broadcast, or one master with its report
    prevalence snapshot [--master M]
    prevalence verify [--json]                       reference digest from the folder alone
    prevalence backup DEST [--json]                  a consistent cut of the folder, verified
    prevalence retire NAME [--force]
    prevalence demo [--unattended]                   a local three-master cluster

Arguments of `tx` and `query` are read as JSON literals when they look like one, else as
strings: ``10`` is an int, ``-2.5`` a float, ``true``/``false``/``null`` are JSON,
``"10"`` (quoted for the shell: ``'"10"'``) is the string 10, ``[1,2]`` and ``{"a":1}``
are a list and an object, and anything else (``acct1``) is a string. ``--strings`` takes
every argument verbatim as a string.

Exit status: 0 success; 1 the model refused (Rejected) or the transaction raised;
2 bad input or configuration (nothing was journaled); 3 `status`: not converged, `verify`:
errors found, `backup`: no backup made; 4 no reply or no broker (the outcome of a write is then unknown: retry it
with the same --key).

Everything except `verify`, `backup`, `retire` and `status` (when Redis is down) goes
through Celery.
Settings come from the environment (see `workers.settings`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import shlex
import time
import uuid
from typing import Any, Sequence

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_CONVERGED = 3
EXIT_NO_REPLY = 4

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")


class CliError(Exception):
    """Raised for a problem the user must fix; carries the exit status."""

    def __init__(self, message: str, exit_status: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def parse_argument(text: str, position: int) -> Any:
    """Read one command-line argument as a JSON literal when it looks like one (module doc).

    Raises `CliError` naming the argument when it starts like JSON (``"``, ``[``, ``{``)
    but does not parse, or is a number too large to be finite.
    """
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        value = float(text)
        if not math.isfinite(value):
            raise CliError(f"argument {position} ({text!r}) is not a finite number")
        return value
    if text in ("true", "false", "null"):
        return json.loads(text)
    if text[:1] in ('"', "[", "{"):
        try:
            return json.loads(text, parse_constant=_refuse_constant)
        except ValueError as exc:
            raise CliError(f"argument {position} ({text!r}) looks like JSON but is not: {exc}. "
                           "Quote it for the shell, e.g. '[1, 2]' or '\"text\"'") from exc
    return text


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_arguments(texts: Sequence[str], *, strings: bool = False) -> list[Any]:
    """Parse every argument (or keep them as strings when `strings`)."""
    if strings:
        return list(texts)
    return [parse_argument(text, i) for i, text in enumerate(texts, start=1)]


def _settings() -> Any:
    from workers.settings import SettingsError, load_settings

    try:
        return load_settings()
    except SettingsError as exc:
        raise CliError(f"bad setting: {exc}") from exc


def _client(timeout_s: float) -> Any:
    from workers.settings import SettingsError

    try:
        from workers.client import Client
        return Client(timeout_s=timeout_s)
    except SettingsError as exc:
        raise CliError(f"bad setting: {exc}") from exc


def _check_master(name: str | None) -> None:
    """Refuse a --master that no folder or status document knows: a message to an unknown
    master.<name> queue would wait there for ever and the command would time out."""
    if name is None:
        return
    from workers.client.monitor import MonitorUnavailable, read_status_documents

    settings = _settings()
    known: set[str] = set()
    masters_dir = settings.shared_dir / "masters"
    if masters_dir.is_dir():
        known |= {p.name for p in masters_dir.iterdir() if not p.name.startswith(".")}
    if settings.is_redis:
        try:
            known |= set(read_status_documents(settings.broker_url))
        except MonitorUnavailable:
            pass
    if known and name not in known:
        raise CliError(f"no master named {name!r} (known: {', '.join(sorted(known))})")


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True, default=str))


def _broker_errors() -> tuple[type[BaseException], ...]:
    from kombu.exceptions import OperationalError

    return (OperationalError, ConnectionError, OSError)


# -- commands ----------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    from workers.client.monitor import cluster_view, render_table
    from workers.prevalence import read_all_progress

    settings = _settings()
    key = settings.read_cluster_key() if settings.cluster_key_file else None

    def read_progress(shared: Any) -> dict:
        return read_all_progress(str(shared), key)

    def read_retired(shared: Any) -> dict:
        from workers.prevalence.cluster.membership import read_retired as read

        return read(str(shared))

    def read_leases(shared: Any) -> dict:
        from workers.prevalence.cluster.lease import read_all_holders

        return read_all_holders(str(shared), key)

    deadline = time.monotonic() + (args.wait or 0.0)
    while True:
        view = cluster_view(settings.broker_url if settings.is_redis else "redis://invalid:0",
                            settings.shared_dir if settings.shared_dir.is_dir() else None,
                            sync_interval_s=settings.sync_interval_s,
                            read_progress=read_progress, read_retired=read_retired,
                            read_leases=read_leases)
        if view["converged"] or time.monotonic() >= deadline:
            break
        time.sleep(min(1.0, max(0.1, settings.sync_interval_s)))
    if args.json:
        _print_json(view)
    else:
        print(render_table(view))
    return EXIT_OK if view["converged"] else EXIT_NOT_CONVERGED


def _report_outcome(outcome: dict, as_json: bool, *, write: bool = True) -> int:
    from workers.client import raise_for_outcome, TransactionRejected, TransactionFailed

    if as_json:
        _print_json(outcome)
    try:
        value = raise_for_outcome(outcome)
    except (TransactionRejected, TransactionFailed) as exc:
        if not as_json:
            print(f"{outcome.get('status')}: {exc}" + (_tentative_note(outcome) if write else ""),
                  file=sys.stderr)
        return EXIT_REFUSED
    except Exception as exc:  # RequestRefused
        if not as_json:
            kind = outcome.get("error_type") or "error"
            print(f"error ({kind}): {exc}" + (". Nothing was journaled." if write else ""),
                  file=sys.stderr)
        return EXIT_BAD_INPUT
    if not as_json:
        suffix = " (already applied earlier: recorded outcome)" if outcome.get("duplicate") else ""
        print(json.dumps(value, default=str) + (f"   [master {outcome.get('master')}]"
                                                 if outcome.get("master") else "") + suffix
              + (_tentative_note(outcome) if write else ""))
    return EXIT_OK


def _tentative_note(outcome: dict) -> str:
    """What a person must know of an answer that is not final yet."""
    if outcome.get("committed", True):
        return ""
    key = outcome.get("rid")
    return ("   TENTATIVE: a write of another master may still change this outcome; final: "
            f"prevalence outcome {key} --wait" if key else "   TENTATIVE")


def cmd_tx(args: argparse.Namespace) -> int:
    _check_master(args.master)
    values = parse_arguments(args.args, strings=args.strings)
    client = _client(args.timeout)
    master = args.master
    if master is None and args.route_key is not None:
        master = client.route(args.route_key)
    deadline = time.monotonic() + args.timeout
    from workers.client import BrokerUnavailable, NoReply

    # The request id is the key, else the task id: known before sending, so that a lost
    # reply can name the exact retry that applies once.
    task_id = str(uuid.uuid4())
    try:
        outcome = client.execute_outcome(args.name, *values, master=master, key=args.key, task_id=task_id)
    except BrokerUnavailable:
        raise
    except NoReply as exc:
        retry = " ".join(["prevalence", "tx", args.name, *map(shlex.quote, args.args),
                          *(["--master", master] if master else []), "--key", args.key or task_id])
        raise CliError(f"{exc}\n  retry, applied at most once: {retry}", EXIT_NO_REPLY) from exc
    if args.wait == "committed" and not outcome.get("committed") and outcome.get("rid"):
        first = outcome
        outcome = client.wait_committed(outcome, max(0.0, deadline - time.monotonic()))
        if first.get("status") != outcome.get("status"):
            print(f"note: the first answer was {first.get('status')}; the committed order reversed it",
                  file=sys.stderr)
    return _report_outcome(outcome, args.json)


def cmd_outcome(args: argparse.Namespace) -> int:
    _check_master(args.master)
    client = _client(args.timeout)
    outcome = client.outcome(args.key, master=args.master, wait=args.wait, timeout_s=args.timeout)
    if outcome.get("status") == "unknown":
        if args.json:
            _print_json(outcome)
        else:
            print(f"unknown: {outcome.get('error')}", file=sys.stderr)
        return EXIT_NO_REPLY
    return _report_outcome(outcome, args.json)


def cmd_query(args: argparse.Namespace) -> int:
    _check_master(args.master)
    values = parse_arguments(args.args, strings=args.strings)
    client = _client(args.timeout)
    outcome = client.query_outcome(args.name, *values, master=args.master)
    return _report_outcome(outcome, args.json, write=False)


def cmd_sync(args: argparse.Namespace) -> int:
    _check_master(args.master)
    client = _client(args.timeout)
    report = client.sync(args.master)
    if report is None:
        print("sync broadcast to every master (no reply: see `prevalence status`)")
    else:
        _print_json(report)
    return EXIT_OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    _check_master(args.master)
    client = _client(args.timeout)
    report = client.snapshot(args.master)
    if report is None:
        print("snapshot broadcast to every master (no reply: see the workers' logs or Flower)")
    else:
        _print_json(report)
        if report.get("error"):
            return EXIT_REFUSED
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from workers.prevalence import PrevalenceError, verify

    settings = _settings()
    shared = settings.require_shared_dir()
    model = settings.load_model()
    def say(line: str) -> None:
        print(f"verify: {line}", file=sys.stderr, flush=True)

    try:
        report = verify(str(shared), model, cluster_key=settings.read_cluster_key(),
                        say=None if args.quiet else say)
    except PrevalenceError as exc:
        raise CliError(f"verify failed on {shared}: {exc}", EXIT_NOT_CONVERGED) from exc
    healthy = not report.get("errors") and report.get("deterministic", True)
    if args.json:
        _print_json(report)
    else:
        print(f"reference digest: {report['digest']}")
        print(f"records: {report.get('total')} "
              f"({', '.join(f'{m} {n}' for m, n in sorted(report['records'].items()))}); "
              f"duplicates skipped: {report.get('duplicates', 0)}; ticks: {report.get('ticks', 0)}")
        if not report.get("deterministic", True):
            print("NOT DETERMINISTIC: two replays gave different digests; a transaction uses "
                  "time or randomness outside ctx")
        for master, error in sorted((report.get("errors") or {}).items()):
            print(f"error in {master}'s journal: {error}")
        print("Masters that report tentative 0 and the same cursors must show this digest "
              "(`prevalence status`).")
    return EXIT_OK if healthy else EXIT_NOT_CONVERGED


def cmd_backup(args: argparse.Namespace) -> int:
    from workers.prevalence import PrevalenceError
    from workers.prevalence.cluster.backup import BackupError, backup

    settings = _settings()
    shared = settings.require_shared_dir()
    model = settings.load_model()
    dest = os.path.abspath(args.dest)
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.path.islink(dest) or os.listdir(dest)):
        raise CliError(f"backup destination {dest} exists and is not an empty folder; name a new one")
    if dest == str(shared.resolve()) or dest.startswith(str(shared.resolve()) + os.sep):
        raise CliError(f"backup destination {dest} is inside the shared folder {shared}; name one outside it")

    def say(line: str) -> None:
        print(f"backup: {line}", file=sys.stderr, flush=True)

    try:
        manifest = backup(str(shared), args.dest, model, cluster_key=settings.read_cluster_key(),
                          say=None if args.quiet else say)
    except BackupError as exc:
        raise CliError(f"no backup made: {exc}", EXIT_NOT_CONVERGED) from exc
    except PrevalenceError as exc:
        raise CliError(f"no backup made: {exc}", EXIT_NOT_CONVERGED) from exc
    if args.json:
        _print_json(manifest)
    else:
        cuts = ", ".join(f"{m} {seq}" for m, seq in sorted(manifest["cuts"].items()))
        print(f"backed up {shared} to {args.dest}: {manifest['files']} files, {manifest['bytes']:,} bytes")
        print(f"cut (last seq per master): {cuts}")
        print(f"digest: {manifest['digest']} ({manifest['total']} records), the same as `prevalence verify` "
              "computes on the source at this cut")
        print("restore: copy the folder to a new shared folder and start the masters on it under the same "
              "names (deploy/README.md, Backups)")
    return EXIT_OK


def cmd_retire(args: argparse.Namespace) -> int:
    from workers.prevalence import PrevalenceError, retire

    settings = _settings()
    shared = settings.require_shared_dir()
    try:
        body = retire(str(shared), args.name, force=args.force, key=settings.read_cluster_key())
    except (PrevalenceError, ValueError) as exc:
        raise CliError(f"cannot retire {args.name}: {exc}") from exc
    print(f"retired {args.name} at seq {body.get('cut')}: the other masters stop waiting for "
          "it at their next sync; it can never start again under this name")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.local.demo import run_demo

    return run_demo(args)


# -- parser ------------------------------------------------------------------------------

ARGUMENT_RULES = """\
Each ARG is read as a JSON literal when it looks like one, else taken as a string:
  10 -> int   -2.5, 1e3 -> float   true, false, null -> JSON
  '"10"' -> the string 10   '[1, 2]' -> list   '{"a": 1}' -> object
  acct1, hello world -> strings        (--strings: every ARG verbatim)

Exit status: 0 ok; 1 the model refused (Rejected) or the transaction raised (recorded);
2 bad input: unknown name, wrong arguments, unencodable values (nothing journaled);
4 no reply or no broker (outcome unknown: retry with the same --key)."""

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prevalence", description="Operate a prevalence-multimaster cluster.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings come from the environment or .env (PREVALENCE_*, CELERY_BROKER_URL).\n"
               "`prevalence tx --help` explains how arguments are read.\n"
               "Exit status: 0 ok; 1 refused by the model; 2 bad input or configuration;\n"
               "3 status: not converged, verify: errors, backup: none made; 4 no reply or no broker.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("status", help="show every master and whether the cluster converged")
    p.add_argument("--json", action="store_true", help="print the view as JSON")
    p.add_argument("--wait", type=float, metavar="SECONDS", default=0.0,
                   help="poll until converged or this many seconds have passed")
    p.set_defaults(func=cmd_status)

    for name, func, what in (("tx", cmd_tx, "transaction"), ("query", cmd_query, "query")):
        p = sub.add_parser(name, help=f"run a {what} through Celery",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"Run a {what} on one master (--master) or on whichever\n"
                           "master takes it from the shared queue.\n\n" + ARGUMENT_RULES)
        p.add_argument("name", metavar="NAME", help=f"the {what} name, e.g. "
                       + ("deposit" if name == "tx" else "balance"))
        # default=[]: without it argparse names ARG as required when NAME is missing,
        # although a transaction or query may take no argument at all.
        p.add_argument("args", nargs="*", metavar="ARG", default=[], help="its arguments (rules above)")
        p.add_argument("--master", "-m", help="send it to this master (default: any)")
        p.add_argument("--strings", action="store_true", help="take every ARG as a string")
        p.add_argument("--json", action="store_true", help="print the outcome document")
        p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                       help="how long to wait for the reply (default 30)")
        if name == "tx":
            p.add_argument("--key", help="request key: a retry with the same key applies once "
                           "(retry on the same --master to get the recorded outcome back "
                           "at once; elsewhere it is applied once after the next sync)")
            p.add_argument("--wait", choices=("tentative", "committed"), default="tentative",
                           help="tentative (default): the master's first answer, which a write "
                           "of another master may still change; committed: wait for the final "
                           "outcome (exit status follows it)")
            p.add_argument("--route-key", metavar="K", help="send every write with this key to "
                           "the same master while it is up (writes on one entity keep their order)")
        p.set_defaults(func=func)

    p = sub.add_parser("outcome", help="the outcome of a request key, and whether it is final")
    p.add_argument("key", help="the request key (--key of `tx`, or the task id it printed)")
    p.add_argument("--master", "-m", help="ask this master (best: the one that answered)")
    p.add_argument("--wait", action="store_true", help="wait until the outcome is committed")
    p.add_argument("--json", action="store_true", help="print the outcome document")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    p.set_defaults(func=cmd_outcome)

    for name, func, what in (("sync", cmd_sync, "sync"), ("snapshot", cmd_snapshot, "snapshot")):
        p = sub.add_parser(name, help=f"{what} every master now (or one, with --master)")
        p.add_argument("--master", "-m", help="only this master, and print its report")
        p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
        p.set_defaults(func=func)

    p = sub.add_parser("verify", help="compute the reference digest from the folder alone")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("backup", help="copy a consistent cut of the shared folder and verify it")
    p.add_argument("dest", metavar="DEST", help="a new folder (or an empty one) to hold the backup")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("retire", help="remove a master from the cluster for good")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="even if its lease looks alive")
    p.set_defaults(func=cmd_retire)

    p = sub.add_parser("demo", help="run a local three-master cluster with a workload")
    from workers.local.demo import add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `prevalence` console script. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from workers.settings import SettingsError
    from workers.client import NoReply, RequestRefused

    try:
        return args.func(args)
    except CliError as exc:
        print(f"prevalence {args.command}: {exc}", file=sys.stderr)
        return exc.exit_status
    except SettingsError as exc:
        print(f"prevalence {args.command}: bad setting: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RequestRefused as exc:
        print(f"prevalence {args.command}: {exc}. Nothing was journaled.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NoReply as exc:
        print(f"prevalence {args.command}: {exc}", file=sys.stderr)
        return EXIT_NO_REPLY
    except _broker_errors() as exc:
        print(f"prevalence {args.command}: cannot reach the broker ({type(exc).__name__}: "
              f"{exc}). Is Redis running at CELERY_BROKER_URL?", file=sys.stderr)
        return EXIT_NO_REPLY
    except KeyboardInterrupt:
        print(f"prevalence {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
