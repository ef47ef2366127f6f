"""Settings: every variable of DESIGN §6 validated, with a message that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.settings import SettingsError, load_settings, parse_duration_s, read_env_file

ROOT = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, **env: str):
    return load_settings(env, cwd=tmp_path)


def test_defaults_are_documented_values(tmp_path):
    settings = load(tmp_path)
    assert settings.master is None
    assert settings.shared_dir == tmp_path / "var" / "shared"
    assert settings.model_path == "workers.models.ledger:model"
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.sync_interval_s == 1.0
    assert settings.snapshot_interval_s == 600.0
    assert settings.fsync == "always"
    assert settings.cluster_key_file is None
    assert settings.redelivery_after_s == 3600.0


@pytest.mark.parametrize("variable, value, text", [
    ("PREVALENCE_MASTER", "bad name", "is not a master name"),
    ("PREVALENCE_MASTER", "-alpha", "is not a master name"),
    ("PREVALENCE_MODEL", "workers.models.ledger", "is not `package.module:attribute`"),
    ("CELERY_BROKER_URL", "amqp://localhost//", "is not supported"),
    ("CELERY_BROKER_URL", "localhost:6379", "is not supported"),
    ("PREVALENCE_SYNC_INTERVAL", "fast", "is not a duration"),
    ("PREVALENCE_SYNC_INTERVAL", "0", "expected between"),
    ("PREVALENCE_SYNC_INTERVAL", "2h", "expected between"),
    ("PREVALENCE_SNAPSHOT_INTERVAL", "-5", "is not a duration"),
    ("PREVALENCE_FSYNC", "sometimes", "is not one of always, interval, never"),
    ("PREVALENCE_JOURNAL_RESERVE", "lots", "is not `auto`, `0` or a size"),
    ("PREVALENCE_JOURNAL_RESERVE", "-1", "is not `auto`, `0` or a size"),
    ("PREVALENCE_JOURNAL_RESERVE", "65m", "expected at most 64m"),
    ("PREVALENCE_SYNC_OVERLAP", "yes", "is not `on` or `off`"),
    ("PREVALENCE_REDELIVERY_AFTER", "soon", "is not a duration"),
    ("PREVALENCE_REDELIVERY_AFTER", "1s", "expected between"),
    ("PREVALENCE_CLUSTER_KEY_FILE", "/nonexistent/key", "is not a readable file"),
    ("PREVALENCE_ENV_FILE", "/nonexistent/.env", "is not a file"),
])
def test_a_bad_value_is_refused_with_the_variable_named(tmp_path, variable, value, text):
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, **{variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")
    assert text in str(caught.value)


@pytest.mark.parametrize("text, seconds", [
    ("2", 2.0), ("0.5", 0.5), ("500ms", 0.5), ("1.5s", 1.5), ("10m", 600.0), ("1h", 3600.0),
    (" 3 s ", 3.0), (".25", 0.25),
])
def test_durations_accept_seconds_and_units(text, seconds):
    assert parse_duration_s("X", text, minimum_s=0.0, maximum_s=1e9) == seconds


@pytest.mark.parametrize("text, size", [
    ("auto", None), ("", None), ("0", 0), ("65536", 65536), ("256k", 262144), ("1m", 1 << 20),
    (" 2 MiB ", 2 << 20),
])
def test_journal_reserve_accepts_auto_zero_and_sizes(tmp_path, text, size):
    assert load(tmp_path, PREVALENCE_JOURNAL_RESERVE=text).journal_reserve_bytes == size


def test_redelivery_after_sets_the_brokers_visibility_timeout_and_restore_scans(tmp_path):
    from workers.celeryconfig import celery_settings

    options = celery_settings(load(tmp_path, PREVALENCE_REDELIVERY_AFTER="30s"))["broker_transport_options"]
    assert options["visibility_timeout"] == 30.0
    assert options["unacked_restore_interval"] == 3.0 and options["unacked_restore_throttle"] == 1
    default = celery_settings(load(tmp_path))["broker_transport_options"]
    assert default["visibility_timeout"] == 3600.0 and default["unacked_restore_interval"] == 10.0


@pytest.mark.parametrize("text, on", [(None, True), ("on", True), (" OFF ", False)])
def test_sync_overlap_is_on_unless_switched_off(tmp_path, text, on):
    env = {} if text is None else {"PREVALENCE_SYNC_OVERLAP": text}
    assert load(tmp_path, **env).sync_overlap is on


def test_env_file_fills_only_what_the_environment_leaves_unset(tmp_path):
    (tmp_path / ".env").write_text(
        "# comment\n"
        "export PREVALENCE_MASTER=beta\n"
        "PREVALENCE_FSYNC='never'\n"
        'PREVALENCE_SYNC_INTERVAL="250ms"\n'
        "PREVALENCE_SNAPSHOT_INTERVAL=5m # inline comment\n")
    settings = load(tmp_path, PREVALENCE_MASTER="alpha")
    assert settings.master == "alpha"
    assert settings.fsync == "never"
    assert settings.sync_interval_s == 0.25
    assert settings.snapshot_interval_s == 300.0
    assert settings.env_file == tmp_path / ".env"


def test_a_malformed_env_file_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "custom.env"
    path.write_text("PREVALENCE_MASTER=alpha\nthis is not an assignment\n")
    with pytest.raises(SettingsError, match=r"line 2 is not KEY=VALUE"):
        read_env_file(path)


def test_a_worker_needs_a_master_name_and_an_existing_shared_folder(tmp_path):
    settings = load(tmp_path, PREVALENCE_SHARED_DIR="missing")
    with pytest.raises(SettingsError, match="PREVALENCE_MASTER: not set"):
        settings.require_master()
    with pytest.raises(SettingsError, match="does not exist.*never create it"):
        settings.require_shared_dir()


def test_the_model_path_is_imported_with_clear_errors(tmp_path):
    assert load(tmp_path).load_model().name == "ledger"
    with pytest.raises(SettingsError, match="cannot import module 'no_such_module'"):
        load(tmp_path, PREVALENCE_MODEL="no_such_module:model").load_model()
    with pytest.raises(SettingsError, match="has no attribute 'nothing'"):
        load(tmp_path, PREVALENCE_MODEL="workers.models.ledger:nothing").load_model()
    with pytest.raises(SettingsError, match="not a prevalence Model"):
        load(tmp_path, PREVALENCE_MODEL="workers.models.ledger:deposit").load_model()


def test_the_cluster_key_is_read_stripped_and_checked_for_length(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("0123456789abcdef0123456789abcdef\n")
    settings = load(tmp_path, PREVALENCE_CLUSTER_KEY_FILE=str(key_file))
    assert settings.read_cluster_key() == b"0123456789abcdef0123456789abcdef"
    key_file.write_text("short\n")
    with pytest.raises(SettingsError, match="PREVALENCE_CLUSTER_KEY_FILE: .* is 5 bytes"):
        settings.read_cluster_key()


def test_settings_accept_exactly_the_engines_fsync_modes_and_master_names(tmp_path):
    # workers.settings must not import the engine, so it keeps its own copies: keep them in step.
    from workers import settings as config_settings
    from workers.prevalence import journal
    from workers.prevalence.cluster import folder

    assert tuple(config_settings.FSYNC_MODES) == tuple(journal.FSYNC_MODES)
    for name in ["alpha", "a", "A1", "x.y-z_1", "9lives", "-bad", ".bad", "bad name",
                 "x" * 64, "x" * 65, "é"]:
        engine_ok = bool(folder.NAME_RE.match(name))
        assert bool(config_settings._MASTER_NAME.match(name)) == engine_ok, name


@pytest.mark.parametrize("command", [["worker", "-P", "solo"], ["beat"], ["flower"]])
def test_a_bad_setting_stops_worker_beat_and_flower_with_one_line_and_exit_78(tmp_path, command):
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PREVALENCE_FSYNC": "sometimes",
           "PREVALENCE_SHARED_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "workers", *command], env=env,
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert done.returncode == 78, done.stderr
    assert done.stderr.strip().splitlines() == [
        "prevalence: bad setting: PREVALENCE_FSYNC: 'sometimes' is not one of always, interval, never "
        "(`always` is the safe default)"]
