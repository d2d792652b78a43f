"""Scenarios: who probes whom, named as cilium-cli names them (connectivity/tests/*.go)."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from .model import ActionSpec, Environment, Peer, Scenario


def _matches(peer: Peer, labels: Mapping[str, str] | None) -> bool:
    return not labels or all(peer.labels.get(k) == v for k, v in labels.items())


def _needs_two_nodes(env: Environment) -> str | None:
    return None if env.multi_node else "needs 2 nodes"


def pod_to_pod(src_labels: Mapping[str, str] | None = None,
               dst_labels: Mapping[str, str] | None = None) -> Scenario:
    def build(env: Environment) -> list[ActionSpec]:
        out = []
        for c in env.clients:
            if not _matches(c, src_labels):
                continue
            for e in env.echo_pods:
                if _matches(e, dst_labels):
                    out.append(ActionSpec(f"curl-{len(out)}", c, e, "curl"))
        return out
    return Scenario("pod-to-pod", build)


def client_to_client() -> Scenario:
    def build(env: Environment) -> list[ActionSpec]:
        out = []
        for a in env.clients:
            for b in env.clients:
                if a is not b:
                    out.append(ActionSpec(f"ping-{len(out)}", a, dataclasses.replace(b, port=0),
                                          "ping", "ICMP"))
        return out
    return Scenario("client-to-client", build)


def pod_to_service() -> Scenario:
    def build(env: Environment) -> list[ActionSpec]:
        return [ActionSpec(f"curl-{i}", c, s, "curl")
                for i, (c, s) in enumerate((c, s) for c in env.clients for s in env.echo_services)]
    return Scenario("pod-to-service", build)


def pod_to_itself_via_service() -> Scenario:
    """Hairpin: a backend reaching its own service lands on itself."""
    def build(env: Environment) -> list[ActionSpec]:
        out = []
        for e in env.echo_pods:
            for s in env.echo_services:
                if e.name.rsplit("/", 1)[-1] in s.backends:
                    out.append(ActionSpec(f"curl-{len(out)}", e, s, "curl"))
        return out
    return Scenario("pod-to-itself-via-service", build)


def pod_to_host() -> Scenario:
    def build(env: Environment) -> list[ActionSpec]:
        return [ActionSpec(f"ping-{i}", c, dataclasses.replace(n, port=0), "ping", "ICMP")
                for i, (c, n) in enumerate((c, n) for c in env.clients for n in env.nodes)]
    return Scenario("pod-to-host", build)


def host_to_pod() -> Scenario:
    def build(env: Environment) -> list[ActionSpec]:
        return [ActionSpec(f"curl-{i}", n, e, "curl")
                for i, (n, e) in enumerate((n, e) for n in env.nodes for e in env.echo_pods)]
    return Scenario("host-to-pod", build)


def _world(env: Environment, address: str, port: int) -> Peer:
    return Peer("external", "world", address, port, labels={"reserved": "world"},
                netns=env.world_netns)


def pod_to_world(ports: tuple[int, ...] = (80, 443)) -> Scenario:
    def build(env: Environment) -> list[ActionSpec]:
        out = []
        for port in ports:
            label = "http-to-world" if port == 80 else f"http-to-world-{port}"
            for i, c in enumerate(env.clients):
                out.append(ActionSpec(f"{label}-{i}", c, _world(env, env.external_ip, port), "curl"))
        return out
    return Scenario("pod-to-world", build)


def pod_to_cidr() -> Scenario:
    def build(env: Environment) -> list[ActionSpec]:
        out = []
        for address in (env.external_ip, env.external_other_ip):
            for i, c in enumerate(env.clients):
                out.append(ActionSpec(f"external-{address}-{i}", c, _world(env, address, 80), "curl"))
        return out
    return Scenario("pod-to-cidr", build)


def _node_port_peer(env: Environment, svc: Peer, node: Peer) -> Peer:
    service = svc.name.rsplit("/", 1)[-1]
    return dataclasses.replace(svc, kind="nodeport", address=node.address,
                               port=env.node_ports[service], node=node.name)


def pod_to_local_nodeport() -> Scenario:
    def build(env: Environment) -> list[ActionSpec]:
        out = []
        for c in env.clients:
            node = next(n for n in env.nodes if n.name == c.node)
            for s in env.echo_services:
                out.append(ActionSpec(f"curl-{len(out)}", c, _node_port_peer(env, s, node), "curl"))
        return out
    return Scenario("pod-to-local-nodeport", build)


def pod_to_remote_nodeport() -> Scenario:
    def build(env: Environment) -> list[ActionSpec]:
        out = []
        for c in env.clients:
            for node in env.nodes:
                if node.name == c.node:
                    continue
                for s in env.echo_services:
                    out.append(ActionSpec(f"curl-{len(out)}", c, _node_port_peer(env, s, node), "curl"))
        return out
    return Scenario("pod-to-remote-nodeport", build, _needs_two_nodes)


def outside_to_nodeport() -> Scenario:
    def build(env: Environment) -> list[ActionSpec]:
        src = _world(env, env.external_ip, 0)
        out = []
        for node in env.nodes:
            for s in env.echo_services:
                out.append(ActionSpec(f"curl-{len(out)}", src, _node_port_peer(env, s, node), "curl"))
        return out
    return Scenario("outside-to-nodeport", build)
