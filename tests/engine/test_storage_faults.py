"""A disk that refuses: every public call raises `StorageError`, never a raw OSError (issue 9,
"Also")."""

from __future__ import annotations

import errno
import os

import pytest

from workers.prevalence import errors

from tests.support import open_master


@pytest.mark.parametrize("call", ["sync", "status", "snapshot"])
def test_sync_status_and_snapshot_on_a_full_disk_raise_storage_error(tmp_path, monkeypatch, call):
    m = open_master(tmp_path)
    m.execute("open_account", "a", 1)

    def full(*_args, **_kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        for name in ("fsync", "fdatasync", "write", "pwrite", "replace", "rename"):
            if hasattr(os, name):
                patch.setattr(os, name, full)
        if call in ("sync", "snapshot"):  # the state changed: both write, which the disk refuses
            with pytest.raises(errors.StorageError, match="ENOSPC|No space"):
                getattr(m, call)()
        else:  # status writes nothing: it must answer, and never raise a raw OSError
            assert m.status(digest=True)["seq"] == 1
    m.close()
