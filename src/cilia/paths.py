"""Where a cluster's runtime files live. Every path is prefixed by the cluster (lab) name so
two labs coexist on one machine."""
from __future__ import annotations

import os

RUN_ROOT = os.environ.get("CILIA_RUN_ROOT", "/run/cilia")
BPF_ROOT = "/sys/fs/bpf/cilia"


def cluster_dir(cluster: str) -> str:
    return os.path.join(RUN_ROOT, cluster)


def node_dir(cluster: str, node: str) -> str:
    return os.path.join(RUN_ROOT, cluster, node)


def agent_socket(cluster: str, node: str) -> str:
    return os.path.join(node_dir(cluster, node), "agent.sock")


def agent_state_dir(cluster: str, node: str) -> str:
    return os.path.join(node_dir(cluster, node), "state")


def pin_dir(cluster: str, node: str) -> str:
    return os.path.join(BPF_ROOT, cluster, node)


def relay_file(cluster: str) -> str:
    """Where `cilia hubble enable` records the relay (pid + start time, port); `cilia lab
    down` stops what it names."""
    return os.path.join(cluster_dir(cluster), "hubble-relay.json")


def write_atomic(path: str, data: bytes | str) -> None:
    """Readers never see a half-written state file, even if we die mid-write."""
    if isinstance(data, str):
        data = data.encode()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
