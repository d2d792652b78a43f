"""A real Prometheus (Debian's) scrapes an agent of a lab: it runs in the lab's fabric netns
(which routes to the node), with its own config and data dir, and is stopped after."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse

import pytest

from cilia.procs import ref_of

pytestmark = pytest.mark.root

NODE_IP = "172.29.0.11"
PODS = """
apiVersion: v1
kind: Pod
metadata: {name: prom-client, labels: {app: prom-client}}
spec:
  nodeName: node1
  containers: [{name: c, image: cilia/echo, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: prom-server, labels: {app: prom-server}}
spec:
  nodeName: node1
  containers: [{name: s, image: cilia/echo, ports: [{containerPort: 8080}]}]
"""


def fabric_exec(lab, *argv: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/run/netns/{lab.name}-fabric", *argv],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=1, prefix="p")
    lab.apply(PODS)
    lab.cilia("wait", "--for=condition=Ready", "pod/prom-client", "pod/prom-server", "--timeout", "60s")
    return lab


@pytest.fixture
def prometheus(lab):
    if not shutil.which("prometheus"):
        pytest.fail("prometheus is not installed (scripts/install-deps.sh installs it)")
    d = tempfile.mkdtemp(prefix="cilia-prom-")
    cfg = os.path.join(d, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write(f"""global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: cilia-agent
    static_configs: [{{targets: ["{NODE_IP}:9962"], labels: {{node: node1}}}}]
""")
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab.name}-fabric", "prometheus",
                          f"--config.file={cfg}", f"--storage.tsdb.path={d}/data",
                          "--web.listen-address=127.0.0.1:9090", "--log.level=warn"],
                         stdout=open(os.path.join(d, "log"), "wb"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    ref = ref_of(p)
    try:
        yield d
    finally:
        ref.stop(5.0)
        p.wait(5)
        shutil.rmtree(d, ignore_errors=True)


def query(lab, expr: str) -> list[dict]:
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    r = fabric_exec(lab, "curl", "-sf", "-m", "3", url)
    if r.returncode != 0:
        return []
    body = json.loads(r.stdout)
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_query(lab, expr: str, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = query(lab, expr)
        if res:
            return res
        time.sleep(0.5)
    return []


def test_agent_serves_prometheus_text(lab):
    r = fabric_exec(lab, "curl", "-sf", "-m", "5", f"http://{NODE_IP}:9962/metrics")
    assert r.returncode == 0, r.stderr
    assert "cilia_endpoint 2.0" in r.stdout
    assert 'cilia_bpf_map_pressure{map_name="cilia_lxc"}' in r.stdout
    assert "# TYPE hubble_flows_processed_total counter" in r.stdout


def test_prometheus_scrapes_agent_and_flow_metrics(lab, prometheus):
    up = wait_query(lab, 'up{job="cilia-agent"} == 1')
    assert up, f"target never up; log: {open(os.path.join(prometheus, 'log')).read()[-2000:]}"
    assert wait_query(lab, "cilia_endpoint")[0]["value"][1] == "2"
    server = lab.pod_ip("prom-server")
    for _ in range(3):
        lab.exec("prom-client", "curl", "-s", "-m", "5", f"http://{server}:8080/")
    res = wait_query(lab, 'sum by (type, verdict) (hubble_flows_processed_total{job="cilia-agent"})')
    assert res, "hubble_flows_processed_total has no data in Prometheus"
    assert any(r["metric"].get("verdict") == "FORWARDED" and float(r["value"][1]) > 0 for r in res), res
    fwd = wait_query(lab, 'cilia_forward_count_total{direction="EGRESS"} > 0')
    assert fwd, "datapath forward counter not scraped"


def test_grafana_dashboard_queries_evaluate(lab, prometheus):
    """Every query of contrib/grafana/cilia-dashboard.json is valid PromQL over what the agent
    exports (Grafana's variables substituted as Grafana would)."""
    from tests.unit.test_hubble_metrics import dashboard_exprs
    assert wait_query(lab, 'up{job="cilia-agent"} == 1')
    time.sleep(3)  # a few scrapes, so rate() has two points
    nonempty = 0
    for expr in dashboard_exprs():
        q = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": q})
        r = fabric_exec(lab, "curl", "-s", "-m", "3", url)
        body = json.loads(r.stdout)
        assert body["status"] == "success", (expr, body)
        nonempty += bool(body["data"]["result"])
    assert nonempty >= 5, nonempty
