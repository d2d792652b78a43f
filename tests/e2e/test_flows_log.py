"""The optional SQLite flow log on a lab (agents started with CILIA_FLOW_LOG=auto): flow
history survives a SIGKILLed agent (the node runtime restarts it) and answers since/until."""
from __future__ import annotations

import os
import signal
import time

import pytest

from cilia.lab import state
from cilia.procs import ProcRef
from tests.e2e.test_flows import agent_status, api_lines, dst

pytestmark = pytest.mark.root

PODS = """
apiVersion: v1
kind: Pod
metadata: {name: logsrv, labels: {app: logsrv}}
spec:
  containers:
  - {name: echo, image: cilia/echo, ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: logcli, labels: {app: logcli}}
spec:
  containers:
  - {name: echo, image: cilia/echo, ports: [{containerPort: 9000}]}
"""


@pytest.fixture(scope="module")
def lab(lab_factory):
    old = os.environ.get("CILIA_FLOW_LOG")
    os.environ["CILIA_FLOW_LOG"] = "auto"  # inherited by the lab's node runtimes and agents
    try:
        lab = lab_factory(nodes=1, prefix="fg")
    finally:
        if old is None:
            os.environ.pop("CILIA_FLOW_LOG", None)
        else:
            os.environ["CILIA_FLOW_LOG"] = old
    lab.apply(PODS)
    lab.cilia("wait", "--for=condition=Ready", "pods", "--all", "--timeout", "90s", timeout=120)
    return lab


def test_history_survives_agent_restart_and_answers_since_until(lab):
    srv_ip = lab.pod_ip("logsrv")
    assert lab.exec("logcli", "curl", "-s", "-m", "5", f"http://{srv_ip}:8080/").rc == 0
    hub = agent_status(lab)["hubble"]
    assert hub["flow_log"].endswith("/flows.db")

    def syn(f):
        return dst(f) == srv_ip and (f.get("l4") or {}).get("TCP", {}).get("flags") == {"SYN": True}

    deadline = time.monotonic() + 10
    while not (before := [r for r in api_lines(lab, "/v1/flows") if syn(r["flow"])]):
        assert time.monotonic() < deadline, "no flow before the restart"
        time.sleep(0.3)
    rec = before[-1]

    pidfile = state.agent_pid_file(lab.name, "node1")
    old = ProcRef(**state.read_json(pidfile, {}))
    assert old.alive() and old.signal(signal.SIGKILL, group=False)
    deadline = time.monotonic() + 60
    while True:
        cur = state.read_json(pidfile, {})
        if cur and cur.get("pid") != old.pid:
            try:
                if agent_status(lab)["hubble"].get("events_read") is not None:
                    break
            except Exception:
                pass
        assert time.monotonic() < deadline, "agent did not come back"
        time.sleep(0.5)

    after = api_lines(lab, "/v1/flows")
    assert rec in after  # the same record (uuid, time and all) from the log
    since = api_lines(lab, f"/v1/flows?since={rec['time']}&until={rec['time']}")
    assert rec in since and all(r["time"] == rec["time"] for r in since)
    assert api_lines(lab, "/v1/flows?until=2000-01-01T00:00:00Z") == []
