"""kubectl-shaped commands: apply, delete, get, exec, wait."""
from __future__ import annotations

import os
import re
import sys
import time

import click

from cilia import netns
from cilia.cli.context import CLIError, cluster, emit_json
from cilia.k8s.errors import ManifestError
from cilia.k8s.loader import load_manifests
from cilia.k8s.printers import dump, no_resources_message, print_table, to_list
from cilia.k8s.registry import KINDS
from cilia.k8s.selectors import selector_matches


def _load(files: tuple[str, ...]) -> list[dict]:
    if not files:
        raise CLIError("must specify -f/--filename")
    try:
        return load_manifests(list(files))
    except ManifestError as e:
        raise CLIError(str(e)) from None


@click.command("apply")
@click.option("-f", "--filename", "files", multiple=True, help="File, directory or - for stdin.")
@click.option("--wait", is_flag=True, help="Return once every node enforces what changed "
              "(policies, pod and namespace labels).")
@click.option("--timeout", type=float, default=60.0, help="For --wait.")
@click.pass_context
def apply(ctx: click.Context, files: tuple[str, ...], wait: bool, timeout: float) -> None:
    from cilia.cluster import POLICY_KINDS, ApplyError
    objs = _load(files)
    spec, cl = cluster(ctx)
    try:
        changes = cl.apply(objs)
    except ApplyError as e:
        raise CLIError(f"{files[0] if len(files) == 1 else ','.join(files)}: {e}") from None
    finally:
        cl.close()
    for c in changes:
        click.echo(str(c))
    if any(c.kind in POLICY_KINDS and c.action != "unchanged" for c in changes):
        click.echo(f"Revision: {cl.revision}")
    if wait and cl.revision:
        _wait_policy(spec, cl.revision, timeout)


def _wait_policy(spec, revision: int, timeout: float) -> None:
    from cilia.cli.policy_cmd import wait_revision
    wait_revision(spec, revision, timeout)


@click.command("delete")
@click.argument("args", nargs=-1)
@click.option("-f", "--filename", "files", multiple=True)
@click.option("-n", "--namespace", default="default")
@click.option("--all", "all_", is_flag=True, help="Delete every object of the kind in the namespace.")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=float, default=60.0)
@click.pass_context
def delete(ctx, args, files, namespace, all_, wait, timeout) -> None:
    from cilia.cluster import ApplyError, display, kind_of
    spec, cl = cluster(ctx)
    try:
        targets: list[tuple[str, str | None, str]] = []
        if files:
            for o in _load(files):
                targets.append((o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]))
            # Namespaced objects first, so a namespace is not emptied behind our back.
            targets.sort(key=lambda t: t[0] == "Namespace")
        else:
            if not args:
                raise CLIError("resource(s) were provided, but no name was specified")
            kind = kind_of(args[0])
            names = list(args[1:])
            if all_:
                names = [o["metadata"]["name"] for o in cl.list(kind, namespace)]
            if not names:
                raise CLIError("resource(s) were provided, but no name was specified")
            ns = None if not KINDS[kind].namespaced else namespace
            targets = [(kind, ns, n) for n in names]
        pending = []
        for kind, ns, name in targets:
            try:
                pending += cl.delete(kind, ns, name)
            except ApplyError as e:
                if files and "NotFound" in str(e):
                    click.echo(str(e), err=True)
                    continue
                raise
            click.echo(f'{display(kind)} "{name}" deleted')
        if wait and pending:
            left = cl.wait_gone(pending, timeout)
            if left:
                raise CLIError(f"timed out waiting for deletion of "
                               f"{', '.join(f'{a}/{b}' for a, b in left)}")
    except ApplyError as e:
        raise CLIError(str(e)) from None
    finally:
        cl.close()
    if wait and cl.revision:
        _wait_policy(spec, cl.revision, timeout)


_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def parse_selector(text: str) -> dict:
    """kubectl's -l syntax (a=b, a==b, a!=b, a, !a, a in (x,y), a notin (x)) as a
    LabelSelector, so matching goes through the same code as manifests' selectors."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    labels: dict[str, str] = {}
    exprs: list[dict] = []
    for p in (x.strip() for x in parts):
        if not p:
            raise ValueError("empty requirement")
        m = _SET_RE.match(p)
        if m:
            vals = [v.strip() for v in m.group(3).split(",") if v.strip()]
            exprs.append({"key": m.group(1), "operator": "In" if m.group(2) == "in" else "NotIn",
                          "values": vals})
        elif "!=" in p:
            k, v = p.split("!=", 1)
            exprs.append({"key": k.strip(), "operator": "NotIn", "values": [v.strip()]})
        elif "=" in p:
            k, v = p.split("==", 1) if "==" in p else p.split("=", 1)
            labels[k.strip()] = v.strip()
        elif p.startswith("!"):
            exprs.append({"key": p[1:].strip(), "operator": "DoesNotExist"})
        else:
            exprs.append({"key": p, "operator": "Exists"})
    return {"matchLabels": labels, "matchExpressions": exprs}


def _filter_labels(objs: list[dict], selector: str | None) -> list[dict]:
    if not selector:
        return objs
    try:
        sel = parse_selector(selector)
    except ValueError as e:
        raise CLIError(f"-l {selector}: {e}") from None
    return [o for o in objs if selector_matches(sel, o["metadata"].get("labels") or {})]


@click.command("get")
@click.argument("resource")
@click.argument("names", nargs=-1)
@click.option("-n", "--namespace", default="default")
@click.option("-A", "--all-namespaces", "all_ns", is_flag=True)
@click.option("-o", "--output", type=click.Choice(["wide", "json", "yaml"]), default=None)
@click.option("-l", "--selector", default=None)
@click.pass_context
def get(ctx, resource, names, namespace, all_ns, output, selector) -> None:
    """kubectl get; RESOURCE may be a comma list (pods,services), and `policies` means every
    policy kind (NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)."""
    from cilia.cluster import POLICY_KINDS, ApplyError, display, kind_of
    words = [w for w in resource.split(",") if w]
    try:
        kinds = [k for w in words for k in (POLICY_KINDS if w == "policies" else (kind_of(w),))]
    except ApplyError as e:
        raise CLIError(str(e)) from None
    if names and len(kinds) > 1:
        raise CLIError("you must specify only one resource type when naming objects")
    _, cl = cluster(ctx)
    try:
        listed = []
        for kind in kinds:
            spec = KINDS[kind]
            listed.append((kind, cl.list(kind, None if (all_ns or not spec.namespaced) else namespace)))
    finally:
        cl.close()
    tables, items = [], []
    for kind, objs in listed:
        spec = KINDS[kind]
        objs = _filter_labels(objs, selector)
        if names:
            found = {o["metadata"]["name"]: o for o in objs}
            missing = [n for n in names if n not in found]
            if missing:
                raise CLIError(f'Error from server (NotFound): {spec.plural} "{missing[0]}" not found')
            objs = [found[n] for n in names]
        for o in objs:
            o.setdefault("apiVersion", spec.api_versions[0])
            o.setdefault("kind", kind)
        items += objs
        if objs and output not in ("json", "yaml"):
            # kubectl names each row kind/name when several kinds are shown
            tables.append(print_table(kind, objs, wide=output == "wide", all_namespaces=all_ns,
                                      name_prefix=f"{display(kind)}/" if len(kinds) > 1 else ""))
    if output in ("json", "yaml"):
        body = items[0] if len(names) == 1 else to_list(items)
        click.echo(dump(body, output), nl=False)
        return
    if not items:
        click.echo(no_resources_message(namespace, all_ns, any(KINDS[k].namespaced for k in kinds)),
                   err=True)
        return
    click.echo("\n".join(tables), nl=False)


@click.command("exec", context_settings={"ignore_unknown_options": True,
                                         "allow_interspersed_args": False})
@click.option("-n", "--namespace", default="default")
@click.option("-c", "--container", default=None, help="Accepted for kubectl compatibility.")
@click.option("-i", "--stdin", is_flag=True, help="Accepted for kubectl compatibility.")
@click.option("-t", "--tty", is_flag=True, help="Accepted for kubectl compatibility.")
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(ctx, namespace, container, stdin, tty, pod, command) -> None:
    """Run COMMAND inside POD's network namespace; its output and exit code pass through."""
    spec, cl = cluster(ctx)
    try:
        obj = cl.get("Pod", namespace, pod)
    finally:
        cl.close()
    if obj is None:
        raise CLIError(f'Error from server (NotFound): pods "{pod}" not found')
    if (obj.get("status") or {}).get("phase") != "Running":
        raise CLIError(f"pod {namespace}/{pod} is not running "
                       f"(phase {(obj.get('status') or {}).get('phase', 'Pending')})")
    ns_name = spec.pod_netns(namespace, pod)
    if not netns.exists(ns_name):
        raise CLIError(f"pod {namespace}/{pod}: network namespace {ns_name} is gone")
    command = tuple(command[1:]) if command and command[0] == "--" else tuple(command)
    if not command:
        raise CLIError("a command is required after --")
    argv = netns.nsenter_argv(ns_name, list(command))
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def _parse_timeout(s: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", s)
    if not m:
        raise CLIError(f"--timeout {s}: invalid duration")
    mult = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * mult


@click.command("wait")
@click.argument("targets", nargs=-1)
@click.option("--for", "for_", default="condition=Ready", show_default=True,
              help="condition=Ready or delete")
@click.option("-n", "--namespace", default="default")
@click.option("-A", "--all-namespaces", "all_ns", is_flag=True)
@click.option("--all", "all_", is_flag=True)
@click.option("-l", "--selector", default=None)
@click.option("--timeout", default="60s", show_default=True)
@click.pass_context
def wait(ctx, targets, for_, namespace, all_ns, all_, selector, timeout) -> None:
    """Wait for pods: `cilia wait --for=condition=Ready pod/NAME` or `pods --all`."""
    from cilia.cluster import ApplyError, kind_of, pod_ready
    limit = _parse_timeout(timeout)
    names: list[str] = []
    kind = "Pod"
    for t in targets:
        if "/" in t:
            k, n = t.split("/", 1)
            names.append(n)
        else:
            k = t
        try:
            kind = kind_of(k)
        except ApplyError as e:
            raise CLIError(str(e)) from None
        if kind != "Pod":
            raise CLIError(f"wait supports pods only, got {k}")
    if not names and not all_ and not selector:
        raise CLIError("resource name, --all or -l is required")
    if for_ not in ("condition=Ready", "condition=ready", "delete"):
        raise CLIError(f"--for {for_}: supported: condition=Ready, delete")
    _, cl = cluster(ctx)
    ns = None if all_ns else namespace
    deadline = time.monotonic() + limit
    try:
        while True:
            pods = _filter_labels(cl.list("Pod", ns), selector)
            by_name = {p["metadata"]["name"]: p for p in pods}
            if for_ == "delete":
                left = [n for n in names if n in by_name] if names else list(by_name)
                if not left:
                    for n in names:
                        click.echo(f"pod/{n} condition met")
                    return
            else:
                want = names or list(by_name)
                missing = [n for n in want if n not in by_name]
                if names and missing and time.monotonic() > deadline:
                    raise CLIError(f'Error from server (NotFound): pods "{missing[0]}" not found')
                left = [n for n in want if n not in by_name or not pod_ready(by_name[n])]
                if want and not left:
                    for n in want:
                        click.echo(f"pod/{n} condition met")
                    return
            if time.monotonic() > deadline:
                raise CLIError(f"timed out waiting for the condition on pods/{left[0]}"
                               if left else "timed out waiting for the condition")
            time.sleep(0.1)
    finally:
        cl.close()
