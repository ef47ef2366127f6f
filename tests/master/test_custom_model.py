"""A custom model through the Celery tasks, as the README's "Your own model" describes it:
what the state may hold is checked at the write, ``ctx.now`` is a UTC datetime, and the
model's module must be importable by `prevalence verify` (and the workers)."""

from __future__ import annotations

import datetime
import decimal  # noqa: F401 (used by an eval below: imported here, where the eval sees it)
import enum
import subprocess
import sys
import textwrap
import uuid  # noqa: F401 (used by an eval below)
from pathlib import Path
from types import SimpleNamespace

import pytest

from workers.master import runtime, tasks
from workers.prevalence import Master, Model, Struct

ROOT = Path(__file__).resolve().parents[2]


def _tags_model() -> Model:
    model = Model("tags", lambda: {"tags": {}, "seen": {}})

    @model.transaction
    def tag_as_set(root, ctx, key):
        root["tags"][key] = {"a", "b"}          # a set: its changes could not be tracked

    @model.transaction
    def tag_as_list(root, ctx, key):
        root["tags"][key] = sorted({"b", "a"})  # a set as a temporary, stored as a list: fine

    @model.transaction
    def stamp(root, ctx, key):
        root["seen"][key] = ctx.now.isoformat()
        return root["seen"][key]

    @model.query
    def tags(root):
        return dict(root["tags"])

    return model


@pytest.fixture
def master(tmp_path):
    opened = Master.open(_tags_model(), str(tmp_path / "shared"), "alpha", fsync="never")
    runtime.install(SimpleNamespace(name="alpha", master=opened))
    yield opened
    runtime.uninstall()
    opened.close()


def _execute(tx, *args):
    result = tasks.execute.apply(args=[tx, list(args)])
    assert result.successful(), result.traceback
    return result.get()


def test_a_set_stored_by_a_transaction_is_refused_by_execute_at_the_write(master):
    outcome = _execute("tag_as_set", "x")
    # Refused at the write, not minutes later at a snapshot: the outcome says so and the
    # state holds no trace of it (only the request id's recorded outcome).
    assert outcome["status"] == "error", outcome
    assert "UntrackableValue" in outcome["error"] and "set" in outcome["error"], outcome
    assert master.query("tags") == {}
    assert master.outcome(outcome["rid"])["status"] == "error"
    assert _execute("tag_as_list", "y")["status"] == "ok"
    assert master.query("tags") == {"y": ["a", "b"]}
    master.snapshot()  # the state is one a snapshot can hold


def test_ctx_now_is_the_records_time_as_a_utc_datetime(master):
    value = _execute("stamp", "k")["value"]
    now = datetime.datetime.fromisoformat(value)
    assert now.tzinfo is not None and now.utcoffset() == datetime.timedelta(0)


MODULE = '''
from workers.prevalence import Model

model = Model("counter", lambda: {"n": 0})


@model.transaction
def add(root, ctx, k):
    root["n"] += k
'''


def test_verify_imports_the_model_from_pythonpath_and_says_what_to_do_when_it_cannot(tmp_path):
    package = tmp_path / "mymodels"
    package.mkdir()
    (package / "counter.py").write_text(textwrap.dedent(MODULE))
    sys.path.insert(0, str(package))
    try:
        import counter
        shared = tmp_path / "shared"
        shared.mkdir()
        m = Master.open(counter.model, str(shared), "alpha")
        m.execute("add", 5)
        digest = m.digest()
        m.close()
    finally:
        sys.path.remove(str(package))
        sys.modules.pop("counter", None)
    env = {"PATH": "/usr/bin:/bin", "PREVALENCE_SHARED_DIR": str(shared),
           "PREVALENCE_MODEL": "counter:model"}

    def verify(pythonpath: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workers.client.cli", "verify"],
                              env=dict(env, PYTHONPATH=pythonpath), capture_output=True, text=True,
                              timeout=60, cwd=str(tmp_path))

    done = verify(str(ROOT))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot import module 'counter'" in done.stderr and "PYTHONPATH" in done.stderr
    done = verify(f"{ROOT}:{package}")
    assert done.returncode == 0, done.stderr
    assert f"reference digest: {digest}" in done.stdout
    # Progress on stderr (a large folder takes minutes): each journal read, each replay.
    assert "verify: read the journal of alpha: 1 records" in done.stderr, done.stderr
    assert "verify: replay 2 of 2 done: 1 records and 0 ticks from initial state" in done.stderr, done.stderr


@pytest.mark.parametrize("value", [
    "(1, 'a')", "datetime.date(2020, 1, 2)", "datetime.datetime(2020, 1, 1)",
    "datetime.timedelta(seconds=3)", "datetime.time(1, 2)", "decimal.Decimal('1.5')", "uuid.UUID(int=5)",
    "datetime.datetime(2020, 1, 1, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))",
    "enum.Enum('Status', 'NEW PAID').PAID", "enum.IntEnum('Level', 'LOW HIGH').HIGH",
])
def test_a_value_a_snapshot_cannot_read_back_is_refused_at_the_write(tmp_path, value):
    # In a plain dict the snapshot codec reads these back as other types (a list, a str,
    # a datetime moved to UTC): refused at the write, the snapshot after it still works.

    model = Model("values", lambda: {"v": {}})

    @model.transaction
    def put(root, ctx):
        root["v"]["x"] = eval(value)

    m = Master.open(model, str(tmp_path), "alpha", fsync="never")
    try:
        with pytest.raises(Exception, match="UntrackableValue"):
            m.execute("put")
        m.snapshot()
    finally:
        m.close()


@pytest.mark.parametrize("key", [
    "datetime.date(2020, 1, 2)", "enum.Enum('Status', 'NEW PAID').PAID", "(1, datetime.date(2020, 1, 2))",
    "Mood.GLAD",
])
def test_a_key_a_snapshot_cannot_read_back_is_refused_at_the_write(tmp_path, key):
    # Before, such a key was taken, and every snapshot after it failed (UnsupportedState)
    # on every master: the journal could never be collected again.
    model = Model("keys", lambda: {"v": {}})

    @model.transaction
    def put(root, ctx):
        root["v"]["before"] = 1
        root["v"][eval(key)] = 1

    @model.query
    def v(root):
        return dict(root["v"])

    m = Master.open(model, str(tmp_path), "alpha", fsync="never")
    try:
        with pytest.raises(Exception, match="UntrackableValue.*cannot be a key"):
            m.execute("put")
        assert m.query("v") == {}  # the change before it was undone too
        m.snapshot()
    finally:
        m.close()


class Mood(enum.Enum):
    CALM = 1
    GLAD = 2


class Diary(Struct):
    """A root whose typed fields the snapshot codec decodes back to their types."""
    day: datetime.date = datetime.date(2000, 1, 1)
    pair: tuple[int, str] = (0, "")
    notes: dict = {}
    mood: Mood = Mood.CALM


def test_a_struct_field_annotated_with_its_type_keeps_a_date_through_a_snapshot(tmp_path):
    model = Model("diary", Diary)

    @model.transaction
    def write(root, ctx):
        root.day = datetime.date(2020, 1, 2)
        root.pair = (7, "x")
        root.notes["at"] = ctx.now  # an aware UTC datetime: allowed in a plain dict
        root.mood = Mood.GLAD

    @model.query
    def read(root):
        return root.day, root.pair, root.notes["at"], root.mood

    m = Master.open(model, str(tmp_path), "alpha", fsync="never")
    try:
        m.execute("write")
        written = m.query("read")
        m.snapshot()
    finally:
        m.close()
    m = Master.open(model, str(tmp_path), "alpha", fsync="never")
    try:
        day, pair, at, mood = m.query("read")
        assert (day, pair, at, mood) == written == (datetime.date(2020, 1, 2), (7, "x"), written[2], Mood.GLAD)
        assert type(day) is datetime.date and type(pair) is tuple and at.hour == written[2].hour
    finally:
        m.close()
