"""On-disk records of a lab: its spec and, per node, the processes the node runtime started.
`cilia lab down` relies only on these files, so it cleans up even when runtimes are dead."""
from __future__ import annotations

import json
import os

from cilia import paths
from cilia.lab.topology import LabSpec


def lab_file(lab: str) -> str:
    return os.path.join(paths.cluster_dir(lab), "lab.json")


ETCD_CLIENT_PORT = 2379


def etcd_dir(lab: str) -> str:
    return os.path.join(paths.cluster_dir(lab), "etcd")


def store_url(lab: str, store: str | None = None) -> str:
    """How a client in the root netns (CLI, operator) reaches the lab's store. etcd is
    dialled through its unix listener, which works from any netns."""
    if store is None:
        got = load_spec(lab)
        store = got[0].store if got else "local"
    if store == "etcd":
        return f"etcd+unix://{etcd_dir(lab)}/etcd:{ETCD_CLIENT_PORT}"
    return f"sqlite://{os.path.join(paths.cluster_dir(lab), 'store.db')}"


def node_store_url(spec: LabSpec) -> str:
    """How agents and node runtimes reach it: etcd over the underlay, like a real cluster."""
    if spec.store == "etcd":
        from cilia.lab.topology import FABRIC_ROUTER
        return f"etcd://{FABRIC_ROUTER}:{ETCD_CLIENT_PORT}"
    return store_url(spec.name, spec.store)


def save_spec(spec: LabSpec, status: str) -> None:
    os.makedirs(paths.cluster_dir(spec.name), exist_ok=True)
    d = spec.to_json()
    d["status"] = status
    paths.write_atomic(lab_file(spec.name), json.dumps(d, indent=1))


def load_spec(lab: str) -> tuple[LabSpec, str] | None:
    try:
        with open(lab_file(lab)) as f:
            d = json.load(f)
    except FileNotFoundError:
        return None
    return LabSpec.from_json(d), d.get("status", "unknown")


def list_labs() -> list[tuple[LabSpec, str]]:
    out = []
    try:
        names = sorted(os.listdir(paths.RUN_ROOT))
    except FileNotFoundError:
        return out
    for n in names:
        got = load_spec(n)
        if got is not None:
            out.append(got)
    return out


def runtime_pid_file(lab: str, node: str) -> str:
    return os.path.join(paths.node_dir(lab, node), "runtime.pid")


def agent_pid_file(lab: str, node: str) -> str:
    return os.path.join(paths.node_dir(lab, node), "agent.pid")


def pods_file(lab: str, node: str) -> str:
    return os.path.join(paths.node_dir(lab, node), "pods.json")


def read_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return default


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    paths.write_atomic(path, json.dumps(data, indent=1, sort_keys=True))
