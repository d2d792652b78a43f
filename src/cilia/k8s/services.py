"""v1 Service and discovery.k8s.io/v1 EndpointSlice validation, with the API server's defaults.

Address ranges (service CIDR, NodePort range, LB pool) are checked here only where they are
fixed for every cilia cluster (the NodePort range); whether a requested ClusterIP lies in the
operator's range and is free is decided by `cilia apply` (src/cilia/cluster.py), which knows the
store."""

from __future__ import annotations

import copy
import ipaddress
import re

from . import names
from .errors import FieldError
from .fields import (check_fields, describe, duplicate, get_bool, get_int, get_list, get_map,
                     get_str, invalid, join, string_list, unsupported)
from .meta import validate_labels, validate_name, validate_object_meta
from .pods import PROTOCOLS, TOP_LEVEL_FIELDS

SERVICE_SPEC_FIELDS = frozenset({
    "ports", "selector", "clusterIP", "clusterIPs", "type", "externalIPs", "sessionAffinity",
    "loadBalancerIP", "loadBalancerSourceRanges", "externalName", "externalTrafficPolicy",
    "healthCheckNodePort", "publishNotReadyAddresses", "sessionAffinityConfig", "ipFamilies",
    "ipFamilyPolicy", "allocateLoadBalancerNodePorts", "loadBalancerClass",
    "internalTrafficPolicy", "trafficDistribution",
})
SERVICE_PORT_FIELDS = frozenset({"name", "protocol", "appProtocol", "port", "targetPort", "nodePort"})
SESSION_AFFINITY_CONFIG_FIELDS = frozenset({"clientIP"})
CLIENT_IP_CONFIG_FIELDS = frozenset({"timeoutSeconds"})

SERVICE_TYPES = ("ClusterIP", "LoadBalancer", "NodePort")
TRAFFIC_POLICIES = ("Cluster", "Local")
SESSION_AFFINITIES = ("ClientIP", "None")
IP_FAMILY_POLICIES = ("SingleStack", "PreferDualStack", "RequireDualStack")

NODE_PORT_MIN, NODE_PORT_MAX = 30000, 32767
DEFAULT_AFFINITY_TIMEOUT = 10800   # sessionAffinityConfig.clientIP.timeoutSeconds default
MAX_AFFINITY_TIMEOUT = 86400
HEADLESS = "None"

# Cilium's per-service datapath algorithm (honoured by cilium with bpf-lb-algorithm-annotation).
LB_ALGORITHM_ANNOTATION = "service.cilium.io/lb-algorithm"
LB_ALGORITHMS = ("maglev", "random")
# Cilium LB-IPAM's request for specific LoadBalancer IPs (comma-separated).
LB_IPS_ANNOTATION = "lbipam.cilium.io/ips"

# Service status conditions written by cilia-operator. A service whose ClusterIP or NodePort
# collides with another's gets AddressesAllocated=False and no datapath frontends at all, so
# it can never take traffic from the service that owns the address.
ADDRESSES_ALLOCATED = "cilia.io/AddressesAllocated"
# Cilium LB-IPAM's condition for a LoadBalancer service's IP request.
IP_REQUEST_SATISFIED = "cilium.io/IPRequestSatisfied"

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"

ENDPOINT_SLICE_FIELDS = frozenset({"apiVersion", "kind", "metadata", "addressType", "endpoints", "ports"})
ENDPOINT_FIELDS = frozenset({"addresses", "conditions", "hostname", "targetRef", "deprecatedTopology",
                             "nodeName", "zone", "hints"})
CONDITION_FIELDS = frozenset({"ready", "serving", "terminating"})
OBJECT_REFERENCE_FIELDS = frozenset({"kind", "namespace", "name", "uid", "apiVersion",
                                     "resourceVersion", "fieldPath"})
ENDPOINT_PORT_FIELDS = frozenset({"name", "protocol", "port", "appProtocol"})
ADDRESS_TYPES = ("FQDN", "IPv4", "IPv6")
MAX_ENDPOINTS_PER_SLICE = 1000
MAX_ADDRESSES_PER_ENDPOINT = 100
MAX_PORTS_PER_SLICE = 100

_DNS1035_LABEL = "[a-z]([-a-z0-9]*[a-z0-9])?"
_DNS1035_RE = re.compile(_DNS1035_LABEL)


def dns1035_label(value: str) -> list[str]:
    """Service names must start with a letter (they become DNS names and env var prefixes)."""
    errs = []
    if len(value) > names.DNS1123_LABEL_MAX:
        errs.append(f"must be no more than {names.DNS1123_LABEL_MAX} characters")
    if not _DNS1035_RE.fullmatch(value):
        errs.append("a DNS-1035 label must consist of lower case alphanumeric characters or '-', "
                    "start with an alphabetic character, and end with an alphanumeric character "
                    f"(e.g. 'my-name',  or 'abc-123', regex used for validation is '{_DNS1035_LABEL}')")
    return errs


def ipv4(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise FieldError(path, f"must be a string, got {describe(value)}")
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise invalid(path, value, "must be a valid IPv4 address, (e.g. 10.9.8.7)") from None


def _port(obj: dict, key: str, path: str, *, need: bool) -> int | None:
    value = get_int(obj, key, path, need=need)
    if value is not None and not 1 <= value <= 65535:
        raise FieldError(join(path, key), f"must be between 1 and 65535, got {value}")
    return value


def _protocol(obj: dict, path: str) -> str:
    protocol = get_str(obj, "protocol", path) or "TCP"
    if protocol not in PROTOCOLS:
        raise unsupported(join(path, "protocol"), protocol, PROTOCOLS)
    return protocol


def _target_port(port: dict, path: str, default: int) -> int | str:
    value = port.get("targetPort")
    tpath = join(path, "targetPort")
    if value is None or value == 0 or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FieldError(tpath, f"must be an integer or a string, got {describe(value)}")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise FieldError(tpath, f"must be between 1 and 65535, got {value}")
        return value
    if value.isdigit():
        # IntOrString from YAML "8080" stays a string in Kubernetes and then fails the
        # name syntax; say what is meant instead of the generic name error.
        raise invalid(tpath, value, "a port number must be an integer, not a string")
    errs = names.port_name(value)
    if errs:
        raise invalid(tpath, value, errs[0])
    return value


def _validate_service_ports(spec: dict, stype: str, headless: bool) -> list[dict]:
    ports = get_list(spec, "ports", "spec") or []
    if not ports and not headless:
        raise FieldError("spec.ports", "field is required")
    seen_names: set[str] = set()
    seen_ports: set[tuple[int, str]] = set()
    seen_node_ports: set[tuple[int, str]] = set()
    out = []
    for i, port in enumerate(ports):
        path = join("spec.ports", i)
        if not isinstance(port, dict):
            raise FieldError(path, f"must be an object, got {describe(port)}")
        check_fields(port, SERVICE_PORT_FIELDS, path)
        name = get_str(port, "name", path) or ""
        if len(ports) > 1 and not name:
            raise FieldError(join(path, "name"), "field is required when a service has more than one port")
        if name:
            validate_name(name, join(path, "name"), names.dns1123_label)
            if name in seen_names:
                raise duplicate(join(path, "name"), name)
            seen_names.add(name)
        number = _port(port, "port", path, need=True)
        assert number is not None
        protocol = _protocol(port, path)
        if (number, protocol) in seen_ports:
            raise duplicate(path, f"{number}/{protocol}")
        seen_ports.add((number, protocol))
        get_str(port, "appProtocol", path)
        item: dict = {"port": number, "protocol": protocol,
                      "targetPort": _target_port(port, path, number)}
        if name:
            item["name"] = name
        if port.get("appProtocol"):
            item["appProtocol"] = port["appProtocol"]
        node_port = get_int(port, "nodePort", path)
        if node_port:
            npath = join(path, "nodePort")
            if stype == "ClusterIP":
                raise FieldError(npath, "may not be used when `type` is 'ClusterIP'")
            if not NODE_PORT_MIN <= node_port <= NODE_PORT_MAX:
                raise invalid(npath, node_port, f"provided port is not in the valid range. "
                                                f"The range of valid ports is {NODE_PORT_MIN}-{NODE_PORT_MAX}")
            if (node_port, protocol) in seen_node_ports:
                raise duplicate(npath, node_port)
            seen_node_ports.add((node_port, protocol))
            item["nodePort"] = node_port
        out.append(item)
    return out


def _validate_cluster_ip(spec: dict, stype: str) -> str:
    cip = get_str(spec, "clusterIP", "spec") or ""
    ips = string_list(spec, "clusterIPs", "spec") or []
    if ips and cip and ips[0] != cip:
        raise invalid("spec.clusterIPs[0]", ips[0], "must be equal to spec.clusterIP")
    if len(ips) > 1:
        raise FieldError("spec.clusterIPs", "may hold one address: cilia services are IPv4 single-stack")
    cip = cip or (ips[0] if ips else "")
    if cip == HEADLESS:
        if stype != "ClusterIP":
            raise invalid("spec.clusterIP", cip, f"may not be set to 'None' for {stype} services")
        return cip
    return ipv4(cip, "spec.clusterIP") if cip else ""


def _validate_affinity(spec: dict) -> tuple[str, dict | None]:
    affinity = get_str(spec, "sessionAffinity", "spec") or "None"
    if affinity not in SESSION_AFFINITIES:
        raise unsupported("spec.sessionAffinity", affinity, SESSION_AFFINITIES)
    config = get_map(spec, "sessionAffinityConfig", "spec")
    if affinity == "None":
        if config:
            raise FieldError("spec.sessionAffinityConfig", "must not be set when session affinity is None")
        return affinity, None
    config = config or {}
    check_fields(config, SESSION_AFFINITY_CONFIG_FIELDS, "spec.sessionAffinityConfig")
    client = get_map(config, "clientIP", "spec.sessionAffinityConfig") or {}
    cpath = "spec.sessionAffinityConfig.clientIP"
    check_fields(client, CLIENT_IP_CONFIG_FIELDS, cpath)
    timeout = get_int(client, "timeoutSeconds", cpath)
    if timeout is None:
        timeout = DEFAULT_AFFINITY_TIMEOUT
    if not 0 < timeout <= MAX_AFFINITY_TIMEOUT:
        raise invalid(join(cpath, "timeoutSeconds"), timeout,
                      f"must be greater than 0 and less than or equal to {MAX_AFFINITY_TIMEOUT}")
    return affinity, {"clientIP": {"timeoutSeconds": timeout}}


def _policy(spec: dict, key: str) -> str | None:
    value = get_str(spec, key, "spec")
    if value is not None and value not in TRAFFIC_POLICIES:
        raise unsupported(join("spec", key), value, TRAFFIC_POLICIES)
    return value


def _validate_service_annotations(meta: dict) -> None:
    ann = meta.get("annotations") or {}
    algo = ann.get(LB_ALGORITHM_ANNOTATION)
    if algo is not None and algo.lower() not in LB_ALGORITHMS:
        raise unsupported(f"metadata.annotations[{LB_ALGORITHM_ANNOTATION}]", algo, LB_ALGORITHMS)
    ips = ann.get(LB_IPS_ANNOTATION)
    if ips is not None:
        for ip in ips.split(","):
            ipv4(ip.strip(), f"metadata.annotations[{LB_IPS_ANNOTATION}]")


def validate_service(obj: dict) -> dict:
    check_fields(obj, TOP_LEVEL_FIELDS, "")
    meta = validate_object_meta(obj, namespaced=True, name_validator=dns1035_label)
    _validate_service_annotations(meta)
    spec = get_map(obj, "spec", "", need=True)
    assert spec is not None
    check_fields(spec, SERVICE_SPEC_FIELDS, "spec")
    stype = get_str(spec, "type", "spec") or "ClusterIP"
    if stype not in SERVICE_TYPES:
        if stype == "ExternalName":
            raise FieldError("spec.type", 'unsupported value "ExternalName": cilia has no cluster '
                                          'DNS to answer it (supported: "ClusterIP", "LoadBalancer", "NodePort")')
        raise unsupported("spec.type", stype, SERVICE_TYPES)
    cluster_ip = _validate_cluster_ip(spec, stype)
    ports = _validate_service_ports(spec, stype, cluster_ip == HEADLESS)
    selector = validate_labels(spec.get("selector"), "spec.selector")
    external_ips = [ipv4(ip, join("spec.externalIPs", i))
                    for i, ip in enumerate(string_list(spec, "externalIPs", "spec") or [])]
    if len(set(external_ips)) != len(external_ips):
        dup = next(ip for ip in external_ips if external_ips.count(ip) > 1)
        raise duplicate("spec.externalIPs", dup)
    affinity, affinity_config = _validate_affinity(spec)
    etp = _policy(spec, "externalTrafficPolicy")
    if etp is not None and stype == "ClusterIP" and not external_ips:
        raise FieldError("spec.externalTrafficPolicy",
                         "may only be set for externally-accessible services")
    itp = _policy(spec, "internalTrafficPolicy") or "Cluster"
    lb_ip = get_str(spec, "loadBalancerIP", "spec")
    if lb_ip:
        if stype != "LoadBalancer":
            raise FieldError("spec.loadBalancerIP", "may only be used when `type` is 'LoadBalancer'")
        lb_ip = ipv4(lb_ip, "spec.loadBalancerIP")
    for i, cidr in enumerate(string_list(spec, "loadBalancerSourceRanges", "spec") or []):
        try:
            ipaddress.IPv4Network(cidr.strip(), strict=False)
        except ValueError:
            raise invalid(join("spec.loadBalancerSourceRanges", i), cidr,
                          "must be a valid IPv4 CIDR (e.g. 192.168.0.0/16)") from None
    families = string_list(spec, "ipFamilies", "spec") or []
    if any(f != "IPv4" for f in families):
        raise unsupported("spec.ipFamilies", next(f for f in families if f != "IPv4"), ["IPv4"])
    family_policy = get_str(spec, "ipFamilyPolicy", "spec") or "SingleStack"
    if family_policy not in IP_FAMILY_POLICIES:
        raise unsupported("spec.ipFamilyPolicy", family_policy, IP_FAMILY_POLICIES)
    for key in ("publishNotReadyAddresses", "allocateLoadBalancerNodePorts"):
        get_bool(spec, key, "spec")
    hc = get_int(spec, "healthCheckNodePort", "spec")
    if hc and (stype != "LoadBalancer" or etp != "Local"):
        raise FieldError("spec.healthCheckNodePort", "may only be set when `type` is 'LoadBalancer' "
                                                     "and `externalTrafficPolicy` is 'Local'")
    get_str(spec, "loadBalancerClass", "spec")

    out = copy.deepcopy(spec)
    out.update({"type": stype, "ports": ports, "sessionAffinity": affinity,
                "internalTrafficPolicy": itp, "ipFamilies": ["IPv4"], "ipFamilyPolicy": family_policy})
    if not ports:
        out.pop("ports")
    for key, value in (("selector", selector), ("externalIPs", external_ips),
                       ("sessionAffinityConfig", affinity_config), ("loadBalancerIP", lb_ip)):
        if value:
            out[key] = value
        else:
            out.pop(key, None)
    if cluster_ip:
        out["clusterIP"], out["clusterIPs"] = cluster_ip, [cluster_ip]
    else:
        out.pop("clusterIP", None)
        out.pop("clusterIPs", None)
    if stype != "ClusterIP" or external_ips:
        out["externalTrafficPolicy"] = etp or "Cluster"
    if stype == "LoadBalancer":
        out.setdefault("allocateLoadBalancerNodePorts", True)
    return {"apiVersion": obj["apiVersion"], "kind": "Service", "metadata": meta, "spec": out}


# --- EndpointSlice -------------------------------------------------------------------------

def _validate_endpoint(ep: object, path: str, address_type: str) -> dict:
    if not isinstance(ep, dict):
        raise FieldError(path, f"must be an object, got {describe(ep)}")
    check_fields(ep, ENDPOINT_FIELDS, path)
    addresses = string_list(ep, "addresses", path)
    if not addresses:
        raise FieldError(join(path, "addresses"), "must contain at least 1 address")
    if len(addresses) > MAX_ADDRESSES_PER_ENDPOINT:
        raise FieldError(join(path, "addresses"), f"must have at most {MAX_ADDRESSES_PER_ENDPOINT} items")
    out = copy.deepcopy(ep)
    if address_type == "IPv4":
        out["addresses"] = [ipv4(a, join(join(path, "addresses"), i)) for i, a in enumerate(addresses)]
    conditions = get_map(ep, "conditions", path) or {}
    check_fields(conditions, CONDITION_FIELDS, join(path, "conditions"))
    for key in CONDITION_FIELDS:
        get_bool(conditions, key, join(path, "conditions"))
    out["conditions"] = dict(conditions)
    node = get_str(ep, "nodeName", path)
    if node:
        validate_name(node, join(path, "nodeName"), names.dns1123_subdomain)
    hostname = get_str(ep, "hostname", path)
    if hostname:
        validate_name(hostname, join(path, "hostname"), names.dns1123_label)
    get_str(ep, "zone", path)
    ref = get_map(ep, "targetRef", path)
    if ref is not None:
        check_fields(ref, OBJECT_REFERENCE_FIELDS, join(path, "targetRef"))
        for key in OBJECT_REFERENCE_FIELDS:
            get_str(ref, key, join(path, "targetRef"))
    return out


def _validate_slice_ports(obj: dict) -> list[dict]:
    ports = get_list(obj, "ports", "") or []
    if len(ports) > MAX_PORTS_PER_SLICE:
        raise FieldError("ports", f"must have at most {MAX_PORTS_PER_SLICE} items")
    seen: set[str] = set()
    out = []
    for i, port in enumerate(ports):
        path = join("ports", i)
        if not isinstance(port, dict):
            raise FieldError(path, f"must be an object, got {describe(port)}")
        check_fields(port, ENDPOINT_PORT_FIELDS, path)
        name = get_str(port, "name", path) or ""
        if name:
            validate_name(name, join(path, "name"), names.dns1123_label)
        if name in seen:
            raise duplicate(join(path, "name"), name)
        seen.add(name)
        number = _port(port, "port", path, need=True)
        item = {"name": name, "port": number, "protocol": _protocol(port, path)}
        app = get_str(port, "appProtocol", path)
        if app:
            item["appProtocol"] = app
        out.append(item)
    return out


def validate_endpointslice(obj: dict) -> dict:
    check_fields(obj, ENDPOINT_SLICE_FIELDS, "")
    meta = validate_object_meta(obj, namespaced=True, name_validator=names.dns1123_subdomain)
    address_type = get_str(obj, "addressType", "", need=True)
    if address_type not in ADDRESS_TYPES:
        raise unsupported("addressType", address_type, ADDRESS_TYPES)
    if address_type != "IPv4":
        raise FieldError("addressType", f'unsupported value "{address_type}": cilia services are '
                                        'IPv4 only (supported: "IPv4")')
    endpoints = get_list(obj, "endpoints", "") or []
    if len(endpoints) > MAX_ENDPOINTS_PER_SLICE:
        raise FieldError("endpoints", f"must have at most {MAX_ENDPOINTS_PER_SLICE} items")
    service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if service is not None and dns1035_label(service):
        raise invalid(f"metadata.labels[{SERVICE_NAME_LABEL}]", service, dns1035_label(service)[0])
    return {
        "apiVersion": obj["apiVersion"], "kind": "EndpointSlice", "metadata": meta,
        "addressType": address_type,
        "endpoints": [_validate_endpoint(ep, join("endpoints", i), address_type)
                      for i, ep in enumerate(endpoints)],
        "ports": _validate_slice_ports(obj),
    }

