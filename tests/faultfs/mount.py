"""Mounting `tests.faultfs.faultfs` for a test: one `FaultMount` per simulated NFS client.

`why_unavailable()` says, in one line, why FUSE cannot be used here (no ``/dev/fuse``, not
root and no ``fusermount3``, no libfuse3 or mfusepy, a mount that fails); the tests then
skip with that line. Every mount is unmounted and its process ended by the fixture that
made it, also when the test fails (`FaultMount.stop`, and `stop_all` at exit as a last
resort).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MOUNT_S_MAX = 10.0
_live: list["FaultMount"] = []
_unavailable: list[str] = []   # the reason, once found


class FuseUnavailable(Exception):
    """Raised when a mount cannot be made here (the reason is the message, one line)."""


def why_unavailable() -> str | None:
    """None where FUSE mounts can be made, else why not (one line). A failed mount says it
    too (`FaultMount.start` records it), so later tests skip at once."""
    if _unavailable:
        return _unavailable[0]
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (no FUSE in this kernel or container)"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "not root and no fusermount3: run bin/install-test-packages fuse as root"
    try:
        import mfusepy  # noqa: F401  (loads libfuse)
    except ImportError:
        return "mfusepy is not installed (pip install -e '.[test]')"
    except (OSError, EnvironmentError) as exc:
        return f"libfuse3 not found ({exc}): run bin/install-test-packages fuse as root"
    return None


class FaultMount:
    """A mount of `root` at `mountpoint` served by a `faultfs` process of its own."""

    def __init__(self, root: Path, mountpoint: Path, faults: dict | None = None):
        self.root = Path(root)
        self.path = Path(mountpoint)
        self.faults = faults or {}
        self.proc: subprocess.Popen | None = None
        self.log = self.path.with_name(self.path.name + ".log")

    def start(self) -> "FaultMount":
        self.path.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faultfs.faultfs", str(self.root), str(self.path)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            start_new_session=True)
        _live.append(self)
        end = time.monotonic() + MOUNT_S_MAX
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                reason = f"a FUSE mount failed here: {tail[0][:200]}"
                _unavailable.append(reason)
                raise FuseUnavailable(reason)
            time.sleep(0.01)
        self.set(**self.faults)
        return self

    def _call(self, msg: dict) -> dict:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or b'{"ok": false, "error": "faultfs is gone"}')
        if not answer.get("ok"):
            raise RuntimeError(f"faultfs at {self.path}: {answer.get('error')}")
        return answer

    def set(self, **faults) -> None:
        """Replace the fault set (see `tests.faultfs.faultfs`; missing keys take defaults)."""
        self.faults = faults
        self._call({"faults": faults})

    def stats(self) -> dict:
        """How many of each fault this mount injected so far."""
        return self._call({})["stats"]

    def stop(self) -> None:
        """Unmount (lazily: a test that failed may still hold files open) and end the process."""
        if self in _live:
            _live.remove(self)
        if os.path.ismount(self.path):
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            for f in (self.proc.stdin, self.proc.stdout):
                if f:
                    f.close()
        if getattr(self, "_log", None):
            self._log.close()


def stop_all() -> None:
    for m in list(_live):
        m.stop()


atexit.register(stop_all)
