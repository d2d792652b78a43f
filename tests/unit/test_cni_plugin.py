"""The real cilia-cni binary, exec'd as a runtime would; agent-side behaviour is covered by
tests/netns/test_agent_cni.py with a real agent."""
import json
import os
import shutil
import subprocess
import sys

import pytest

CNI = shutil.which("cilia-cni", path=os.path.dirname(sys.executable))


def run(env: dict, stdin: str = "") -> tuple[int, dict | None]:
    base = {"PATH": os.environ["PATH"]}
    p = subprocess.run([CNI], input=stdin.encode(), env={**base, **env},
                       capture_output=True, timeout=30)
    out = p.stdout.decode().strip()
    return p.returncode, (json.loads(out) if out else None)


def conf(**kw) -> str:
    return json.dumps({"cniVersion": "1.0.0", "name": "cilia", "type": "cilia-cni",
                       "agent-socket": "/nonexistent/cilia-test/agent.sock", **kw})


def test_binary_is_installed():
    assert CNI, "cilia-cni console script missing from the venv"


def test_version():
    rc, out = run({"CNI_COMMAND": "VERSION"})
    assert rc == 0
    assert out["cniVersion"] == "1.0.0"
    assert "1.0.0" in out["supportedVersions"] and "0.4.0" in out["supportedVersions"]


@pytest.mark.parametrize("env,stdin,code,needle", [
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "x", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x"},
     "{not json", 6, "not JSON"),
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "x", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x"},
     conf(cniVersion="9.9.9"), 1, "unsupported cniVersion"),
    ({"CNI_COMMAND": "ADD", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x"}, conf(), 4, "CNI_CONTAINERID"),
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "x", "CNI_IFNAME": "eth0"}, conf(), 4, "CNI_NETNS"),
    ({"CNI_COMMAND": "BOGUS", "CNI_CONTAINERID": "x"}, conf(), 4, "CNI_COMMAND"),
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "x", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x",
      "CNI_ARGS": "K8S_POD_NAME"}, conf(), 4, "CNI_ARGS"),
    ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "x", "CNI_IFNAME": "eth0", "CNI_NETNS": "/x"},
     conf(), 11, "not reachable"),
])
def test_errors_follow_the_spec(env, stdin, code, needle):
    rc, out = run(env, stdin)
    assert rc == 1
    assert out["code"] == code
    assert needle in out["msg"]


def test_del_without_agent_succeeds():
    rc, out = run({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "gone", "CNI_IFNAME": "eth0"}, conf())
    assert rc == 0 and out is None


def test_result_downgrade_for_old_versions():
    from cilia.cni.plugin import _downgrade
    r = {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.2/32", "gateway": "10.244.1.1"}]}
    old = _downgrade(r, "0.4.0")
    assert old["cniVersion"] == "0.4.0" and old["ips"][0]["version"] == "4"
    assert "version" not in _downgrade(r, "1.0.0")["ips"][0]
