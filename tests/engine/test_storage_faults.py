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
        if call == "sync":  # the state changed: sync publishes progress, which the disk refuses
            with pytest.raises(errors.StorageError, match="ENOSPC|No space"):
                m.sync()
        else:
            try:
                getattr(m, call)()
            except errors.StorageError as exc:
                assert "ENOSPC" in str(exc) or "No space" in str(exc)
    m.close()
