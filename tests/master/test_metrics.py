"""Metrics of a master worker, in process: every gauge from a status document, the
histograms, and the PREVALENCE_METRICS_PORT setting."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from workers.master.metrics import Metrics
from workers.settings import SettingsError, load_settings


def _value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_status_document_sets_every_gauge_and_counters_only_grow(tmp_path):
    journal = tmp_path / "journal"
    journal.mkdir()
    (journal / "00000000000000000001.log").write_bytes(b"x" * 1234)
    (journal / "00000000000000000001.seal").write_bytes(b"seal")  # not a segment
    m = Metrics("alpha")
    frontier = (1_700_000_000_000 << 16)
    status = {"seq": 42, "frontier": frontier, "tentative": 3, "last_error": "disk full",
              "snapshot_frontier": frontier, "clock": frontier, "horizons": {"beta": frontier + (2000 << 16)},
              "lag": {"beta": 7, "gamma": None}, "rebases": 5, "outcomes_changed": 2, "clock_skew_ms": -3_600_000}
    m.update(status, {"duration_ms": 12.5}, up=True, journal_dir=str(journal))
    assert _value(m, "prevalence_seq", master="alpha") == 42
    assert _value(m, "prevalence_tentative_records", master="alpha") == 3
    assert _value(m, "prevalence_lag_records", master="alpha", peer="beta") == 7
    assert _value(m, "prevalence_lag_records", master="alpha", peer="gamma") is None
    assert _value(m, "prevalence_clock_skew_seconds", master="alpha", peer="beta") == 2.0
    assert _value(m, "prevalence_last_error", master="alpha") == 1
    assert _value(m, "prevalence_wall_clock_skew_seconds", master="alpha") == -3600.0
    assert _value(m, "prevalence_up", master="alpha") == 1
    assert _value(m, "prevalence_journal_bytes", master="alpha") == 1234
    assert _value(m, "prevalence_frontier_age_seconds", master="alpha") > 0
    assert _value(m, "prevalence_rebases_total", master="alpha") == 5
    assert _value(m, "prevalence_sync_duration_seconds_count", master="alpha") == 1
    m.update(dict(status, rebases=6, outcomes_changed=2, last_error=None), None, up=False)
    assert _value(m, "prevalence_rebases_total", master="alpha") == 6
    assert _value(m, "prevalence_reversed_outcomes_total", master="alpha") == 2
    assert _value(m, "prevalence_last_error", master="alpha") == 0
    m.observe_fsync(0.003)
    assert _value(m, "prevalence_fsync_duration_seconds_count", master="alpha") == 1
    assert b"prevalence_fsync_duration_seconds_bucket" in generate_latest(m.registry)


@pytest.mark.parametrize("text, address", [("9808", ("127.0.0.1", 9808)), ("0.0.0.0:9808", ("0.0.0.0", 9808)),
                                           ("[::1]:9808", ("[::1]", 9808))])
def test_the_metrics_port_setting_takes_a_port_or_host_and_port(text, address):
    assert load_settings({"PREVALENCE_METRICS_PORT": text}, use_env_file=False).metrics_address == address


@pytest.mark.parametrize("text", ["http", "0", "70000", ":9808", "host:"])
def test_a_bad_metrics_port_is_refused_naming_the_variable(text):
    with pytest.raises(SettingsError, match="PREVALENCE_METRICS_PORT"):
        load_settings({"PREVALENCE_METRICS_PORT": text}, use_env_file=False)
