"""cilia-lab-node: the lab's kubelet, one per lab node, running in the node's netns.

It supervises the node's agent (restarting it when it dies, as a DaemonSet would), registers
the Node, watches the store for pods bound to this node and runs them: pod netns, the real
cilia-cni binary for ADD/DEL, container processes, readiness, status."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from cilia import netns, paths
from cilia.agent.supervisor import Supervisor
from cilia.api.client import AgentClient
from cilia.kvstore import open_store
from cilia.lab import state
from cilia.lab.topology import LabSpec, NodeSpec
from cilia.lab.workloads import workload_for
from cilia.objects import Objects, key as obj_key, prefix as obj_prefix
from cilia.procs import ProcRef, ref_of, spawn

log = logging.getLogger("cilia.lab.node")

POLL = 0.1
START_CONCURRENCY = 8


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP listeners of the netns that pid lives in (/proc/PID/net is that netns' view)."""
    ports: set[int] = set()
    for fname in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{fname}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            pass
    return ports


@dataclass
class ContainerRun:
    name: str
    argv: list[str]
    tcp_ports: list[int]
    proc: ProcRef | None = None
    popen: subprocess.Popen | None = None
    restarts: int = 0
    started_at: str = ""
    last_exit: int | None = None
    next_start: float = 0.0


@dataclass
class PodRun:
    key: str
    uid: str
    namespace: str
    name: str
    netns: str
    restart_policy: str = "Always"
    grace: float = 30.0
    ip: str = ""
    containers: list[ContainerRun] = field(default_factory=list)
    ready: bool = False
    reported: str = ""

    def to_json(self) -> dict:
        return {"key": self.key, "uid": self.uid, "namespace": self.namespace,
                "name": self.name, "netns": self.netns, "ip": self.ip,
                "restart_policy": self.restart_policy, "grace": self.grace,
                "containers": [{"name": c.name, "argv": c.argv, "tcp_ports": c.tcp_ports,
                                "restarts": c.restarts, "started_at": c.started_at,
                                "proc": c.proc.to_json() if c.proc else None}
                               for c in self.containers]}

    @classmethod
    def from_json(cls, d: dict) -> "PodRun":
        p = cls(key=d["key"], uid=d["uid"], namespace=d["namespace"], name=d["name"],
                netns=d["netns"], ip=d.get("ip", ""),
                restart_policy=d.get("restart_policy", "Always"),
                grace=float(d.get("grace", 30.0)))
        for c in d.get("containers", []):
            p.containers.append(ContainerRun(
                name=c["name"], argv=c["argv"], tcp_ports=c.get("tcp_ports", []),
                proc=ProcRef.from_json(c["proc"]) if c.get("proc") else None,
                restarts=c.get("restarts", 0), started_at=c.get("started_at", "")))
        return p


class NodeRuntime:
    def __init__(self, spec: LabSpec, node: NodeSpec):
        self.spec = spec
        self.node = node
        self.dir = paths.node_dir(spec.name, node.name)
        self.socket = paths.agent_socket(spec.name, node.name)
        self.store = open_store(state.node_store_url(spec))
        self.objects = Objects(self.store)
        self.pods: dict[str, PodRun] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.agent_proc: subprocess.Popen | None = None
        # A burst of pods (a 100-replica Deployment) starts a few at a time: each start is
        # a process exec or two, and 2 CPUs shared by 100 at once finish them all last.
        self.start_slots = asyncio.Semaphore(START_CONCURRENCY)
        self.agent_healthy = False
        self.cni_bin = shutil.which("cilia-cni", path=os.path.dirname(sys.executable)) \
            or shutil.which("cilia-cni")
        if not self.cni_bin:
            raise RuntimeError("cilia-cni binary not found next to the Python interpreter")

    # --- persistence ---------------------------------------------------------------------

    def save(self) -> None:
        state.write_json(state.pods_file(self.spec.name, self.node.name),
                         {k: p.to_json() for k, p in self.pods.items()})

    def load(self) -> None:
        data = state.read_json(state.pods_file(self.spec.name, self.node.name), {})
        for k, d in data.items():
            self.pods[k] = PodRun.from_json(d)

    # --- agent ---------------------------------------------------------------------------

    def agent_argv(self) -> list[str]:
        return [sys.executable, "-m", "cilia.agent.main", "--cluster", self.spec.name,
                "--node", self.node.name, "--node-ip", self.node.ip,
                "--pod-cidr", "auto", "--preferred-pod-cidr", self.node.pod_cidr,
                "--store", state.node_store_url(self.spec),
                "--routing", self.spec.routing, "--mtu", str(self.spec.pod_mtu),
                "--node-id", str(self.node.index)]

    async def supervise_agent(self) -> None:
        pidfile = state.agent_pid_file(self.spec.name, self.node.name)
        try:
            while True:
                self.agent_proc = spawn(self.agent_argv(), os.path.join(self.dir, "agent.log"))
                state.write_json(pidfile, ref_of(self.agent_proc).to_json())
                while self.agent_proc.poll() is None:
                    await asyncio.sleep(POLL)
                log.warning("agent exited with %s; restarting", self.agent_proc.returncode)
                self.agent_healthy = False
                await asyncio.sleep(0.5)
        finally:
            if self.agent_proc is not None and self.agent_proc.poll() is None:
                await asyncio.to_thread(ref_of(self.agent_proc).stop, 5.0)

    def _agent_ok(self) -> bool:
        try:
            return AgentClient(self.socket, timeout=2).get("/v1/healthz").get("status") == "ok"
        except Exception:
            return False

    async def wait_agent(self) -> None:
        while not await asyncio.to_thread(self._agent_ok):
            await asyncio.sleep(POLL)

    async def heartbeat(self) -> None:
        while True:
            ok = await asyncio.to_thread(self._agent_ok)
            if ok != self.agent_healthy:
                self.agent_healthy = ok
                await self.register_node(ok)
            await asyncio.sleep(1.0)

    async def register_node(self, ready: bool) -> None:
        uname = os.uname()
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node.name, "labels": {
                "kubernetes.io/hostname": self.node.name, "kubernetes.io/os": "linux",
                "cilia.io/lab": self.spec.name}},
            "spec": {"podCIDR": self.node.pod_cidr, "podCIDRs": [self.node.pod_cidr]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": self.node.ip},
                              {"type": "Hostname", "address": self.node.name}],
                "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                "reason": "AgentReady" if ready else "AgentNotReady",
                                "lastTransitionTime": now_rfc3339()}],
                "nodeInfo": {"kernelVersion": uname.release, "osImage": "cilia lab",
                             "containerRuntimeVersion": "cilia-lab://0.1",
                             "kubeletVersion": "v1.30.0-cilia", "architecture": uname.machine,
                             "operatingSystem": "linux"},
            },
        }
        got = await self.objects.get("nodes", None, self.node.name)
        if got is not None:
            node["metadata"]["creationTimestamp"] = got[0]["metadata"].get("creationTimestamp")
            node["metadata"]["uid"] = got[0]["metadata"].get("uid")
        else:
            import uuid
            node["metadata"]["creationTimestamp"] = now_rfc3339()
            node["metadata"]["uid"] = str(uuid.uuid4())
        await self.objects.put("nodes", node)

    # --- pods ----------------------------------------------------------------------------

    async def watch_pods(self) -> None:
        await self.wait_agent()
        items, rev = await self.store.list(obj_prefix("pods"))
        seen = set()
        for kv in items:
            seen.add(kv.key)
            self.kick(kv.key, json.loads(kv.value))
        for k in list(self.pods):
            if k not in seen:
                self.kick(k, None)
        async for ev in self.store.watch(obj_prefix("pods"), rev + 1):
            obj = json.loads(ev.value) if ev.type == "PUT" and ev.value else None
            self.kick(ev.key, obj)

    def kick(self, key: str, obj: dict | None) -> None:
        mine = obj is not None and (obj.get("spec") or {}).get("nodeName") == self.node.name
        if not mine and key not in self.pods:
            return
        asyncio.get_running_loop().create_task(self.reconcile(key, obj if mine else None))

    async def reconcile(self, key: str, obj: dict | None) -> None:
        lock = self.locks.setdefault(key, asyncio.Lock())
        async with lock:
            run = self.pods.get(key)
            if obj is None:
                if run is not None:
                    await self.teardown(run)
                return
            md = obj["metadata"]
            if run is not None and run.uid != md.get("uid"):
                await self.teardown(run)
                run = None
            if md.get("deletionTimestamp"):
                if run is not None:
                    await self.teardown(run)
                await self.store.delete(key)
                return
            if run is None:
                try:
                    async with self.start_slots:
                        await self.start_pod(key, obj)
                except Exception as e:
                    log.exception("pod %s failed to start", key)
                    await self.set_status(key, md.get("uid"), failed=str(e))

    async def cni(self, command: str, run: PodRun) -> dict:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
               "CNI_CONTAINERID": run.uid, "CNI_NETNS": netns.path_of(run.netns),
               "CNI_IFNAME": "eth0", "CNI_PATH": os.path.dirname(self.cni_bin),
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={run.namespace};"
                           f"K8S_POD_NAME={run.name};K8S_POD_UID={run.uid}"}
        conf = {"cniVersion": "1.0.0", "name": "cilia", "type": "cilia-cni",
                "agent-socket": self.socket}
        proc = await asyncio.create_subprocess_exec(
            self.cni_bin, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(json.dumps(conf).encode())
        result = json.loads(out) if out.strip() else {}
        if proc.returncode != 0:
            raise RuntimeError(f"CNI {command} failed: {result.get('msg') or err.decode()}")
        return result

    async def start_pod(self, key: str, obj: dict) -> None:
        md, spec = obj["metadata"], obj.get("spec") or {}
        run = PodRun(key=key, uid=md["uid"], namespace=md.get("namespace", "default"),
                     name=md["name"], netns=self.spec.pod_netns(md.get("namespace", "default"),
                                                                md["name"]),
                     restart_policy=spec.get("restartPolicy", "Always"),
                     grace=float(spec.get("terminationGracePeriodSeconds", 30)))
        for c in spec.get("containers", []):
            argv = workload_for(c, pod_name=run.name, namespace=run.namespace,
                                node=self.node.name)
            if not argv:
                raise RuntimeError(f"container {c['name']}: no command and no image")
            ports = [p["containerPort"] for p in c.get("ports", [])
                     if p.get("protocol", "TCP") == "TCP"]
            run.containers.append(ContainerRun(name=c["name"], argv=argv, tcp_ports=ports))
        if netns.exists(run.netns):
            netns.delete(run.netns)
        await asyncio.to_thread(netns.create, run.netns)
        self.pods[key] = run
        self.save()
        try:
            result = await self.cni("ADD", run)
            run.ip = result["ips"][0]["address"].split("/")[0]
            self.save()
            for c in run.containers:
                self.start_container(run, c, obj)
        except BaseException:
            await self.teardown(run)
            raise
        await self.set_status(key, run.uid, run=run)

    def container_env(self, run: PodRun, container: dict | None) -> dict:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": run.name,
               "POD_NAME": run.name, "POD_NAMESPACE": run.namespace, "POD_IP": run.ip,
               "NODE_NAME": self.node.name, "PYTHONUNBUFFERED": "1"}
        for e in (container or {}).get("env", []) or []:
            if "value" in e:
                env[e["name"]] = str(e["value"])
        return env

    def start_container(self, run: PodRun, c: ContainerRun, obj: dict | None = None) -> None:
        spec_c = None
        if obj is not None:
            spec_c = next((x for x in obj["spec"]["containers"] if x["name"] == c.name), None)
        logf = os.path.join(self.dir, "pods", f"{run.namespace}_{run.name}_{c.name}.log")
        c.popen = spawn(netns.nsenter_argv(run.netns, c.argv), logf,
                        env=self.container_env(run, spec_c))
        c.proc = ref_of(c.popen)
        c.started_at = now_rfc3339()
        self.save()

    async def teardown(self, run: PodRun) -> None:
        # SIGTERM, then SIGKILL after the pod's grace period, in parallel for all containers:
        # while it drains, the endpoint is "terminating" and gets no new connections.
        await asyncio.gather(*(asyncio.to_thread(c.proc.stop, max(run.grace, 0.1))
                               for c in run.containers if c.proc is not None))
        try:
            await self.cni("DEL", run)
        except Exception as e:
            log.warning("CNI DEL for %s: %s", run.key, e)
        await asyncio.to_thread(netns.delete, run.netns)
        self.pods.pop(run.key, None)
        self.save()

    async def monitor(self) -> None:
        """Restart exited containers per restartPolicy and report readiness changes."""
        while True:
            await asyncio.sleep(POLL)
            for key, run in list(self.pods.items()):
                if self.locks.get(key) is not None and self.locks[key].locked():
                    continue
                changed = False
                for c in run.containers:
                    alive = c.proc is not None and c.proc.alive()
                    if c.popen is not None and c.popen.poll() is not None:
                        c.last_exit, alive = c.popen.returncode, False
                    if alive:
                        continue
                    if run.restart_policy == "Never" or (
                            run.restart_policy == "OnFailure" and c.last_exit == 0):
                        continue
                    if c.next_start == 0.0:
                        # Kubernetes-like back-off, capped low for a lab.
                        c.next_start = time.monotonic() + min(0.5 * 2 ** c.restarts, 10)
                    if time.monotonic() >= c.next_start:
                        c.restarts += 1
                        c.next_start = 0.0
                        self.start_container(run, c, None)
                        changed = True
                ready = self.is_ready(run)
                if ready != run.ready or changed:
                    run.ready = ready
                    await self.set_status(key, run.uid, run=run)

    def is_ready(self, run: PodRun) -> bool:
        pid = None
        for c in run.containers:
            if c.proc is None or not c.proc.alive():
                return False
            pid = c.proc.pid
        if pid is None:
            return False
        want = {p for c in run.containers for p in c.tcp_ports}
        return not want or want <= listening_tcp_ports(pid)

    async def set_status(self, key: str, uid: str | None, run: PodRun | None = None,
                         failed: str | None = None) -> None:
        ns, name = key.rsplit("/", 2)[-2:]

        def mutate(obj: dict) -> dict | None:
            if obj["metadata"].get("uid") != uid:
                return None
            st = obj.setdefault("status", {})
            if failed is not None:
                st.update(phase="Pending", hostIP=self.node.ip,
                          conditions=[{"type": "Ready", "status": "False",
                                       "reason": "SandboxFailed", "message": failed}])
                return obj
            assert run is not None
            ready = "True" if run.ready else "False"
            t = now_rfc3339()
            st.update(phase="Running", hostIP=self.node.ip, hostIPs=[{"ip": self.node.ip}],
                      podIP=run.ip, podIPs=[{"ip": run.ip}])
            st.setdefault("startTime", t)
            st["conditions"] = [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": t},
                {"type": "Ready", "status": ready, "lastTransitionTime": t},
            ]
            images = {c["name"]: c.get("image", "") for c in obj["spec"].get("containers", [])}
            st["containerStatuses"] = [{
                "name": c.name, "image": images.get(c.name, ""), "imageID": "",
                "containerID": f"cilia://{c.proc.pid}" if c.proc else "",
                "ready": run.ready, "started": c.proc is not None, "restartCount": c.restarts,
                "state": {"running": {"startedAt": c.started_at}},
            } for c in run.containers]
            return obj

        await self.objects.mutate("pods", ns, name, mutate)

    async def adopt(self) -> None:
        """After a runtime restart: keep running pods we started before."""
        self.load()
        for run in self.pods.values():
            run.ready = False
        self.save()


async def main_async(lab: str, node: str) -> int:
    got = state.load_spec(lab)
    if got is None:
        log.error("lab %s not found", lab)
        return 2
    spec = got[0]
    rt = NodeRuntime(spec, spec.node(node))
    await rt.adopt()
    sup = Supervisor()
    sup.add("agent", rt.supervise_agent)
    sup.add("heartbeat", rt.heartbeat)
    sup.add("pods", rt.watch_pods)
    sup.add("monitor", rt.monitor)
    try:
        return await sup.run()
    finally:
        await rt.store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cilia-lab-node")
    p.add_argument("--lab", required=True)
    p.add_argument("--node", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return asyncio.run(main_async(a.lab, a.node))


if __name__ == "__main__":
    sys.exit(main())
