"""Node- and cluster-level views in Cilium's shapes: status, endpoint list, bpf … list."""
from __future__ import annotations

import concurrent.futures
import time

import click

from cilia.api.client import AgentUnreachable, APIError
from cilia.cli.context import CLIError, agent, agent_get, cluster, emit_json, lab_spec, node_name
from cilia.k8s.printers import render_columns

LOGO = [
    "    /¯¯\\",
    " /¯¯\\__/¯¯\\",
    " \\__/¯¯\\__/",
    " /¯¯\\__/¯¯\\",
    " \\__/¯¯\\__/",
    "    \\__/",
]

node_option = click.option("--node", default=None, help="Lab node (default: the first node).")
output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")


def _all_status(spec) -> dict[str, dict | str]:
    """Every agent's /v1/status in parallel; an unreachable agent maps to its error."""
    def one(node: str):
        try:
            return agent(spec, node, timeout=5).get("/v1/status")
        except (AgentUnreachable, APIError, OSError) as e:
            return str(e)

    names = [n.name for n in spec.nodes]
    with concurrent.futures.ThreadPoolExecutor(max(1, len(names))) as ex:
        return dict(zip(names, ex.map(one, names)))


def _all_endpoints(spec) -> dict[str, list]:
    def one(node: str):
        try:
            return agent(spec, node, timeout=5).get("/v1/endpoint")
        except (AgentUnreachable, APIError, OSError):
            return []

    names = [n.name for n in spec.nodes]
    with concurrent.futures.ThreadPoolExecutor(max(1, len(names))) as ex:
        return dict(zip(names, ex.map(one, names)))


def cluster_status(ctx) -> dict:
    spec, cl = cluster(ctx)
    operator = "unknown"
    try:
        pods = [p for p in cl.list("Pod") if not p["metadata"].get("deletionTimestamp")]
        store_rev = cl.store.revision()
        store_ok, store_err = True, None
        op = cl.store.get("/cilia/operator/v1/status")
        # The key lives on the operator's lease: present means alive.
        operator = "OK" if op is not None else "not running"
    except Exception as e:  # the store being down is a status to report, not a crash
        pods, store_rev, store_ok, store_err = [], None, False, str(e)
    finally:
        cl.close()
    statuses = _all_status(spec)
    eps = _all_endpoints(spec)
    managed_ips = {a["ipv4"] for lst in eps.values() for e in lst
                   for a in e["status"]["networking"]["addressing"]}
    with_ip = [p for p in pods if (p.get("status") or {}).get("podIP")]
    managed = [p for p in with_ip if p["status"]["podIP"] in managed_ips]
    errors, warnings = [], []
    for n, st in statuses.items():
        if isinstance(st, str):
            errors.append(f"cilia-agent on {n}: {st}")
        elif not st.get("store", {}).get("ok", True):
            warnings.append(f"cilia-agent on {n}: store unreachable: {st['store'].get('error')}")
        if isinstance(st, dict) and (st.get("hubble") or {}).get("lost_events"):
            warnings.append(f"cilia-agent on {n}: {st['hubble']['lost_events']} datapath events lost "
                            "(ring buffer full; flows are missing)")
    if not store_ok:
        errors.append(f"store: {store_err}")
    elif operator != "OK":
        warnings.append("cilia-operator is not running: new nodes get no pod CIDR")
    for p in with_ip:
        if p not in managed:
            warnings.append(f"pod {p['metadata']['namespace']}/{p['metadata']['name']} "
                            f"({p['status']['podIP']}) has no cilia endpoint")
    ready = sum(1 for s in statuses.values() if isinstance(s, dict))
    return {
        "lab": spec.name,
        "installed": type(spec).__name__ == "InstalledSpec",
        "routing": spec.routing,
        "store": {"backend": "sqlite" if spec.store == "local" else "etcd", "ok": store_ok,
                  "revision": store_rev, "error": store_err},
        "cilia": {"desired": len(spec.nodes), "ready": ready, "available": ready},
        "operator": operator,
        "hubble_relay": _relay_state(spec.name),
        "cluster_mesh": "disabled",
        "pods": {"total": len(with_ip), "managed": len(managed)},
        "nodes": {n: (s if isinstance(s, dict) else {"error": s}) for n, s in statuses.items()},
        "errors": errors,
        "warnings": warnings,
    }


def _relay_state(lab: str) -> str:
    from cilia.paths import relay_file
    from cilia.lab import state
    from cilia.procs import ProcRef
    rec = state.read_json(relay_file(lab), None)
    if not rec:
        return "disabled"
    return "OK" if ProcRef.from_json(rec).alive() else "error (relay recorded but not running)"


def _hubble_line(h: dict) -> str:
    if not h or h.get("enabled") is False:
        return "Disabled"
    n, m = h.get("num_flows", 0), h.get("max_flows", 0) or 1
    line = (f"{'Ok' if not h.get('error') else 'Warning'}   Current/Max Flows: {n}/{m} "
            f"({100 * n / m:.2f}%), seen {h.get('seen_flows', 0)}, lost events {h.get('lost_events', 0)}")
    return line + (f"; {h['error']}" if h.get("error") else "")


def render_cluster_status(st: dict) -> str:
    c = st["cilia"]
    cilia_state = "OK" if c["ready"] == c["desired"] and not st["errors"] else "error"
    store = st["store"]
    comps = [
        ("Cilia", cilia_state),
        ("Operator", st["operator"]),
        ("Store", f"{'OK' if store['ok'] else 'unreachable'} ({store['backend']})"),
        ("Hubble Relay", st["hubble_relay"]),
        ("ClusterMesh", st["cluster_mesh"]),
    ]
    lines = []
    for i, art in enumerate(LOGO):
        row = art.ljust(15)
        if 1 <= i <= len(comps):
            k, v = comps[i - 1]
            row += f"{k + ':':<20}{v}"
        lines.append(row.rstrip())
    lines.append("")
    lines.append(f"{'DaemonSet':<23}{'cilia-agent':<19}Desired: {c['desired']}, "
                 f"Ready: {c['ready']}/{c['desired']}, Available: {c['available']}/{c['desired']}")
    lines.append(f"{'Containers:':<23}{'cilia-agent':<19}Running: {c['ready']}")
    lines.append(f"{'Cluster Pods:':<23}{st['pods']['managed']}/{st['pods']['total']} managed by Cilia")
    where = "Host:" if st.get("installed") else "Lab:"
    lines.append(f"{where:<23}{st['lab']} ({len(st['nodes'])} nodes, {st['routing']} routing, "
                 f"{store['backend']} store)")
    if st["errors"] or st["warnings"]:
        lines.append(f"{'Errors:':<23}" + (st["errors"][0] if st["errors"] else "none"))
        lines += [" " * 23 + e for e in st["errors"][1:]]
        lines.append(f"{'Warnings:':<23}" + (st["warnings"][0] if st["warnings"] else "none"))
        lines += [" " * 23 + w for w in st["warnings"][1:]]
    return "\n".join(lines)


def render_node_status(st: dict) -> str:
    ipam = st["ipam"]
    store = st.get("store") or {}
    kv = "Disabled" if store.get("backend") == "disabled" else (
        f"Ok   {store.get('backend')} (revision {store.get('revision')})" if store.get("ok")
        else f"Failure   {store.get('backend')}: {store.get('error')}")
    rows = [
        ("KVStore", kv),
        ("Kubernetes", "Disabled (lab store)"),
        ("Host firewall", "Disabled"),
        ("CNI Chaining", "none"),
        ("Cilia", f"Ok   {st['version']} (node {st['node']}, uptime {st['uptime_seconds']}s)"),
        ("NodeMonitor", "Disabled"),
        ("IPAM", f"IPv4: {ipam['allocated']}/{ipam['capacity']} allocated from {ipam['pod_cidr']}, "
                 f"router {ipam['router_ip']}"),
    ]
    lines = [f"{k + ':':<25}{v}" for k, v in rows]
    if ipam["addresses"]:
        lines.append("Allocated addresses:")
        for ip, owner in sorted(ipam["addresses"].items()):
            lines.append(f"  {ip} ({owner})")
    restore = st.get("restore") or {}
    rows = [
        ("Routing", f"Network: {'Tunnel [vxlan]' if st['routing'] == 'tunnel' else 'Native'}   "
                    f"Host: BPF (redirect_peer)"),
        ("Device MTU", f"{st['mtu']}"),
        ("Masquerading", f"BPF   [eth0]   {ipam['pod_cidr']} -> {st['node_ip']}"
                         if st.get("masquerade") else "Disabled"),
        ("KubeProxyReplacement", "True   [eth0 " + st["node_ip"] + "] (services: "
                                 f"{(st.get('services') or {}).get('frontends', 0)} frontends)"),
        ("Endpoints", f"{st['endpoints']} (regenerations: {st['regenerations']}, "
                      f"last: {st['last_regeneration_ms']} ms)"),
        ("Restored endpoints", f"{restore.get('restored', 0)} (removed {restore.get('removed', 0)}, "
                               f"stale map entries {restore.get('stale_map_entries', 0)})"),
        ("Datapath", f"{', '.join(st['datapath']['programs'])}; maps pinned at "
                     f"{st['datapath']['pin_dir']}"),
        ("Policy", _policy_line(st.get("policy") or {})),
        ("Hubble", _hubble_line(st.get("hubble") or {})),
        ("Encryption", "Disabled"),
    ]
    lines += [f"{k + ':':<25}{v}" for k, v in rows]
    return "\n".join(lines)


def _policy_line(p: dict) -> str:
    line = (f"enforcement {p.get('enforcement', 'default')}"
            f"{', audit mode' if p.get('audit') else ''}; {p.get('policies', 0)} policies, "
            f"{p.get('identities', 0)} cluster identities, realized revision {p.get('revision', 0)}")
    if p.get("errors"):
        line += f"; {len(p['errors'])} not enforced: " + "; ".join(
            f"{k.rsplit('/', 1)[-1]}: {v}" for k, v in sorted(p["errors"].items()))
    return line


@click.command("status")
@click.option("--verbose", is_flag=True, help="One node's agent in detail (cilium-dbg status).")
@click.option("--wait", is_flag=True, help="Wait until every component is ready (as cilium status --wait).")
@click.option("--wait-duration", type=float, default=300.0, show_default=True,
              help="Seconds --wait waits before giving up.")
@node_option
@output_option
@click.pass_context
def status(ctx, verbose: bool, wait: bool, wait_duration: float, node: str | None,
           output: str) -> None:
    if verbose or node:
        spec = lab_spec(ctx)
        st = agent_get(spec, node_name(spec, node), "/v1/status")
        emit_json(st) if output == "json" else click.echo(render_node_status(st))
        return
    st = cluster_status(ctx)
    deadline = time.monotonic() + wait_duration
    while wait and _not_ready(st) and time.monotonic() < deadline:
        time.sleep(1.0)
        st = cluster_status(ctx)
    emit_json(st) if output == "json" else click.echo(render_cluster_status(st))
    if st["errors"] or (wait and _not_ready(st)):
        ctx.exit(1)


def _not_ready(st: dict) -> bool:
    c = st["cilia"]
    unmanaged = st["pods"]["managed"] < st["pods"]["total"]
    return bool(st["errors"] or unmanaged or c["ready"] < c["desired"] or st["operator"] != "OK")


def node_listing(group: click.Group, api_path: str, render, name: str = "list",
                 help: str | None = None):
    """A `… list [--node N] [-o json]` command over one agent API path: JSON passes through,
    the table comes from render(data) -> rows (or a ready string)."""
    @group.command(name, help=help)
    @node_option
    @output_option
    @click.pass_context
    def command(ctx, node: str | None, output: str) -> None:
        spec = lab_spec(ctx)
        data = agent_get(spec, node_name(spec, node), api_path)
        if output == "json":
            emit_json(data)
            return
        out = render(data)
        click.echo(out if isinstance(out, str) else render_columns(out), nl=False)
    return command


@click.group("endpoint", help="Endpoints managed by a node's agent.")
def endpoint() -> None:
    pass


def endpoint_rows(eps: list[dict]) -> list[list[str]]:
    rows = [["ENDPOINT", "POLICY (ingress)", "POLICY (egress)", "IDENTITY",
             "LABELS (source:key[=value])", "IPv6", "IPv4", "STATUS"],
            ["", "ENFORCEMENT", "ENFORCEMENT", "", "", "", "", ""]]
    for e in eps:
        s = e["status"]
        labels = s["identity"]["labels"] or ["reserved:init"]
        ip4 = s["networking"]["addressing"][0].get("ipv4", "")
        pol = s.get("policy", {}).get("realized", {})
        rows.append([str(e["id"]), pol.get("ingress-enforcement", "Disabled"),
                     pol.get("egress-enforcement", "Disabled"), str(s["identity"]["id"]),
                     labels[0], "", ip4, s["state"]])
        for lab in labels[1:]:
            rows.append(["", "", "", "", lab, "", "", ""])
    return rows


node_listing(endpoint, "/v1/endpoint", endpoint_rows)


@click.group("bpf", help="Inspect a node's BPF maps.")
def bpf() -> None:
    pass


def bpf_endpoint_rows(entries: list[dict]) -> list[list[str]]:
    rows = [["IP ADDRESS", "LOCAL ENDPOINT INFO"]]
    for e in sorted(entries, key=lambda e: tuple(int(x) for x in e["ip4"].split("."))):
        rows.append([f"{e['ip4']}:0",
                     f"id={e['ep_id']:<5} sec_id={e['sec_id']:<6} flags=0x{e['flags']:04x} "
                     f"ifindex={e['ifindex']:<4} mac={e['mac'].upper()} "
                     f"nodemac={e['node_mac'].upper()}"])
    return rows


def metrics_rows(ms: list[dict]) -> list[list[str]]:
    rows = [["REASON", "DIRECTION", "PACKETS", "BYTES"]]
    for m in sorted(ms, key=lambda m: (m["reason"], m["direction"])):
        rows.append([m["reason_name"], m["direction"], str(m["packets"]), str(m["bytes"])])
    return rows


def ipcache_rows(entries: list[dict]) -> list[list[str]]:
    rows = [["IP PREFIX/ADDRESS", "IDENTITY"]]
    for e in sorted(entries, key=lambda e: _prefix_key(e["prefix"])):
        flags = "<none>" if not e.get("flags") else f"0x{e['flags']:x}"
        rows.append([e["prefix"], f"identity={e['identity']} encryptkey=0 "
                                  f"tunnelendpoint={e.get('tunnel_endpoint') or '0.0.0.0'} "
                                  f"flags={flags}"])
    return rows


def _prefix_key(prefix: str) -> tuple:
    ip, _, plen = prefix.partition("/")
    return (*(int(x) for x in ip.split(".")), int(plen or 32))


def format_nat(e: dict) -> str:
    """Cilium's `bpf nat list` line: PROTO DIR src -> dst XLATE_x addr:port ..."""
    proto = e.get("protocol") or {6: "TCP", 17: "UDP", 1: "ICMP"}.get(e.get("proto"), str(e.get("proto")))
    direction = str(e.get("direction", "OUT")).upper()
    xlate = e.get("xlate") or ("XLATE_SRC" if direction == "OUT" else "XLATE_DST")
    return (f"{proto} {direction} {e.get('saddr')}:{e.get('sport')} -> "
            f"{e.get('daddr')}:{e.get('dport')} {xlate} {e.get('to_addr')}:{e.get('to_port')} "
            f"Created={e.get('created', 0)}sec ago")


def nat_text(entries: list[dict]) -> str:
    return "".join(format_nat(e) + "\n" for e in entries)


for _name, _path, _render in (("endpoint", "/v1/bpf/endpoint", bpf_endpoint_rows),
                              ("metrics", "/v1/bpf/metrics", metrics_rows),
                              ("ipcache", "/v1/bpf/ipcache", ipcache_rows),
                              ("nat", "/v1/bpf/nat", nat_text)):
    node_listing(bpf.group(_name)(lambda: None), _path, _render)


@click.group("identity", help="Security identities (reserved and cluster-wide).")
def identity() -> None:
    pass


def _identities(ctx) -> list[dict]:
    from cilia.identity.allocator import ID_PREFIX, parse_id_kv
    from cilia.identity.reserved import reserved_identities
    _, cl = cluster(ctx)
    try:
        kvs, _ = cl.store.list(ID_PREFIX)
    finally:
        cl.close()
    out = [i.to_json() for i in reserved_identities()]
    for kv in kvs:
        ident = parse_id_kv(kv.key, kv.value)
        if ident is not None:
            out.append(ident.to_json())
    return sorted(out, key=lambda d: d["id"])


@identity.command("list")
@output_option
@click.pass_context
def identity_list(ctx, output: str) -> None:
    ids = _identities(ctx)
    if output == "json":
        emit_json(ids)
        return
    rows = [["ID", "LABELS"]]
    for d in ids:
        rows.append([str(d["id"]), d["labels"][0] if d["labels"] else ""])
        rows += [["", lab] for lab in d["labels"][1:]]
    click.echo(render_columns(rows), nl=False)


@identity.command("get")
@click.argument("ident", type=int)
@output_option
@click.pass_context
def identity_get(ctx, ident: int, output: str) -> None:
    found = [d for d in _identities(ctx) if d["id"] == ident]
    if not found:
        raise CLIError(f"identity {ident} not found")
    if output == "json":
        emit_json(found[0])
        return
    rows = [["ID", "LABELS"], [str(ident), found[0]["labels"][0] if found[0]["labels"] else ""]]
    rows += [["", lab] for lab in found[0]["labels"][1:]]
    click.echo(render_columns(rows), nl=False)
