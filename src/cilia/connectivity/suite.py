"""The suite: cilium-cli's connectivity tests (connectivity/suite.go) as data.

Each test names its policies, its scenarios and, per action, what egress from the source
and ingress into the destination must show. Tests run in this order.
"""
from __future__ import annotations

from . import scenarios as sc
from .model import (DEFAULT_DENY_DROP, DROP, DROP_CURL_TIMEOUT, NONE, OK, POLICY_DENY_DROP,
                    ActionSpec, Result, TestDef)


def _external(a: ActionSpec) -> bool:
    return a.dst.kind == "external"


def _client_ingress(a: ActionSpec) -> tuple[Result, Result]:
    if a.src.has_label("other", "client"):
        return OK, OK
    return OK, DEFAULT_DENY_DROP


def _all_ingress_deny(a: ActionSpec) -> tuple[Result, Result]:
    # Replies to a pod's own connections are not new ingress: world stays reachable.
    if _external(a):
        return OK, NONE
    return DROP, DEFAULT_DENY_DROP


def _echo_ingress(a: ActionSpec) -> tuple[Result, Result]:
    if a.dst.has_label("kind", "echo") and not a.src.has_label("other", "client"):
        return DROP_CURL_TIMEOUT, DROP_CURL_TIMEOUT
    return OK, OK


def _host_entity(a: ActionSpec) -> tuple[Result, Result]:
    # `host` is the pod's own node; another node is remote-node, which the policy omits.
    if a.dst.kind == "node" and a.dst.name != a.src.node:
        return DEFAULT_DENY_DROP, NONE
    return OK, NONE


def _to_entities_world(a: ActionSpec) -> tuple[Result, Result]:
    if a.dst.port == 80:
        return OK, NONE
    return DROP_CURL_TIMEOUT, NONE


def _to_cidr_external(env_other_ip: str):
    def expect(a: ActionSpec) -> tuple[Result, Result]:
        if a.dst.address == env_other_ip:
            return DROP_CURL_TIMEOUT, NONE
        return OK, NONE
    return expect


def _echo_ingress_from_other_client_deny(a: ActionSpec) -> tuple[Result, Result]:
    if a.src.has_label("other", "client") and a.dst.has_label("kind", "echo"):
        return DROP, POLICY_DENY_DROP
    return OK, OK


def _client_egress_to_echo_deny(a: ActionSpec) -> tuple[Result, Result]:
    if (a.src.has_label("kind", "client") and a.dst.has_label("kind", "echo")
            and a.dst.port == 8080):
        return POLICY_DENY_DROP, NONE
    return OK, NONE


def build(external_other_ip: str) -> list[TestDef]:
    return [
        TestDef("no-policies", (
            sc.pod_to_pod(), sc.client_to_client(), sc.pod_to_service(),
            sc.pod_to_itself_via_service(), sc.pod_to_remote_nodeport(),
            sc.pod_to_local_nodeport(), sc.pod_to_world(), sc.pod_to_host(),
            sc.host_to_pod(), sc.pod_to_cidr(), sc.outside_to_nodeport())),
        TestDef("allow-all-except-world", (
            sc.pod_to_pod(), sc.client_to_client(), sc.pod_to_service(), sc.pod_to_host()),
            policies=("allow-all-except-world",)),
        TestDef("client-ingress", (sc.client_to_client(),),
                policies=("client-ingress-from-client2",), expect=_client_ingress),
        TestDef("all-ingress-deny", (sc.pod_to_pod(), sc.pod_to_cidr()),
                policies=("deny-all-ingress",), expect=_all_ingress_deny),
        TestDef("all-egress-deny", (sc.pod_to_pod(),), policies=("deny-all-egress",),
                expect=lambda a: (DEFAULT_DENY_DROP, NONE)),
        TestDef("all-entities-deny", (sc.pod_to_pod(), sc.pod_to_cidr()),
                policies=("deny-all-entities",), expect=lambda a: (POLICY_DENY_DROP, NONE)),
        TestDef("cluster-entity", (sc.pod_to_pod(dst_labels={"name": "echo-same-node"}),),
                policies=("allow-cluster-entity",)),
        TestDef("host-entity-egress", (sc.pod_to_host(),), policies=("allow-host-entity-egress",),
                expect=_host_entity),
        TestDef("echo-ingress", (sc.pod_to_pod(),), policies=("echo-ingress-from-other-client",),
                expect=_echo_ingress),
        TestDef("client-egress", (sc.pod_to_pod(),), policies=("client-egress-to-echo",)),
        TestDef("client-egress-expression", (sc.pod_to_pod(),),
                policies=("client-egress-to-echo-expression",)),
        TestDef("to-entities-world", (sc.pod_to_world(),),
                policies=("client-egress-to-entities-world",), expect=_to_entities_world),
        TestDef("to-cidr-external", (sc.pod_to_cidr(),),
                policies=("client-egress-to-cidr-external",),
                expect=_to_cidr_external(external_other_ip)),
        TestDef("echo-ingress-from-other-client-deny", (
            sc.pod_to_pod(src_labels={"name": "client"}),
            sc.pod_to_pod(src_labels={"name": "client2"}),
            sc.client_to_client()),
            policies=("allow-all-egress", "allow-all-ingress",
                      "echo-ingress-from-other-client-deny"),
            expect=_echo_ingress_from_other_client_deny),
        TestDef("client-egress-to-echo-deny", (sc.client_to_client(), sc.pod_to_pod()),
                policies=("allow-all-egress", "allow-all-ingress", "client-egress-to-echo-deny"),
                expect=_client_egress_to_echo_deny),
        TestDef("no-unexpected-packet-drops", special="drops"),
    ]
