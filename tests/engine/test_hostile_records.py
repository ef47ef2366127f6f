"""Arguments built to hurt: refused before anything is written, never a crash (issue 9,
item 8, the writing side)."""

from __future__ import annotations

import pytest

from workers.prevalence import codec, errors

from tests.support import open_master
from .helpers import journal_bytes


# -- item 8: nesting depth -------------------------------------------------------------------

def nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [codec_depth + 1 for codec_depth in (getattr(codec, "DEPTH_MAX", 100),)] + [10_000])
def test_arguments_nested_too_deep_are_bad_arguments_and_nothing_is_written(tmp_path, depth):
    m = open_master(tmp_path)
    m.execute("open_account", "a", 1)
    before = journal_bytes(tmp_path)
    with pytest.raises(errors.BadArguments, match="deep"):
        m.execute("deposit", nested(depth), 1)
    with pytest.raises(errors.BadArguments, match="deep"):
        m.execute_many([("deposit", ["a", 1], None), ("deposit", [nested(depth), 1], None)])
    assert journal_bytes(tmp_path) == before and m.seq == 1
    m.execute("deposit", "a", 1)
    m.close()


def test_arguments_nested_within_the_bound_are_written_and_read_back(tmp_path):
    from tests.engine.helpers import probe
    m = open_master(tmp_path, model=probe)
    depth = getattr(codec, "DEPTH_MAX", 100) - 1
    with pytest.raises(errors.TransactionFailed):
        m.execute("add", nested(depth))  # a list is no number: recorded as an error
    m.close()
    m = open_master(tmp_path, model=probe)
    assert m.seq == 1
    m.close()
