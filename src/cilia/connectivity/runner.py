"""Runs the suite: deploy, one test after another (each test's actions in parallel), flow
validation, the unexpected-drops check, cleanup (also on SIGINT/SIGTERM), the report."""
from __future__ import annotations

import asyncio
import re
import signal
import time
from dataclasses import dataclass

from cilia import paths
from cilia.api.client import AgentClient, AgentUnreachable, APIError
from cilia.kvstore import KVStoreError
from cilia.lab.topology import LabSpec

from . import flows, manifests, probes, suite
from .deploy import WORLD_OTHER_IP, Deployment, DeployError
from .model import ANY_ERROR, NONE, Action, ActionSpec, Environment, Peer, TestDef
from .report import Output, TestRun, summary, to_json, write_json, write_junit

# cilium-cli's defaults.ExpectedDropReasons, as cilia's metrics name them.
EXPECTED_DROP_REASONS = frozenset({
    "Policy denied", "Policy denied by denylist", "Unsupported L2 protocol",
    "Unsupported L3 protocol", "Stale or unroutable IP", "Authentication required",
    "Service backend not found", "Unsupported protocol for NAT masquerade", "Invalid source ip",
    "Unknown L3 target address", "No tunnel/encapsulation endpoint (datapath BUG!)",
    "No mapping for NAT masquerade",
})
FIRST_DROP_REASON = 130    # Cilium: reasons below are forwards/traces
LOCAL_PORTS_PER_ACTION = 8
LOCAL_PORT_BASE = flows.PROBE_PORTS[0]
LOCAL_PORT_SPAN = flows.PROBE_PORTS[1] + 1 - LOCAL_PORT_BASE


async def _uninterruptible(coro):
    """Await to the end even when the run is cancelled meanwhile (a signal during cleanup)."""
    fut = asyncio.ensure_future(coro)
    while True:
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.done():
                return fut.result()


def _scenario_names(t: TestDef) -> list[str]:
    """Scenario names as printed: a repeated scenario gets -1, -2… (cilium-cli does too)."""
    seen: dict[str, int] = {}
    out = []
    for sc in t.scenarios:
        n = seen.get(sc.name, 0)
        seen[sc.name] = n + 1
        out.append(sc.name if n == 0 else f"{sc.name}-{n}")
    return out


class SelectionError(ValueError):
    pass


def _compile(p: str, raw: str) -> re.Pattern:
    try:
        return re.compile(raw)
    except re.error as e:
        raise SelectionError(f"--test {p!r}: invalid regular expression: {e}") from None


def _parse(patterns: tuple[str, ...]):
    """(include?, test regex, scenario regex or None) per --test pattern; 'TEST/SCENARIO'
    targets scenarios as cilium-cli's --test does ('/pod-to-cidr': that scenario anywhere)."""
    out = []
    for p in patterns:
        include = not p.startswith("!")
        body = p if include else p[1:]
        test, slash, scen = body.partition("/")
        out.append((include, _compile(p, test), _compile(p, scen) if slash else None))
    return out


def select(names: list[str], patterns: tuple[str, ...]) -> set[str]:
    """cilium-cli's --test: run a test that matches any include (or there are none) and no
    exclude (a pattern with a leading '!'); an exclude naming a scenario drops only that."""
    parsed = _parse(patterns)
    inc = [t for i, t, _ in parsed if i]
    exc = [t for i, t, sc in parsed if not i and sc is None]
    return {n for n in names
            if (not inc or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc)}


def scenario_selected(test: str, scenario: str, patterns: tuple[str, ...]) -> bool:
    parsed = [(i, t, sc) for i, t, sc in _parse(patterns) if sc is not None and t.search(test)]
    inc = [sc for i, _, sc in parsed if i]
    if inc and not any(sc.search(scenario) for sc in inc):
        return False
    return not any(sc.search(scenario) for i, _, sc in parsed if not i)


@dataclass
class Params:
    namespace: str = "cilia-test"
    tests: tuple[str, ...] = ()
    connect_timeout: float = 2.0
    request_timeout: float = 5.0
    timeout: float = 60.0
    verbose: bool = False
    flow_validation: str | None = None    # None: strict when the API exists, else say skipped
    flow_wait: float = 3.0
    json_output: str | None = None
    junit_file: str | None = None
    force_deploy: bool = False
    single_node: bool = False
    print_flows: bool = False
    concurrency: int = 10


class Runner:
    def __init__(self, spec: LabSpec, params: Params, out: Output | None = None):
        self.spec = spec
        self.p = params
        self.out = out or Output(params.verbose)
        self.tracker = probes.ProcessTracker()
        self.deployment = Deployment(spec, params.namespace, params.timeout, self.out.line,
                                     self.tracker)
        self.flow_source: flows.AgentFlows | None = None
        self.flow_note: str | None = None
        self.flow_mode = "disabled"
        self.runs: list[TestRun] = []
        self._port_seq = 0
        self.interrupted = False
        self.started = time.time()

    # --- entry ---------------------------------------------------------------------------------

    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signame: str) -> None:
            if not self.interrupted:
                self.interrupted = True
                self.out.line(f"\n⚠️  {signame}: stopping; removing what the test deployed...")
                task.cancel()
            else:
                self.out.line("⚠️  cleanup in progress, please wait")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        try:
            return await self._run_all()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _run_all(self) -> int:
        tests = suite.build(WORLD_OTHER_IP)
        chosen = select([t.name for t in tests], self.p.tests)
        if not chosen:
            self.out.line(f"❌ no test matches --test {' '.join(self.p.tests)}")
            return 1
        self.out.line(f"ℹ️  Lab {self.spec.name}: {len(self.spec.nodes)} node(s), "
                      f"{self.spec.routing} routing")
        rc = 0
        metrics_before = None
        try:
            if "no-unexpected-packet-drops" in chosen:
                metrics_before = await asyncio.to_thread(self._drop_counters)
            env = await self.deployment.deploy(self.p.force_deploy, self.p.single_node)
            if not await self._setup_flows():
                return 1
            self.out.line("🏃 Running tests...")
            # A test whose every scenario --test deselects is skipped like an unselected one.
            chosen = {t.name for t in tests if t.name in chosen and (
                not t.scenarios or any(scenario_selected(t.name, n, self.p.tests)
                                       for n in _scenario_names(t)))}
            selected = [t for t in tests if t.name in chosen]
            for t in tests:
                run = TestRun(t.name, 0, t.policies)
                self.runs.append(run)
                if t.name not in chosen:
                    run.skipped = "not selected by --test"
                    continue
                run.index = selected.index(t) + 1
                await self._run_test(run, t, env, len(selected), metrics_before)
        except asyncio.CancelledError:
            rc = 130
        except (DeployError, KVStoreError) as e:
            self.out.line(f"❌ {e}" if isinstance(e, DeployError)
                          else f"❌ cluster store unreachable: {e}")
            rc = 1
        finally:
            self.out.end_dots()
            if self.p.verbose or self.interrupted:
                self.out.line(f"🔥 [{self.spec.name}] Deleting connectivity check deployments...")
            problems = await _uninterruptible(asyncio.to_thread(self.deployment.cleanup))
            for pr in problems:
                self.out.line(f"⚠️  cleanup: {pr}")
            if problems and rc == 0:
                rc = 1
        if self.interrupted:
            self.out.line("❌ interrupted: connectivity test did not finish")
            rc = 130
        elif self.runs and not summary(self.runs, self.out, self.flow_note):
            rc = 1
        if self.p.junit_file and self.runs:
            write_junit(self.p.junit_file, self.runs, list(self.p.tests), self.started)
        if self.p.json_output:
            write_json(self.p.json_output, to_json(self.runs, self.spec.name, self.p.namespace,
                                                   self.flow_note or self.flow_mode,
                                                   self.interrupted))
        return rc

    # --- flows ---------------------------------------------------------------------------------

    async def _setup_flows(self) -> bool:
        mode = self.p.flow_validation
        if mode == "disabled":
            self.flow_note = "disabled (--flow-validation=disabled)"
            return True
        source = flows.AgentFlows(self.spec.name, {n.name: paths.agent_socket(self.spec.name, n.name)
                                   for n in self.spec.nodes})
        try:
            await asyncio.to_thread(source.check)
        except flows.FlowAPIUnavailable as e:
            if mode == "strict":
                self.out.line(f"❌ --flow-validation=strict, but the flow API is unavailable: {e}")
                return False
            self.flow_note = f"skipped: flow API unavailable ({e})"
            self.out.line(f"ℹ️  Flow validation {self.flow_note}")
            return True
        self.flow_source = source
        self.flow_mode = mode or "strict"
        self.out.line(f"🔭 Flow validation ({self.flow_mode}): observe API on "
                      f"{', '.join(n.name for n in self.spec.nodes)}")
        return True

    # --- one test ------------------------------------------------------------------------------

    def _ports(self) -> tuple[int, int]:
        lo = LOCAL_PORT_BASE + (self._port_seq * LOCAL_PORTS_PER_ACTION) % LOCAL_PORT_SPAN
        self._port_seq += 1
        return lo, lo + LOCAL_PORTS_PER_ACTION - 1

    def _actions(self, run: TestRun, t: TestDef, env: Environment) -> list[tuple[str, list[Action]]]:
        out: list[tuple[str, list[Action]]] = []
        for sc, name in zip(t.scenarios, _scenario_names(t)):
            why = sc.unsupported(env)
            if why is None and not scenario_selected(t.name, name, self.p.tests):
                why = "not selected by --test"
            if why:
                run.scenarios_skipped.append((name, why))
                continue
            acts = []
            for spec in sc.build(env):
                eg, ing = t.expect(spec)
                acts.append(Action(t.name, name, spec, eg, ing,
                                   local_ports=self._ports() if spec.probe == "curl" else (0, 0)))
            out.append((name, acts))
        return out

    async def _run_test(self, run: TestRun, t: TestDef, env: Environment, total: int,
                        metrics_before) -> None:
        self.out.line(f"[=] Test [{t.name}] [{run.index}/{total}]")
        started = time.monotonic()
        if t.special == "drops":
            self._check_drops(run, env, metrics_before)
            self._finish(run, [("no-unexpected-packet-drops", run.actions)], started)
            return
        groups = self._actions(run, t, env)
        run.actions = [a for _, acts in groups for a in acts]
        run.scenarios = [g for g, _ in groups]
        if not run.actions:
            run.skipped = "every scenario skipped: " + "; ".join(
                f"{n}: {w}" for n, w in run.scenarios_skipped)
            self.out.line(f"[=] Skipping Test [{t.name}] ({run.skipped})")
            return
        policy_text = "---\n".join(
            manifests.render_policy(p, {"NS": self.p.namespace,
                                        "EXTERNAL_CIDR": f"{env.external_ip.rsplit('.', 1)[0]}.0/24",
                                        "EXTERNAL_OTHER_IP": env.external_other_ip})
            for p in t.policies)
        if policy_text:
            for p in t.policies:
                run.log.append(f"  ℹ️  📜 Applying CiliumNetworkPolicy '{p}' to namespace "
                               f"'{self.p.namespace}'..")
            try:
                rev = await self.deployment.apply_policies(policy_text)
                run.log.append(f"  ℹ️  policy revision {rev} enforced on every node")
                run.pre_lines = len(run.log)
            except DeployError as e:
                run.failed = True
                run.errors.append(f"applying policies: {e}")
                run.log.append(f"  ❌ applying policies: {e}")
                await self._delete_policies(run, policy_text)
                self._finish(run, groups, started)
                return
        since = time.time() - 0.05
        lost_before = await self._lost_events()
        sem = asyncio.Semaphore(self.p.concurrency)
        await asyncio.gather(*(self._run_action(a, sem) for a in run.actions))
        await self._validate_flows(run, since, env, lost_before)
        if policy_text:
            await self._delete_policies(run, policy_text)
        self._finish(run, groups, started)

    async def _delete_policies(self, run: TestRun, text: str) -> None:
        for p in run.policies:
            run.log.append(f"  ℹ️  📜 Deleting CiliumNetworkPolicy '{p}' from namespace "
                           f"'{self.p.namespace}'..")
        try:
            await self.deployment.delete_policies(text)
        except DeployError as e:
            run.failed = True
            run.errors.append(f"deleting policies: {e}")

    def _finish(self, run: TestRun, groups, started: float) -> None:
        run.duration = time.monotonic() - started
        run.failed = run.failed or any(a.failed for a in run.actions)
        self.out.end_dots()
        if run.failed or self.p.verbose:
            pre = run.pre_lines if run.pre_lines is not None else len(run.policies)
            lines = list(run.log[:pre])
            for name, acts in groups:
                lines.append(f"  [-] Scenario [{run.name}/{name}]")
                for a in acts:
                    lines.append(f"  [.] Action [{a}]")
                    lines += [f"  {line}" for line in a.log]
            lines += run.log[pre:]
            for n, why in run.scenarios_skipped:
                lines.append(f"  [-] Skipping Scenario [{run.name}/{n}] ({why})")
            for line in lines:
                self.out.line(line)

    # --- one action ----------------------------------------------------------------------------

    async def _run_action(self, a: Action, sem: asyncio.Semaphore) -> None:
        async with sem:
            a.started = time.time()
            if a.spec.probe == "curl":
                r = await probes.curl(self.tracker, a.src.netns, a.dst.address, a.dst.port,
                                      a.local_ports, self.p.connect_timeout,
                                      self.p.request_timeout)
            else:
                r = await probes.ping(self.tracker, a.src.netns, a.dst.address,
                                      self.p.connect_timeout)
        a.exit_code = r.exit_code
        a.output = r.stdout
        self._check_probe(a, r)
        self.out.dot()

    def _fail(self, a: Action, msg: str) -> None:
        a.failed = True
        a.log.append(f"❌ {msg}")

    def _check_probe(self, a: Action, r: probes.ProbeResult) -> None:
        want = a.expected_exit()
        err = f" ({r.stderr})" if r.stderr else ""
        if r.exit_code != 0:
            if want == 0:
                self._fail(a, f'command "{r.command}" failed: exit code {r.exit_code}{err}')
            elif want == ANY_ERROR or r.exit_code == want:
                a.log.append(f'ℹ️  command "{r.command}" failed as expected: exit code {r.exit_code}{err}')
            else:
                self._fail(a, f'command "{r.command}" failed with unexpected exit code '
                              f'{r.exit_code} (expected {want}){err}')
            return
        if want != 0:
            self._fail(a, f'command "{r.command}" succeeded while it should have failed: '
                          f'{r.stdout.strip()[:200]}')
            return
        if a.spec.probe != "curl":
            return
        expected = self._answerers(a.dst)
        got = r.answered_by
        if expected is not None and got not in expected:
            self._fail(a, f"answered by {got!r}, expected {' or '.join(sorted(expected))}: "
                          f"{r.stdout.strip()[:200]}")
        elif self.p.verbose and r.body:
            a.log.append(f"ℹ️  answered by {got} (client seen as {r.body.get('client')})")

    def _answerers(self, dst: Peer) -> set[str] | None:
        if dst.kind == "pod":
            return {dst.name.rsplit("/", 1)[-1]}
        if dst.kind in ("service", "nodeport"):
            return set(dst.backends)
        if dst.kind == "external" and dst.port in self.deployment.world_ports:
            return {"world"}
        return None

    # --- flows per test ------------------------------------------------------------------------

    async def _lost_events(self) -> dict[str, int]:
        if self.flow_source is None:
            return {}
        try:
            return await asyncio.to_thread(self.flow_source.lost_events)
        except flows.FlowAPIUnavailable:
            return {}

    async def _validate_flows(self, run: TestRun, since: float, env: Environment,
                              lost_before: dict[str, int]) -> None:
        if self.flow_source is None:
            for a in run.actions:
                a.flow_status = self.flow_note or "skipped"
                if self.p.verbose:
                    a.log.append(f"ℹ️  flows: {a.flow_status}")
            return
        node_ips = [n.address for n in env.nodes]
        try:
            outcomes = await flows.wait_and_evaluate(self.flow_source, run.actions, since,
                                                     node_ips, self.p.flow_wait)
        except flows.FlowAPIUnavailable as e:
            for a in run.actions:
                a.flow_status = f"skipped: {e}"
            if self.flow_mode == "strict":
                run.failed = True
                run.errors.append(f"flow validation: {e}")
            return
        lost_after = await self._lost_events()
        lost = {n: lost_after.get(n, 0) - c for n, c in lost_before.items()
                if lost_after.get(n, 0) > c}
        for a in run.actions:
            o = outcomes[id(a)]
            a.flow_status = "ok" if o.ok else "failed"
            if not o.ok and lost:
                # The agent said it missed events meanwhile: a missing flow proves nothing.
                why = ", ".join(f"{n} lost {k} events" for n, k in sorted(lost.items()))
                a.flow_status = f"inconclusive: {why}"
                a.log += [f"⚠️  {line}" for line in o.lines]
                a.log.append(f"⚠️  flow validation inconclusive: {why} during this test")
            elif not o.ok:
                if self.flow_mode == "strict":
                    a.failed = True
                    a.log += o.lines
                else:
                    a.log += [f"⚠️  {line}" for line in o.lines]
            elif self.p.verbose:
                a.log += o.lines
            if not o.ok or self.p.print_flows:
                if o.flows:
                    a.log.append(f"📄 Flow logs for {a.name}:")
                    a.log += [flows.format_flow(i, f, o.matched) for i, f in enumerate(o.flows)]
                else:
                    a.log.append(f"📄 No flows recorded for {a.name}")

    # --- no-unexpected-packet-drops ------------------------------------------------------------

    def _drop_counters(self) -> dict[str, dict[tuple, int]] | dict[str, str]:
        out: dict = {}
        for n in self.spec.nodes:
            try:
                rows = AgentClient(paths.agent_socket(self.spec.name, n.name), timeout=10).get(
                    "/v1/bpf/metrics")
            except (AgentUnreachable, APIError) as e:
                out[n.name] = str(e)
                continue
            counts: dict[tuple, int] = {}
            for m in rows or []:
                if int(m.get("reason", 0)) >= FIRST_DROP_REASON:
                    k = (m.get("reason_name") or str(m["reason"]), m.get("direction", ""))
                    counts[k] = counts.get(k, 0) + int(m.get("packets", 0))
            out[n.name] = counts
        return out

    def _check_drops(self, run: TestRun, env: Environment, before) -> None:
        after = self._drop_counters()
        for node in env.nodes:
            peer = node
            a = Action(run.name, "no-unexpected-packet-drops",
                       ActionSpec(f"drops-on-{node.name}", peer, peer, "metrics"), NONE, NONE)
            a.flow_status = "n/a"
            run.actions.append(a)
            b, c = (before or {}).get(node.name, {}), after.get(node.name, {})
            if isinstance(b, str) or isinstance(c, str):
                self._fail(a, f"cannot read drop counters on {node.name}: {b if isinstance(b, str) else c}")
                self.out.dot()
                continue
            for (reason, direction), n in sorted(c.items()):
                delta = n - b.get((reason, direction), 0)
                if delta <= 0:
                    continue
                line = f"{delta} packets dropped on {node.name} ({direction.lower()}): {reason}"
                if reason in EXPECTED_DROP_REASONS:
                    a.log.append(f"ℹ️  expected: {line}")
                else:
                    self._fail(a, f"unexpected drops: {line}")
            self.out.dot()

