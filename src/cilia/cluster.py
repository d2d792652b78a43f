"""Cluster operations behind `cilia apply|delete|get|wait`: what an API server would do.

Everything is validated first and written in one store transaction, so a bad manifest leaves
nothing half-applied."""
from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass

from cilia.k8s.deployments import expand_deployment, pod_template_hash
from cilia.k8s.registry import KINDS, resolve_resource
from cilia.kvstore import MAX_TXN_OPS, SyncStore
from cilia.loadbalancer.ipam import (ALLOC_PREFIX, DEFAULT_LB_POOL, DEFAULT_SERVICE_CIDR, Ranges,
                                     check_requested, parse_claim_key, wants_node_ports)
from cilia.objects import Conflict, decode, encode, key, prefix


class ApplyError(Exception):
    pass


POLICY_KINDS = ("NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")


def plural(kind: str) -> str:
    return KINDS[kind].plural


def display(kind: str) -> str:
    """kubectl's resource prefix in messages: pod, deployment.apps, namespace."""
    api = KINDS[kind].api_versions[0]
    return kind.lower() + (f".{api.split('/')[0]}" if "/" in api else "")


# Only these may change on a running pod, as in Kubernetes.
POD_MUTABLE_META = ("labels", "annotations")


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def kind_of(word: str) -> str:
    spec = resolve_resource(word)
    if spec is None:
        raise ApplyError(f'error: the server doesn\'t have a resource type "{word}"')
    return spec.kind


@dataclass
class Change:
    kind: str
    name: str
    action: str  # created | configured | unchanged | deleted

    def __str__(self) -> str:
        return f"{display(self.kind)}/{self.name} {self.action}"


def _server_fields(obj: dict) -> dict:
    md = obj.setdefault("metadata", {})
    md.setdefault("uid", str(uuid.uuid4()))
    md.setdefault("creationTimestamp", now_rfc3339())
    if obj["kind"] == "Namespace":
        md.setdefault("labels", {})["kubernetes.io/metadata.name"] = md["name"]
        obj.setdefault("status", {"phase": "Active"})
    return obj


class Cluster:
    def __init__(self, store_url: str):
        self.store = SyncStore(store_url)
        # The store revision of the last write (what `policy wait` waits for).
        self.revision = 0

    def close(self) -> None:
        self.store.close()

    # --- reads -----------------------------------------------------------------------------

    def list(self, kind: str, namespace: str | None = None) -> list[dict]:
        plural_ = plural(kind)
        ns = None if kind in ("Namespace", "Node") else namespace
        kvs, _ = self.store.list(prefix(plural_, ns))
        out = []
        for kv in kvs:
            o = decode(kv.value)
            o.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
            out.append(o)
        if kind == "Deployment":
            pods = self.list("Pod", namespace)
            for d in out:
                _deployment_status(d, pods)
        return out

    def get(self, kind: str, namespace: str | None, name: str) -> dict | None:
        kv = self.store.get(key(plural(kind), namespace, name))
        if kv is None:
            return None
        o = decode(kv.value)
        o.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
        if kind == "Deployment":
            _deployment_status(o, self.list("Pod", namespace))
        return o

    def ready_nodes(self) -> list[str]:
        out = []
        for n in self.list("Node"):
            conds = n.get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                out.append(n["metadata"]["name"])
        return sorted(out)

    # --- apply -----------------------------------------------------------------------------

    def plan_apply(self, objs: list[dict], nodes: list[str]) -> tuple[list[tuple[str, bytes]], list[Change]]:
        """Compute every write first; raises ApplyError before anything is written."""
        writes: list[tuple[str, bytes]] = []
        changes: list[Change] = []
        existing_ns = {o["metadata"]["name"] for o in self.list("Namespace")}
        new_ns = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
        all_pods = self.list("Pod")
        load = {n: 0 for n in nodes}
        for p in all_pods:
            n = p.get("spec", {}).get("nodeName")
            if n in load:
                load[n] += 1

        def schedule(pod: dict) -> None:
            spec = pod.setdefault("spec", {})
            if spec.get("nodeName"):
                if nodes and spec["nodeName"] not in nodes:
                    raise ApplyError(f"Pod {pod['metadata'].get('namespace')}/"
                                     f"{pod['metadata']['name']}: spec.nodeName: node "
                                     f"\"{spec['nodeName']}\" not found (nodes: {', '.join(nodes)})")
                load[spec["nodeName"]] = load.get(spec["nodeName"], 0) + 1
                return
            if not nodes:
                raise ApplyError("no Ready node to schedule pods on")
            target = min(nodes, key=lambda n: (load[n], n))
            spec["nodeName"] = target
            load[target] += 1

        services: dict | None = None   # loaded on the first Service, then kept current
        claims: dict = {}

        for obj in objs:
            kind, md = obj["kind"], obj["metadata"]
            name, ns = md["name"], md.get("namespace")
            if KINDS[kind].namespaced and ns not in existing_ns and ns not in new_ns:
                raise ApplyError(f'{kind} {ns}/{name}: metadata.namespace: namespaces "{ns}" not found')
            pl = plural(kind)
            cur = self.get(kind, ns, name)
            if kind == "Pod":
                if cur is None:
                    o = _server_fields(copy.deepcopy(obj))
                    schedule(o)
                    writes.append((key(pl, ns, name), encode(o)))
                    changes.append(Change(kind, name, "created"))
                else:
                    upd = _update_pod_meta(cur, obj)
                    if upd is None:
                        changes.append(Change(kind, name, "unchanged"))
                    else:
                        writes.append((key(pl, ns, name), encode(upd)))
                        changes.append(Change(kind, name, "configured"))
            elif kind == "Namespace":
                if cur is None:
                    o = _server_fields(copy.deepcopy(obj))
                    writes.append((key(pl, None, name), encode(o)))
                    changes.append(Change(kind, name, "created"))
                else:
                    labels = dict(obj["metadata"].get("labels") or {})
                    labels["kubernetes.io/metadata.name"] = name
                    if labels == cur["metadata"].get("labels"):
                        changes.append(Change(kind, name, "unchanged"))
                    else:
                        cur["metadata"]["labels"] = labels
                        cur["metadata"].pop("resourceVersion", None)
                        writes.append((key(pl, None, name), encode(cur)))
                        changes.append(Change(kind, name, "configured"))
            elif kind == "Deployment":
                w, action = self._plan_deployment(obj, cur, all_pods, schedule)
                writes += w
                changes.append(Change(kind, name, action))
            elif kind == "Service":
                if services is None:
                    services = {(o["metadata"].get("namespace") or "default", o["metadata"]["name"]): o
                                for o in self.list("Service")}
                    claims = self._claims()
                o, action = self._plan_service(obj, cur, services, claims)
                if o is not None:
                    writes.append((key(pl, ns, name), encode(o)))
                changes.append(Change(kind, name, action))
            elif kind == "EndpointSlice":
                o, action = _plan_endpointslice(obj, cur)
                if o is not None:
                    writes.append((key(pl, ns, name), encode(o)))
                changes.append(Change(kind, name, action))
            elif kind in POLICY_KINDS:
                o, action = _plan_policy(obj, cur)
                if o is not None:
                    writes.append((key(pl, ns, name), encode(o)))
                changes.append(Change(kind, name, action))
            else:
                raise ApplyError(f"{kind} {name}: kind: apply is not supported for this kind")
        return writes, changes

    def _plan_deployment(self, obj: dict, cur: dict | None, all_pods: list[dict], schedule):
        md = obj["metadata"]
        ns, name = md["namespace"], md["name"]
        dep = _server_fields(copy.deepcopy(obj))
        if cur is not None:
            dep["metadata"]["uid"] = cur["metadata"]["uid"]
            dep["metadata"]["creationTimestamp"] = cur["metadata"]["creationTimestamp"]
        owned = [p for p in all_pods if p["metadata"].get("namespace") == ns and any(
            r.get("kind") == "Deployment" and r.get("name") == name
            for r in p["metadata"].get("ownerReferences", []))
            and not p["metadata"].get("deletionTimestamp")]
        h = pod_template_hash(dep["spec"]["template"])
        keep = [p for p in owned if p["metadata"].get("labels", {}).get("pod-template-hash") == h]
        stale = [p for p in owned if p not in keep]
        replicas = dep["spec"].get("replicas", 1)
        writes: list[tuple[str, bytes]] = []
        ts = now_rfc3339()
        for p in stale + keep[replicas:]:
            p = copy.deepcopy(p)
            p["metadata"].pop("resourceVersion", None)
            p["metadata"]["deletionTimestamp"] = ts
            writes.append((key("pods", ns, p["metadata"]["name"]), encode(p)))
        missing = replicas - min(len(keep), replicas)
        if missing > 0:
            for pod in expand_deployment(dep, replicas=missing):
                pod = _server_fields(pod)
                schedule(pod)
                writes.append((key("pods", ns, pod["metadata"]["name"]), encode(pod)))
        same = cur is not None and _spec_equal(cur, dep)
        dep["metadata"].pop("resourceVersion", None)
        dep.pop("status", None)
        if not same:
            writes.append((key("deployments", ns, name), encode(dep)))
        action = "created" if cur is None else ("unchanged" if same and not writes else "configured")
        return writes, action

    def service_ranges(self) -> Ranges:
        """The running operator's ranges (it publishes them with its heartbeat), else defaults."""
        kv = self.store.get("/cilia/operator/v1/status")
        st = decode(kv.value) if kv is not None else {}
        try:
            return Ranges(st.get("serviceCIDR") or DEFAULT_SERVICE_CIDR, st.get("lbPool") or DEFAULT_LB_POOL)
        except ValueError:
            return Ranges()

    def _claims(self) -> dict:
        kvs, _ = self.store.list(ALLOC_PREFIX)
        out: dict = {}
        for kv in kvs:
            parsed = parse_claim_key(kv.key)
            if parsed is not None:
                out.setdefault(parsed[0], {})[parsed[1]] = decode(kv.value)
        return out

    def _plan_service(self, obj: dict, cur: dict | None, services: dict, claims: dict):
        """Server side of a Service apply: allocated fields survive a re-apply that omits
        them (as kubectl apply's merge keeps them), clusterIP is immutable, and a requested
        ClusterIP or NodePort that is taken or out of range is refused before any write.
        Allocation of unset ones is the operator's job."""
        md = obj["metadata"]
        ns, name = md["namespace"], md["name"]
        new = _server_fields(copy.deepcopy(obj))
        spec = new["spec"]
        if cur is not None:
            cspec = cur.get("spec") or {}
            new["metadata"]["uid"] = cur["metadata"]["uid"]
            new["metadata"]["creationTimestamp"] = cur["metadata"]["creationTimestamp"]
            ccip = cspec.get("clusterIP")
            if spec.get("clusterIP") and ccip and spec["clusterIP"] != ccip:
                raise ApplyError(f'Service {ns}/{name}: spec.clusterIP: Invalid value: '
                                 f'"{spec["clusterIP"]}": field is immutable')
            if not spec.get("clusterIP") and ccip:
                spec["clusterIP"], spec["clusterIPs"] = ccip, [ccip]
            if wants_node_ports(new):
                for p in spec.get("ports") or []:
                    if p.get("nodePort"):
                        continue
                    for cp in cspec.get("ports") or []:
                        same = (cp.get("port"), cp.get("protocol")) == (p["port"], p["protocol"]) or \
                            (p.get("name") and cp.get("name") == p.get("name"))
                        if same and cp.get("nodePort"):
                            p["nodePort"] = cp["nodePort"]
                            break
            new["status"] = copy.deepcopy(cur.get("status") or {"loadBalancer": {}})
        else:
            new["status"] = {"loadBalancer": {}}
        problem = check_requested(new, cur, services, claims, self.service_ranges())
        if problem:
            raise ApplyError(f"Service {ns}/{name}: {problem}")
        services[(ns, name)] = new
        if cur is not None and _spec_equal(cur, new) and \
                (cur["metadata"].get("annotations") or {}) == (new["metadata"].get("annotations") or {}):
            return None, "unchanged"
        new["metadata"].pop("resourceVersion", None)
        return new, "created" if cur is None else "configured"

    def apply(self, objs: list[dict]) -> list[Change]:
        writes, changes = self.plan_apply(objs, self.ready_nodes() or self._all_nodes())
        # Everything was validated above; chunking only matters if the store itself fails
        # mid-way (etcd caps a transaction at 128 operations).
        for i in range(0, len(writes), MAX_TXN_OPS):
            self.revision = self.store.txn_put_many(writes[i:i + MAX_TXN_OPS])
        return changes

    def _all_nodes(self) -> list[str]:
        return sorted(n["metadata"]["name"] for n in self.list("Node"))

    # --- delete ----------------------------------------------------------------------------

    def mark_pod_deleted(self, ns: str, name: str) -> bool:
        k = key("pods", ns, name)
        for _ in range(20):
            kv = self.store.get(k)
            if kv is None:
                return False
            o = decode(kv.value)
            if o["metadata"].get("deletionTimestamp"):
                return True
            o["metadata"]["deletionTimestamp"] = now_rfc3339()
            if not o.get("spec", {}).get("nodeName"):
                return self.store.cas_delete(k, kv.mod_revision)
            if self.store.cas(k, encode(o), kv.mod_revision):
                return True
        raise Conflict(k)

    def delete(self, kind: str, ns: str | None, name: str) -> list[tuple[str, str]]:
        """Returns the pods (ns, name) whose removal is pending."""
        pending: list[tuple[str, str]] = []
        if kind == "Pod":
            if not self.mark_pod_deleted(ns, name):
                raise ApplyError(f'Error from server (NotFound): pods "{name}" not found')
            pending.append((ns, name))
        elif kind == "Deployment":
            if not self.store.delete(key("deployments", ns, name)):
                raise ApplyError(f'Error from server (NotFound): deployments.apps "{name}" not found')
            for p in self.list("Pod", ns):
                if any(r.get("kind") == "Deployment" and r.get("name") == name
                       for r in p["metadata"].get("ownerReferences", [])):
                    if self.mark_pod_deleted(ns, p["metadata"]["name"]):
                        pending.append((ns, p["metadata"]["name"]))
        elif kind in ("Service", "EndpointSlice"):
            # The operator releases a service's addresses and removes its managed slices.
            if not self.store.delete(key(plural(kind), ns, name)):
                raise ApplyError(f'Error from server (NotFound): {plural(kind)}'
                                 f'{"" if kind == "Service" else ".discovery.k8s.io"} "{name}" not found')
        elif kind == "Namespace":
            if name in ("default", "kube-system"):
                raise ApplyError(f'namespace "{name}": forbidden: this namespace may not be deleted')
            if self.get("Namespace", None, name) is None:
                raise ApplyError(f'Error from server (NotFound): namespaces "{name}" not found')
            for d in self.list("Deployment", name):
                self.store.delete(key("deployments", name, d["metadata"]["name"]))
            for kind_ in ("Service", "EndpointSlice"):
                for o in self.list(kind_, name):
                    self.store.delete(key(plural(kind_), name, o["metadata"]["name"]))
            for p in self.list("Pod", name):
                if self.mark_pod_deleted(name, p["metadata"]["name"]):
                    pending.append((name, p["metadata"]["name"]))
            self.store.delete(key("namespaces", None, name))
        elif kind in POLICY_KINDS:
            k = key(plural(kind), ns, name)
            kv = self.store.get(k)
            if kv is None or not self.store.cas_delete(k, kv.mod_revision):
                group = KINDS[kind].api_versions[0].split("/")[0]
                raise ApplyError(f'Error from server (NotFound): {plural(kind)}.{group} "{name}" not found')
            self.revision = self.store.revision()
        else:
            raise ApplyError(f"{kind} {name}: delete is not supported for this kind")
        return pending

    def wait_gone(self, pods: list[tuple[str, str]], timeout: float) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        left = list(pods)
        while left and time.monotonic() < deadline:
            left = [(ns, n) for ns, n in left if self.store.get(key("pods", ns, n)) is not None]
            if left:
                time.sleep(0.1)
        return left


def pod_ready(p: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in p.get("status", {}).get("conditions", []))


def _deployment_status(d: dict, pods: list[dict]) -> None:
    name, ns = d["metadata"]["name"], d["metadata"].get("namespace")
    mine = [p for p in pods if p["metadata"].get("namespace") == ns and any(
        r.get("kind") == "Deployment" and r.get("name") == name
        for r in p["metadata"].get("ownerReferences", []))
        and not p["metadata"].get("deletionTimestamp")]
    ready = sum(1 for p in mine if pod_ready(p))
    d["status"] = {"replicas": len(mine), "readyReplicas": ready, "availableReplicas": ready,
                   "updatedReplicas": len(mine)}


def _plan_plain(obj: dict, cur: dict | None, fields: tuple[str, ...]) -> tuple[dict | None, str]:
    """Kinds stored as given: unchanged when `fields`, labels and annotations are."""
    new = _server_fields(copy.deepcopy(obj))
    if cur is None:
        return new, "created"
    new["metadata"]["uid"] = cur["metadata"]["uid"]
    new["metadata"]["creationTimestamp"] = cur["metadata"]["creationTimestamp"]
    if all(cur.get(f) == new.get(f) for f in fields) and all(
            (cur["metadata"].get(m) or {}) == (new["metadata"].get(m) or {}) for m in ("labels", "annotations")):
        return None, "unchanged"
    return new, "configured"


def _plan_endpointslice(obj: dict, cur: dict | None) -> tuple[dict | None, str]:
    return _plan_plain(obj, cur, ("addressType", "endpoints", "ports"))


def _plan_policy(obj: dict, cur: dict | None) -> tuple[dict | None, str]:
    return _plan_plain(obj, cur, ("spec", "specs"))


def _spec_equal(cur: dict, new: dict) -> bool:
    return cur.get("spec") == new.get("spec") and \
        (cur["metadata"].get("labels") or {}) == (new["metadata"].get("labels") or {})


def _update_pod_meta(cur: dict, new: dict) -> dict | None:
    cs, ns_ = dict(cur.get("spec") or {}), dict(new.get("spec") or {})
    # nodeName is filled by the scheduler; an unpinned manifest does not change it.
    if not ns_.get("nodeName"):
        ns_["nodeName"] = cs.get("nodeName")
    if _normalize_spec(cs) != _normalize_spec(ns_):
        name = new["metadata"]["name"]
        raise ApplyError(f"Pod {new['metadata'].get('namespace')}/{name}: spec: Forbidden: pod "
                         "updates may not change fields other than labels and annotations "
                         "(delete and re-create the pod)")
    changed = False
    out = copy.deepcopy(cur)
    out["metadata"].pop("resourceVersion", None)
    for f in POD_MUTABLE_META:
        want = new["metadata"].get(f) or {}
        if (cur["metadata"].get(f) or {}) != want:
            out["metadata"][f] = want
            changed = True
    return out if changed else None


def _normalize_spec(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if v not in (None, {}, [])}
