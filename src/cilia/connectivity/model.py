"""The suite's vocabulary: peers, expected results, actions, scenarios and tests.

Pure data: nothing here touches the network or the cluster.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

# Cilium's drop reasons as the flow API names them (flow.proto DropReason).
POLICY_DENIED = "POLICY_DENIED"   # 133: no rule allowed it (default deny)
POLICY_DENY = "POLICY_DENY"       # 181: an explicit deny rule matched
POLICY_REASONS = {POLICY_DENIED: 133, POLICY_DENY: 181}

CURL_TIMEOUT = 28      # curl: "Operation timed out"
ANY_ERROR = -1


@dataclass(frozen=True)
class Peer:
    """One end of an action: a pod, a service frontend, a node or the world host."""
    kind: str                  # pod | service | nodeport | node | external
    name: str                  # as printed: "cilia-test/client-xyz", "node1", "world"
    address: str
    port: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    node: str = ""             # the lab node a pod runs on, or the node itself
    netns: str = ""            # where to run probes when this peer is the source
    # For service frontends: the pods that may answer, and their IPs.
    backends: tuple[str, ...] = ()
    backend_ips: tuple[str, ...] = ()
    target_port: int = 0

    def has_label(self, key: str, value: str) -> bool:
        return self.labels.get(key) == value

    @property
    def is_endpoint(self) -> bool:
        return self.kind == "pod"


@dataclass(frozen=True)
class Result:
    """What one side of an action must show (cilium-cli's check.Result)."""
    drop: bool = False
    reasons: tuple[str, ...] = ()        # acceptable drop reasons (empty: any policy reason)
    exit_code: int = 0                   # 0 success, CURL_TIMEOUT, ANY_ERROR
    none: bool = False                   # nothing to check on this side

    def describe(self) -> str:
        if self.none:
            return "none"
        if not self.drop:
            return "ok"
        return "drop" + (f" ({'/'.join(self.reasons)})" if self.reasons else "")


OK = Result()
NONE = Result(none=True)
DROP = Result(drop=True, exit_code=ANY_ERROR)
DROP_CURL_TIMEOUT = Result(drop=True, exit_code=CURL_TIMEOUT)
DEFAULT_DENY_DROP = Result(drop=True, reasons=(POLICY_DENIED,), exit_code=ANY_ERROR)
POLICY_DENY_DROP = Result(drop=True, reasons=(POLICY_DENY,), exit_code=ANY_ERROR)


@dataclass(frozen=True)
class ActionSpec:
    """What a scenario asks for; the runner turns it into an Action with expectations."""
    name: str
    src: Peer
    dst: Peer
    probe: str                # curl | ping
    protocol: str = "TCP"     # TCP | ICMP (what flow validation looks for)


@dataclass
class Action:
    test: str
    scenario: str
    spec: ActionSpec
    egress: Result
    ingress: Result
    local_ports: tuple[int, int] = (0, 0)
    started: float = 0.0
    failed: bool = False
    flow_status: str = "pending"   # ok | failed | skipped: <why> | pending
    log: list[str] = field(default_factory=list)
    output: str = ""
    exit_code: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def src(self) -> Peer:
        return self.spec.src

    @property
    def dst(self) -> Peer:
        return self.spec.dst

    def expected_exit(self) -> int:
        if self.egress.exit_code:
            return self.egress.exit_code
        if self.ingress.exit_code:
            return self.ingress.exit_code
        return 0

    def expects_drop(self) -> bool:
        return self.egress.drop or self.ingress.drop

    def __str__(self) -> str:
        s, d = self.spec.src, self.spec.dst
        if self.spec.probe == "metrics":
            return f"{self.test}/{self.scenario}/{self.spec.name}"
        return (f"{self.test}/{self.scenario}/{self.spec.name}: "
                f"{s.name} ({s.address}) -> {d.name} ({d.address}:{d.port})")


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[["Environment"], list[ActionSpec]]
    # Why the scenario cannot run here, or None (e.g. "needs 2 nodes").
    unsupported: Callable[["Environment"], str | None] = lambda env: None


Expectation = Callable[[ActionSpec], tuple[Result, Result]]


def all_ok(_: ActionSpec) -> tuple[Result, Result]:
    return OK, OK


@dataclass(frozen=True)
class TestDef:
    name: str
    scenarios: tuple[Scenario, ...] = ()
    policies: tuple[str, ...] = ()          # manifest names in manifests.POLICIES
    expect: Expectation = all_ok
    special: str = ""                        # "" or "drops" (no-unexpected-packet-drops)


@dataclass
class Environment:
    """The deployed test workloads, as peers (filled by deploy.discover)."""
    lab: str
    routing: str
    namespace: str
    nodes: list[Peer]
    clients: list[Peer]
    echo_pods: list[Peer]
    echo_services: list[Peer]         # ClusterIP frontends
    node_ports: dict[str, int]        # service name -> nodePort
    external_ip: str
    external_other_ip: str
    world_netns: str

    def node_ip(self, name: str) -> str:
        return next(n.address for n in self.nodes if n.name == name)

    @property
    def multi_node(self) -> bool:
        return len(self.nodes) > 1
