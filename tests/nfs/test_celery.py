"""The Celery variant on real NFS (issue 12, item 3): one master worker
(``celery -A workers worker -P solo``, the deployment's command line) in each guest, on the
guest's NFSv4.1 mount; Redis inside the lab's namespace; beat on the host (inside the
namespace, where Redis is); writes through the client; convergence through the
`prevalence` CLI (``status --json --wait``, ``verify --json``).
"""

from __future__ import annotations

import json
import sys

import pytest

from .remote import in_parallel

pytestmark = pytest.mark.nfs

MOUNT = "v4.1"
MASTERS = ("m0", "m1", "m2")


@pytest.fixture
def celery_cluster(nfs_lab, request):
    lab = nfs_lab.lab
    if not lab.with_redis:
        pytest.skip("NFS tier not run: the Celery variant needs redis-server")
    name = f"celery_{request.node.name}".replace("[", "_").replace("]", "_")
    env_common = {"CELERY_BROKER_URL": f"{lab.redis_url}/1", "PREVALENCE_SYNC_INTERVAL": "0.2s",
                  "PREVALENCE_SNAPSHOT_INTERVAL": "2s"}
    lab.ns_run(["redis-cli", "-h", lab.redis_url.split("//")[1].split(":")[0], "-n", "1", "flushdb"], {})
    guest_env = dict(env_common, PREVALENCE_SHARED_DIR=f"/run/nfs/{MOUNT}/{name}")
    # The host's view of the same folder is the server's backing folder (the CLI reads
    # progress files there only when Redis is down, and `verify` reads the journals).
    host_env = dict(env_common, PREVALENCE_SHARED_DIR=str(lab.work / "export" / name))
    beats = []
    state = {"lab": lab, "name": name, "guest_env": guest_env, "host_env": host_env, "beats": beats,
             "guests": dict(zip(MASTERS, nfs_lab.guests))}
    yield state
    for p in beats:
        lab.stop_spawned(p)
    in_parallel([lambda g=g: g.restart_driver(deadline_s=60.0) for g in nfs_lab.guests])


def _client(cc, *args, deadline_s: float = 180.0) -> dict:
    r = cc["lab"].ns_run([sys.executable, "-m", "tests.nfs.celery_client", *args], cc["host_env"],
                         deadline_s=deadline_s)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cli(cc, *args, deadline_s: float = 180.0):
    exe = sys.executable.replace("/python", "/prevalence")
    r = cc["lab"].ns_run([exe, *args], cc["host_env"], deadline_s=deadline_s)
    return r.returncode, r.stdout, r.stderr


def _start_worker(cc, master: str) -> None:
    g = cc["guests"][master]
    g.request("spawn_worker", master=master, env=cc["guest_env"], log_path=str(g.guest.job / f"worker-{master}.log"))


def test_celery_workers_on_nfs_clients_converge_through_the_cli(celery_cluster, tmp_path):
    cc = celery_cluster
    lab = cc["lab"]
    cc["guests"]["m0"].request("mkdir", mount=MOUNT, cluster=cc["name"])
    _start_worker(cc, "m0")
    assert _client(cc, "wait-up", "m0")["up"]
    cc["beats"].append(lab.ns_spawn([sys.executable, "-m", "celery", "-A", "workers", "beat", "-l", "info",
                                     "-s", str(lab.work / f"beat-{cc['name']}")], cc["host_env"],
                                    lab.work / f"beat-{cc['name']}.log"))
    for m in MASTERS[1:]:
        _start_worker(cc, m)
    assert _client(cc, "wait-up", *MASTERS)["up"]
    load = _client(cc, "load", "--masters", ",".join(MASTERS), "--ops", "90", "--seed", "7")
    assert not load.get("failures") and "error" not in load, load
    statuses = [v["status"] for v in load["acked"].values() if isinstance(v, dict)]
    assert len(statuses) == 90 and "rejected" in statuses, load["takers"]
    # m1's worker is killed -9 (nothing flushed, lease left behind) and started again on
    # its host: it recovers from the folder, over NFS, and takes writes again.
    assert cc["guests"]["m1"].request("stop_worker", master="m1", signal_name="SIGKILL") == -9
    _start_worker(cc, "m1")
    assert _client(cc, "wait-up", *MASTERS)["up"]
    more = _client(cc, "load", "--masters", ",".join(MASTERS), "--ops", "30", "--seed", "8")
    assert not more.get("failures") and "error" not in more, more
    load["acked"].update({k: v for k, v in more["acked"].items() if isinstance(v, dict)})
    # Convergence, through the CLI: every master reports the same records read and digest...
    code, out, err = _cli(cc, "status", "--json", "--wait", "90")
    view = json.loads(out)
    assert code == 0 and view["converged"], (view["verdict"], err[-2000:])
    assert sorted(view["masters"]) == sorted(MASTERS)
    # ... equal to the reference computed from the folder alone.
    code, out, err = _cli(cc, "verify", "--json")
    ref = json.loads(out)
    assert code == 0 and not ref["errors"], (ref, err[-2000:])
    assert {d["digest"] for d in view["masters"].values()} == {ref["digest"]}
    assert ref["total"] == 6 + 90 + 30 and ref["duplicates"] == 0, ref
    # Nothing acknowledged lost: every master knows every acknowledged request key.
    keys = tmp_path / "acked.json"
    keys.write_text(json.dumps(load["acked"]))
    replay = _client(cc, "replay-keys", "--masters", ",".join(MASTERS), str(keys))
    assert replay["checked"] == 120 and replay["not_known"] == {}, replay
    # Warm shutdown (SIGTERM, as the deploy files stop them): each exits 0.
    codes = in_parallel([lambda m=m: cc["guests"][m].request("stop_worker", master=m, deadline_s=90)
                         for m in MASTERS])
    assert codes == [0, 0, 0], codes
