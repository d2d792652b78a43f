"""Policy commands: `policy get|explain|wait`, `bpf policy get`, `endpoint config`,
`config view|set` (the cluster-wide agent settings, as cilium-cli's `config`)."""
from __future__ import annotations

import concurrent.futures
import json
import sys
import time

import click

from cilia.api.client import AgentUnreachable, APIError
from cilia.cli.context import CLIError, agent, agent_get, cluster, emit_json, lab_spec, node_name
from cilia.k8s.printers import render_columns

CONFIG_KEYS = {"enable-policy": ("default", "always", "never"),
               "policy-audit-mode": ("true", "false")}


def _realized(spec, node: str, revision: int) -> tuple[bool, str]:
    try:
        r = agent(spec, node, timeout=10).get(f"/v1/policy/realized?revision={revision}")
        return bool(r.get("realized")), f"revision {r.get('revision')}"
    except (AgentUnreachable, APIError) as e:
        return False, str(e)


def wait_revision(spec, revision: int, timeout: float) -> None:
    """Until every node enforces `revision`. Two consecutive rounds must pass: a node that
    was current before a peer published a relabelled pod is asked again after it."""
    nodes = [n.name for n in spec.nodes]
    deadline = time.monotonic() + timeout
    passes = 0
    last: dict[str, str] = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, len(nodes))) as pool:
        while True:
            got = dict(zip(nodes, pool.map(lambda n: _realized(spec, n, revision), nodes)))
            ok = all(r for r, _ in got.values())
            last = {n: why for n, (r, why) in got.items() if not r}
            passes = passes + 1 if ok else 0
            if passes >= 2:
                return
            if time.monotonic() > deadline:
                raise CLIError(f"timed out after {timeout:g}s waiting for policy revision {revision}: "
                               + ", ".join(f"{n} at {w}" for n, w in sorted(last.items())))
            time.sleep(0.05 if ok else 0.1)


@click.group("policy", help="Network policy: what is enforced and why.")
def policy() -> None:
    pass


@policy.command("get", help="The policies the agent enforces and its realized revision.")
@click.option("--node", default=None)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def policy_get(ctx, node, output) -> None:
    spec = lab_spec(ctx)
    data = agent_get(spec, node_name(spec, node), "/v1/policy")
    if output == "json":
        emit_json(data)
        return
    click.echo(json.dumps(data["items"], indent=2))
    click.echo(f"Revision: {data['revision']}")


@policy.command("wait", help="Wait until every node enforces policy revision REVISION.")
@click.argument("revision", type=int)
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.pass_context
def policy_wait(ctx, revision, timeout) -> None:
    spec = lab_spec(ctx)
    wait_revision(spec, revision, timeout)
    click.echo(f"policy revision {revision} enforced on {len(spec.nodes)}/{len(spec.nodes)} nodes")


def _pod_node(cl, ref: str) -> str | None:
    if "/" not in ref:
        return None
    ns, name = ref.split("/", 1)
    pod = cl.get("Pod", ns, name)
    if pod is None:
        raise CLIError(f"pod {ref} not found")
    return (pod.get("spec") or {}).get("nodeName")


def _explain_node(spec, cl, q: dict) -> str:
    """Ask the node that enforces the decisive side: the destination pod's (ingress) and
    else the source pod's; both see every policy and identity."""
    for ref in (q.get("to"), q.get("from")):
        n = _pod_node(cl, str(ref or ""))
        if n:
            return n
    return spec.nodes[0].name


def _query(src: str, dst: str, port: int, protocol: str) -> dict:
    return {"from": src, "to": dst, "port": port, "protocol": protocol.upper()}


def _print_verdict(r: dict) -> None:
    q = r["query"]
    click.echo(f"{q['from']} -> {q['to']}:{q['port']}/{q['protocol']}: {r['verdict']}")
    click.echo(f"  reason: {r['reason']}")
    for d in ("egress", "ingress"):
        dv = r.get(d)
        if dv is None:
            continue
        click.echo(f"  {d}: {dv['result']} ({'enforced' if dv['enforced'] else 'not enforced'})"
                   f" - {dv['reason']}")
        for a in dv["allowed_by"]:
            click.echo(f"    allowed by {a['kind']} {a['namespace'] + '/' if a['namespace'] else ''}{a['name']}")
        for a in dv["denied_by"]:
            click.echo(f"    denied by {a['kind']} {a['namespace'] + '/' if a['namespace'] else ''}{a['name']}")


@policy.command("explain", help="Would this connection pass policy? Which rules decide it?")
@click.option("--from", "src", default=None, help="NAMESPACE/POD or IP")
@click.option("--to", "dst", default=None, help="NAMESPACE/POD or IP")
@click.option("--port", type=int, default=0)
@click.option("--protocol", default="TCP", show_default=True)
@click.option("--batch", default=None, help="JSON lines of {from,to,port,protocol} (- for stdin)")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def policy_explain(ctx, src, dst, port, protocol, batch, output) -> None:
    if batch:
        text = sys.stdin.read() if batch == "-" else open(batch).read()
        try:
            queries = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise CLIError(f"{batch}: not JSON lines: {e}") from None
    else:
        if not src or not dst:
            raise CLIError("--from and --to are required (or --batch)")
        queries = [_query(src, dst, port, protocol)]
    spec, cl = cluster(ctx)
    try:
        by_node: dict[str, list[tuple[int, dict]]] = {}
        for i, q in enumerate(queries):
            by_node.setdefault(_explain_node(spec, cl, q), []).append((i, q))
    finally:
        cl.close()
    results: list[dict | None] = [None] * len(queries)
    for node, items in by_node.items():
        try:
            got = agent(spec, node, timeout=60).post("/v1/policy/explain", [q for _, q in items])
        except (AgentUnreachable, APIError) as e:
            raise CLIError(f"node {node}: {e}") from None
        for (i, _), r in zip(items, got):
            results[i] = dict(r, node=node)
    errors = [r for r in results if r and "error" in r]
    if output == "json":
        if batch:
            for r in results:
                click.echo(json.dumps(r))
        else:
            emit_json(results[0])
    else:
        for r in results:
            if "error" in r:
                click.echo(f"error: {r['error']}", err=True)
            else:
                _print_verdict(r)
    if errors and not batch:
        raise CLIError(errors[0]["error"])


def policy_rows(entries: list[dict]) -> list[list[str]]:
    rows = [["POLICY", "DIRECTION", "IDENTITY", "PORT/PROTO", "PROXY PORT", "AUTH TYPE", "BYTES",
             "PACKETS", "PREFIX", "COOKIE"]]
    for e in entries:
        lo, hi = e["port_range"]
        port = "ANY" if e["prefix_len"] == 0 else (str(lo) if lo == hi else f"{lo}-{hi}")
        rows.append(["Deny" if e["verdict"] == "deny" else "Allow", e["direction"].capitalize(),
                     "ANY" if e["identity"] == 0 else str(e["identity"]),
                     f"{port}/{e['protocol']}", "NONE", "disabled", "0", "0",
                     str(e["prefix_len"]), str(e["cookie"])])
    return rows


def add_bpf_policy(bpf: click.Group) -> None:
    @bpf.group("policy", help="The policy map of an endpoint.")
    def bpf_policy() -> None:
        pass

    @bpf_policy.command("get")
    @click.argument("endpoint", type=int, required=False)
    @click.option("--all", "all_", is_flag=True, help="Every endpoint of the node.")
    @click.option("--node", default=None)
    @click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
    @click.pass_context
    def bpf_policy_get(ctx, endpoint, all_, node, output) -> None:
        if endpoint is None and not all_:
            raise CLIError("missing endpoint ID (or --all)")
        spec = lab_spec(ctx)
        path = "/v1/bpf/policy" + ("" if all_ else f"?ep={endpoint}")
        data = agent_get(spec, node_name(spec, node), path)
        if output == "json":
            emit_json(data)
        else:
            click.echo(render_columns(policy_rows(data)), nl=False)


def add_endpoint_config(endpoint: click.Group) -> None:
    @endpoint.command("config", help="Set an endpoint option: PolicyAuditMode=Enabled|Disabled.")
    @click.argument("endpoint_id", type=int)
    @click.argument("options", nargs=-1, required=True)
    @click.option("--node", default=None)
    @click.pass_context
    def endpoint_config(ctx, endpoint_id, options, node) -> None:
        body = {}
        for opt in options:
            k, sep, v = opt.partition("=")
            if not sep:
                raise CLIError(f"option {opt!r}: want KEY=VALUE")
            body[k] = v
        spec = lab_spec(ctx)
        n = node_name(spec, node)
        try:
            agent(spec, n).request("PATCH", f"/v1/endpoint/{endpoint_id}/config", body)
        except (AgentUnreachable, APIError) as e:
            raise CLIError(f"node {n}: {e}") from None
        click.echo(f"Endpoint {endpoint_id} configuration updated successfully")


@click.group("config", help="Cluster-wide agent settings (enable-policy, policy-audit-mode).")
def config() -> None:
    pass


def _config_store(ctx):
    from cilia.agent.policy_sync import CONFIG_KEY
    spec, cl = cluster(ctx)
    return cl, CONFIG_KEY


@config.command("view")
@click.pass_context
def config_view(ctx) -> None:
    from cilia.agent.policy_sync import parse_config
    cl, key = _config_store(ctx)
    try:
        kv = cl.store.get(key)
    finally:
        cl.close()
    cfg = parse_config(kv.value if kv else None)
    for k in sorted(cfg):
        v = cfg[k]
        click.echo(f"{k:<40}{str(v).lower() if isinstance(v, bool) else v}")


@config.command("set")
@click.argument("key")
@click.argument("value")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Return once every agent runs with it.")
@click.option("--timeout", type=float, default=60.0)
@click.pass_context
def config_set(ctx, key, value, wait, timeout) -> None:
    if key not in CONFIG_KEYS:
        raise CLIError(f"config key {key!r}: unknown (known: {', '.join(CONFIG_KEYS)})")
    if value.lower() not in CONFIG_KEYS[key]:
        raise CLIError(f"config {key}: value {value!r} not one of {', '.join(CONFIG_KEYS[key])}")
    cl, ckey = _config_store(ctx)
    try:
        kv = cl.store.get(ckey)
        cur = json.loads(kv.value) if kv else {}
        cur[key] = value.lower()
        rev = cl.store.put(ckey, json.dumps(cur, sort_keys=True).encode())
    finally:
        cl.close()
    click.echo(f"✨ Patching ConfigMap cilium-config with {key}={value.lower()}...")
    if wait:
        wait_revision(lab_spec(ctx), rev, timeout)
