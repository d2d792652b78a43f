"""cilia-cni: the CNI plugin binary (spec 1.0; ADD, DEL, CHECK, VERSION).

It does no networking itself: it forwards the request to the node's agent over the agent's
unix socket, like Cilium's plugin. Kept to stdlib imports because a runtime execs it per pod.
"""
from __future__ import annotations

import json
import os
import sys

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]
DEFAULT_SOCKET = "/run/cilia/agent.sock"

# CNI well-known error codes
E_INCOMPATIBLE = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_NETCONF = 7
E_TRY_LATER = 11


class PluginError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def parse_cni_args(raw: str) -> dict[str, str]:
    out = {}
    for part in filter(None, raw.split(";")):
        k, sep, v = part.partition("=")
        if not sep:
            raise PluginError(E_INVALID_ENV, f"CNI_ARGS: malformed pair {part!r}")
        out[k] = v
    return out


def _downgrade(result: dict, version: str) -> dict:
    """0.3.x/0.4.0 results carry an explicit IP version per address."""
    result = dict(result, cniVersion=version)
    if not version.startswith("1."):
        result["ips"] = [dict(ip, version="4") for ip in result.get("ips", [])]
    return result


def run(env: dict[str, str], stdin: str) -> tuple[int, dict | None]:
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        return 0, {"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}
    try:
        conf = json.loads(stdin) if stdin.strip() else {}
    except ValueError as e:
        raise PluginError(E_DECODE, f"network configuration is not JSON: {e}") from None
    version = conf.get("cniVersion", "1.0.0")
    if version not in SUPPORTED:
        raise PluginError(E_INCOMPATIBLE, f"unsupported cniVersion {version!r}",
                          f"supported: {', '.join(SUPPORTED)}")
    if command not in ("ADD", "DEL", "CHECK"):
        raise PluginError(E_INVALID_ENV, f"CNI_COMMAND {command!r} is not ADD, DEL, CHECK or VERSION")
    container_id = env.get("CNI_CONTAINERID", "")
    if not container_id:
        raise PluginError(E_INVALID_ENV, "CNI_CONTAINERID is required")
    ifname = env.get("CNI_IFNAME", "eth0")
    if command != "DEL" and not env.get("CNI_IFNAME"):
        raise PluginError(E_INVALID_ENV, "CNI_IFNAME is required")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    if args.get("K8S_POD_NAME") and not args.get("K8S_POD_NAMESPACE"):
        # podman's CNI backend sends the container name as K8S_POD_NAME and no namespace:
        # outside Kubernetes a workload lives in namespace "default".
        args["K8S_POD_NAMESPACE"] = "default"
    body = {"containerID": container_id, "netns": env.get("CNI_NETNS", ""), "ifname": ifname,
            "args": args, "netconf": conf}
    if command == "ADD" and not body["netns"]:
        raise PluginError(E_INVALID_ENV, "CNI_NETNS is required for ADD")

    from cilia.api.client import AgentClient, AgentUnreachable, APIError
    client = AgentClient(conf.get("agent-socket") or DEFAULT_SOCKET, timeout=60)
    try:
        result = client.post(f"/v1/cni/{command.lower()}", body)
    except AgentUnreachable as e:
        if command == "DEL":
            # The spec wants DEL to succeed when there is nothing left to release; with no
            # agent the runtime would otherwise never be able to remove the container.
            return 0, None
        raise PluginError(E_TRY_LATER, "cilia agent is not reachable", str(e)) from None
    except APIError as e:
        b = e.body if isinstance(e.body, dict) else {}
        raise PluginError(int(b.get("code", 999)), b.get("msg", str(e)), b.get("details", ""))
    if command == "ADD":
        return 0, _downgrade(result, version)
    return 0, None


def main() -> int:
    env = dict(os.environ)
    stdin = "" if env.get("CNI_COMMAND") == "VERSION" else sys.stdin.read()
    version = "1.0.0"
    try:
        version = json.loads(stdin).get("cniVersion", version) if stdin.strip() else version
    except ValueError:
        pass
    try:
        rc, out = run(env, stdin)
    except PluginError as e:
        json.dump({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details},
                  sys.stdout)
        sys.stdout.write("\n")
        return 1
    if out is not None:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
