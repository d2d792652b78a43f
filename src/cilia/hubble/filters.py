"""Hubble's FlowFilter: the `hubble observe` flags turned into allow/deny filter lists, and
the matcher that the agent's /v1/flows, the relay and `cilia observe` share.

Semantics follow Hubble (observer.proto FlowFilter, hubble/cmd/observe/flows_filter.go):
- a FlowFilter is a dict of lists; a flow matches it when, for every non-empty field, it
  matches at least one of that field's values (values OR, fields AND);
- a flow passes when it matches any allow filter (or there is none) and no deny filter;
- the CLI keeps a "left" (source side) and a "right" (destination side) filter: `--pod x`
  puts x into left.source_pod and right.destination_pod, while `--from-pod x` and
  direction-less flags such as `--verdict` go into both, so `--pod x --verdict DROPPED` is
  (src x AND DROPPED) OR (dst x AND DROPPED). Identical left/right collapse into one filter;
- `--not` sends the next filter flag into a separate deny tracker built the same way.
"""
from __future__ import annotations

import copy
import fnmatch
import ipaddress
import re
from functools import lru_cache
from typing import Any, Callable, Iterable

# Cilium's monitor message types (pkg/monitor/api/types.go) and Hubble's --type names.
EVENT_TYPES = {"drop": 1, "debug": 2, "capture": 3, "trace": 4, "policy-verdict": 5,
               "recorder": 6, "trace-sock": 7, "l7": 129, "agent": 130}
# Trace observation points (pkg/monitor/api/types.go TraceObservationPoints).
TRACE_POINTS = {"to-endpoint": 0, "to-proxy": 1, "to-host": 2, "to-stack": 3,
                "to-overlay": 4, "from-endpoint": 5, "from-proxy": 6, "from-host": 7,
                "from-stack": 8, "from-overlay": 9, "from-network": 10, "to-network": 11,
                "from-crypto": 12, "to-crypto": 13}
VERDICTS = ("FORWARDED", "DROPPED", "ERROR", "AUDIT", "REDIRECTED", "TRACED", "TRANSLATED")
DIRECTIONS = ("INGRESS", "EGRESS")
PROTOCOLS = ("tcp", "udp", "icmp", "icmpv4", "icmpv6", "sctp", "http", "dns", "kafka")
TCP_FLAGS = ("SYN", "ACK", "FIN", "RST", "PSH", "URG", "ECE", "CWR", "NS")

# FlowFilter field names (proto names, as Hubble's JSON prints them).
FIELDS = ("uuid", "source_ip", "destination_ip", "source_pod", "destination_pod",
          "source_label", "destination_label", "source_service", "destination_service",
          "source_workload", "destination_workload", "source_identity",
          "destination_identity", "source_port", "destination_port", "verdict",
          "drop_reason_desc", "event_type", "protocol", "traffic_direction", "node_name",
          "tcp_flags", "reply", "ip_version")


class FilterError(ValueError):
    pass


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


_CAMEL = {_camel(f): f for f in FIELDS}


def normalize(ff: dict) -> dict:
    """A FlowFilter from JSON (proto or camelCase names) -> proto names; unknown fields are
    an error, so a typo never silently widens a filter."""
    if not isinstance(ff, dict):
        raise FilterError(f"flow filter must be an object, got {type(ff).__name__}")
    out = {}
    for k, v in ff.items():
        name = k if k in FIELDS else _CAMEL.get(k)
        if name is None:
            raise FilterError(f"flow filter: unknown field {k!r}")
        if v in (None, [], ""):
            continue
        out[name] = v if isinstance(v, list) else [v]
    return out


# --- matching ------------------------------------------------------------------------------

def _ep(flow: dict, side: str) -> dict:
    return flow.get(side) or {}


def _ip(flow: dict, side: str) -> str:
    return ((flow.get("IP") or {}).get(side)) or ""


def _ports(flow: dict) -> tuple[int | None, int | None]:
    l4 = flow.get("l4") or {}
    for proto in ("TCP", "UDP", "SCTP"):
        p = l4.get(proto)
        if p:
            return p.get("source_port"), p.get("destination_port")
    return None, None


@lru_cache(maxsize=1024)
def _pod_selector(value: str) -> tuple[str, str]:
    """Hubble's "[namespace/]pod-prefix"; no namespace means default."""
    if "/" in value:
        ns, pod = value.split("/", 1)
        return ns, pod
    return "default", value


def _match_pod(ep: dict, values: list[str]) -> bool:
    ns, pod = ep.get("namespace") or "", ep.get("pod_name") or ""
    for v in values:
        want_ns, prefix = _pod_selector(v)
        if ns and ns == want_ns and pod.startswith(prefix):
            return True
    return False


def _match_service(svc: dict | None, values: list[str]) -> bool:
    if not svc or not svc.get("name"):
        return False
    for v in values:
        want_ns, prefix = _pod_selector(v)
        if (svc.get("namespace") or "") == want_ns and svc["name"].startswith(prefix):
            return True
    return False


def _match_workload(ep: dict, values: list) -> bool:
    for w in ep.get("workloads") or []:
        for v in values:
            if isinstance(v, dict):
                if (not v.get("name") or v["name"] == w.get("name")) and \
                        (not v.get("kind") or v["kind"] == w.get("kind")):
                    return True
            elif v == w.get("name"):
                return True
    return False


@lru_cache(maxsize=4096)
def _ip_matcher(value: str) -> Callable[[str], bool]:
    if "/" in value:
        net = ipaddress.ip_network(value, strict=False)
        def in_net(ip: str) -> bool:
            try:
                return ipaddress.ip_address(ip) in net
            except ValueError:
                return False
        return in_net
    addr = str(ipaddress.ip_address(value))
    return lambda ip: ip == addr


def _match_ip(ip: str, values: list[str]) -> bool:
    return bool(ip) and any(_ip_matcher(v)(ip) for v in values)


# Label selectors: Kubernetes' string syntax over Cilium's "source:key=value" labels.
_REQ = re.compile(r"""\s*(?:
    (?P<notexists>!\s*(?P<nk>[^\s,=!()]+)) |
    (?P<set>(?P<sk>[^\s,=!()]+)\s+(?P<op>in|notin)\s*\((?P<vals>[^)]*)\)) |
    (?P<cmp>(?P<ck>[^\s,=!()]+)\s*(?P<cop>==|=|!=)\s*(?P<cv>[^\s,=!()]*)) |
    (?P<exists>(?P<ek>[^\s,=!()]+))
)\s*(?:,|$)""", re.X)


@lru_cache(maxsize=1024)
def parse_selector(text: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """"k=v,k2 in (a,b),!k3" -> ((key, op, values), ...); op in = != in notin exists !."""
    reqs = []
    pos, text = 0, text.strip()
    if not text:
        raise FilterError("empty label selector")
    while pos < len(text):
        m = _REQ.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"invalid label selector {text!r} at {text[pos:]!r}")
        pos = m.end()
        if m["notexists"]:
            reqs.append((m["nk"], "!", ()))
        elif m["set"]:
            vals = tuple(v.strip() for v in m["vals"].split(",") if v.strip())
            reqs.append((m["sk"], m["op"], vals))
        elif m["cmp"]:
            reqs.append((m["ck"], "!=" if m["cop"] == "!=" else "=", (m["cv"],)))
        else:
            reqs.append((m["ek"], "exists", ()))
    return tuple(reqs)


def _label_map(labels: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """key -> [(source, value)]; a key given without a source matches any source."""
    out: dict[str, list[tuple[str, str]]] = {}
    for lab in labels or ():
        src, _, kv = lab.partition(":") if ":" in lab.split("=", 1)[0] else ("", "", lab)
        k, _, v = kv.partition("=")
        out.setdefault(k, []).append((src, v))
    return out


def _values_for(lmap: dict, key: str) -> list[str]:
    src, _, k = key.rpartition(":") if ":" in key else ("", "", key)
    if src in ("", "any"):
        return [v for _, v in lmap.get(k, [])]
    return [v for s, v in lmap.get(k, []) if s == src]


@lru_cache(maxsize=4096)
def _label_map_of(labels: tuple[str, ...]) -> dict[str, list[tuple[str, str]]]:
    return _label_map(labels)


def _match_selector(labels: list[str], selector: str) -> bool:
    lmap = _label_map_of(tuple(labels))
    for key, op, vals in parse_selector(selector):
        have = _values_for(lmap, key)
        if op == "exists" and not have:
            return False
        if op == "!" and have:
            return False
        if op == "=" and vals[0] not in have:
            return False
        if op == "!=" and vals[0] in have:
            return False
        if op == "in" and not any(v in vals for v in have):
            return False
        if op == "notin" and any(v in vals for v in have):
            return False
    return True


def _match_protocol(flow: dict, values: list[str]) -> bool:
    l4 = flow.get("l4") or {}
    l7 = flow.get("l7") or {}
    for v in values:
        v = v.lower()
        if v == "tcp" and "TCP" in l4 or v == "udp" and "UDP" in l4 or \
                v == "sctp" and "SCTP" in l4:
            return True
        if v in ("icmp", "icmpv4") and "ICMPv4" in l4 or v in ("icmp", "icmpv6") and "ICMPv6" in l4:
            return True
        if v in ("http", "dns", "kafka") and v in {k.lower() for k in l7}:
            return True
    return False


def _match_event_type(flow: dict, values: list) -> bool:
    et = flow.get("event_type") or {}
    t, st = et.get("type"), et.get("sub_type", 0)
    for v in values:
        if isinstance(v, dict):
            want_t = v.get("type")
            if want_t is not None and want_t != t:
                continue
            if v.get("match_sub_type") or v.get("matchSubType"):
                if v.get("sub_type", v.get("subType", 0)) != st:
                    continue
            return True
        elif v == t:
            return True
    return False


def _tcp_flag_set(flow: dict) -> set[str]:
    tcp = (flow.get("l4") or {}).get("TCP") or {}
    return {k for k, on in (tcp.get("flags") or {}).items() if on}


def _match_tcp_flags(flow: dict, values: list) -> bool:
    have = _tcp_flag_set(flow)
    for v in values:
        want = {k for k, on in v.items() if on} if isinstance(v, dict) else \
            {s.strip().upper() for s in str(v).split(",") if s.strip()}
        if want and want <= have:
            return True
    return False


def _node_patterns(values: list[str]) -> list[str]:
    # Hubble accepts "cluster/node-glob"; one lab is one cluster, so the node part decides.
    return [v.split("/", 1)[1] if "/" in v else v for v in values]


def _upper_set(v: list) -> frozenset:
    return frozenset(str(x).upper() for x in v)


def _int_set(v: list) -> frozenset:
    return frozenset(int(x) for x in v)


# Per field: prepare(values) once per filter, then test(flow, prepared) per flow.
_FIELDS: dict[str, tuple[Callable[[list], Any], Callable[[dict, Any], bool]]] = {
    "uuid": (frozenset, lambda f, p: f.get("uuid") in p),
    "source_ip": (list, lambda f, p: _match_ip(_ip(f, "source"), p)),
    "destination_ip": (list, lambda f, p: _match_ip(_ip(f, "destination"), p)),
    "source_pod": (list, lambda f, p: _match_pod(_ep(f, "source"), p)),
    "destination_pod": (list, lambda f, p: _match_pod(_ep(f, "destination"), p)),
    "source_label": (list, lambda f, p: any(_match_selector(_ep(f, "source").get("labels") or [], s) for s in p)),
    "destination_label": (list, lambda f, p: any(_match_selector(_ep(f, "destination").get("labels") or [], s) for s in p)),
    "source_service": (list, lambda f, p: _match_service(f.get("source_service"), p)),
    "destination_service": (list, lambda f, p: _match_service(f.get("destination_service"), p)),
    "source_workload": (list, lambda f, p: _match_workload(_ep(f, "source"), p)),
    "destination_workload": (list, lambda f, p: _match_workload(_ep(f, "destination"), p)),
    "source_identity": (_int_set, lambda f, p: _ep(f, "source").get("identity") in p),
    "destination_identity": (_int_set, lambda f, p: _ep(f, "destination").get("identity") in p),
    "source_port": (_int_set, lambda f, p: _ports(f)[0] in p),
    "destination_port": (_int_set, lambda f, p: _ports(f)[1] in p),
    "verdict": (_upper_set, lambda f, p: f.get("verdict") in p),
    "drop_reason_desc": (_upper_set, lambda f, p: f.get("drop_reason_desc") in p),
    "event_type": (list, _match_event_type),
    "protocol": (list, _match_protocol),
    "traffic_direction": (_upper_set, lambda f, p: f.get("traffic_direction") in p),
    "node_name": (_node_patterns, lambda f, p: any(fnmatch.fnmatchcase(f.get("node_name") or "", x) for x in p)),
    "tcp_flags": (list, _match_tcp_flags),
    "reply": (lambda v: frozenset(bool(x) for x in v), lambda f, p: bool(f.get("is_reply")) in p),
    "ip_version": (frozenset, lambda f, p: ((f.get("IP") or {}).get("ipVersion")) in p),
}


def compile_one(ff: dict) -> list[tuple[Callable[[dict, Any], bool], Any]]:
    out = []
    for name, values in ff.items():
        if values in (None, [], ""):
            continue
        spec = _FIELDS.get(name) or _FIELDS.get(_CAMEL.get(name, ""))
        if spec is None:
            raise FilterError(f"flow filter: unknown field {name!r}")
        prepare, test = spec
        out.append((test, prepare(values if isinstance(values, list) else [values])))
    return out


def match_one(flow: dict, ff: dict) -> bool:
    return all(test(flow, p) for test, p in compile_one(ff))


# Compiled filter lists by identity: the API and the relay match every flow of a stream
# against the same lists. The entry holds the list itself, so its id cannot be reused while
# cached; a list must not be changed after it has been used for matching.
_COMPILED: dict[int, tuple[list, list]] = {}


def _compiled(lst: list[dict]) -> list:
    got = _COMPILED.get(id(lst))
    if got is not None and got[0] is lst:
        return got[1]
    c = [compile_one(ff) for ff in lst]
    if len(_COMPILED) >= 256:
        _COMPILED.clear()
    _COMPILED[id(lst)] = (lst, c)
    return c


def _any(flow: dict, compiled: list) -> bool:
    for tests in compiled:
        for test, p in tests:
            if not test(flow, p):
                break
        else:
            return True
    return False


def match(flow: dict, allow: list[dict] | None, deny: list[dict] | None) -> bool:
    """Hubble's rule: in some allow filter (or no allow filters) and in no deny filter.
    Accepts the flow itself or the {"flow": ...} record around it."""
    inner = flow.get("flow")
    if isinstance(inner, dict):
        flow = inner
    if allow and not _any(flow, _compiled(allow)):
        return False
    return not (deny and _any(flow, _compiled(deny)))


def validate(allow: list[dict] | None, deny: list[dict] | None) -> tuple[list[dict], list[dict]]:
    """For the API: {"allow": [...], "deny": [...]} in, normalized lists out, or FilterError."""
    return [normalize(f) for f in allow or []], [normalize(f) for f in deny or []]


# --- hubble observe flags -> filters -------------------------------------------------------

class _Tracker:
    """Hubble's filterTracker: a left (source side) and a right (destination side) filter,
    plus the namespaces from -n/--from-namespace/--to-namespace, applied to the pod and
    service values when the filters are materialized (so `-n ns --pod x` means ns/x)."""

    def __init__(self) -> None:
        self.left: dict | None = None
        self.right: dict | None = None
        self.flags: set[str] = set()
        self.ns: list[str] = []
        self.src_ns: list[str] = []
        self.dst_ns: list[str] = []

    def _add(self, side: str, field: str, value: Any) -> None:
        f = getattr(self, side)
        if f is None:
            f = {}
            setattr(self, side, f)
        f.setdefault(field, [])
        if value not in f[field]:
            f[field].append(value)

    def both(self, field: str, value: Any) -> None:
        self._add("left", field, value)
        self._add("right", field, value)

    def split(self, left_field: str, right_field: str, value: Any) -> None:
        self._add("left", left_field, value)
        self._add("right", right_field, value)

    @staticmethod
    def _with_ns(values: list[str], nss: list[str]) -> list[str]:
        out: list[str] = []
        for v in values:
            for x in ([v] if "/" in v else [f"{ns}/{v}" for ns in nss]):
                if x not in out:
                    out.append(x)
        return out

    def _apply_ns(self, f: dict, side: str, nss: list[str]) -> None:
        pod, svc = f"{side}_pod", f"{side}_service"
        if not f.get(pod) and not f.get(svc):
            f[pod] = [""]
        for k in (pod, svc):
            if f.get(k):
                f[k] = self._with_ns(f[k], nss)

    def filters(self) -> list[dict]:
        if self.left is None and self.right is None and not (self.ns or self.src_ns or self.dst_ns):
            return []
        left, right = copy.deepcopy(self.left or {}), copy.deepcopy(self.right or {})
        if self.dst_ns:
            self._apply_ns(left, "destination", self.dst_ns)
            self._apply_ns(right, "destination", self.dst_ns)
        if self.src_ns:
            self._apply_ns(left, "source", self.src_ns)
            self._apply_ns(right, "source", self.src_ns)
        if self.ns:
            self._apply_ns(left, "source", self.ns)
            self._apply_ns(right, "destination", self.ns)
        return [left] if left == right else [left, right]


# flag -> (kind, field(s)); kind: "split" (source on the left, destination on the right),
# "both" (the same field on both sides).
_SPLIT = {
    "pod": ("source_pod", "destination_pod"),
    "label": ("source_label", "destination_label"),
    "ip": ("source_ip", "destination_ip"),
    "port": ("source_port", "destination_port"),
    "identity": ("source_identity", "destination_identity"),
    "service": ("source_service", "destination_service"),
    "workload": ("source_workload", "destination_workload"),
}
_BOTH = {
    "from-pod": "source_pod", "to-pod": "destination_pod",
    "from-label": "source_label", "to-label": "destination_label",
    "from-ip": "source_ip", "to-ip": "destination_ip",
    "from-port": "source_port", "to-port": "destination_port",
    "from-identity": "source_identity", "to-identity": "destination_identity",
    "from-service": "source_service", "to-service": "destination_service",
    "from-workload": "source_workload", "to-workload": "destination_workload",
    "verdict": "verdict", "protocol": "protocol", "type": "event_type",
    "node-name": "node_name", "traffic-direction": "traffic_direction",
    "drop-reason-desc": "drop_reason_desc", "tcp-flags": "tcp_flags", "uuid": "uuid",
    "is-reply": "reply",
}
_NAMESPACE = {"namespace": "ns", "from-namespace": "src_ns", "to-namespace": "dst_ns"}
FLAGS = tuple(_SPLIT) + tuple(_BOTH) + tuple(_NAMESPACE)
# hubble observe's conflict groups (flags in one group cannot be combined in one list).
_CONFLICT_GROUPS = (
    {"from-ip", "ip", "from-namespace", "namespace"},
    {"from-ip", "ip", "from-pod", "pod"},
    {"to-ip", "ip", "to-namespace", "namespace"},
    {"to-ip", "ip", "to-pod", "pod"},
    {"to-pod", "namespace"}, {"from-pod", "namespace"},
    {"to-service", "namespace"}, {"from-service", "namespace"},
    {"label", "from-label"}, {"label", "to-label"},
    {"service", "from-service"}, {"service", "to-service"},
    {"port", "to-port"}, {"port", "from-port"},
    {"identity", "to-identity"}, {"identity", "from-identity"},
    {"workload", "to-workload"}, {"workload", "from-workload"},
)
SHORT = {"-n": "namespace", "-l": "label", "-t": "type"}


def _conflicts(flag: str) -> set[str]:
    return set().union(*(g for g in _CONFLICT_GROUPS if flag in g)) - {flag}


class FilterBuilder:
    """Feed `hubble observe` filter flags in command-line order; `--not` negates the next."""

    def __init__(self) -> None:
        self.allow = _Tracker()
        self.deny = _Tracker()
        self._negate = False
        self._namespace: str | None = None

    def negate_next(self) -> None:
        self._negate = True

    def add(self, flag: str, value: str) -> None:
        flag = SHORT.get(flag, flag).lstrip("-")
        tr = self.deny if self._negate else self.allow
        self._negate = False
        # hubble refuses these pairs: --pod x --from-pod y would put both into the source
        # side filter, where they OR instead of meaning anything a user would intend.
        for other in sorted(_conflicts(flag) & tr.flags):
            raise FilterError(f"filters --{flag} and --{other} cannot be combined")
        tr.flags.add(flag)
        v = self._value(flag, value)
        if flag in _NAMESPACE:
            lst = getattr(tr, _NAMESPACE[flag])
            if v not in lst:
                lst.append(v)
        elif flag in _SPLIT:
            tr.split(*_SPLIT[flag], v)
        elif flag in _BOTH:
            tr.both(_BOTH[flag], v)
        else:
            raise FilterError(f"--{flag}: not a filter flag")

    def _value(self, flag: str, value: str) -> Any:
        value = str(value).strip()
        if flag in ("namespace", "from-namespace", "to-namespace"):
            if not value or "/" in value:
                raise FilterError(f"--{flag} {value!r}: expected a namespace name")
            return value
        if flag in ("pod", "from-pod", "to-pod", "service", "from-service", "to-service"):
            if not value:
                raise FilterError(f"--{flag}: empty value")
            return value
        if flag in ("ip", "from-ip", "to-ip"):
            try:
                _ip_matcher(value)
            except ValueError:
                raise FilterError(f"--{flag} {value!r}: not an IP address or CIDR") from None
            return value
        if flag in ("port", "from-port", "to-port"):
            if not value.isdigit() or not 0 <= int(value) <= 65535:
                raise FilterError(f"--{flag} {value!r}: not a port number")
            return str(int(value))
        if flag in ("identity", "from-identity", "to-identity"):
            if not value.isdigit():
                raise FilterError(f"--{flag} {value!r}: not a numeric identity")
            return int(value)
        if flag in ("label", "from-label", "to-label"):
            parse_selector(value)
            return value
        if flag == "verdict":
            v = value.upper()
            if v not in VERDICTS:
                raise FilterError(f"--verdict {value!r}: one of {', '.join(VERDICTS)}")
            return v
        if flag == "protocol":
            v = value.lower()
            if v not in PROTOCOLS:
                raise FilterError(f"--protocol {value!r}: one of {', '.join(PROTOCOLS)}")
            return v
        if flag == "type":
            return parse_type(value)
        if flag == "traffic-direction":
            v = value.upper()
            if v not in DIRECTIONS:
                raise FilterError(f"--traffic-direction {value!r}: ingress or egress")
            return v
        if flag == "tcp-flags":
            flags = [s.strip().upper() for s in value.split(",") if s.strip()]
            bad = [f for f in flags if f not in TCP_FLAGS]
            if not flags or bad:
                raise FilterError(f"--tcp-flags {value!r}: comma-separated {', '.join(TCP_FLAGS)}")
            return {f: True for f in flags}
        if flag == "drop-reason-desc":
            return value.upper()
        if flag == "is-reply":
            if value.lower() not in ("true", "false"):
                raise FilterError(f"--is-reply {value!r}: true or false")
            return value.lower() == "true"
        return value

    def filters(self) -> tuple[list[dict], list[dict]]:
        return self.allow.filters(), self.deny.filters()


def parse_type(value: str) -> dict:
    """Hubble's --type: "trace", "trace:to-endpoint", "drop", "policy-verdict", "l7", or a
    number; a sub-type narrows the match."""
    name, _, sub = value.partition(":")
    name = name.strip().lower()
    if name.isdigit():
        t = int(name)
    elif name in EVENT_TYPES:
        t = EVENT_TYPES[name]
    else:
        raise FilterError(f"--type {value!r}: one of {', '.join(EVENT_TYPES)} (optionally type:subtype)")
    out: dict = {"type": t}
    if sub:
        sub = sub.strip().lower()
        if sub.isdigit():
            st = int(sub)
        elif t == EVENT_TYPES["trace"] and sub in TRACE_POINTS:
            st = TRACE_POINTS[sub]
        else:
            raise FilterError(f"--type {value!r}: unknown sub-type {sub!r}")
        out.update(sub_type=st, match_sub_type=True)
    return out


def from_args(pairs: Iterable[tuple[str, str | None]]) -> tuple[list[dict], list[dict]]:
    """[(flag, value)] in command-line order ("not" with value None) -> (allow, deny)."""
    b = FilterBuilder()
    for flag, value in pairs:
        if flag.lstrip("-") == "not":
            b.negate_next()
        else:
            b.add(flag, value)
    if b._negate:
        raise FilterError("--not must be followed by a filter flag")
    return b.filters()
