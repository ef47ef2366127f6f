"""The NFS lab: a real NFS server and real Linux NFS clients on this machine, for the `nfs` tier.

What it builds (the recipe in the shared notes, ``nfs-tier-recipe.md``, tested on this kind
of machine):

* a private **network namespace** ``nfst-<pid>-<rand>`` holding a bridge with the server
  address and one tap device per guest. Nothing is added to the host's namespace; every
  packet stays inside the namespace (the tests talk to the guests over a socket created
  in it, see `listen_in_netns`);
* **nfs-ganesha** (VFS export of a local folder, NFSv3 and v4.1) with the **rpcbind** it
  needs, inside the namespace, in a process group of their own;
* **User-Mode Linux guests** (a 6.1 kernel run as ordinary processes, the host's ``/`` as
  their root through hostfs, so they run the host's Python and the project's venv). Each
  loads the NFS client modules and mounts the export twice, NFSv4.1 and NFSv3, with the
  production options (``hard``, default attribute and lookup caching, no ``noac``), then
  runs `tests.nfs.guest_driver` in a loop (a driver killed with SIGKILL is started again:
  that is how a master is killed -9 and restarted).

Every process the lab starts lives in a process group of its own, and `NfsLab.stop` kills
each group by its id, removes the devices and the namespace, and removes the work folder.
A lab left behind by a killed test run is found by name (the namespace carries the pid of
the run that made it) and removed by `remove_stale_labs`.

Nothing here waits without a deadline: a `hard` mount hangs forever if the server goes, so
every wait is bounded and a guest that overstays is killed by process group.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_INIT = Path(__file__).with_name("guest_init.sh")
NS_PREFIX = "nfst-"
SUBNET = "10.79.0"
SERVER_IP = f"{SUBNET}.1"
#: Where each guest mounts the export, per NFS version (the tests pick one by key).
MOUNTS = {"v4.1": ("4.1", "/run/nfs/v4.1"), "v3": ("3", "/run/nfs/v3")}
GUEST_MEM = "192M"
#: A guest boots, loads modules and mounts in 2-3 s on an idle 2-core machine; allow for a
#: machine busy with other test runs.
BOOT_S_MAX = 90.0
CLONE_NEWNET = 0x40000000
#: The work folder (export, logs, guest jobs) goes on a local disk filesystem: the VFS FSAL
#: exports by file handle (open_by_handle_at), which tmpfs does not offer.
WORK_PARENT = "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


class LabUnavailable(Exception):
    """Raised when this machine cannot run the lab; the message is the one-line reason."""


def _run(*cmd: str, timeout_s: float = 20.0, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout_s, check=check)


def why_unavailable() -> str | None:
    """None if the lab can run here, else the reason in one line (for a skip)."""
    if os.geteuid() != 0:
        return "needs root (network namespace, tap devices, NFS server)"
    need = {"ganesha.nfsd": "nfs-ganesha", "linux.uml": "user-mode-linux", "rpcbind": "nfs-common (rpcbind)",
            "modprobe": "kmod", "ip": "iproute2"}
    missing = [pkg for exe, pkg in need.items() if not shutil.which(exe, path="/usr/sbin:/usr/bin:/sbin:/bin")]
    if not glob.glob("/usr/lib/*/ganesha/libfsalvfs.so") and not glob.glob("/usr/lib/ganesha/libfsalvfs.so"):
        missing.append("nfs-ganesha-vfs")
    if not uml_module_version():
        missing.append("user-mode-linux (modules)")
    if missing:
        return (f"needs {', '.join(missing)}: run bin/install-test-packages nfs as root "
                "(bin/test does it when it can)")
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (tap devices for the guests)"
    return None


def _read(path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def uml_module_version() -> str | None:
    versions = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob("/usr/lib/uml/modules/*/kernel"))
    return versions[-1] if versions else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_group_gone(pgid: int, deadline_s: float, leader: subprocess.Popen | None = None) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if leader is not None:
            leader.poll()  # reap the leader: a zombie still counts as a member of its group
        if not _group_alive(pgid):
            return True
        time.sleep(0.05)
    return not _group_alive(pgid)


def _delete_namespace(ns: str) -> None:
    """Kill whatever still runs in `ns` (only the lab's own processes can be there), delete
    its devices, then the namespace."""
    pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    for _ in range(50):
        if not _run("ip", "netns", "pids", ns, check=False).stdout.split():
            break
        time.sleep(0.05)
    devices = _run("ip", "netns", "exec", ns, "ls", "/sys/class/net", check=False).stdout.split()
    for dev in devices:
        if dev != "lo":
            _run("ip", "netns", "exec", ns, "ip", "link", "del", dev, check=False)
    _run("ip", "netns", "del", ns, check=False)


def remove_stale_labs() -> list[str]:
    """Remove namespaces (killing what runs in them) and work folders left by lab runs whose
    process is gone (a SIGKILLed test run)."""
    removed = []
    listing = _run("ip", "netns", "list", check=False).stdout.split("\n")
    for line in listing:
        ns = line.split(" ")[0]
        if not ns.startswith(NS_PREFIX):
            continue
        try:
            pid = int(ns.split("-")[1])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            _delete_namespace(ns)
            removed.append(ns)
    for work in glob.glob(os.path.join(WORK_PARENT, f"{NS_PREFIX}*.*")):
        try:
            pid = int(os.path.basename(work).split("-")[1])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
    return removed


def listen_in_netns(ns: str, host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket bound to `host` inside namespace `ns`.

    A socket belongs to the namespace it was created in, whatever thread uses it later; so a
    short-lived thread enters the namespace (setns affects only the calling thread), makes
    the socket and ends. The test process itself never leaves the host's namespace.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    box: dict = {}

    def make():
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                box["error"] = OSError(err, f"setns({ns}): {os.strerror(err)}")
                return
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(16)
            box["socket"] = s
        except OSError as exc:
            box["error"] = exc
        finally:
            os.close(fd)

    t = threading.Thread(target=make, name=f"setns-{ns}")
    t.start()
    t.join(10)
    if "error" in box:
        raise box["error"]
    return box["socket"]


GANESHA_CONF = """\
NFS_CORE_PARAM {{
    Protocols = 3, 4;
    Bind_addr = {server};
    NFS_Port = 2049;
    MNT_Port = 20048;
    Enable_NLM = false;        # the engine takes no NFS locks (DESIGN section 4)
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Mount_Path_Pseudo = true;  # NFSv3 mounts the pseudo path /export too
}}
NFSV4 {{
    Graceless = true;          # no 90 s grace period at start
    Lease_Lifetime = 10;
    Only_Numeric_Owners = true;
    RecoveryRoot = {work}/recov;
}}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{
    Export_Id = 1;
    Path = {work}/export;
    Pseudo = /export;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 3, 4;
    Transports = TCP;
    Attr_Expiration_Time = 0;  # the server re-stats its backing files (no server-side staleness)
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"""

SERVER_SH = """\
#!/bin/sh
# ganesha + the rpcbind it registers with, inside the lab's namespace. `ip netns exec` gives
# this shell a private mount namespace: the tmpfs on /run hides the host's rpcbind socket.
set -e
mount -t tmpfs -o size=16m nfst-run /run
mkdir -p /run/rpcbind
rpcbind -f &
for i in $(seq 200); do [ -S /run/rpcbind.sock ] && break; sleep 0.02; done
exec ganesha.nfsd -F -f "$1" -L "$2" -p /run/ganesha.pid
"""


@dataclass
class Guest:
    """One UML guest: an NFS client host running one master driver at a time."""
    name: str
    index: int
    job: Path
    pgid: int | None = None
    popen: subprocess.Popen | None = None
    ready: dict = field(default_factory=dict)
    boot: int = 0          # how many times the lab power-cycled this guest

    @property
    def ip(self) -> str:
        return f"{SUBNET}.{11 + self.index}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("uml.log", "init.log", "driver.log"):  # uml.log: the guest kernel (OOM, panics)
            p = self.job / name
            if p.exists():
                text = p.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {self.name}/{name}\n" + "\n".join(text))
        return "\n".join(out)


class NfsLab:
    """The namespace, the server and the guests. `start`, then `boot_guests`, then `stop`."""

    def __init__(self, *, guests: int = 3, with_redis: bool = False, python: str | None = None,
                 local_disk_mb: int = 0):
        self.guest_count = guests
        # A local ext4 disk per guest (an image file on the host's disk, /run/local in the
        # guest): the benchmarks' local-folder baseline, on the same disk as the export.
        self.local_disk_mb = local_disk_mb
        self.with_redis = with_redis
        self.python = python or os.path.join(REPO, ".venv", "bin", "python")
        self.ns = f"{NS_PREFIX}{os.getpid()}-{random.randrange(1 << 16):04x}"
        self.work: Path | None = None
        self.services: list[subprocess.Popen] = []  # server and redis: each leads its own group
        self.guests: list[Guest] = []
        self.listener: socket.socket | None = None
        self.port = 0
        self._ns_made = False

    # -- start -----------------------------------------------------------------------------

    def start(self) -> "NfsLab":
        """Namespace, bridge, taps, ganesha (+ rpcbind), optionally redis; the driver socket."""
        if not os.path.exists(self.python):
            raise LabUnavailable(f"no project venv at {self.python} (create it: bin/test does)")
        # The export must be on a local disk filesystem (the VFS FSAL uses file handles).
        self.work = Path(tempfile.mkdtemp(prefix=f"{self.ns}.", dir=WORK_PARENT))
        for sub in ("export", "recov", "uml", "jobs", "mods/lib/modules"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        ver = uml_module_version()
        os.symlink(f"/usr/lib/uml/modules/{ver}", self.work / "mods/lib/modules" / ver)
        self._make_network()
        self._start_server()
        if self.with_redis:
            self._start_redis()
        self.listener = listen_in_netns(self.ns, SERVER_IP)
        self.port = self.listener.getsockname()[1]
        return self

    def nsx(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", self.ns, *cmd, check=check)

    def _make_network(self) -> None:
        _run("ip", "netns", "add", self.ns)
        self._ns_made = True
        self.nsx("ip", "link", "set", "lo", "up")
        self.nsx("ip", "link", "add", "nfstbr0", "type", "bridge")
        self.nsx("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "nfstbr0")
        self.nsx("ip", "link", "set", "nfstbr0", "up")
        for i in range(self.guest_count):
            self.nsx("ip", "tuntap", "add", f"nfsttap{i}", "mode", "tap")
            self.nsx("ip", "link", "set", f"nfsttap{i}", "master", "nfstbr0")
            self.nsx("ip", "link", "set", f"nfsttap{i}", "up")

    def _spawn_group(self, cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.services.append(p)
        return p

    def _wait_port(self, port: int, proc: subprocess.Popen, what: str, deadline_s: float = 20.0) -> None:
        end = time.monotonic() + deadline_s
        probe = f"exec 3<>/dev/tcp/{SERVER_IP}/{port}"
        while time.monotonic() < end:
            if self.nsx("bash", "-c", probe, check=False).returncode == 0:
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise LabUnavailable(f"{what} did not come up on {SERVER_IP}:{port} in the lab namespace "
                             f"(see {self.work})")

    def _start_server(self) -> None:
        conf = self.work / "ganesha.conf"
        conf.write_text(GANESHA_CONF.format(server=SERVER_IP, work=self.work))
        script = self.work / "server.sh"
        script.write_text(SERVER_SH)
        script.chmod(0o755)
        p = self._spawn_group(["ip", "netns", "exec", self.ns, str(script), str(conf), str(self.work / "ganesha.log")],
                              self.work / "ganesha.out")
        self._wait_port(2049, p, "nfs-ganesha")

    def _start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise LabUnavailable("redis-server not found (the Celery variant needs it)")
        p = self._spawn_group(["ip", "netns", "exec", self.ns, exe, "--bind", SERVER_IP, "--port", "6379",
                               "--save", "", "--appendonly", "no", "--protected-mode", "no",
                               "--daemonize", "no", "--dir", str(self.work)], self.work / "redis.log")
        self._wait_port(6379, p, "redis-server")

    # -- host-side processes inside the namespace (the Celery variant) ---------------------

    @property
    def redis_url(self) -> str:
        return f"redis://{SERVER_IP}:6379"

    def ns_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO))
        env.update(extra)
        return env

    def ns_run(self, cmd: list[str], env: dict[str, str], *, deadline_s: float = 120.0) -> subprocess.CompletedProcess:
        """Run a command on the host inside the namespace (where the lab's Redis is)."""
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], env=self.ns_env(env), cwd=REPO,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=deadline_s)

    def ns_spawn(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Start a long-running command inside the namespace, in a process group of its own
        (stop it with `stop_spawned`; `stop` kills it anyway)."""
        with open(log, "ab") as out:
            p = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], env=self.ns_env(env), cwd=REPO,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.services.append(p)
        return p

    def stop_spawned(self, p: subprocess.Popen, deadline_s: float = 10.0) -> int | None:
        _kill_group(p.pid, signal.SIGTERM)
        if not _wait_group_gone(p.pid, deadline_s, p):
            _kill_group(p.pid)
            _wait_group_gone(p.pid, 2.0, p)
        if p in self.services:
            self.services.remove(p)
        return p.returncode

    # -- guests ----------------------------------------------------------------------------

    def boot_guests(self, extra_mount_opts: str = "") -> list[Guest]:
        """Boot every guest at once; return when each has mounted both versions (or raise)."""
        for i in range(self.guest_count):
            self.guests.append(self._launch(i, extra_mount_opts))
        end = time.monotonic() + BOOT_S_MAX
        for g in self.guests:
            while not (g.job / "ready.json").exists():
                if not g.alive() and "ptrace set fp regs failed" in _read(g.job / "uml.log"):
                    # UML 6.1 sizes its FPU-register buffer for the CPUs it knew: on a host
                    # CPU with AMX (Sapphire Rapids and later) the host kernel refuses it
                    # (PTRACE_SETREGSET, EFAULT) and the guest's init dies at once.
                    raise LabUnavailable(f"guest {g.name} died at boot: this user-mode-linux kernel cannot "
                                         "run on this CPU (its ptrace FPU-register set fails, errno 14; "
                                         "seen on CPUs with AMX)")
                if not g.alive() or time.monotonic() > end:
                    raise LabUnavailable(f"guest {g.name} did not mount the export "
                                         f"({'exited' if not g.alive() else 'deadline'}):\n{g.log_tail()}")
                time.sleep(0.05)
            g.ready = json.loads((g.job / "ready.json").read_text())
            if g.ready.get("mount_failed"):
                raise LabUnavailable(f"guest {g.name} could not mount {g.ready['mount_failed']}:\n{g.log_tail()}")
        return self.guests

    def power_cycle(self, guest: Guest, extra_mount_opts: str = "") -> Guest:
        """Pull the plug on `guest` (SIGKILL to its whole process group: whatever the guest
        kernel had not sent to the server is lost, as in a host's power loss) and boot it
        again: same name, address and tap, a new boot id. Returns the new `Guest`."""
        _kill_group(guest.pgid)
        guest.popen.wait(timeout=30)
        fresh = self._launch(guest.index, extra_mount_opts, boot=guest.boot + 1)
        self.guests[self.guests.index(guest)] = fresh
        end = time.monotonic() + BOOT_S_MAX
        while not (fresh.job / "ready.json").exists():
            if not fresh.alive() or time.monotonic() > end:
                raise LabUnavailable(f"guest {fresh.name} did not come back:\n{fresh.log_tail()}")
            time.sleep(0.05)
        fresh.ready = json.loads((fresh.job / "ready.json").read_text())
        return fresh

    def _launch(self, i: int, extra_mount_opts: str, boot: int = 0) -> Guest:
        name = f"nfsg{i}"
        job = self.work / "jobs" / (name if boot == 0 else f"{name}.boot{boot}")
        job.mkdir(parents=True)
        env = {
            "NAME": name, "GIP": f"{SUBNET}.{11 + i}", "SRV": SERVER_IP, "MODROOT": str(self.work / "mods"),
            "MOUNTS": " ".join(f"{vers}:{path}" for vers, path in MOUNTS.values()),
            "EXTRA_OPTS": extra_mount_opts, "REPO": str(REPO), "PY": self.python, "PORT": str(self.port),
        }
        # Read by the guest's init with `.`: values are quoted for the shell.
        disk = []
        if self.local_disk_mb:
            image = job / "local.ext4"
            with open(image, "wb") as f:
                f.truncate(self.local_disk_mb << 20)
            _run("mkfs.ext4", "-q", "-F", str(image), timeout_s=60)
            disk = [f"ubd0={image}"]
            env["LOCAL_DISK"] = "1"
        (job / "env").write_text("".join(f"{k}='{v}'\n" for k, v in env.items()))
        cmd = ["ip", "netns", "exec", self.ns, "linux.uml", f"mem={GUEST_MEM}", "rootfstype=hostfs",
               "rootflags=/", "rw", f"init={GUEST_INIT}", f"umid={self.ns}-{i}", f"uml_dir={self.work / 'uml'}",
               # gro=1: the server side sends TSO/GSO frames through the tap (large NFS reads);
               # without GRO the guest drops them ("Incoming GSO frames and GRO disabled")
               # and its NFS mount stalls ("server not responding").
               f"vec0:transport=tap,ifname=nfsttap{i},mac=02:4e:46:53:00:{i + 1:02x},gro=1",
               *disk, "con0=null,fd:1", "con=null", f"NFST_JOB={job}"]
        with open(job / "uml.log", "wb") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        return Guest(name=name, index=i, job=job, pgid=p.pid, popen=p, boot=boot)

    # -- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process the lab started (by process group), remove the namespace,
        its devices and the work folder. Safe to call twice, and after a failed start."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for g in self.guests:
            if g.pgid is not None:
                _kill_group(g.pgid)
        for g in self.guests:
            if g.popen is not None:
                try:
                    g.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for p in self.services:
            _kill_group(p.pid, signal.SIGTERM)
        for p in self.services:
            if not _wait_group_gone(p.pid, 5.0, p):
                _kill_group(p.pid)
                _wait_group_gone(p.pid, 2.0, p)
        self.services = []
        if self._ns_made:
            _delete_namespace(self.ns)
            self._ns_made = False
        if self.work is not None and os.environ.get("NFS_TIER_KEEP") != "1":
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None
