"""kubectl-shaped output for `get`: tables, List wrappers, JSON and YAML dumps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import yaml

from .registry import KINDS, resolve_resource
from .selectors import format_label_selector
from .timefmt import age, as_utc

# kubectl's printers.GetNewTabWriter: minwidth 6, padding 3, spaces.
TAB_MIN_WIDTH = 6
TAB_PADDING = 3
NONE = "<none>"

Row = Callable[[dict, datetime], list[str]]


@dataclass(frozen=True)
class TableSpec:
    columns: tuple[str, ...]
    row: Row
    wide_columns: tuple[str, ...] = ()
    wide_row: Row | None = None


TABLES: dict[str, TableSpec] = {}


def register_table(kind: str, spec: TableSpec) -> None:
    TABLES[kind] = spec


def render_columns(rows: list[list[str]]) -> str:
    """Go text/tabwriter as kubectl configures it; the last cell is never padded."""
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    widths = [TAB_MIN_WIDTH] * ncols
    for r in rows:
        for i, cell in enumerate(r[:-1]):
            widths[i] = max(widths[i], len(cell) + TAB_PADDING)
    lines = []
    for r in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(r[:-1])] + r[-1:]
        lines.append("".join(cells))
    return "\n".join(lines) + "\n"


def _meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


def _status(obj: dict) -> dict:
    return obj.get("status") or {}


def _spec(obj: dict) -> dict:
    return obj.get("spec") or {}


def _age(obj: dict, now: datetime) -> str:
    return age(_meta(obj).get("creationTimestamp"), now)


# --- pods -------------------------------------------------------------------------

def _state(cs: dict) -> dict:
    return cs.get("state") or {}


def _exit_reason(term: dict, prefix: str = "") -> str:
    if term.get("reason"):
        return prefix + term["reason"]
    if term.get("signal"):
        return f"{prefix}Signal:{term['signal']}"
    return f"{prefix}ExitCode:{term.get('exitCode', 0)}"


def pod_status_text(pod: dict) -> str:
    """The STATUS column, following kubectl's printPod."""
    status, spec = _status(pod), _spec(pod)
    reason = status.get("reason") or status.get("phase") or "Pending"
    initializing = False
    init_specs = spec.get("initContainers") or []
    for i, cs in enumerate(status.get("initContainerStatuses") or []):
        term, waiting = _state(cs).get("terminated"), _state(cs).get("waiting")
        if term is not None and term.get("exitCode", 0) == 0:
            continue
        if term is not None:
            reason = _exit_reason(term, "Init:")
        elif waiting and waiting.get("reason") and waiting["reason"] != "PodInitializing":
            reason = "Init:" + waiting["reason"]
        else:
            reason = f"Init:{i}/{len(init_specs)}"
        initializing = True
        break
    if not initializing:
        has_running = False
        for cs in reversed(status.get("containerStatuses") or []):
            state = _state(cs)
            waiting, term = state.get("waiting"), state.get("terminated")
            if waiting and waiting.get("reason"):
                reason = waiting["reason"]
            elif term and term.get("reason"):
                reason = term["reason"]
            elif term is not None:
                reason = _exit_reason(term)
            elif state.get("running") is not None and cs.get("ready"):
                has_running = True
        if reason == "Completed" and has_running:
            reason = "Running" if _pod_ready(pod) else "NotReady"
    if _meta(pod).get("deletionTimestamp"):
        reason = "Unknown" if status.get("reason") == "NodeLost" else "Terminating"
    return reason


def _pod_ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in _status(pod).get("conditions") or [])


def _pod_restarts(pod: dict, now: datetime) -> str:
    restarts, last = 0, None
    for cs in _status(pod).get("containerStatuses") or []:
        restarts += int(cs.get("restartCount") or 0)
        finished = ((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt")
        if finished and (last is None or finished > last):
            last = finished
    if restarts and last:
        return f"{restarts} ({age(last, now)} ago)"
    return str(restarts)


def _pod_row(pod: dict, now: datetime) -> list[str]:
    statuses = _status(pod).get("containerStatuses") or []
    total = len(_spec(pod).get("containers") or []) or len(statuses)
    ready = sum(1 for cs in statuses if cs.get("ready"))
    return [_meta(pod).get("name", ""), f"{ready}/{total}", pod_status_text(pod),
            _pod_restarts(pod, now), _age(pod, now)]


def _pod_wide(pod: dict, now: datetime) -> list[str]:
    gates = _spec(pod).get("readinessGates") or []
    if gates:
        conds = {c.get("type"): c.get("status") for c in _status(pod).get("conditions") or []}
        true = sum(1 for g in gates if conds.get(g.get("conditionType")) == "True")
        gates_text = f"{true}/{len(gates)}"
    else:
        gates_text = NONE
    return [_status(pod).get("podIP") or NONE, _spec(pod).get("nodeName") or NONE,
            _status(pod).get("nominatedNodeName") or NONE, gates_text]


# --- nodes ------------------------------------------------------------------------

def _node_status(node: dict) -> str:
    parts = []
    for cond in _status(node).get("conditions") or []:
        if cond.get("type") == "Ready":
            parts = ["Ready" if cond.get("status") == "True" else "NotReady"]
    if not parts:
        parts = ["Unknown"]
    if _spec(node).get("unschedulable"):
        parts.append("SchedulingDisabled")
    return ",".join(parts)


def _node_roles(node: dict) -> str:
    roles = set()
    for key, value in (_meta(node).get("labels") or {}).items():
        if key.startswith("node-role.kubernetes.io/"):
            role = key.split("/", 1)[1]
            if role:
                roles.add(role)
        elif key == "kubernetes.io/role" and value:
            roles.add(value)
    return ",".join(sorted(roles)) or NONE


def _node_row(node: dict, now: datetime) -> list[str]:
    info = _status(node).get("nodeInfo") or {}
    return [_meta(node).get("name", ""), _node_status(node), _node_roles(node), _age(node, now),
            info.get("kubeletVersion", "")]


def _node_address(node: dict, kind: str) -> str:
    for addr in _status(node).get("addresses") or []:
        if addr.get("type") == kind:
            return addr.get("address") or NONE
    return NONE


def _node_wide(node: dict, now: datetime) -> list[str]:
    info = _status(node).get("nodeInfo") or {}
    return [_node_address(node, "InternalIP"), _node_address(node, "ExternalIP"),
            info.get("osImage") or "<unknown>", info.get("kernelVersion") or "<unknown>",
            info.get("containerRuntimeVersion") or "<unknown>"]


# --- namespaces, deployments, anything else ----------------------------------------

def _namespace_row(ns: dict, now: datetime) -> list[str]:
    return [_meta(ns).get("name", ""), _status(ns).get("phase", ""), _age(ns, now)]


def _deployment_row(dep: dict, now: datetime) -> list[str]:
    status = _status(dep)
    replicas = _spec(dep).get("replicas", 1)
    return [_meta(dep).get("name", ""), f"{status.get('readyReplicas', 0)}/{replicas}",
            str(status.get("updatedReplicas", 0)), str(status.get("availableReplicas", 0)),
            _age(dep, now)]


def _deployment_wide(dep: dict, now: datetime) -> list[str]:
    containers = ((_spec(dep).get("template") or {}).get("spec") or {}).get("containers") or []
    return [",".join(c.get("name", "") for c in containers),
            ",".join(c.get("image", "") for c in containers),
            format_label_selector(_spec(dep).get("selector"))]


def _generic_row(obj: dict, now: datetime) -> list[str]:
    return [_meta(obj).get("name", ""), _age(obj, now)]


register_table("Pod", TableSpec(("NAME", "READY", "STATUS", "RESTARTS", "AGE"), _pod_row,
                                ("IP", "NODE", "NOMINATED NODE", "READINESS GATES"), _pod_wide))
register_table("Node", TableSpec(("NAME", "STATUS", "ROLES", "AGE", "VERSION"), _node_row,
                                 ("INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION",
                                  "CONTAINER-RUNTIME"), _node_wide))
register_table("Namespace", TableSpec(("NAME", "STATUS", "AGE"), _namespace_row))
register_table("Deployment", TableSpec(("NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"),
                                       _deployment_row, ("CONTAINERS", "IMAGES", "SELECTOR"),
                                       _deployment_wide))
GENERIC_TABLE = TableSpec(("NAME", "AGE"), _generic_row)


# --- services and endpoint slices (kubectl's printService / printEndpointSlice) ----------

def service_external_ip(svc: dict) -> str:
    spec = _spec(svc)
    external = list(spec.get("externalIPs") or [])
    if spec.get("type") == "LoadBalancer":
        ingress = [i.get("ip") or i.get("hostname") or ""
                   for i in ((_status(svc).get("loadBalancer") or {}).get("ingress") or [])]
        found = [x for x in ingress if x] + external
        return ",".join(found) if found else "<pending>"
    return ",".join(external) if external else NONE


def service_ports(svc: dict) -> str:
    out = []
    for p in _spec(svc).get("ports") or []:
        proto = p.get("protocol", "TCP")
        if p.get("nodePort"):
            out.append(f"{p['port']}:{p['nodePort']}/{proto}")
        else:
            out.append(f"{p.get('port')}/{proto}")
    return ",".join(out) if out else NONE


def _service_row(svc: dict, now: datetime) -> list[str]:
    spec = _spec(svc)
    return [_meta(svc).get("name", ""), spec.get("type", "ClusterIP"), spec.get("clusterIP") or NONE,
            service_external_ip(svc), service_ports(svc), _age(svc, now)]


def _service_wide(svc: dict, now: datetime) -> list[str]:
    selector = _spec(svc).get("selector") or {}
    return [",".join(f"{k}={v}" for k, v in sorted(selector.items())) or NONE]


def _slice_ports(sl: dict) -> str:
    ports = sl.get("ports") or []
    if not ports:
        return "<unset>"
    return ",".join(str(p["port"]) if p.get("port") is not None else "<unset>" for p in ports)


def _slice_endpoints(sl: dict, limit: int = 3) -> str:
    addresses = [a for ep in sl.get("endpoints") or [] for a in ep.get("addresses") or []]
    if not addresses:
        return "<unset>"
    text = ",".join(addresses[:limit])
    return f"{text} + {len(addresses) - limit} more..." if len(addresses) > limit else text


def _slice_row(sl: dict, now: datetime) -> list[str]:
    return [_meta(sl).get("name", ""), sl.get("addressType", ""), _slice_ports(sl),
            _slice_endpoints(sl), _age(sl, now)]


register_table("Service", TableSpec(("NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"),
                                    _service_row, ("SELECTOR",), _service_wide))
register_table("EndpointSlice", TableSpec(("NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"),
                                          _slice_row))

def _register_policy_tables() -> None:
    from .policies import POLICY_TABLES
    for kind, fields in POLICY_TABLES.items():
        register_table(kind, TableSpec(*fields))


_register_policy_tables()


def _canonical_kind(kind: str) -> str:
    if kind in TABLES or kind in KINDS:
        return kind
    spec = resolve_resource(kind)
    return spec.kind if spec else kind


def _namespaced(kind: str, objs: list[dict]) -> bool:
    spec = KINDS.get(kind)
    if spec is not None:
        return spec.namespaced
    return any(_meta(o).get("namespace") for o in objs)


def print_table(kind: str, objs: list[dict], wide: bool = False, all_namespaces: bool = False,
                now: datetime | None = None, name_prefix: str = "") -> str:
    """`kubectl get <kind>` output; '' when there is nothing (see no_resources_message).
    name_prefix ("pod/"): kubectl's naming when one listing shows several kinds."""
    if not objs:
        return ""
    kind = _canonical_kind(kind)
    now = as_utc(now)
    table = TABLES.get(kind, GENERIC_TABLE)
    with_ns = all_namespaces and _namespaced(kind, objs)
    header = list(table.columns)
    if wide and table.wide_row is not None:
        header += table.wide_columns
    if with_ns:
        header = ["NAMESPACE"] + header
    rows = [header]
    # The API server lists in key order: namespace, then name.
    for obj in sorted(objs, key=lambda o: (_meta(o).get("namespace", ""), _meta(o).get("name", ""))):
        row = table.row(obj, now)
        row[0] = name_prefix + row[0]
        if wide and table.wide_row is not None:
            row += table.wide_row(obj, now)
        if with_ns:
            row = [_meta(obj).get("namespace", "")] + row
        rows.append(row)
    return render_columns(rows)


def no_resources_message(namespace: str | None = "default", all_namespaces: bool = False,
                         namespaced: bool = True) -> str:
    """What kubectl writes to stderr for an empty listing."""
    if all_namespaces or not namespaced or not namespace:
        return "No resources found"
    return f"No resources found in {namespace} namespace."


def to_list(objs: list[dict]) -> dict:
    return {"apiVersion": "v1", "items": list(objs), "kind": "List", "metadata": {"resourceVersion": ""}}


class _KubectlYamlDumper(yaml.SafeDumper):
    """Block style like kubectl (go-yaml): double quotes where quoting is needed, no wrapping."""

    def choose_scalar_style(self):  # type: ignore[override]
        style = super().choose_scalar_style()
        return '"' if style == "'" else style


def dump(obj: dict, fmt: str) -> str:
    """`-o json` (4-space indent, sorted keys, as kubectl) or `-o yaml`."""
    if fmt == "json":
        return json.dumps(obj, indent=4, sort_keys=True, ensure_ascii=False) + "\n"
    if fmt == "yaml":
        return yaml.dump(obj, Dumper=_KubectlYamlDumper, default_flow_style=False, sort_keys=True,
                         allow_unicode=True, width=2**31 - 1)
    raise ValueError(f'unable to match a printer suitable for the output format "{fmt}", '
                     'allowed formats are: json,yaml,wide')
