"""The agent's flow observability: reads the datapath's event ring, turns events into
Hubble flows enriched from the agent's own state, keeps them in the Observer ring (and the
optional SQLite flow log), and fans raw events out to `cilia monitor` streams.

Everything runs on the agent's event loop. Lookups during enrichment only touch
in-memory indexes that a refresh task rebuilds every second, so a flow never waits on the
store. start() is the one call the daemon makes."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

from cilia.datapath import events as E
from cilia.hubble import flow as F
from cilia.hubble.flowlog import FlowLog
from cilia.hubble.observer import DEFAULT_MAX_FLOWS, Observer

log = logging.getLogger("cilia.hubble")

BATCH = 2048            # events per loop turn: bounds how long the API waits behind us
POLL_FALLBACK_S = 0.5   # reads even without a wake-up (the ring wakes us only when caught up)
REFRESH_S = 1.0


class AgentFlowContext:
    """FlowContext answered from the agent: local endpoints, the cluster's ipcache view,
    identities (listed from the store now and then) and the LB's frontends."""

    def __init__(self, agent):
        self.agent = agent
        self.node_name = agent.cfg.node
        self.cluster_name = agent.cfg.cluster
        self._local: dict[str, F.EndpointView] = {}
        self._identities: dict[int, list[str]] = {}
        self._services: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._lb_version = None
        self._ids_at = 0.0
        self.side_cache: dict = {}  # flow.build's per-peer cache; cleared on every refresh

    # -- FlowContext --------------------------------------------------------------------
    def endpoint(self, ip: str) -> F.EndpointView | None:
        view = self._local.get(ip)
        if view is not None:
            return view
        cl = self.agent.cluster
        info = cl.endpoints.get(ip) if cl is not None else None
        if info is None:
            return None
        return F.EndpointView(identity=info.identity, namespace=info.namespace, pod_name=info.pod,
                              labels=self._identities.get(info.identity, []), node=info.node)

    def identity_labels(self, identity: int) -> list[str]:
        return self._identities.get(identity) or F.reserved_labels(identity)

    def service(self, ip: str, port: int, proto: int) -> tuple[str, str] | None:
        return self._services.get((ip, port, proto))

    def rule(self, cookie: int) -> dict | None:
        """The policy a cookie names, in Hubble's Policy shape (Cilium's derived-from labels)."""
        engine = getattr(getattr(self.agent, "policy", None), "engine", None)
        src = engine.rule_source(cookie) if engine is not None else None
        if src is None or src.kind.startswith("<"):  # no rule: not enforced, allow-localhost
            return None
        labels = [f"k8s:io.cilium.k8s.policy.derived-from={src.kind}", f"k8s:io.cilium.k8s.policy.name={src.name}"]
        if src.namespace:
            labels.append(f"k8s:io.cilium.k8s.policy.namespace={src.namespace}")
        return {"name": src.name, "namespace": src.namespace, "labels": labels,
                "revision": getattr(engine, "revision", 0), "kind": src.kind}

    # -- refresh ------------------------------------------------------------------------
    def refresh_local(self) -> None:
        self.side_cache.clear()
        eps = self.agent.endpoints.endpoints.values() if self.agent.endpoints else ()
        self._local = {e.ip4: F.EndpointView(identity=e.identity, ep_id=e.id, namespace=e.pod_namespace,
                                             pod_name=e.pod_name, labels=list(e.identity_labels),
                                             node=self.node_name)
                       for e in eps if e.ip4}

    def refresh_services(self) -> None:
        lb = self.agent.lb
        if lb is None:
            return
        version = (lb.syncs, len(lb.desired))
        if version == self._lb_version:
            return
        self._lb_version = version
        self._services = {(fe.address, fe.port, fe.proto): (e.service.namespace, e.service.name)
                          for fe, e in list(lb.desired.items())}

    async def refresh_identities(self) -> None:
        ids = self.agent.identities
        if ids is None or time.monotonic() - self._ids_at < 5.0:
            return
        self._ids_at = time.monotonic()
        try:
            self._identities = {i.id: list(i.labels) for i in await ids.list()}
        except Exception as e:  # store down: keep what we had
            log.debug("identity list failed: %s", e)


class Hubble:
    """The per-agent flow pipeline."""

    def __init__(self, agent, *, max_flows: int = DEFAULT_MAX_FLOWS, flow_log: str = "",
                 flow_log_retention_s: float = 24 * 3600):
        self.agent = agent
        self.observer = Observer(max_flows)
        self.ctx = AgentFlowContext(agent)
        self.flowlog = FlowLog(flow_log, flow_log_retention_s) if flow_log else None
        self._monitors: dict[int, Callable[[E.Event], None]] = {}
        self._next = 0
        self.events_read = 0
        self.decode_errors = 0
        self.source: E.EventSource | None = None
        self.error: str | None = None
        if self.flowlog is not None:
            # History survives a restart: the ring starts with the newest logged flows.
            self.observer.add_many(self.flowlog.query(last=max_flows))

    # -- raw event subscribers (cilia monitor) --------------------------------------------
    def subscribe_events(self, callback: Callable[[E.Event], None]) -> Callable[[], None]:
        sid, self._next = self._next, self._next + 1
        self._monitors[sid] = callback
        return lambda: self._monitors.pop(sid, None)

    # -- the reader --------------------------------------------------------------------
    def process(self, raws: list[bytes]) -> int:
        """Decode, enrich and store one batch of ring records; returns flows added."""
        logged = [] if self.flowlog is not None else None
        monitors = list(self._monitors.values())
        for raw in raws:
            try:
                ev = E.decode(raw)
                ns, rec = F.build(ev, self.ctx)
            except Exception:
                self.decode_errors += 1
                log.exception("cannot decode datapath event")
                continue
            self.observer.add(rec, ns)
            if logged is not None:
                logged.append((ns, rec))
            if monitors and ev.type == E.EVENT_DROP:
                self._fill_drop(ev)
            for cb in monitors:
                try:
                    cb(ev)
                except Exception:
                    log.exception("monitor subscriber failed")
        self.events_read += len(raws)
        if logged:
            try:
                self.flowlog.append(logged)
            except Exception as e:  # a full disk must not stop the ring
                self.error = f"flow log: {e}"
        return len(raws)

    def _fill_drop(self, ev: E.Event) -> None:
        """A drop is raised where the datapath may not know the peers (send_drop has only
        the packet): what Cilium's drop notify carries, identities and the local endpoint
        receiving, is resolved here from the addresses."""
        src = self.ctx.endpoint(ev.src_ip) if ev.src_ip else None
        dst = self.ctx.endpoint(ev.dst_ip) if ev.dst_ip else None
        if not ev.src_identity:
            ev.src_identity = src.identity if src else (2 if ev.src_ip else 0)
        if not ev.dst_identity:
            ev.dst_identity = dst.identity if dst else (2 if ev.dst_ip else 0)
        if not ev.ep_id and dst is not None:
            ev.ep_id = dst.ep_id

    def lost(self) -> int:
        return self.source.lost() if self.source is not None else 0

    async def refresh(self) -> None:
        while True:
            self.ctx.refresh_local()
            self.ctx.refresh_services()
            await self.ctx.refresh_identities()
            if self.source is not None:
                self.observer.lost_events = self.source.lost()
            await asyncio.sleep(REFRESH_S)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.source = E.EventSource(self.agent.cfg.pin_dir)
        wake = asyncio.Event()
        loop.add_reader(self.source.fileno(), wake.set)
        refresher = asyncio.create_task(self.refresh(), name="hubble-refresh")
        try:
            while True:
                raws = self.source.read_raw(BATCH)
                if raws:
                    self.process(raws)
                    await asyncio.sleep(0)  # let the API run between batches
                    continue
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), POLL_FALLBACK_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            refresher.cancel()
            try:
                await refresher
            except (asyncio.CancelledError, Exception):
                pass
            loop.remove_reader(self.source.fileno())
            self.source.close()
            self.source = None
            if self.flowlog is not None:
                self.flowlog.close()

    def status(self) -> dict:
        st = self.observer.status()
        try:
            st["lost_events"] = self.observer.lost_events = self.lost()
        except OSError:
            pass
        st.update({"events_read": self.events_read, "decode_errors": self.decode_errors,
                   "flow_log": self.flowlog.path if self.flowlog else None, "error": self.error})
        return st


def start(agent, sup) -> Hubble:
    """Creates the agent's Hubble (agent.hubble) and its reader task under ``sup``.
    Settings come from the agent config when it has them (flow_log, hubble_max_flows)."""
    cfg = agent.cfg
    flow_log = getattr(cfg, "flow_log", "") or os.environ.get("CILIA_FLOW_LOG", "")
    if flow_log == "auto":
        flow_log = os.path.join(cfg.state_dir, "flows.db")
    retention = float(getattr(cfg, "flow_log_retention", 0) or os.environ.get("CILIA_FLOW_LOG_RETENTION", 0)
                      or 24 * 3600)
    max_flows = int(getattr(cfg, "hubble_max_flows", 0) or DEFAULT_MAX_FLOWS)
    agent.hubble = Hubble(agent, max_flows=max_flows, flow_log=flow_log, flow_log_retention_s=retention)
    sup.add("hubble", agent.hubble.run)
    return agent.hubble


def status(agent) -> dict:
    """The `"hubble"` part of the agent's /v1/status."""
    h = getattr(agent, "hubble", None)
    return h.status() if h is not None else {"enabled": False}


def datapath_flags(cfg=None) -> int:
    """cilia_config.flags for the agent's monitor aggregation setting
    (CILIA_MONITOR_AGGREGATION or cfg.monitor_aggregation: medium | none | disabled)."""
    level = (getattr(cfg, "monitor_aggregation", "") if cfg is not None else "") \
        or os.environ.get("CILIA_MONITOR_AGGREGATION", "medium")
    if level not in E.AGGREGATION_FLAGS:
        raise ValueError(f"monitor aggregation must be one of {sorted(E.AGGREGATION_FLAGS)}, not {level!r}")
    return E.AGGREGATION_FLAGS[level]


def add_flags(parser) -> None:
    """cilia-agent's observability flags (defaults from the environment, so a lab started
    with them set passes them to every agent)."""
    parser.add_argument("--monitor-aggregation", choices=sorted(E.AGGREGATION_FLAGS),
                        default=os.environ.get("CILIA_MONITOR_AGGREGATION", "medium"),
                        help="datapath trace events: medium (per connection), none (per packet), disabled")
    parser.add_argument("--hubble-max-flows", type=int, default=DEFAULT_MAX_FLOWS,
                        help="capacity of the in-memory flow ring")
    parser.add_argument("--flow-log", default=os.environ.get("CILIA_FLOW_LOG", ""),
                        help="SQLite flow history: a path, 'auto' (the state dir) or '' (off)")
    parser.add_argument("--flow-log-retention", type=float,
                        default=float(os.environ.get("CILIA_FLOW_LOG_RETENTION", 24 * 3600)),
                        help="seconds of flow history to keep")


def apply_flags(cfg, args) -> None:
    cfg.monitor_aggregation = args.monitor_aggregation
    cfg.hubble_max_flows = args.hubble_max_flows
    cfg.flow_log = args.flow_log
    cfg.flow_log_retention = args.flow_log_retention
