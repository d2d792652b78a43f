"""v1 Pod and pod template validation, with the API server's defaults applied."""

from __future__ import annotations

import copy

from . import names
from .errors import FieldError
from .fields import (check_fields, describe, duplicate, get_bool, get_int, get_list, get_map,
                     get_str, invalid, join, string_list, string_map, unsupported)
from .meta import (OBJECT_META_FIELDS, validate_annotations, validate_labels, validate_name,
                   validate_object_meta)

TOP_LEVEL_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})

POD_SPEC_FIELDS = frozenset({
    "volumes", "initContainers", "containers", "ephemeralContainers", "restartPolicy",
    "terminationGracePeriodSeconds", "activeDeadlineSeconds", "dnsPolicy", "nodeSelector",
    "serviceAccountName", "serviceAccount", "automountServiceAccountToken", "nodeName",
    "hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace", "securityContext",
    "imagePullSecrets", "hostname", "subdomain", "affinity", "schedulerName", "tolerations",
    "hostAliases", "priorityClassName", "priority", "dnsConfig", "readinessGates",
    "runtimeClassName", "enableServiceLinks", "preemptionPolicy", "overhead",
    "topologySpreadConstraints", "setHostnameAsFQDN", "os", "hostUsers", "schedulingGates",
    "resourceClaims", "resources",
})

CONTAINER_FIELDS = frozenset({
    "name", "image", "command", "args", "workingDir", "ports", "envFrom", "env", "resources",
    "resizePolicy", "restartPolicy", "volumeMounts", "volumeDevices", "livenessProbe",
    "readinessProbe", "startupProbe", "lifecycle", "terminationMessagePath",
    "terminationMessagePolicy", "imagePullPolicy", "securityContext", "stdin", "stdinOnce", "tty",
})

CONTAINER_PORT_FIELDS = frozenset({"name", "hostPort", "containerPort", "protocol", "hostIP"})
ENV_VAR_FIELDS = frozenset({"name", "value", "valueFrom"})
POD_TEMPLATE_FIELDS = frozenset({"metadata", "spec"})

PROTOCOLS = ("SCTP", "TCP", "UDP")
RESTART_POLICIES = ("Always", "Never", "OnFailure")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
DNS_POLICIES = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")


def default_pull_policy(image: str) -> str:
    """Always for ':latest' or untagged images, IfNotPresent otherwise (as Kubernetes)."""
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else "latest"
    return "Always" if tag == "latest" else "IfNotPresent"


def _port_number(obj: dict, key: str, path: str, *, need: bool, allow_zero: bool = False) -> int | None:
    value = get_int(obj, key, path, need=need)
    if value is None or (allow_zero and value == 0):
        return value
    if not 1 <= value <= 65535:
        raise FieldError(join(path, key), f"must be between 1 and 65535, got {value}")
    return value


def _validate_ports(container: dict, path: str) -> list[dict]:
    ports = get_list(container, "ports", path) or []
    seen_names: set[str] = set()
    out = []
    for i, port in enumerate(ports):
        ppath = join(join(path, "ports"), i)
        if not isinstance(port, dict):
            raise FieldError(ppath, f"must be an object, got {describe(port)}")
        check_fields(port, CONTAINER_PORT_FIELDS, ppath)
        _port_number(port, "containerPort", ppath, need=True)
        _port_number(port, "hostPort", ppath, need=False, allow_zero=True)
        protocol = get_str(port, "protocol", ppath) or "TCP"
        if protocol not in PROTOCOLS:
            raise unsupported(join(ppath, "protocol"), protocol, PROTOCOLS)
        get_str(port, "hostIP", ppath)
        name = get_str(port, "name", ppath)
        if name:
            errs = names.port_name(name)
            if errs:
                raise invalid(join(ppath, "name"), name, errs[0])
            if name in seen_names:
                raise duplicate(join(ppath, "name"), name)
            seen_names.add(name)
        out.append({**port, "protocol": protocol})
    return out


def _validate_env(container: dict, path: str) -> None:
    for i, var in enumerate(get_list(container, "env", path) or []):
        vpath = join(join(path, "env"), i)
        if not isinstance(var, dict):
            raise FieldError(vpath, f"must be an object, got {describe(var)}")
        check_fields(var, ENV_VAR_FIELDS, vpath)
        get_str(var, "name", vpath, need=True)
        get_str(var, "value", vpath)
        get_map(var, "valueFrom", vpath)


def _validate_container(container: object, path: str, seen: set[str]) -> dict:
    if not isinstance(container, dict):
        raise FieldError(path, f"must be an object, got {describe(container)}")
    check_fields(container, CONTAINER_FIELDS, path)
    name = get_str(container, "name", path, need=True)
    assert name is not None
    validate_name(name, join(path, "name"), names.dns1123_label)
    if name in seen:
        raise duplicate(join(path, "name"), name)
    seen.add(name)
    image = get_str(container, "image", path, need=True)
    assert image is not None
    if image != image.strip():
        raise invalid(join(path, "image"), image, "must not have leading or trailing whitespace")
    string_list(container, "command", path)
    string_list(container, "args", path)
    get_str(container, "workingDir", path)
    _validate_env(container, path)
    pull = get_str(container, "imagePullPolicy", path) or default_pull_policy(image)
    if pull not in PULL_POLICIES:
        raise unsupported(join(path, "imagePullPolicy"), pull, PULL_POLICIES)
    for key in ("stdin", "stdinOnce", "tty"):
        get_bool(container, key, path)
    out = copy.deepcopy(container)
    ports = _validate_ports(container, path)
    if ports:
        out["ports"] = ports
    out.setdefault("resources", {})
    out.setdefault("terminationMessagePath", "/dev/termination-log")
    out.setdefault("terminationMessagePolicy", "File")
    out["imagePullPolicy"] = pull
    return out


def validate_pod_spec(spec: dict, path: str) -> dict:
    check_fields(spec, POD_SPEC_FIELDS, path)
    containers = get_list(spec, "containers", path, need=True)
    if not containers:
        raise FieldError(join(path, "containers"), "must have at least one container")
    seen: set[str] = set()
    out = copy.deepcopy(spec)
    init = get_list(spec, "initContainers", path)
    if init:
        out["initContainers"] = [_validate_container(c, join(join(path, "initContainers"), i), seen)
                                 for i, c in enumerate(init)]
    out["containers"] = [_validate_container(c, join(join(path, "containers"), i), seen)
                         for i, c in enumerate(containers)]
    node = get_str(spec, "nodeName", path)
    if node:
        validate_name(node, join(path, "nodeName"), names.dns1123_subdomain)
    restart = get_str(spec, "restartPolicy", path) or "Always"
    if restart not in RESTART_POLICIES:
        raise unsupported(join(path, "restartPolicy"), restart, RESTART_POLICIES)
    dns = get_str(spec, "dnsPolicy", path) or "ClusterFirst"
    if dns not in DNS_POLICIES:
        raise unsupported(join(path, "dnsPolicy"), dns, DNS_POLICIES)
    grace = get_int(spec, "terminationGracePeriodSeconds", path)
    if grace is not None and grace < 0:
        raise FieldError(join(path, "terminationGracePeriodSeconds"),
                         f"must be greater than or equal to 0, got {grace}")
    for key in ("hostNetwork", "hostPID", "hostIPC", "enableServiceLinks",
                "automountServiceAccountToken", "shareProcessNamespace"):
        get_bool(spec, key, path)
    string_map(spec, "nodeSelector", path)
    for key in ("serviceAccountName", "hostname", "subdomain", "schedulerName"):
        get_str(spec, key, path)
    out["restartPolicy"] = restart
    out["dnsPolicy"] = dns
    out["terminationGracePeriodSeconds"] = 30 if grace is None else grace
    out.setdefault("schedulerName", "default-scheduler")
    out.setdefault("securityContext", {})
    return out


def validate_pod_template(template: dict, path: str) -> dict:
    check_fields(template, POD_TEMPLATE_FIELDS, path)
    meta = get_map(template, "metadata", path) or {}
    mpath = join(path, "metadata")
    check_fields(meta, OBJECT_META_FIELDS, mpath)
    out_meta: dict = {}
    labels = validate_labels(meta.get("labels"), join(mpath, "labels"))
    if labels:
        out_meta["labels"] = labels
    annotations = validate_annotations(meta.get("annotations"), join(mpath, "annotations"))
    if annotations:
        out_meta["annotations"] = annotations
    spec = get_map(template, "spec", path, need=True)
    assert spec is not None
    return {"metadata": out_meta, "spec": validate_pod_spec(spec, join(path, "spec"))}


def validate_pod(obj: dict) -> dict:
    check_fields(obj, TOP_LEVEL_FIELDS, "")
    meta = validate_object_meta(obj, namespaced=True, name_validator=names.dns1123_subdomain)
    spec = get_map(obj, "spec", "", need=True)
    assert spec is not None
    # status in a manifest is ignored on create, as the API server does.
    return {"apiVersion": obj["apiVersion"], "kind": "Pod", "metadata": meta,
            "spec": validate_pod_spec(spec, "spec")}
