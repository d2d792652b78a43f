"""NetworkPolicy (networking.k8s.io/v1), CiliumNetworkPolicy and
CiliumClusterwideNetworkPolicy (cilium.io/v2) validation.

L3/L4 policy is complete; everything that needs a proxy or a DNS/service watcher (L7
rules, toFQDNs, toServices, toGroups, listeners, authentication) is refused with one line
naming the field, so a manifest never half-applies with silently ignored rules.
"""
from __future__ import annotations

import copy
import ipaddress
import re
from datetime import datetime

from . import names
from .errors import FieldError
from .fields import (check_fields, describe, duplicate, get_bool, get_int, get_list, get_map,
                     get_str, invalid, join, string_list, unsupported)
from .meta import validate_object_meta
from .selectors import format_label_selector, validate_label_selector, validate_match_expressions
from .timefmt import age

TOP_LEVEL_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
L7_REFUSAL = "not supported yet (L7/FQDN policy is planned)"
NOT_SUPPORTED = "not supported yet"

# ---- NetworkPolicy --------------------------------------------------------------------

NP_SPEC_FIELDS = frozenset({"podSelector", "policyTypes", "ingress", "egress"})
NP_INGRESS_FIELDS = frozenset({"from", "ports"})
NP_EGRESS_FIELDS = frozenset({"to", "ports"})
NP_PEER_FIELDS = frozenset({"podSelector", "namespaceSelector", "ipBlock"})
NP_PORT_FIELDS = frozenset({"protocol", "port", "endPort"})
IP_BLOCK_FIELDS = frozenset({"cidr", "except"})
NP_PROTOCOLS = ("SCTP", "TCP", "UDP")
POLICY_TYPES = ("Ingress", "Egress")


def _object(value: object, path: str) -> dict:
    if not isinstance(value, dict):
        raise FieldError(path, f"must be an object, got {describe(value)}")
    return value


def parse_cidr(value: str, path: str, *, bare_ip: bool = False) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if "/" not in value and bare_ip:
        try:
            return ipaddress.ip_network(value)
        except ValueError:
            pass
    if "/" not in value:
        raise invalid(path, value, "must be a valid CIDR (e.g. 10.0.0.0/8 or 2001:db8::/64)")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise invalid(path, value, "must be a valid CIDR (e.g. 10.0.0.0/8 or 2001:db8::/64)") from None


def _validate_excepts(excepts: list[str] | None, net, path: str, key: str = "except") -> list[str]:
    out = []
    for i, e in enumerate(excepts or []):
        epath = join(join(path, key), i)
        enet = parse_cidr(e, epath)
        if enet.version != net.version or not enet.subnet_of(net) or enet.prefixlen <= net.prefixlen:
            raise invalid(epath, e, "must be a strict subset of `cidr`")
        out.append(e)
    return out


def _validate_ip_block(block: dict, path: str) -> dict:
    check_fields(block, IP_BLOCK_FIELDS, path)
    cidr = get_str(block, "cidr", path, need=True)
    assert cidr is not None
    net = parse_cidr(cidr, join(path, "cidr"))
    out: dict = {"cidr": cidr}
    excepts = _validate_excepts(string_list(block, "except", path), net, path)
    if excepts:
        out["except"] = excepts
    return out


def _validate_np_peer(peer: object, path: str) -> dict:
    peer = _object(peer, path)
    check_fields(peer, NP_PEER_FIELDS, path)
    out: dict = {}
    for key in ("podSelector", "namespaceSelector"):
        sel = get_map(peer, key, path)
        if key in peer and peer[key] is not None:
            out[key] = validate_label_selector(sel or {}, join(path, key))
    block = get_map(peer, "ipBlock", path)
    if block is not None:
        if out:
            raise FieldError(path, "may not specify both ipBlock and another peer")
        out["ipBlock"] = _validate_ip_block(block, join(path, "ipBlock"))
    if not out:
        raise FieldError(path, "must specify a peer")
    return out


def _validate_np_port(port: object, path: str) -> dict:
    port = _object(port, path)
    check_fields(port, NP_PORT_FIELDS, path)
    protocol = get_str(port, "protocol", path) or "TCP"
    if protocol not in NP_PROTOCOLS:
        raise unsupported(join(path, "protocol"), protocol, NP_PROTOCOLS)
    out: dict = {"protocol": protocol}
    value = port.get("port")
    if value is not None:
        ppath = join(path, "port")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise FieldError(ppath, f"must be an integer or a port name, got {describe(value)}")
        if isinstance(value, int):
            if not 1 <= value <= 65535:
                raise FieldError(ppath, f"must be between 1 and 65535, got {value}")
        else:
            errs = names.port_name(value)
            if errs:
                raise invalid(ppath, value, errs[0])
        out["port"] = value
    end = get_int(port, "endPort", path)
    if end is not None:
        epath = join(path, "endPort")
        if value is None:
            raise FieldError(join(path, "port"), "must be specified when `endPort` is specified")
        if isinstance(value, str):
            raise invalid(epath, end, "may not be specified when `port` is non-numeric")
        if not 1 <= end <= 65535:
            raise FieldError(epath, f"must be between 1 and 65535, got {end}")
        if end < value:
            raise invalid(epath, end, "must be greater than or equal to `port`")
        out["endPort"] = end
    return out


def _validate_np_rules(spec: dict, key: str, peer_key: str, fields: frozenset[str]) -> list[dict] | None:
    rules = get_list(spec, key, "spec")
    if rules is None:
        return None
    out = []
    for i, rule in enumerate(rules):
        rpath = join(join("spec", key), i)
        rule = _object(rule, rpath) if rule is not None else {}
        check_fields(rule, fields, rpath)
        item: dict = {}
        ports = get_list(rule, "ports", rpath)
        if ports:
            item["ports"] = [_validate_np_port(p, join(join(rpath, "ports"), j)) for j, p in enumerate(ports)]
        peers = get_list(rule, peer_key, rpath)
        if peers:
            item[peer_key] = [_validate_np_peer(p, join(join(rpath, peer_key), j)) for j, p in enumerate(peers)]
        out.append(item)
    return out


def validate_network_policy(obj: dict) -> dict:
    check_fields(obj, TOP_LEVEL_FIELDS, "")
    meta = validate_object_meta(obj, namespaced=True, name_validator=names.dns1123_subdomain)
    spec = get_map(obj, "spec", "") or {}
    check_fields(spec, NP_SPEC_FIELDS, "spec")
    out_spec: dict = {
        "podSelector": validate_label_selector(get_map(spec, "podSelector", "spec") or {}, "spec.podSelector"),
    }
    ingress = _validate_np_rules(spec, "ingress", "from", NP_INGRESS_FIELDS)
    egress = _validate_np_rules(spec, "egress", "to", NP_EGRESS_FIELDS)
    types = string_list(spec, "policyTypes", "spec")
    if types is None:
        # The API server's defaulting: Ingress always, Egress when egress rules exist.
        types = ["Ingress"] + (["Egress"] if egress else [])
    seen: set[str] = set()
    for i, t in enumerate(types):
        tpath = join("spec.policyTypes", i)
        if t not in POLICY_TYPES:
            raise unsupported(tpath, t, POLICY_TYPES)
        if t in seen:
            raise duplicate(tpath, t)
        seen.add(t)
    out_spec["policyTypes"] = list(types)
    if ingress is not None:
        out_spec["ingress"] = ingress
    if egress is not None:
        out_spec["egress"] = egress
    return {"apiVersion": obj["apiVersion"], "kind": "NetworkPolicy", "metadata": meta, "spec": out_spec}


# ---- CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy -----------------------------

CNP_TOP_LEVEL_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "specs", "status"})
RULE_FIELDS = frozenset({"endpointSelector", "nodeSelector", "ingress", "ingressDeny", "egress",
                         "egressDeny", "labels", "description", "enableDefaultDeny"})
INGRESS_FIELDS = frozenset({"fromEndpoints", "fromRequires", "fromCIDR", "fromCIDRSet", "fromEntities",
                            "fromGroups", "fromNodes", "toPorts", "icmps", "authentication"})
INGRESS_DENY_FIELDS = INGRESS_FIELDS - {"authentication"}
EGRESS_FIELDS = frozenset({"toEndpoints", "toRequires", "toCIDR", "toCIDRSet", "toEntities", "toServices",
                           "toFQDNs", "toGroups", "toNodes", "toPorts", "icmps", "authentication"})
EGRESS_DENY_FIELDS = EGRESS_FIELDS - {"authentication", "toFQDNs"}
PORT_RULE_FIELDS = frozenset({"ports", "rules", "listener", "originatingTLS", "terminatingTLS", "serverNames"})
PORT_PROTOCOL_FIELDS = frozenset({"port", "endPort", "protocol"})
CIDR_RULE_FIELDS = frozenset({"cidr", "except", "cidrGroupRef", "cidrGroupSelector"})
ICMP_RULE_FIELDS = frozenset({"fields"})
ICMP_FIELD_FIELDS = frozenset({"type", "family"})
DEFAULT_DENY_FIELDS = frozenset({"ingress", "egress"})
RULE_LABEL_FIELDS = frozenset({"key", "value", "source"})
CILIUM_PROTOCOLS = ("TCP", "UDP", "SCTP", "ANY")
ICMP_FAMILIES = ("IPv4", "IPv6")
ENTITIES = ("all", "world", "cluster", "host", "remote-node", "health", "init", "unmanaged",
            "kube-apiserver", "ingress")

# Fields that need L7 proxies, DNS proxies or service/cloud watchers.
L7_FIELDS = frozenset({"toFQDNs", "toServices", "toGroups", "fromGroups", "authentication"})
L7_PORT_FIELDS = ("rules", "listener", "originatingTLS", "terminatingTLS", "serverNames")
UNSUPPORTED_FIELDS = frozenset({"fromRequires", "toRequires", "fromNodes", "toNodes"})

# Cilium's icmpIpv4TypeNameToCode / icmpIpv6TypeNameToCode (the common ones).
ICMP_TYPE_NAMES = {
    "IPv4": {"EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
             "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11,
             "ParameterProblem": 12, "Timestamp": 13, "TimestampReply": 14,
             "ExtendedEchoRequest": 42, "ExtendedEchoReply": 43},
    "IPv6": {"DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
             "EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130,
             "MulticastListenerReport": 131, "MulticastListenerDone": 132, "RouterSolicitation": 133,
             "RouterAdvertisement": 134, "NeighborSolicitation": 135, "NeighborAdvertisement": 136,
             "RedirectMessage": 137, "ExtendedEchoRequest": 160, "ExtendedEchoReply": 161},
}

_SOURCE_RE = re.compile("[a-z][a-z0-9-]*")
_PORT_DIGITS = re.compile("[0-9]+")


def _selector_key(key: object, path: str) -> str:
    if not isinstance(key, str):
        raise FieldError(path, f"keys must be strings, got {describe(key)}")
    source, sep, rest = key.partition(":")
    if sep and not _SOURCE_RE.fullmatch(source):
        raise invalid(path, key, "label source must be a lowercase word, as in 'k8s:app'")
    name = rest if sep else key
    errs = names.qualified_name(name)
    if errs:
        raise invalid(path, key, errs[0])
    return key


def validate_cilium_selector(selector: object, path: str) -> dict:
    """A LabelSelector whose keys may carry a Cilium label source ('k8s:app', 'reserved:host')."""
    selector = _object(selector if selector is not None else {}, path)
    check_fields(selector, frozenset({"matchLabels", "matchExpressions"}), path)
    out: dict = {}
    labels = get_map(selector, "matchLabels", path)
    if labels:
        mpath = join(path, "matchLabels")
        for k, v in labels.items():
            _selector_key(k, mpath)
            if not isinstance(v, str):
                raise FieldError(f"{mpath}[{k}]", f"must be a string, got {describe(v)}")
            errs = names.label_value(v)
            if errs:
                raise invalid(f"{mpath}[{k}]", v, errs[0])
        out["matchLabels"] = dict(labels)
    exprs = validate_match_expressions(selector, path, _selector_key)
    if exprs:
        out["matchExpressions"] = exprs
    return out


def _validate_cilium_port(port: object, path: str) -> dict:
    port = _object(port, path)
    check_fields(port, PORT_PROTOCOL_FIELDS, path)
    out: dict = {}
    value = port.get("port")
    number: int | None = None
    if value is not None:
        ppath = join(path, "port")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise FieldError(ppath, f"must be a port number or name, got {describe(value)}")
        text = str(value)
        if _PORT_DIGITS.fullmatch(text):
            number = int(text)
            if number > 65535:
                raise FieldError(ppath, f"must be between 0 and 65535, got {number}")
            out["port"] = str(number)
        else:
            errs = names.port_name(text.lower())
            if errs:
                raise invalid(ppath, value, errs[0])
            out["port"] = text.lower()  # Cilium lower-cases named ports
    end = get_int(port, "endPort", path)
    if end is not None:
        epath = join(path, "endPort")
        if number is None:
            raise invalid(epath, end, "may only be specified with a numeric `port`")
        if not 0 <= end <= 65535:
            raise FieldError(epath, f"must be between 0 and 65535, got {end}")
        if end and end < number:
            raise invalid(epath, end, "must be greater than or equal to `port`")
        out["endPort"] = end
    protocol = get_str(port, "protocol", path)
    if protocol is not None:
        # Cilium's sanitize upper-cases the protocol.
        if protocol.upper() not in CILIUM_PROTOCOLS:
            raise unsupported(join(path, "protocol"), protocol, CILIUM_PROTOCOLS)
        out["protocol"] = protocol.upper()
    return out


def _validate_to_ports(rule: dict, path: str, deny: bool) -> list[dict] | None:
    items = get_list(rule, "toPorts", path)
    if items is None:
        return None
    out = []
    for i, item in enumerate(items):
        ipath = join(join(path, "toPorts"), i)
        item = _object(item, ipath)
        for key in L7_PORT_FIELDS:
            if item.get(key) not in (None, {}, []):
                raise FieldError(join(ipath, key), L7_REFUSAL)
        check_fields(item, PORT_RULE_FIELDS, ipath)
        ports = get_list(item, "ports", ipath) or []
        out.append({"ports": [_validate_cilium_port(p, join(join(ipath, "ports"), j)) for j, p in enumerate(ports)]})
    return out


def _validate_icmps(rule: dict, path: str) -> list[dict] | None:
    items = get_list(rule, "icmps", path)
    if items is None:
        return None
    out = []
    for i, item in enumerate(items):
        ipath = join(join(path, "icmps"), i)
        item = _object(item, ipath)
        check_fields(item, ICMP_RULE_FIELDS, ipath)
        fields = []
        for j, f in enumerate(get_list(item, "fields", ipath) or []):
            fpath = join(join(ipath, "fields"), j)
            f = _object(f, fpath)
            check_fields(f, ICMP_FIELD_FIELDS, fpath)
            family = get_str(f, "family", fpath) or "IPv4"
            if family not in ICMP_FAMILIES:
                raise unsupported(join(fpath, "family"), family, ICMP_FAMILIES)
            t = f.get("type")
            tpath = join(fpath, "type")
            if t is None:
                raise FieldError(tpath, "field is required")
            if isinstance(t, bool) or not isinstance(t, (int, str)):
                raise FieldError(tpath, f"must be an ICMP type number or name, got {describe(t)}")
            if isinstance(t, str) and t.isdigit():
                t = int(t)
            if isinstance(t, int):
                if not 0 <= t <= 255:
                    raise FieldError(tpath, f"must be between 0 and 255, got {t}")
            elif t not in ICMP_TYPE_NAMES[family]:
                raise unsupported(tpath, t, sorted(ICMP_TYPE_NAMES[family]))
            fields.append({"family": family, "type": t})
        out.append({"fields": fields})
    return out


def _validate_cidr_set(rule: dict, key: str, path: str) -> list[dict] | None:
    items = get_list(rule, key, path)
    if items is None:
        return None
    out = []
    for i, item in enumerate(items):
        ipath = join(join(path, key), i)
        item = _object(item, ipath)
        for k in ("cidrGroupRef", "cidrGroupSelector"):
            if item.get(k) is not None:
                raise FieldError(join(ipath, k), NOT_SUPPORTED)
        check_fields(item, CIDR_RULE_FIELDS, ipath)
        cidr = get_str(item, "cidr", ipath, need=True)
        assert cidr is not None
        net = parse_cidr(cidr, join(ipath, "cidr"))
        entry: dict = {"cidr": cidr}
        excepts = _validate_excepts(string_list(item, "except", ipath), net, ipath)
        if excepts:
            entry["except"] = excepts
        out.append(entry)
    return out


def _validate_peer_rule(rule: object, path: str, egress: bool, deny: bool) -> dict:
    rule = _object(rule if rule is not None else {}, path)
    p = "to" if egress else "from"
    fields = (EGRESS_DENY_FIELDS if deny else EGRESS_FIELDS) if egress else \
             (INGRESS_DENY_FIELDS if deny else INGRESS_FIELDS)
    for key in rule:
        if key in L7_FIELDS:
            raise FieldError(join(path, key), L7_REFUSAL)
        if key in UNSUPPORTED_FIELDS:
            raise FieldError(join(path, key), NOT_SUPPORTED)
    check_fields(rule, fields, path)
    out: dict = {}
    eps = get_list(rule, f"{p}Endpoints", path)
    if eps is not None:
        out[f"{p}Endpoints"] = [validate_cilium_selector(s, join(join(path, f"{p}Endpoints"), i))
                                for i, s in enumerate(eps)]
    cidrs = string_list(rule, f"{p}CIDR", path)
    if cidrs is not None:
        for i, c in enumerate(cidrs):
            parse_cidr(c, join(join(path, f"{p}CIDR"), i), bare_ip=True)
        out[f"{p}CIDR"] = list(cidrs)
    cidr_set = _validate_cidr_set(rule, f"{p}CIDRSet", path)
    if cidr_set is not None:
        out[f"{p}CIDRSet"] = cidr_set
    entities = string_list(rule, f"{p}Entities", path)
    if entities is not None:
        for i, e in enumerate(entities):
            if e not in ENTITIES:
                raise unsupported(join(join(path, f"{p}Entities"), i), e, ENTITIES)
        out[f"{p}Entities"] = list(entities)
    l3 = [k for k in (f"{p}Endpoints", f"{p}CIDR", f"{p}CIDRSet", f"{p}Entities") if out.get(k)]
    if len(l3) > 1:
        raise FieldError(path, f"combining {l3[0]} and {l3[1]} is not supported yet")
    to_ports = _validate_to_ports(rule, path, deny)
    if to_ports is not None:
        out["toPorts"] = to_ports
    icmps = _validate_icmps(rule, path)
    if icmps is not None:
        out["icmps"] = icmps
    if to_ports and icmps:
        raise FieldError(join(path, "icmps"), "may only be present without toPorts; "
                                              "define a separate rule to use toPorts")
    return out


def _validate_rule(rule: object, path: str) -> dict:
    rule = _object(rule, path)
    if rule.get("nodeSelector") is not None:
        raise FieldError(join(path, "nodeSelector"), NOT_SUPPORTED + " (host policies are planned)")
    check_fields(rule, RULE_FIELDS, path)
    if rule.get("endpointSelector") is None:
        raise FieldError(join(path, "endpointSelector"), "field is required")
    out: dict = {"endpointSelector": validate_cilium_selector(rule["endpointSelector"],
                                                              join(path, "endpointSelector"))}
    for key, egress, deny in (("ingress", False, False), ("ingressDeny", False, True),
                              ("egress", True, False), ("egressDeny", True, True)):
        items = get_list(rule, key, path)
        if items is not None:
            out[key] = [_validate_peer_rule(r, join(join(path, key), i), egress, deny)
                        for i, r in enumerate(items)]
    dd = get_map(rule, "enableDefaultDeny", path)
    if dd is not None:
        dpath = join(path, "enableDefaultDeny")
        check_fields(dd, DEFAULT_DENY_FIELDS, dpath)
        norm = {k: v for k in ("ingress", "egress") if (v := get_bool(dd, k, dpath)) is not None}
        out["enableDefaultDeny"] = norm
    description = get_str(rule, "description", path)
    if description is not None:
        out["description"] = description
    labels = get_list(rule, "labels", path)
    if labels is not None:
        for i, label in enumerate(labels):
            lpath = join(join(path, "labels"), i)
            check_fields(_object(label, lpath), RULE_LABEL_FIELDS, lpath)
            get_str(label, "key", lpath, need=True)
        out["labels"] = copy.deepcopy(labels)
    return out


def _validate_cilium_policy(obj: dict, kind: str, namespaced: bool) -> dict:
    check_fields(obj, CNP_TOP_LEVEL_FIELDS, "")
    meta = validate_object_meta(obj, namespaced=namespaced, name_validator=names.dns1123_subdomain)
    out: dict = {"apiVersion": obj["apiVersion"], "kind": kind, "metadata": meta}
    spec = get_map(obj, "spec", "")
    specs = get_list(obj, "specs", "")
    if spec is None and not specs:
        raise FieldError("spec", "field is required (or specs)")
    if spec is not None:
        out["spec"] = _validate_rule(spec, "spec")
    if specs:
        out["specs"] = [_validate_rule(r, join("specs", i)) for i, r in enumerate(specs)]
    return out


def validate_cilium_network_policy(obj: dict) -> dict:
    return _validate_cilium_policy(obj, "CiliumNetworkPolicy", True)


def validate_cilium_clusterwide_network_policy(obj: dict) -> dict:
    return _validate_cilium_policy(obj, "CiliumClusterwideNetworkPolicy", False)


# ---- registration and printing (wired by registry.py / printers.py) -------------------

def register_policy_kinds(register, KindSpec) -> None:
    """register(KindSpec(...)) for the three policy kinds, with kubectl's short names."""
    register(KindSpec("NetworkPolicy", ("networking.k8s.io/v1",), "networkpolicies", True,
                      validate_network_policy, ("netpol",)))
    register(KindSpec("CiliumNetworkPolicy", ("cilium.io/v2",), "ciliumnetworkpolicies", True,
                      validate_cilium_network_policy, ("cnp", "ciliumnp")))
    register(KindSpec("CiliumClusterwideNetworkPolicy", ("cilium.io/v2",),
                      "ciliumclusterwidenetworkpolicies", False,
                      validate_cilium_clusterwide_network_policy, ("ccnp",)))


def _name(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("name", "")


def _age(obj: dict, now: datetime) -> str:
    return age((obj.get("metadata") or {}).get("creationTimestamp"), now)


def network_policy_row(obj: dict, now: datetime) -> list[str]:
    return [_name(obj), format_label_selector((obj.get("spec") or {}).get("podSelector")), _age(obj, now)]


def cilium_policy_row(obj: dict, now: datetime) -> list[str]:
    # Only valid objects are ever stored, so VALID is always True (Cilium's status column).
    return [_name(obj), _age(obj, now), "True"]


# kind -> (columns, row, wide_columns, wide_row): the fields of printers.TableSpec.
POLICY_TABLES: dict[str, tuple] = {
    "NetworkPolicy": (("NAME", "POD-SELECTOR", "AGE"), network_policy_row, (), None),
    "CiliumNetworkPolicy": (("NAME", "AGE", "VALID"), cilium_policy_row, (), None),
    "CiliumClusterwideNetworkPolicy": (("NAME", "AGE", "VALID"), cilium_policy_row, (), None),
}
