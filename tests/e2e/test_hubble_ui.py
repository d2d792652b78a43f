"""The Hubble UI in a real browser (Debian's headless chromium through chromedriver):
`cilia hubble enable --ui` on a lab with allowed and denied traffic, the service map shows
the lab's workloads with verdict-coloured edges, the flow table fills and filters; a
screenshot is saved."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

pytestmark = pytest.mark.root

PODS = """
apiVersion: v1
kind: Namespace
metadata: {name: ui}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: ui, labels: {app: frontend}}
spec:
  nodeName: node1
  containers: [{name: c, image: idle}]
---
apiVersion: v1
kind: Pod
metadata: {name: backend, namespace: ui, labels: {app: backend}}
spec:
  nodeName: node1
  containers: [{name: c, image: echo, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: vault, namespace: ui, labels: {app: vault}}
spec:
  nodeName: node1
  containers: [{name: c, image: echo, ports: [{containerPort: 8080}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: vault-deny, namespace: ui}
spec:
  podSelector: {matchLabels: {app: vault}}
  policyTypes: [Ingress]
"""

ARTIFACTS = os.environ.get("CILIA_TEST_ARTIFACTS") or os.path.join(tempfile.gettempdir(), "cilia-artifacts")


def curl(lab, url: str, timeout: float = 2) -> bool:
    return subprocess.run(["nsenter", f"--net=/run/netns/{lab.name}-ui-frontend", "curl", "-s",
                           "-o", "/dev/null", "-m", str(timeout), url],
                          capture_output=True, timeout=30).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(lab_factory):
    lab = lab_factory(nodes=1, prefix="ui")
    lab.apply(PODS)
    lab.cilia("wait", "--for=condition=Ready", "pod/frontend", "pod/backend", "pod/vault",
              "-n", "ui", "--timeout", "90s")
    backend, vault = lab.pod_ip("backend", "ui"), lab.pod_ip("vault", "ui")
    deadline = time.monotonic() + 30
    while not curl(lab, f"http://{backend}:8080/"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert not curl(lab, f"http://{vault}:8080/", timeout=1)
    lab.port = free_port()
    lab.cilia("hubble", "enable", "--ui", "--port", str(lab.port))
    yield lab
    lab.cilia("hubble", "disable", check=False)


@pytest.fixture
def browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("chromium/chromedriver missing (scripts/install-deps.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="cilia-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1400"):
        opts.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a driver
    drv = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(fn, timeout: float = 30, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    return last


def test_ui_shows_service_map_and_flow_table(lab, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    backend, vault = lab.pod_ip("backend", "ui"), lab.pod_ip("vault", "ui")
    browser.get(f"http://127.0.0.1:{lab.port}/")
    assert "Hubble" in browser.title
    # keep traffic flowing while the page polls
    curl(lab, f"http://{backend}:8080/")
    curl(lab, f"http://{vault}:8080/", timeout=1)
    js = browser.execute_script  # one-shot DOM reads: the page re-renders every second

    def map_ids():
        return set(js("return [...document.querySelectorAll('#servicemap g.node')].map(g => g.dataset.id)"))

    ids = wait_for(lambda: {"ui/frontend", "ui/backend", "ui/vault"} <= map_ids() and map_ids())
    assert ids and {"ui/frontend", "ui/backend", "ui/vault"} <= ids, ids

    def edges():
        rows = js("""return [...document.querySelectorAll('#servicemap g.edge-group')].map(g =>
            [g.dataset.source, g.dataset.target, g.dataset.verdict,
             getComputedStyle(g.querySelector('path')).stroke])""")
        return {(a, b): (v, stroke) for a, b, v, stroke in rows}

    e = wait_for(lambda: ("ui/frontend", "ui/vault") in edges() and edges())
    assert e, edges()
    assert e[("ui/frontend", "ui/backend")] == ("FORWARDED", "rgb(46, 158, 79)")
    assert e[("ui/frontend", "ui/vault")] == ("DROPPED", "rgb(217, 48, 48)")

    # the namespace picker lists the lab's namespace and narrows the map to it
    assert "ui" in js("return [...document.querySelectorAll('#namespace option')].map(o => o.value)")
    Select(browser.find_element(By.ID, "namespace")).select_by_value("ui")
    assert wait_for(lambda: map_ids() and all(i.startswith("ui/") or ":" in i for i in map_ids()))

    def rows():
        return js("""return [...document.querySelectorAll('#flows tbody tr')].map(r =>
            [r.className, r.innerText])""")

    got = wait_for(lambda: any("ui/backend:8080" in t and "FORWARDED" in c for c, t in rows()) and rows())
    assert got, rows()[:5]
    assert any("ui/frontend" in t for _, t in got)

    # a filter in the table: only drops
    Select(browser.find_element(By.ID, "f-verdict")).select_by_value("DROPPED")
    dropped = wait_for(lambda: rows() and all("DROPPED" in c for c, _ in rows()) and rows())
    assert dropped and any("ui/vault:8080" in t for _, t in dropped), rows()[:5]
    Select(browser.find_element(By.ID, "f-verdict")).select_by_value("")
    wait_for(lambda: any("FORWARDED" in c for c, _ in rows()))

    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, f"hubble-ui-{lab.name}.png")
    assert browser.save_screenshot(shot)
    assert os.path.getsize(shot) > 10_000
    print(f"screenshot: {shot}")


def test_hubble_status_and_disable(lab):
    st = json.loads(lab.cilia("hubble", "status", "-o", "json").out)
    assert st["running"] and st["relay"]["nodes"]["node1"]["state"] == "connected"
    assert st["relay"]["num_flows"] > 0
    text = lab.cilia("hubble", "status").out
    assert "Nodes:    1/1 connected" in text


def _relay_flows(lab, after: int = 0) -> dict:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{lab.port}/api/flows?after={after}", timeout=5) as r:
        return json.load(r)


def test_hung_and_restarted_agent_never_stall_observe_or_relay(lab):
    import signal
    from cilia.lab import state
    from cilia.procs import ProcRef
    backend = lab.pod_ip("backend", "ui")

    def agent() -> ProcRef:
        return ProcRef.from_json(state.read_json(state.agent_pid_file(lab.name, "node1"), {}))

    # A hung agent (stopped, its socket still accepting): observe gives up after the read
    # timeout with a warning instead of hanging.
    a = agent()
    assert a.signal(signal.SIGSTOP, group=False)
    try:
        t = time.monotonic()
        r = subprocess.run([os.path.join(os.path.dirname(__import__("sys").executable), "cilia"),
                            "observe", "--last", "5"], env={**lab.env, "CILIA_OBSERVE_TIMEOUT": "2"},
                           capture_output=True, text=True, timeout=60)
        assert time.monotonic() - t < 20
        assert r.returncode == 1 and "warning: node node1: skipped" in r.stderr, r.stderr
    finally:
        a.signal(signal.SIGCONT, group=False)
    # A killed agent: the node runtime restarts it; the relay reports it and reconnects,
    # resuming after the last flow it had.
    seq = _relay_flows(lab)["seq"]
    assert a.signal(signal.SIGKILL, group=False)
    deadline = time.monotonic() + 60
    while True:
        st = json.loads(lab.cilia("hubble", "status", "-o", "json").out)["relay"]["nodes"]["node1"]
        if st["state"] == "connected" and agent().pid != a.pid and agent().alive():
            curl(lab, f"http://{backend}:8080/")
            new = [f for f in _relay_flows(lab, seq)["flows"]
                   if f["flow"]["destination"].get("pod_name") == "backend"]
            if new:
                break
        assert time.monotonic() < deadline, st
        time.sleep(1)
    seqs = [f["seq"] for f in _relay_flows(lab)["flows"]]
    assert seqs == sorted(set(seqs))
