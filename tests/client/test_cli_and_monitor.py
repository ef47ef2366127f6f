"""The command line's argument parsing and the operators' cluster view, without workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from workers.client.cli import CliError, parse_argument, parse_arguments
from workers.client.monitor import evaluate, format_hlc, render_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, value", [
    ("10", 10), ("-3", -3), ("2.5", 2.5), ("1e3", 1000.0), ("true", True), ("null", None),
    ('"10"', "10"), ("[1, 2]", [1, 2]), ('{"a": 1}', {"a": 1}), ("acct1", "acct1"),
    ("hello world", "hello world"), ("1180591620717411303424", 1180591620717411303424),
])
def test_cli_arguments_are_json_literals_when_they_look_like_one(text, value):
    assert parse_argument(text, 1) == value


@pytest.mark.parametrize("text", ["[1,", '{"a":', '"open', "NaN", "[NaN]", "1e999"])
def test_cli_arguments_that_look_like_json_but_are_not_are_refused(text):
    if text == "NaN":
        assert parse_argument(text, 1) == "NaN"  # a bare word is a string
        return
    with pytest.raises(CliError, match="argument 1"):
        parse_argument(text, 1)


def test_strings_mode_keeps_every_argument_verbatim():
    assert parse_arguments(["10", "true"], strings=True) == ["10", "true"]


def doc(name, **fields):
    base = {"master": name, "state": "ready", "tentative": 0, "cursors": {"a": 1, "b": 2},
            "digest": "d1", "reported_at": 100.0, "seq": 1}
    base.update(fields)
    return base


def test_converged_means_same_cursors_same_digest_nothing_tentative():
    masters = {"a": doc("a"), "b": doc("b", seq=2)}
    assert evaluate(masters, expected=["a", "b"], now_s=101.0) == (True, [])


@pytest.mark.parametrize("change, reason", [
    ({"tentative": 2}, "has 2 tentative"),
    ({"cursors": {"a": 1, "b": 1}}, "cursors differ"),
    ({"state": "joining"}, "is joining"),
    ({"last_error": "boom"}, "reports an error: boom"),
    ({"reported_at": 0.0}, "101 s old"),
    ({"digest": None}, "no digest yet from b"),
    ({"digest": ""}, "no digest yet from b"),
])
def test_not_converged_says_why(change, reason):
    masters = {"a": doc("a"), "b": doc("b", **change)}
    converged, reasons = evaluate(masters, expected=["a", "b"], stale_after_s=30, now_s=101.0)
    assert not converged
    assert any(reason in r for r in reasons), reasons


def test_a_missing_master_and_divergence_are_named():
    converged, reasons = evaluate({"a": doc("a"), "b": doc("b", digest="d2")},
                                  expected=["a", "b", "c"], now_s=101.0)
    assert not converged
    assert any("c has not reported" in r for r in reasons)
    assert any(r.startswith("DIVERGED") for r in reasons)


def test_a_missing_digest_is_pending_not_divergence():
    converged, reasons = evaluate({"a": doc("a"), "b": doc("b", digest=None)}, now_s=101.0)
    assert not converged and not any(r.startswith("DIVERGED") for r in reasons), reasons


def test_the_table_has_a_row_per_master_and_a_plain_verdict():
    view = {"source": "redis", "broker_url": "redis://x", "converged": True, "reasons": [],
            "verdict": "CONVERGED: 2 master(s)", "masters": {"a": doc("a", frontier=5 << 16),
                                                             "b": doc("b")}}
    text = render_table(view)
    assert "MASTER" in text and "\na " in text and "\nb " in text
    assert text.rstrip().endswith("CONVERGED: 2 master(s)")
    assert format_hlc(0) == "-" and format_hlc((1000 << 16) | 3).endswith(".000+3")


def test_status_without_redis_reads_the_progress_files_and_says_so(tmp_path):
    from workers.models.ledger import model
    from workers.prevalence import Master

    shared = tmp_path / "shared"
    shared.mkdir()
    master = Master.open(model, str(shared), "alpha")
    master.execute("open_account", "x", 5)
    master.sync()
    master.close()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PREVALENCE_SHARED_DIR": str(shared),
           "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "workers.client.cli", "status"], capture_output=True,
                          text=True, cwd=str(tmp_path), env=env, timeout=60)
    assert "Redis is unavailable" in done.stdout, done.stdout + done.stderr
    assert "progress files" in done.stdout
    assert "alpha" in done.stdout
    assert done.returncode in (0, 3)


def test_a_member_without_a_report_is_shown_from_its_progress_file(monkeypatch, tmp_path):
    import workers.client.monitor as monitor

    monkeypatch.setattr(monitor, "read_status_documents", lambda url: {"a": doc("a")})
    b_progress = {k: v for k, v in doc("b").items() if k != "reported_at"}
    progress = {"a": doc("a"), "b": dict(b_progress, updated=90.0)}
    view = monitor.cluster_view("redis://x", tmp_path, sync_interval_s=1.0,
                                read_progress=lambda shared: progress,
                                read_retired=lambda shared: {}, now_s=100.0)
    assert not view["converged"]
    assert "b has not reported (down, or not started yet)" in view["verdict"]
    assert view["masters"]["b"]["state"] == "no report"
    assert view["masters"]["b"]["age_s"] == 10.0
    assert "\nb " in render_table(view)


def test_a_retired_master_is_neither_expected_nor_evaluated(monkeypatch, tmp_path):
    import workers.client.monitor as monitor

    monkeypatch.setattr(monitor, "read_status_documents",
                        lambda url: {"a": doc("a"), "c": doc("c", state="stopped")})
    view = monitor.cluster_view("redis://x", tmp_path, sync_interval_s=1.0,
                                read_progress=lambda shared: {"a": doc("a"), "c": doc("c")},
                                read_retired=lambda shared: {"c": 3}, now_s=100.0)
    assert view["converged"], view["reasons"]
    assert view["retired"] == ["c"] and set(view["masters"]) == {"a"}


def test_a_master_whose_lease_says_its_process_is_gone_is_down_at_once(monkeypatch, tmp_path):
    import workers.client.monitor as monitor

    # b's last report is one second old and says ready; its lease says the process is gone.
    monkeypatch.setattr(monitor, "read_status_documents",
                        lambda url: {"a": doc("a"), "b": doc("b", reported_at=99.0)})
    why = "its process (pid 77 on host 'h1', named by its lease) is gone"
    leases = {"a": {"lease": "alive", "why": "running"}, "b": {"lease": "down", "why": why}}
    view = monitor.cluster_view("redis://x", tmp_path, sync_interval_s=1.0,
                                read_progress=lambda shared: {"a": doc("a"), "b": doc("b")},
                                read_retired=lambda shared: {}, read_leases=lambda shared: leases,
                                now_s=100.0)
    assert not view["converged"]
    assert view["masters"]["b"]["state"] == "down"
    assert f"b is down: {why}" in view["verdict"]
    assert "\nb  " in render_table(view) and " down " in render_table(view)
    # Without the leases the same view calls it converged: the lease is what tells.
    view = monitor.cluster_view("redis://x", tmp_path, sync_interval_s=1.0,
                                read_progress=lambda shared: {"a": doc("a"), "b": doc("b")},
                                read_retired=lambda shared: {}, now_s=100.0)
    assert view["converged"], view["reasons"]


def test_with_redis_down_a_dead_master_is_down_from_its_lease(monkeypatch, tmp_path):
    import workers.client.monitor as monitor

    def unavailable(url):
        raise monitor.MonitorUnavailable("ConnectionError: refused")

    monkeypatch.setattr(monitor, "read_status_documents", unavailable)
    view = monitor.cluster_view("redis://x", tmp_path, sync_interval_s=1.0,
                                read_progress=lambda shared: {"a": doc("a", joined=True)},
                                read_retired=lambda shared: {},
                                read_leases=lambda shared: {"a": {"lease": "down", "why": "gone"}},
                                now_s=100.0)
    assert view["source"] == "progress-files" and view["masters"]["a"]["state"] == "down"
    assert "a is down: gone" in view["verdict"]


@pytest.mark.parametrize("command", ["tx", "query"])
def test_a_missing_name_is_the_only_required_argument_named(command, capsys):
    from workers.client.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"prevalence {command}: error: the following arguments are required: NAME"
    # A name alone is a complete call: a transaction or query may take no argument.
    assert build_parser().parse_args([command, "total"]).args == []


def _cli(*args, env_extra):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.run([sys.executable, "-m", "workers.client.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [("tx", "deposit", "a", "1", "--timeout", "3"), ("query", "balance", "a"),
                                  ("sync",), ("outcome", "k1", "--timeout", "3")])
def test_with_redis_down_the_cli_says_so_in_one_line_and_exits_4_within_its_timeout(tmp_path, args):
    done = _cli(*args, env_extra={"CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
                                  "PREVALENCE_SHARED_DIR": str(tmp_path)})
    assert done.returncode == 4, done.stderr
    assert done.stderr.count("\n") == 1 and "cannot reach the broker" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_write_that_times_out_says_how_to_retry_and_prints_no_traceback(tmp_path, broker):
    done = _cli("tx", "deposit", "a", "1", "--timeout", "1", "--key", "retry-me",
                env_extra={"CELERY_BROKER_URL": broker.url, "PREVALENCE_SHARED_DIR": str(tmp_path)})
    assert done.returncode == 4, done.stderr
    assert "no reply" in done.stderr and "--key retry-me" in done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


def test_a_committed_wait_tells_the_caller_when_the_committed_order_reversed_the_answer(monkeypatch):
    from workers.client import Client, TransactionRejected

    client = Client(app=object())
    first = {"status": "ok", "value": 20, "rid": "k", "master": "alpha", "committed": False}
    final = {"status": "rejected", "value": None, "error": "insufficient funds", "rid": "k",
             "master": "alpha", "committed": True}
    monkeypatch.setattr(client, "execute_outcome", lambda *a, **k: first)
    monkeypatch.setattr(client, "wait_committed", lambda answer, timeout_s: final)
    seen = []
    with pytest.raises(TransactionRejected, match="insufficient funds"):
        client.execute("withdraw", "a", 80, wait="committed", on_change=lambda t, f: seen.append((t, f)))
    assert seen == [(first, final)]
    assert client.execute("withdraw", "a", 80) == 20  # the default: the first answer


def test_route_keys_are_spread_stable_and_move_only_off_a_master_that_went_down(monkeypatch):
    from workers.client import Client

    client = Client(app=object())
    up = ["alpha", "beta", "gamma"]
    monkeypatch.setattr(client, "members_up", lambda: list(up))
    keys = [f"k{i}" for i in range(60)]
    routes = {k: client.route(k) for k in keys}
    assert set(routes.values()) == set(up)
    up.remove("beta")
    assert all(client.route(k) == r for k, r in routes.items() if r != "beta")
    assert all(client.route(k) in up for k in keys)
    up.clear()
    assert client.route("k1") is None  # no master known up: any master
