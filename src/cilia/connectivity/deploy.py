"""Deploying and removing the suite's workloads, the world listener and the second world
address; everything made here is recorded so cleanup removes exactly that."""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from cilia import netns, paths
from cilia.api.client import AgentClient, AgentUnreachable, APIError
from cilia.cluster import ApplyError, Cluster, pod_ready
from cilia.k8s.errors import ManifestError
from cilia.kvstore import KVStoreError
from cilia.k8s.loader import load_manifests
from cilia.lab import state
from cilia.lab.topology import WORLD_HOST, WORLD_NET, LabSpec

from . import manifests, probes
from .model import Environment, Peer

# cilium-cli's ExternalOtherIP counterpart: a second address on the world host, so a CIDR
# policy can allow one world address and except another.
WORLD_OTHER_IP = str(WORLD_NET.network_address + 101)
WORLD_PORTS = (80, 443)


class DeployError(Exception):
    pass


def _load(text: str) -> list[dict]:
    try:
        return load_manifests(["-"], stdin=io.StringIO(text))
    except ManifestError as e:
        raise DeployError(str(e)) from None


@dataclass
class Deployment:
    spec: LabSpec
    namespace: str
    timeout: float
    log: Callable[[str], None]
    tracker: probes.ProcessTracker
    world_proc: subprocess.Popen | None = None
    world_ports: list[int] = field(default_factory=list)   # served by our world_proc
    added_world_ip: bool = False
    namespace_created: bool = False
    applied_policies: list[tuple] = field(default_factory=list)   # (kind, ns, name)

    # --- deploy ------------------------------------------------------------------------------

    def _cluster(self) -> Cluster:
        return Cluster(state.store_url(self.spec.name))

    def _store(self, what: str, fn, attempts: int = 4):
        """fn(cluster) with a fresh client, retried while the store is unreachable (etcd
        times out now and then on a loaded 2-CPU machine); every caller is idempotent."""
        for i in range(attempts):
            cl = self._cluster()
            try:
                return fn(cl)
            except KVStoreError as e:
                if i == attempts - 1:
                    raise DeployError(f"{what}: cluster store unreachable: {e}") from None
            finally:
                cl.close()
            time.sleep(1.0)

    def _nodes(self, cl: Cluster) -> list[str]:
        ready = set(cl.ready_nodes())
        names = [n.name for n in self.spec.nodes if n.name in ready]
        if not names:
            raise DeployError(f"lab {self.spec.name}: no Ready node")
        return names

    async def deploy(self, force: bool, single_node: bool = False) -> Environment:
        cl = self._cluster()
        try:
            if cl.get("Namespace", None, self.namespace) is not None:
                if not force:
                    raise DeployError(
                        f"namespace {self.namespace} already exists (another run, or one that "
                        f"did not finish); use --force-deploy to replace it")
                self.log(f"🔥 [{self.spec.name}] Deleting namespace {self.namespace}...")
                self._delete_namespace(cl)
            nodes = self._nodes(cl)
            node, other = nodes[0], (nodes[1] if len(nodes) > 1 and not single_node else None)
            if other is None:
                self.log(f"ℹ️  [{self.spec.name}] Single-node environment: no echo-other-node, "
                         "cross-node scenarios are skipped")
            self.log(f"✨ [{self.spec.name}] Creating namespace {self.namespace} for connectivity check...")
            objs = load_manifests(["-"], stdin=io.StringIO(
                manifests.workloads(self.namespace, node, other)))
            self.namespace_created = True
            for o in objs:
                if o["kind"] in ("Deployment", "Service"):
                    self.log(f"✨ [{self.spec.name}] Deploying {o['metadata']['name']} "
                             f"{o['kind'].lower()}...")
            try:
                cl.apply(objs)
            except ApplyError as e:
                raise DeployError(f"deploying the test workloads: {e}") from None
            await self._wait_pods(cl, [o["metadata"]["name"] for o in objs if o["kind"] == "Deployment"])
            env = self.discover(cl, other is not None)
        finally:
            cl.close()
        await self._start_world()
        await self._wait_services(env)
        return env

    async def _wait_pods(self, cl: Cluster, deployments: list[str]) -> None:
        deadline = time.monotonic() + self.timeout
        for d in deployments:
            self.log(f"⌛ [{self.spec.name}] Waiting for deployment {self.namespace}/{d} to become ready...")
        while True:
            pods = cl.list("Pod", self.namespace)
            waiting = [d for d in deployments
                       if not any(p["metadata"].get("labels", {}).get("name") == d and pod_ready(p)
                                  for p in pods)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise DeployError(f"timed out after {self.timeout:g}s waiting for deployment "
                                  f"{self.namespace}/{waiting[0]} to become ready")
            await asyncio.sleep(0.2)

    def discover(self, cl: Cluster, multi_node: bool) -> Environment:
        spec = self.spec
        pods = [p for p in cl.list("Pod", self.namespace)
                if pod_ready(p) and not p["metadata"].get("deletionTimestamp")]

        def pod_peer(p: dict) -> Peer:
            md = p["metadata"]
            return Peer("pod", f"{self.namespace}/{md['name']}", p["status"]["podIP"],
                        labels=dict(md.get("labels") or {}), node=p["spec"]["nodeName"],
                        netns=spec.pod_netns(self.namespace, md["name"]))

        by_role: dict[str, Peer] = {}
        for p in pods:
            role = (p["metadata"].get("labels") or {}).get("name")
            if role and role not in by_role:
                by_role[role] = pod_peer(p)
        clients = [by_role[n] for n in manifests.CLIENTS if n in by_role]
        echo_pods = [dataclasses.replace(by_role[n], port=manifests.ECHO_PORT)
                     for n in manifests.echo_names(multi_node) if n in by_role]
        services, node_ports = [], {}
        for name in manifests.echo_names(multi_node):
            svc = cl.get("Service", self.namespace, name)
            if svc is None or name not in by_role:
                raise DeployError(f"service {self.namespace}/{name} or its pod is missing")
            port = svc["spec"]["ports"][0]
            node_ports[name] = int(port.get("nodePort") or 0)
            backend = by_role[name]
            services.append(Peer("service", f"{self.namespace}/{name}", svc["spec"]["clusterIP"],
                                 int(port["port"]), labels=dict(svc["metadata"].get("labels") or {}),
                                 backends=(backend.name.rsplit("/", 1)[-1],),
                                 backend_ips=(backend.address,), target_port=manifests.ECHO_PORT))
        nodes = [Peer("node", n.name, n.ip, node=n.name, netns=n.netns) for n in spec.nodes
                 if n.name in self._nodes(cl)]
        return Environment(lab=spec.name, routing=spec.routing, namespace=self.namespace,
                           nodes=nodes, clients=clients, echo_pods=echo_pods,
                           echo_services=services, node_ports=node_ports,
                           external_ip=WORLD_HOST, external_other_ip=WORLD_OTHER_IP,
                           world_netns=spec.world_netns)

    # --- world host ----------------------------------------------------------------------------

    def _world_listening(self, port: int) -> bool:
        def connect() -> bool:
            with socket.socket() as s:
                s.settimeout(0.5)
                return s.connect_ex((WORLD_HOST, port)) == 0
        return netns.run_in(self.spec.world_netns, connect)

    def _world_has_ip(self, ip: str) -> bool:
        out = subprocess.run(netns.nsenter_argv(self.spec.world_netns,
                                                ["ip", "-j", "addr", "show", "dev", "eth0"]),
                             capture_output=True, text=True, timeout=10)
        return any(a.get("local") == ip for link in json.loads(out.stdout or "[]")
                   for a in link.get("addr_info", []))

    async def _start_world(self) -> None:
        if not self._world_has_ip(WORLD_OTHER_IP):
            subprocess.run(netns.nsenter_argv(self.spec.world_netns, [
                "ip", "addr", "add", f"{WORLD_OTHER_IP}/32", "dev", "eth0"]),
                check=True, capture_output=True, timeout=10)
            self.added_world_ip = True
        missing = [p for p in WORLD_PORTS if not self._world_listening(p)]
        if len(missing) < len(WORLD_PORTS):
            self.log(f"ℹ️  [{self.spec.name}] world host {WORLD_HOST} already serves "
                     f"{', '.join(str(p) for p in WORLD_PORTS if p not in missing)}; using it")
        if not missing:
            return
        self.log(f"✨ [{self.spec.name}] Starting an echo server on the world host "
                 f"({WORLD_HOST}, {WORLD_OTHER_IP}: {', '.join(map(str, missing))})...")
        argv = netns.nsenter_argv(self.spec.world_netns, [
            sys.executable, "-m", "cilia.lab.workloads", "echo",
            "--ports", ",".join(f"{p}/TCP" for p in missing),
            "--name", "world", "--namespace", "world", "--node", "world"])
        self.world_ports = missing
        self.world_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                           start_new_session=True)
        deadline = time.monotonic() + 10
        while not all(self._world_listening(p) for p in WORLD_PORTS):
            if self.world_proc.poll() is not None:
                err = self.world_proc.stderr.read().decode(errors="replace").strip().splitlines()
                self.world_proc = None
                raise DeployError(f"world echo server exited: {err[-1] if err else 'no output'}")
            if time.monotonic() > deadline:
                raise DeployError("timed out waiting for the world echo server")
            await asyncio.sleep(0.1)

    # --- services ------------------------------------------------------------------------------

    async def _wait_until(self, what: str, probe) -> None:
        self.log(f"⌛ [{self.spec.name}] Waiting for {what} to become ready...")
        deadline = time.monotonic() + self.timeout
        while True:
            r = await probe()
            if r.exit_code == 0:
                return
            if time.monotonic() > deadline:
                raise DeployError(f"timed out after {self.timeout:g}s waiting for {what}: "
                                  f"{r.command}: exit code {r.exit_code} {r.stderr}")
            await asyncio.sleep(0.3)

    async def _wait_services(self, env: Environment) -> None:
        waits = []
        for svc in env.echo_services:
            for c in env.clients:
                waits.append(self._wait_until(
                    f"Service {svc.name} from {c.name}",
                    lambda c=c, svc=svc: probes.curl(self.tracker, c.netns, svc.address, svc.port,
                                                     None, 1, 2)))
            name = svc.name.rsplit("/", 1)[-1]
            for n in env.nodes:
                waits.append(self._wait_until(
                    f"NodePort {n.address}:{env.node_ports[name]} ({svc.name})",
                    lambda n=n, name=name: probes.curl(self.tracker, env.world_netns, n.address,
                                                       env.node_ports[name], None, 1, 2)))
        await asyncio.gather(*waits)

    # --- policies ------------------------------------------------------------------------------

    async def apply_policies(self, text: str) -> int:
        """What `cilia apply --wait` does, in process (two interpreter starts per test cost
        seconds on a busy 2-CPU machine): store the policies, then wait until every agent
        enforces the store revision. Returns that revision."""
        objs = _load(text)
        # Recorded first, so an interrupt mid-apply still deletes whatever landed.
        self.applied_policies += [(o["kind"], o["metadata"].get("namespace"),
                                   o["metadata"]["name"]) for o in objs]

        def apply(cl: Cluster) -> int:
            try:
                cl.apply(objs)
            except ApplyError as e:
                raise DeployError(str(e)) from None
            return cl.revision
        revision = await asyncio.to_thread(self._store, "applying policies", apply)
        await self.wait_realized(revision)
        return revision

    async def delete_policies(self, text: str) -> int:
        objs = _load(text)
        refs = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]

        def delete(cl: Cluster) -> int:
            for ref in refs:
                try:
                    cl.delete(*ref)
                except ApplyError as e:
                    if "NotFound" not in str(e):
                        raise DeployError(str(e)) from None
                if ref in self.applied_policies:
                    self.applied_policies.remove(ref)
            return cl.revision
        revision = await asyncio.to_thread(self._store, "deleting policies", delete)
        if revision:
            await self.wait_realized(revision)
        return revision

    async def wait_realized(self, revision: int) -> None:
        """Every node's agent enforces `revision`, twice in a row (as `cilia policy wait`: a
        node current before a peer published a change is asked again after it)."""
        def realized(node: str) -> tuple[bool, str]:
            try:
                r = AgentClient(paths.agent_socket(self.spec.name, node), timeout=10).get(
                    f"/v1/policy/realized?revision={revision}")
                return bool(r.get("realized")), f"revision {r.get('revision')}"
            except (AgentUnreachable, APIError) as e:
                return False, str(e)
        nodes = [n.name for n in self.spec.nodes]
        deadline = time.monotonic() + self.timeout
        passes = 0
        while True:
            got = await asyncio.gather(*(asyncio.to_thread(realized, n) for n in nodes))
            behind = {n: why for n, (ok, why) in zip(nodes, got) if not ok}
            passes = 0 if behind else passes + 1
            if passes >= 2:
                return
            if time.monotonic() > deadline:
                raise DeployError(f"timed out after {self.timeout:g}s waiting for policy revision "
                                  f"{revision}: " + ", ".join(f"{n} at {w}" for n, w in behind.items()))
            await asyncio.sleep(0.05 if not behind else 0.1)

    # --- cleanup -------------------------------------------------------------------------------

    def _delete_namespace(self, cl: Cluster) -> None:
        # Policies go with their namespace, as in Kubernetes (a crashed run may have left some).
        for kind in ("CiliumNetworkPolicy", "NetworkPolicy"):
            for o in cl.list(kind, self.namespace):
                try:
                    cl.delete(kind, self.namespace, o["metadata"]["name"])
                except ApplyError:
                    pass
        pending = cl.delete("Namespace", None, self.namespace)
        left = cl.wait_gone(pending, self.timeout)
        if left:
            raise DeployError(f"timed out deleting pods {', '.join(f'{a}/{b}' for a, b in left)}")

    def cleanup(self) -> list[str]:
        """Remove everything this run made; returns problems (never raises: each step runs
        even when an earlier one failed)."""
        problems: list[str] = []
        self.tracker.kill_all()
        for step in (self._cleanup_policies, self._cleanup_world, self._cleanup_namespace):
            try:
                step(problems)
            except Exception as e:  # noqa: BLE001 — report and go on with the next step
                problems.append(f"{step.__name__.strip('_').replace('_', ' ')}: {e}")
        return problems

    def _cleanup_policies(self, problems: list[str]) -> None:
        if not self.applied_policies:
            return

        def delete(cl: Cluster) -> None:
            for ref in list(self.applied_policies):
                try:
                    cl.delete(*ref)
                except ApplyError as e:
                    if "NotFound" not in str(e):
                        problems.append(f"deleting {ref[0]} {ref[1]}/{ref[2]}: {e}")
                self.applied_policies.remove(ref)
        self._store("deleting policies", delete)

    def _cleanup_world(self, problems: list[str]) -> None:
        if self.world_proc is not None:
            if self.world_proc.poll() is None:
                os.killpg(self.world_proc.pid, signal.SIGTERM)
                try:
                    self.world_proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.world_proc.pid, signal.SIGKILL)
                    self.world_proc.wait()
            self.world_proc = None
        if self.added_world_ip:
            p = subprocess.run(netns.nsenter_argv(self.spec.world_netns, [
                "ip", "addr", "del", f"{WORLD_OTHER_IP}/32", "dev", "eth0"]),
                capture_output=True, text=True, timeout=10)
            if p.returncode != 0:
                problems.append(f"removing {WORLD_OTHER_IP} from the world host: {p.stderr.strip()}")
            self.added_world_ip = False

    def _cleanup_namespace(self, problems: list[str]) -> None:
        if not self.namespace_created:
            return

        def delete(cl: Cluster) -> None:
            if cl.get("Namespace", None, self.namespace) is not None:
                self._delete_namespace(cl)
        try:
            self._store(f"deleting namespace {self.namespace}", delete)
        except (ApplyError, DeployError) as e:
            problems.append(f"deleting namespace {self.namespace}: {e}")
        self.namespace_created = False
