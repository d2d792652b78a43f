"""What a node's load balancer must hold: frontends, their backends and flags.

Plain frozen values, so "did this service change?" is an equality test and the reconciler
can skip everything that did not."""
from __future__ import annotations

from dataclasses import dataclass

from .maglev import DEFAULT_HASH_SEED, DEFAULT_TABLE_SIZE, check_table_size

PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}

SCOPE_EXTERNAL = "external"
SCOPE_INTERNAL = "internal"

# Cilium's SVCType names, as `cilium service list` prints them.
KIND_CLUSTER_IP = "ClusterIP"
KIND_NODE_PORT = "NodePort"
KIND_LOAD_BALANCER = "LoadBalancer"
KIND_EXTERNAL_IPS = "ExternalIPs"

STATE_ACTIVE = "active"
STATE_TERMINATING = "terminating"

ALGORITHMS = ("random", "maglev")


@dataclass(frozen=True, order=True)
class Frontend:
    address: str
    port: int
    proto: int
    scope: str = SCOPE_EXTERNAL

    def key(self) -> str:
        """Stable text form, also the rev-NAT id allocator's key."""
        return f"{self.address}:{self.port}/{PROTO_NAMES.get(self.proto, self.proto)}/{self.scope}"

    def __str__(self) -> str:
        suffix = "/i" if self.scope == SCOPE_INTERNAL else ""
        return f"{self.address}:{self.port}/{PROTO_NAMES.get(self.proto, self.proto)}{suffix}"


@dataclass(frozen=True, order=True)
class Backend:
    address: str
    port: int
    proto: int
    state: str = STATE_ACTIVE
    node: str = ""

    def key(self) -> str:
        """Identity of a backend regardless of state: the backend id allocator's key, and the
        name Maglev hashes (Cilium's L3n4Addr string)."""
        return f"{self.address}:{self.port}/{PROTO_NAMES.get(self.proto, self.proto)}"


@dataclass(frozen=True)
class ServiceRef:
    namespace: str
    name: str
    port_name: str = ""


@dataclass(frozen=True)
class LBEntry:
    """One frontend as the datapath must see it."""
    frontend: Frontend
    kind: str
    backends: tuple[Backend, ...]
    service: ServiceRef
    algorithm: str = "random"
    affinity_timeout: int = 0
    local_only: bool = False
    ext_traffic_policy: str = "Cluster"
    int_traffic_policy: str = "Cluster"


@dataclass(frozen=True)
class LBConfig:
    """Node-wide settings (Cilium's --bpf-lb-algorithm and friends)."""
    algorithm: str = "random"
    maglev_table_size: int = DEFAULT_TABLE_SIZE
    maglev_hash_seed: str = DEFAULT_HASH_SEED
    nodeport: bool = True
    algorithm_annotation: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"LB algorithm {self.algorithm!r}: supported: {', '.join(ALGORITHMS)}")
        check_table_size(self.maglev_table_size)
