"""A real Prometheus scrapes a real master worker's metrics (PREVALENCE_METRICS_PORT), and
the deploy files' alert rules and dashboard name metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import make_client
from workers.local.cluster import wait_until
from workers.local.processes import free_port
from workers.master.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
NO_PROMETHEUS = "no prometheus binary (Debian `prometheus`; bin/test installs it when root with apt)"


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)["data"]["result"]


@pytest.mark.celery
@pytest.mark.skipif(shutil.which("prometheus") is None, reason=NO_PROMETHEUS)
def test_a_real_prometheus_scrapes_a_master_worker(make_cluster, tmp_path):
    port = free_port()
    cluster = make_cluster(masters=("alpha",), env={"PREVALENCE_METRICS_PORT": f"127.0.0.1:{port}"})
    cluster.start_masters()
    cluster.start_beat()
    client = make_client(cluster)
    client.execute("open_account", "m1", 0, master="alpha")
    for _ in range(5):
        client.execute("deposit", "m1", 1, master="alpha")
    web = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s}\n"
                      "scrape_configs:\n  - job_name: prevalence\n"
                      f"    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n")
    log = open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{web}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{web}"
    try:
        def scraped():
            try:
                seq = _query(base, 'prevalence_seq{master="alpha"}')
                fsyncs = _query(base, 'prevalence_fsync_duration_seconds_count{master="alpha"}')
            except OSError:
                return False
            return (seq and float(seq[0]["value"][1]) >= 6 and fsyncs and float(fsyncs[0]["value"][1]) >= 6)

        wait_until(scraped, 60, "Prometheus to scrape alpha's metrics",
                   on_timeout=lambda: (tmp_path / "prometheus.log").read_text()[-2000:])
        up = _query(base, 'prevalence_up{master="alpha"}')
        assert float(up[0]["value"][1]) == 1
        assert _query(base, 'up{job="prevalence"}')[0]["value"][1] == "1"
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _metric_names() -> set[str]:
    """Every sample name the metrics module can produce (labelled metrics have no samples
    until set, so derive them from the families' types)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {family.name + suffix for family in Metrics("x").registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


def test_the_alert_rules_and_the_dashboard_name_metrics_that_exist():
    known = _metric_names() | {"up"}
    texts = [(ROOT / "deploy" / "prometheus-alerts.yml").read_text(),
             (ROOT / "deploy" / "grafana-dashboard.json").read_text()]
    used = {name for text in texts for name in re.findall(r"\b(prevalence_[a-z_]+|up)\b", text)}
    assert used and used <= known, sorted(used - known)
    json.loads(texts[1])


@pytest.mark.skipif(shutil.which("promtool") is None, reason=NO_PROMETHEUS)
def test_promtool_accepts_the_alert_rules():
    done = subprocess.run(["promtool", "check", "rules", str(ROOT / "deploy" / "prometheus-alerts.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
