"""Settings: the environment variables that configure a master, beat, Flower and the CLI.

Every variable of DESIGN §6 is read here and nowhere else. Each one is validated when it
is read, and a bad value raises `SettingsError` with a message that names the variable,
shows the value found and says what was expected, so that a worker, beat or the CLI stops
at start-up instead of failing later in a task.

Variables (all optional unless stated):

PREVALENCE_MASTER
    Name of the master this worker runs (1-64 of ``A-Za-z0-9_.-``). Required by a
    worker, ignored by beat, Flower and the CLI.
PREVALENCE_SHARED_DIR
    The shared folder (NFS in production). Default ``./var/shared``. A worker refuses to
    start when it does not exist: on NFS a missing folder usually means "not mounted", and
    creating it would write the journal to the local disk under the mount point.
PREVALENCE_MODEL
    ``module:attribute`` of the `Model`. Default ``workers.models.ledger:model``.
CELERY_BROKER_URL
    Redis URL, used as broker, result backend and monitoring store. Default
    ``redis://127.0.0.1:6379/0``. ``memory://`` is accepted for in-process tests only.
PREVALENCE_SYNC_INTERVAL
    How often beat sends ``sync`` to every master. A duration: ``2``, ``0.5s``, ``500ms``,
    ``1m``. Default ``1s``. Between 10 ms and 1 h.
PREVALENCE_SNAPSHOT_INTERVAL
    How often beat sends ``snapshot`` to every master. Default ``10m``. Between 1 s and 7 d.
PREVALENCE_FSYNC
    ``always`` (default: a write is on stable storage before it is acknowledged),
    ``interval`` or ``never`` (both trade durability for speed; see the engine's docs).
PREVALENCE_JOURNAL_RESERVE
    Space the journal writer keeps written ahead of its offset, so that a commit's sync
    writes data only: ``auto`` (default: 256 KiB on a local disk, none on NFS and other
    network filesystems, whose readers could cache the zeros), ``0`` (never), or a size
    ``65536``, ``256k``, ``1m`` (up to 64m; on NFS only with NFSv4.2 servers that report
    exact change attributes).
PREVALENCE_SYNC_OVERLAP
    ``on`` (default) or ``off``. With ``on`` and ``PREVALENCE_FSYNC=always``, a write's
    journal sync runs in the kernel (Linux AIO) while Celery prepares the task's result,
    and the result is published, and the message acknowledged, only once the sync is done
    (`workers.master.results`): the same guarantee, in less time per write. ``off`` syncs before
    the task returns. Elsewhere than Linux it is always off.
PREVALENCE_REDELIVERY_AFTER
    How long a write a master took and never acknowledged (its worker was killed, its
    host lost power) waits in Redis before it is delivered again, to the same master's
    queue or the shared one. Default ``1h``; between 5 s and 7 d. It must exceed the
    longest write task (a batch of 10,000 takes well under a second; a write redelivered
    while it still runs applies once anyway, by its request id, and is only wasted work).
    Workers scan for such writes every tenth of it (at most every 10 s).
PREVALENCE_METRICS_PORT
    Serve a worker's Prometheus metrics (`workers.master.metrics`) on this port: ``9808``
    (loopback only) or ``HOST:PORT`` (``0.0.0.0:9808`` for a Prometheus on another host).
    Unset: no metrics endpoint. Each master on a host needs its own port.
PREVALENCE_CLUSTER_KEY_FILE
    Path of a file holding the cluster's HMAC key. Surrounding whitespace is stripped; the
    key must be at least 16 bytes. Without it records are checksummed but not signed.

A ``.env`` file (``KEY=VALUE`` lines, ``#`` comments, optional quotes) in the current
directory, or at the path in ``PREVALENCE_ENV_FILE``, supplies values that the process
environment does not already set: the real environment always wins.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

__all__ = ["Settings", "SettingsError", "load_settings", "parse_duration_s", "read_env_file"]

DEFAULT_SHARED_DIR = "./var/shared"
DEFAULT_MODEL = "workers.models.ledger:model"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_SYNC_INTERVAL = "1s"
DEFAULT_SNAPSHOT_INTERVAL = "10m"
FSYNC_MODES = ("always", "interval", "never")
RESERVE_BYTES_MAX = 64 * 1024 * 1024
_SIZE = re.compile(r"^(\d+)\s*(|b|k|kb|kib|m|mb|mib)$")
_SIZE_UNIT = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024,
              "m": 1024 * 1024, "mb": 1024 * 1024, "mib": 1024 * 1024}
CLUSTER_KEY_BYTES_MIN = 16
CLUSTER_KEY_BYTES_MAX = 4096

_MASTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MODEL_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "memory")
_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


class SettingsError(ValueError):
    """Raised when an environment variable (or `.env` entry) holds a value that cannot be used.

    `variable` names the offending variable; the message says what was found, what was
    expected and how to fix it.
    """

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated configuration of one process (worker, beat, Flower or CLI)."""

    master: str | None
    shared_dir: Path
    model_path: str
    broker_url: str
    sync_interval_s: float
    snapshot_interval_s: float
    fsync: str
    cluster_key_file: Path | None
    env_file: Path | None = None
    journal_reserve_bytes: int | None = None  # None = auto
    sync_overlap: bool = True
    metrics_address: tuple[str, int] | None = None  # (host, port) of the metrics endpoint
    redelivery_after_s: float = 3600.0

    def require_master(self) -> str:
        """Return the master name, or raise `SettingsError` if PREVALENCE_MASTER is unset."""
        if not self.master:
            raise SettingsError(
                "PREVALENCE_MASTER",
                "not set. A worker is one master and needs its name, e.g. "
                "PREVALENCE_MASTER=alpha celery -A workers worker -P solo -n alpha@%h",
            )
        return self.master

    def require_shared_dir(self) -> Path:
        """Return the shared folder, or raise `SettingsError` if it is not an existing folder.

        The folder is never created here: on NFS a missing folder usually means the share
        is not mounted, and creating it would put the journal on the local disk.
        """
        if not self.shared_dir.is_dir():
            found = "is not a folder" if self.shared_dir.exists() else "does not exist"
            raise SettingsError(
                "PREVALENCE_SHARED_DIR",
                f"{str(self.shared_dir)!r} {found}. Create it (or mount the share) first; "
                "the workers never create it themselves.",
            )
        return self.shared_dir

    def load_model(self) -> Any:
        """Import and return the model named by PREVALENCE_MODEL.

        Raises `SettingsError` naming PREVALENCE_MODEL if the module cannot be imported or
        the attribute is missing. Errors raised while importing the model's own module are
        reported with their type and message.
        """
        module_name, _, attribute = self.model_path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = ""
            if isinstance(exc, ModuleNotFoundError) and exc.name and (
                    module_name == exc.name or module_name.startswith(exc.name + ".")):
                hint = ("; the model's module must be importable by every master worker and by "
                        "`prevalence verify`/`backup`: install it into the same venv, or put the "
                        "folder that holds it on PYTHONPATH")
            raise SettingsError(
                "PREVALENCE_MODEL", f"cannot import module {module_name!r}: {exc}{hint}"
            ) from exc
        target: Any = module
        for part in attribute.split("."):
            try:
                target = getattr(target, part)
            except AttributeError as exc:
                raise SettingsError(
                    "PREVALENCE_MODEL",
                    f"module {module_name!r} has no attribute {attribute!r}",
                ) from exc
        if not (hasattr(target, "transaction") and hasattr(target, "query")):
            raise SettingsError(
                "PREVALENCE_MODEL",
                f"{self.model_path!r} is a {type(target).__name__}, not a prevalence Model",
            )
        return target

    def read_cluster_key(self) -> bytes | None:
        """Return the cluster key bytes (whitespace stripped), or None when not configured.

        Raises `SettingsError` naming PREVALENCE_CLUSTER_KEY_FILE when the file cannot be
        read or the key is shorter than 16 or longer than 4096 bytes.
        """
        if self.cluster_key_file is None:
            return None
        variable = "PREVALENCE_CLUSTER_KEY_FILE"
        try:
            size_bytes = self.cluster_key_file.stat().st_size
            if size_bytes > CLUSTER_KEY_BYTES_MAX * 2:
                raise SettingsError(variable, f"{str(self.cluster_key_file)!r} is "
                                    f"{size_bytes} bytes; a key file holds one key")
            key = self.cluster_key_file.read_bytes().strip()
        except OSError as exc:
            raise SettingsError(variable, f"cannot read {str(self.cluster_key_file)!r}: "
                                f"{exc.strerror or exc}") from exc
        if not CLUSTER_KEY_BYTES_MIN <= len(key) <= CLUSTER_KEY_BYTES_MAX:
            raise SettingsError(
                variable,
                f"the key in {str(self.cluster_key_file)!r} is {len(key)} bytes; expected "
                f"{CLUSTER_KEY_BYTES_MIN}..{CLUSTER_KEY_BYTES_MAX} (e.g. `openssl rand -hex 32`)",
            )
        return key

    @property
    def is_redis(self) -> bool:
        """True when the broker is a Redis server (so it can also hold monitoring data)."""
        return urlsplit(self.broker_url).scheme != "memory"


def parse_duration_s(variable: str, text: str, *, minimum_s: float, maximum_s: float) -> float:
    """Parse a duration such as ``2``, ``0.5s``, ``500ms``, ``10m``, ``1h`` into seconds.

    A bare number means seconds. Raises `SettingsError` naming `variable` when the text is
    not a duration or falls outside ``[minimum_s, maximum_s]``.
    """
    match = _DURATION.match(text)
    if not match:
        raise SettingsError(
            variable,
            f"{text!r} is not a duration; write seconds (`2`, `0.5`) or a number with a "
            "unit ms, s, m, h or d (`500ms`, `10m`)",
        )
    seconds = float(match.group(1)) * _DURATION_UNIT_S[match.group(2)]
    if not minimum_s <= seconds <= maximum_s:
        raise SettingsError(
            variable,
            f"{text!r} is {seconds:g} s; expected between {minimum_s:g} s and {maximum_s:g} s",
        )
    return seconds


def parse_reserve_bytes(variable: str, text: str) -> int | None:
    """Parse ``auto`` (None), ``0`` or a size such as ``65536``, ``256k``, ``1m`` into bytes."""
    cleaned = text.strip().lower()
    if cleaned in ("", "auto"):
        return None
    match = _SIZE.match(cleaned)
    if not match:
        raise SettingsError(variable, f"{text!r} is not `auto`, `0` or a size in bytes "
                                      "(`65536`, `256k`, `1m`)")
    size = int(match.group(1)) * _SIZE_UNIT[match.group(2)]
    if size > RESERVE_BYTES_MAX:
        raise SettingsError(variable, f"{text!r} is {size} bytes; expected at most "
                                      f"{RESERVE_BYTES_MAX // (1024 * 1024)}m")
    return size


def read_env_file(path: Path) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines from a `.env` file.

    Blank lines and ``#`` comments are skipped, ``export`` prefixes are allowed, and a value
    in matching single or double quotes is unquoted (no escapes, no interpolation). Raises
    `SettingsError` naming the file and line for a line that is not an assignment.
    """
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError("PREVALENCE_ENV_FILE", f"cannot read {str(path)!r}: "
                            f"{exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise SettingsError("PREVALENCE_ENV_FILE", f"{str(path)!r} is not UTF-8 text") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if not match:
            raise SettingsError(
                "PREVALENCE_ENV_FILE",
                f"{str(path)!r} line {number} is not KEY=VALUE: {stripped[:60]!r}",
            )
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        elif " #" in value:
            # An unquoted value ends at an inline comment, as in shells and docker's env files.
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def load_settings(environ: Mapping[str, str] | None = None, *, cwd: Path | None = None,
                  use_env_file: bool = True) -> Settings:
    """Read and validate the settings from `environ` (default `os.environ`) and `.env`.

    Args:
        environ: the variables to read; the process environment when None.
        cwd: folder against which relative paths and the default `.env` are resolved
            (default: the current directory).
        use_env_file: read ``PREVALENCE_ENV_FILE`` or ``./.env`` for unset variables.

    Returns the `Settings`. Raises `SettingsError` naming the first bad variable. Does not
    check that the shared folder exists, import the model or read the key file: the
    `require_*`/`load_model`/`read_cluster_key` methods do that where they are needed.
    """
    base = Path.cwd() if cwd is None else cwd
    env: dict[str, str] = dict(os.environ if environ is None else environ)
    env_file: Path | None = None
    if use_env_file:
        explicit = env.get("PREVALENCE_ENV_FILE", "").strip()
        candidate = Path(explicit) if explicit else base / ".env"
        if not candidate.is_absolute():
            candidate = base / candidate
        if explicit and not candidate.is_file():
            raise SettingsError("PREVALENCE_ENV_FILE", f"{explicit!r} is not a file")
        if candidate.is_file():
            env_file = candidate
            for key, value in read_env_file(candidate).items():
                env.setdefault(key, value)

    def get(name: str, default: str | None) -> str | None:
        value = env.get(name)
        if value is None or value.strip() == "":
            return default
        return value.strip()

    master = get("PREVALENCE_MASTER", None)
    if master is not None and not _MASTER_NAME.match(master):
        raise SettingsError(
            "PREVALENCE_MASTER",
            f"{master!r} is not a master name; use 1-64 letters, digits, '_', '.' and '-', "
            "starting with a letter or digit (it names a folder and a queue)",
        )

    shared_text = get("PREVALENCE_SHARED_DIR", DEFAULT_SHARED_DIR)
    assert shared_text is not None
    shared_dir = Path(shared_text).expanduser()
    if not shared_dir.is_absolute():
        shared_dir = base / shared_dir
    shared_dir = Path(os.path.normpath(shared_dir))

    model_path = get("PREVALENCE_MODEL", DEFAULT_MODEL)
    assert model_path is not None
    if not _MODEL_PATH.match(model_path):
        raise SettingsError(
            "PREVALENCE_MODEL",
            f"{model_path!r} is not `package.module:attribute` (e.g. {DEFAULT_MODEL!r})",
        )

    broker_url = get("CELERY_BROKER_URL", DEFAULT_BROKER_URL)
    assert broker_url is not None
    scheme = urlsplit(broker_url).scheme
    if scheme not in _BROKER_SCHEMES:
        raise SettingsError(
            "CELERY_BROKER_URL",
            f"scheme {scheme or '(none)'!r} in {broker_url!r} is not supported; use "
            "redis://HOST:PORT/DB (or rediss://, redis+socket://)",
        )

    sync_interval_s = parse_duration_s(
        "PREVALENCE_SYNC_INTERVAL", get("PREVALENCE_SYNC_INTERVAL", DEFAULT_SYNC_INTERVAL) or "",
        minimum_s=0.01, maximum_s=3600.0)
    snapshot_interval_s = parse_duration_s(
        "PREVALENCE_SNAPSHOT_INTERVAL",
        get("PREVALENCE_SNAPSHOT_INTERVAL", DEFAULT_SNAPSHOT_INTERVAL) or "",
        minimum_s=1.0, maximum_s=7 * 86400.0)

    fsync = (get("PREVALENCE_FSYNC", "always") or "").lower()
    if fsync not in FSYNC_MODES:
        raise SettingsError(
            "PREVALENCE_FSYNC",
            f"{fsync!r} is not one of {', '.join(FSYNC_MODES)} (`always` is the safe default)",
        )

    journal_reserve_bytes = parse_reserve_bytes(
        "PREVALENCE_JOURNAL_RESERVE", get("PREVALENCE_JOURNAL_RESERVE", "auto") or "")

    overlap_text = (get("PREVALENCE_SYNC_OVERLAP", "on") or "").strip().lower()
    if overlap_text not in ("on", "off"):
        raise SettingsError("PREVALENCE_SYNC_OVERLAP", f"{overlap_text!r} is not `on` or `off`")

    metrics_address = parse_address("PREVALENCE_METRICS_PORT", get("PREVALENCE_METRICS_PORT", None))

    redelivery_after_s = parse_duration_s(
        "PREVALENCE_REDELIVERY_AFTER", get("PREVALENCE_REDELIVERY_AFTER", "1h") or "",
        minimum_s=5.0, maximum_s=7 * 86400.0)

    key_text = get("PREVALENCE_CLUSTER_KEY_FILE", None)
    cluster_key_file: Path | None = None
    if key_text is not None:
        cluster_key_file = Path(key_text).expanduser()
        if not cluster_key_file.is_absolute():
            cluster_key_file = base / cluster_key_file
        if not cluster_key_file.is_file():
            raise SettingsError("PREVALENCE_CLUSTER_KEY_FILE",
                                f"{key_text!r} is not a readable file")

    return Settings(
        master=master,
        shared_dir=shared_dir,
        model_path=model_path,
        broker_url=broker_url,
        sync_interval_s=sync_interval_s,
        snapshot_interval_s=snapshot_interval_s,
        fsync=fsync,
        cluster_key_file=cluster_key_file,
        env_file=env_file,
        journal_reserve_bytes=journal_reserve_bytes,
        sync_overlap=overlap_text == "on",
        metrics_address=metrics_address,
        redelivery_after_s=redelivery_after_s,
    )


def parse_address(variable: str, text: str | None) -> tuple[str, int] | None:
    """``PORT`` (loopback) or ``HOST:PORT`` -> (host, port); None for unset."""
    if text is None:
        return None
    host, sep, port_text = text.rpartition(":")
    host = host if sep else "127.0.0.1"
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535 or (sep and not host):
        raise SettingsError(variable, f"{text!r} is not a port (1-65535) or HOST:PORT, e.g. 9808 or "
                            "0.0.0.0:9808")
    return host, int(port_text)
