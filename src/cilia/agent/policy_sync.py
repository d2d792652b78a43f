"""The agent's network policy: the store's policies, identities, pods and namespaces feed
the PolicyEngine; its per-endpoint output is written to the BPF policy map.

Root task `run()` watches (each a WatchCache):
  policies   NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy
  identities every cluster identity (peers are selected by their labels)
  pods       named container ports cluster-wide (egress `port: name`), and label changes of
             this node's pods (the endpoint moves to a new identity)
  namespaces label changes (namespace selectors are identity labels too)
  config     /cilia/config/v1/agent: enable-policy and policy-audit-mode, live (as Cilium's
             cilium-config ConfigMap)
and after each burst of changes regenerates what the changes can affect.

`policy wait REV` asks `realized(REV)`: true once every watched prefix equals the store at a
revision >= REV and nothing is left to regenerate or relabel, i.e. every endpoint here
enforces everything written up to REV.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time

from cilia.datapath.policy import PolicyEntry
from cilia.identity.allocator import ID_PREFIX, parse_id_kv
from cilia.identity.labels import pod_security_labels
from cilia.identity.reserved import WORLD
from cilia.kvstore.watchcache import WatchCache
from cilia.objects import parse_key, prefix
from cilia.policy.compute import Endpoint as PolicyEndpoint
from cilia.policy.compute import PolicyEngine
from cilia.policy.mapstate import DENY
from cilia.policy.models import ENFORCEMENT_MODES

log = logging.getLogger("cilia.policy")

POLICY_PLURALS = {"networkpolicies": "NetworkPolicy",
                  "ciliumnetworkpolicies": "CiliumNetworkPolicy",
                  "ciliumclusterwidenetworkpolicies": "CiliumClusterwideNetworkPolicy"}
PODS = prefix("pods")
NAMESPACES = prefix("namespaces")
CONFIG_KEY = "/cilia/config/v1/agent"
CONFIG_PREFIX = "/cilia/config/v1/"


def parse_config(value: bytes | None) -> dict:
    """The cluster-wide agent settings -> {"enable-policy": mode, "policy-audit-mode": bool}."""
    d = json.loads(value) if value else {}
    mode = str(d.get("enable-policy", "default"))
    if mode not in ENFORCEMENT_MODES:
        mode = "default"
    audit = str(d.get("policy-audit-mode", "false")).lower() in ("true", "1", "yes", "enabled")
    return {"enable-policy": mode, "policy-audit-mode": audit}


def named_ports(pod: dict) -> dict[str, tuple[str, int]]:
    out = {}
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") and p.get("containerPort"):
                out[p["name"]] = (p.get("protocol") or "TCP", int(p["containerPort"]))
    return out


def enforcement_label(enforced: bool, audit: bool) -> str:
    """Cilium's endpoint list wording."""
    if not enforced:
        return "Disabled"
    return "Enabled (Audit)" if audit else "Enabled"


class PolicySync:
    def __init__(self, agent, enforcement: str = "default", audit: bool = False):
        self.agent = agent
        self.default_mode = (enforcement, audit)
        self.engine = PolicyEngine(enforcement=enforcement, audit=audit)
        self.pods: dict[tuple[str, str], dict] = {}
        self.namespaces: dict[str, dict] = {}
        self.identities: dict[int, tuple[str, ...]] = {}
        self.endpoint_audit: dict[int, bool] = {}   # `endpoint config ID PolicyAuditMode=`
        self.config = {"enable-policy": enforcement, "policy-audit-mode": audit}
        self.watches = [WatchCache(agent.store, prefix(p), self._on_policy, self._kick)
                        for p in POLICY_PLURALS]
        self.watches += [WatchCache(agent.store, ID_PREFIX, self._on_identity, self._kick),
                         WatchCache(agent.store, PODS, self._on_pod, self._kick),
                         WatchCache(agent.store, NAMESPACES, self._on_namespace, self._kick),
                         WatchCache(agent.store, CONFIG_PREFIX, self._on_config, self._kick)]
        self._dirty = asyncio.Event()
        self._relabel: set[int] = set()      # endpoints whose labels may have changed
        self._busy = 0                       # regenerations/relabels in flight
        self._cidrs: dict[str, int] = {}     # CIDR identities as last given to the ipcache
        self.realized_revision = 0
        self._synced: set[int] = set()       # endpoints whose map was compared with the kernel
        self.regenerations = 0
        self.last_regeneration_ms = 0.0
        self.errors: dict[str, str] = {}     # policy key -> why the engine refused it
        self.objects: dict[str, dict] = {}   # policy key -> the stored object

    # --- store events (called on the loop thread; the engine is only touched here) ---------

    def _kick(self) -> None:
        self._dirty.set()

    def _on_policy(self, key: str, value: bytes | None, _rev: int) -> None:
        plural, ns, name = parse_key(key)
        kind = POLICY_PLURALS[plural]
        try:
            if value is None:
                self.objects.pop(key, None)
                self.engine.delete_policy(kind, ns or "", name)
            else:
                self.objects[key] = json.loads(value)
                self.engine.upsert_policy(self.objects[key])
            self.errors.pop(key, None)
        except Exception as e:  # a stored object is validated; never let one kill the agent
            log.error("policy %s not enforced: %s", key, e)
            self.errors[key] = str(e)
        self._dirty.set()

    def _on_identity(self, key: str, value: bytes | None, _rev: int) -> None:
        n = int(key[len(ID_PREFIX):]) if key[len(ID_PREFIX):].isdigit() else None
        if n is None:
            return
        ident = parse_id_kv(key, value) if value is not None else None
        if ident is None:
            if self.identities.pop(n, None) is not None:
                self.engine.remove_identity(n)
        else:
            self.identities[n] = ident.labels
            self.engine.add_identity(ident)
        self._dirty.set()

    def _on_pod(self, key: str, value: bytes | None, _rev: int) -> None:
        _, ns, name = parse_key(key)
        owner = f"pod/{ns}/{name}"
        if value is None:
            self.pods.pop((ns, name), None)
            self.engine.remove_named_ports(owner)
        else:
            pod = json.loads(value)
            self.pods[(ns, name)] = pod
            self.engine.set_named_ports(owner, named_ports(pod))
            ep = self._local_endpoint(ns, name)
            if ep is not None:
                self._relabel.add(ep.id)
        self._dirty.set()

    def _on_namespace(self, key: str, value: bytes | None, _rev: int) -> None:
        name = parse_key(key)[2]
        if value is None:
            self.namespaces.pop(name, None)
        else:
            self.namespaces[name] = json.loads(value)
        for ep in self._local_endpoints():
            if ep.pod_namespace == name:
                self._relabel.add(ep.id)
        self._dirty.set()

    def _on_config(self, key: str, value: bytes | None, _rev: int) -> None:
        if key != CONFIG_KEY:
            return
        cfg = parse_config(value) if value is not None else {
            "enable-policy": self.default_mode[0], "policy-audit-mode": self.default_mode[1]}
        if cfg != self.config:
            self.config = cfg
            self.engine.enforcement = cfg["enable-policy"]
            self.engine.audit = cfg["policy-audit-mode"]
            for ep in self._local_endpoints():
                self._upsert(ep)
        self._dirty.set()

    # --- endpoints ---------------------------------------------------------------------------

    def _local_endpoints(self) -> list:
        eps = self.agent.endpoints
        return list(eps.endpoints.values()) if eps is not None else []

    def _local_endpoint(self, ns: str, name: str):
        for ep in self._local_endpoints():
            if ep.pod_namespace == ns and ep.pod_name == name:
                return ep
        return None

    def _upsert(self, ep) -> None:
        pod = self.pods.get((ep.pod_namespace, ep.pod_name)) or {}
        self.engine.upsert_endpoint(PolicyEndpoint(
            ep.id, ep.identity, tuple(ep.identity_labels), named_ports(pod),
            audit=self.endpoint_audit.get(ep.id)))

    def endpoint_added(self, ep) -> None:
        self._upsert(ep)

    def endpoint_changed(self, ep) -> None:
        self._upsert(ep)
        self._dirty.set()

    async def endpoint_removed(self, ep_id: int) -> None:
        self.engine.remove_endpoint(ep_id)
        self.endpoint_audit.pop(ep_id, None)
        self._synced.discard(ep_id)
        await self.agent.blocking(self.agent.datapath.delete_policy, ep_id)

    async def set_endpoint_audit(self, ep_id: int, audit: bool | None) -> None:
        ep = self.agent.endpoints.endpoints[ep_id]
        if audit is None:
            self.endpoint_audit.pop(ep_id, None)
        else:
            self.endpoint_audit[ep_id] = audit
        self._upsert(ep)
        await self.regenerate()

    def security_labels(self, ns: str, name: str) -> tuple[dict, list[str]]:
        pod = self.pods.get((ns, name)) or {}
        labels = dict((pod.get("metadata") or {}).get("labels") or {})
        ns_labels = ((self.namespaces.get(ns) or {}).get("metadata") or {}).get("labels") or {}
        sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        return labels, pod_security_labels(labels, ns, ns_labels, sa, self.agent.cfg.cluster)

    async def _relabel_endpoints(self) -> None:
        """A pod's or its namespace's labels changed: a new identity, as Cilium does."""
        todo, self._relabel = self._relabel, set()
        for ep_id in sorted(todo):
            ep = self.agent.endpoints.endpoints.get(ep_id)
            if ep is None or (ep.pod_namespace, ep.pod_name) not in self.pods:
                continue
            labels, id_labels = self.security_labels(ep.pod_namespace, ep.pod_name)
            if list(id_labels) == list(ep.identity_labels):
                continue
            await self.agent.relabel_endpoint(ep, labels, id_labels)
            self._upsert(ep)

    # --- regeneration --------------------------------------------------------------------------

    async def regenerate(self) -> dict:
        """Recompute what changed and write it to the maps: entries first, then the
        endpoint's enforcement bits, so a direction is never enforced on a half-written map."""
        self._busy += 1
        try:
            t0 = time.perf_counter()
            updates = self.engine.regenerate()
            cidrs = {p: i.id for p, i in self.engine.cidr_identities().items()}
            if cidrs != self._cidrs:
                self._cidrs = cidrs
                await self.agent.reapply_cluster_view()
            eps = self.agent.endpoints.endpoints
            work = []
            for ep_id, u in updates.items():
                ep = eps.get(ep_id)
                if ep is None:
                    continue
                pol = u.policy
                if ep_id in self._synced:
                    change = ({tuple(k): tuple(v) for k, v in u.upserts.items()},
                              [tuple(k) for k in u.deletes])
                else:
                    # First write since we started: the pinned map may hold entries of a
                    # policy deleted while we were away, so compare with the kernel.
                    change = [PolicyEntry(k.direction, k.identity, k.proto, k.port, k.plen,
                                          bool(v.flags & DENY), v.cookie)
                              for k, v in pol.entries.items()]
                work.append((ep.id, ep.ip4, ep.host_ifindex, change, pol.ingress.enforced,
                             pol.egress.enforced, pol.audit))

            def program() -> None:
                dp = self.agent.datapath
                for ep_id, ip4, ifindex, change, ing, egr, audit in work:
                    if isinstance(change, tuple):
                        dp.apply_policy_diff(ep_id, *change)
                    else:
                        dp.sync_policy(ep_id, change)
                        self._synced.add(ep_id)
                    try:
                        dp.set_endpoint_policy_flags(ip4, ifindex, ing, egr, audit)
                    except (KeyError, ValueError) as e:  # endpoint went away meanwhile
                        log.info("endpoint %d: %s", ep_id, e)
            if work:
                await self.agent.blocking(program)
            self.regenerations += 1
            self.last_regeneration_ms = (time.perf_counter() - t0) * 1000
            return updates
        finally:
            self._busy -= 1

    def cidr_ipcache(self) -> dict[str, int]:
        return dict(self._cidrs)

    async def run(self) -> None:
        tasks = [asyncio.create_task(w.run(), name=f"policy-watch{w.prefix}") for w in self.watches]
        try:
            while True:
                await self._dirty.wait()
                await asyncio.sleep(0.02)  # coalesce a burst (one apply) into one regeneration
                self._dirty.clear()
                for t in tasks:
                    if t.done():
                        t.result()  # a dead watcher is a dead agent: raise
                if not all(w.listed for w in self.watches):
                    continue  # enforcing half a picture could drop allowed traffic
                self._busy += 1  # realized() must not answer between here and the maps
                try:
                    if self._relabel:
                        await self._relabel_endpoints()
                    await self.regenerate()
                finally:
                    self._busy -= 1
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def realized(self, want: int) -> int:
        """The store revision this node provably enforces (0: still catching up)."""
        if want and self.realized_revision >= want:
            return self.realized_revision
        if self._dirty.is_set() or self._relabel or self._busy or self.engine.pending():
            return 0
        rev = 0
        for w in self.watches:
            same, r = await w.current()
            if not same:
                return 0
            rev = max(rev, r)
        cl = self.agent.cluster
        if cl is not None and not await cl.current():
            return 0
        if self._dirty.is_set() or self._relabel or self._busy:
            return 0
        self.realized_revision = max(self.realized_revision, rev)
        return self.realized_revision

    # --- reading -------------------------------------------------------------------------------

    def endpoint_status(self, ep_id: int) -> dict:
        pol = self.engine.realized(ep_id)
        if pol is None:
            return {"policy-enabled": "none", "policy-revision": 0}
        ing, egr = pol.ingress.enforced, pol.egress.enforced
        enabled = {(False, False): "none", (True, False): "ingress", (False, True): "egress",
                   (True, True): "both"}[(ing, egr)]
        if pol.audit and enabled != "none":
            enabled = f"audit-{enabled}"
        return {"policy-enabled": enabled, "policy-revision": pol.revision,
                "ingress-enforcement": enforcement_label(ing, pol.audit),
                "egress-enforcement": enforcement_label(egr, pol.audit),
                "ingress-selected-by": [str(s) for s in pol.ingress.selected_by],
                "egress-selected-by": [str(s) for s in pol.egress.selected_by]}

    def party(self, ref: str):
        """'ns/pod' or an IP -> what PolicyEngine.explain takes, plus a description."""
        if "/" in ref and not _is_ip(ref):
            ns, name = ref.split("/", 1)
            pod = self.pods.get((ns, name))
            if pod is None:
                raise LookupError(f"pod {ref} not found")
            ip = (pod.get("status") or {}).get("podIP")
            if not ip:
                raise LookupError(f"pod {ref} has no IP yet")
            return self._ip_party(ip), {"pod": ref, "ip": ip}
        if not _is_ip(ref):
            raise LookupError(f"{ref!r} is neither NAMESPACE/POD nor an IPv4 address")
        return self._ip_party(ref), {"ip": ref}

    def _ip_party(self, ip: str):
        for ep in self._local_endpoints():
            if ep.ip4 == ip:
                pol = self.engine.realized(ep.id)
                if pol is not None:
                    return pol
        ident = self._ipcache_identity(ip)
        if ident is None or ident == WORLD:
            return self.engine.identity_of_address(ip)
        labels = self.identities.get(ident)
        for (ns, name), pod in self.pods.items():
            if (pod.get("status") or {}).get("podIP") == ip and labels is not None:
                return PolicyEndpoint(0, ident, labels, named_ports(pod))
        return ident

    def _ipcache_identity(self, ip: str) -> int | None:
        cl = self.agent.cluster
        if cl is None:
            return None
        entries, _ = cl.view()
        addr = ipaddress.IPv4Address(ip)
        best = None
        for pfx, (ident, _via, _flags) in entries.items():
            net = ipaddress.IPv4Network(pfx)
            if addr in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, ident)
        return best[1] if best else None

    def explain(self, query: dict) -> dict:
        src, src_desc = self.party(str(query["from"]))
        dst, dst_desc = self.party(str(query["to"]))
        v = self.engine.explain(src, dst, int(query.get("port") or 0), query.get("protocol") or "TCP")
        return {"query": query, "from": src_desc, "to": dst_desc, **verdict_json(v)}


def _is_ip(s: str) -> bool:
    try:
        ipaddress.IPv4Address(s)
        return True
    except ValueError:
        return False


def _ref(r) -> dict:
    kind, ns, name = r
    return {"kind": kind, "namespace": ns, "name": name}


def _direction_json(d) -> dict | None:
    if d is None:
        return None
    return {"direction": d.direction, "enforced": d.enforced, "result": d.result,
            "reason": d.reason, "allowed_by": [_ref(s.ref) for s in d.allow_rules],
            "denied_by": [_ref(s.ref) for s in d.deny_rules]}


def verdict_json(v) -> dict:
    return {"verdict": v.result, "reason": v.reason, "decided_by": list(v.directions),
            "allowed_by": [_ref(r) for r in v.allow_rules],
            "denied_by": _ref(v.deny_rule) if v.deny_rule else None,
            "egress": _direction_json(v.egress), "ingress": _direction_json(v.ingress)}

