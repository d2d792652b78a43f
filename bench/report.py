"""Render bench/results/*.json as Markdown: `python -m bench.report` prints it;
`python -m bench.report --write docs/benchmarks.md` replaces the part of that file between
the `<!-- bench:results:begin -->` and `<!-- bench:results:end -->` markers."""
from __future__ import annotations

import argparse
import json
import os
import sys

from bench import crossnode, events, podstart, samenode, services, store_latency
from bench.common import RESULTS_DIR, fmt, table

BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"


def load(name: str) -> dict | None:
    try:
        with open(os.path.join(RESULTS_DIR, f"{name}.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _load(res: dict) -> str:
    b, a = res.get("loadavg_before"), res.get("loadavg_after")
    return f"load average {b[0]:.2f} before, {a[0]:.2f} after" if b and a else ""


def render() -> str:
    out: list[str] = []
    results = {n: load(n) for n in ("podstart", "samenode", "crossnode", "store",
                                             "services", "events")}
    any_res = next((r for r in results.values() if r), None)
    if any_res is None:
        return "(no results in bench/results/; run `make bench`)\n"
    m = any_res["machine"]
    out += ["### Machine", "",
            table(["", ""], [["CPUs (nproc)", m["nproc"]], ["CPU model", m["cpu_model"]],
                             ["kernel", m["kernel"]], ["memory", m["memory"]],
                             ["Python", m["python"]], ["sockperf", m["sockperf"]],
                             ["iperf3", m["iperf3"]], ["cilia commit", m["git_commit"]],
                             ["date (UTC)", m["date"]]], left=2), ""]
    ps = results["podstart"]
    if ps:
        out += [f"### Pod start ({ps['pods']} pods, {ps['nodes']}-node lab, {ps['routing']} "
                "routing)", "",
                f"Command: `{ps['command']}` — {ps['wall_s']:.0f} s, {_load(ps)}.", "",
                podstart.render(ps), "",
                "Per burst repetition (apply → Ready of 100 pods in one manifest):", ""]
        rows = [[i + 1, fmt(b["first_ip_s"], 2), fmt(b["last_ip_s"], 2),
                 fmt(b["first_ready_s"], 2), fmt(b["total_s"], 2),
                 fmt(b["apply_to_ready_ms"]["p50"], 0), fmt(b["apply_to_ready_ms"]["p99"], 0),
                 fmt(b["pods_per_s"], 1), fmt(b["delete_all_s"], 2), fmt(b["poll_period_ms"], 0)]
                for i, b in enumerate(ps["burst"])]
        out += [table(["rep", "first podIP s", "last podIP s", "first Ready s", "last Ready s",
                       "p50 ms", "p99 ms", "pods/s", "delete all s", "poll period ms"], rows),
                ""]
    sn = results["samenode"]
    if sn:
        out += [f"### Same-node pod-to-pod: cilia vs plain routing (MTU "
                f"{sn['cilia']['pod_mtu']} both, {sn['routing']} routing lab)", "",
                f"Command: `{sn['command']}` — {sn['wall_s']:.0f} s, {_load(sn)}.", "",
                samenode.render(sn), "",
                "Every repetition (TCP/UDP: p50 RTT µs; stream: Gbit/s):", ""]
        rows = []
        for t, key in samenode.PRIMARY.items():
            for path in samenode.PATHS:
                vals = [s[key] for s in sn["samples"][t][path]]
                rows.append([t, path, " ".join(fmt(v, 2 if key == "gbit_s" else 1)
                                                for v in vals)])
        out += [table(["test", "path", "per repetition"], rows, left=3), ""]
        tc = sn["cilia"]["host_veth_tc"]
        progs = sorted({p.split(":")[0] for v in tc.values() for d in v.values() for p in d})
        out += [f"cilia pods' host veths carried BPF programs {', '.join(f'`{p}`' for p in progs)} (tc names, truncated) during the run; "
                "the baseline veths carried none.", ""]
    cn = results["crossnode"]
    if cn:
        modes = cn["modes"]
        mtus = ", ".join(f"{m} {modes[m]['cilia']['pod_mtu']}" for m in crossnode.MODES
                         if m in modes)
        out += ["### Cross-node pod-to-pod: cilia vs the kernel without BPF (2-node labs, pod "
                f"MTU {mtus}, same MTU in each baseline)", "",
                f"Command: `{cn['command']}` — {cn['wall_s']:.0f} s, {_load(cn)}, "
                f"cilia {cn['machine']['git_commit']}, {cn['machine']['date']}.", "",
                crossnode.render(cn), "",
                "Every repetition (TCP/UDP: p50 RTT µs; stream: Gbit/s):", "",
                crossnode.render_samples(cn), ""]
        progs = {}
        for m, r in modes.items():
            tc = r["cilia"]["nodes"]["node1"]["tc"]
            progs[m] = sorted({f"{d if not d.startswith('lxc') else 'lxc…'} "
                               f"{dirn}: {p.split(':')[0]}"
                               for d, v in tc.items() for dirn, ps in v.items() for p in ps})
        out += ["BPF programs on node1 during the run (tc names, truncated): "
                + "; ".join(f"{m}: " + ", ".join(f"`{p}`" for p in ps)
                            for m, ps in progs.items())
                + ". The baseline namespaces carried none.", ""]
    st = results["store"]
    if st:
        out += [f"### Store: put → watch latency and resync ({st['ops']} operations per case)",
                "", f"Command: `{st['command']}` — {st['wall_s']:.0f} s, {_load(st)}, "
                f"cilia {st['machine']['git_commit']}, {st['machine']['date']}.", "",
                store_latency.render(st), ""]
    sv = results["services"]
    if sv:
        out += _services(sv)
    ev = results["events"]
    if ev:
        out += ["### Flow observability: the agent's event pipeline and its cost on traffic", "",
                f"Command: `{ev['command']}` — {ev['wall_s']:.0f} s, {_load(ev)}, "
                f"cilia {ev['machine']['git_commit']}, {ev['machine']['date']}.", "",
                events.render(ev), ""]
    return "\n".join(out)


def _services(sv: dict) -> list[str]:
    cp, dp, ipt = sv["control_plane"], sv["data_plane"], sv["iptables"]
    out = ["### Services: cilia's BPF load balancer vs kube-proxy's iptables layout", "",
           f"Command: `{sv['command']}` — {sv['wall_s']:.0f} s, {_load(sv)}, "
           f"cilia {sv['machine']['git_commit']}, {sv['machine']['date']}; "
           f"{ipt['version']} ({ipt['restore']}).", "",
           "Control plane (scratch netns, fresh pin dir / empty nat table per run):", "",
           services.render_control(cp, ipt["backend"]), ""]
    rows = [[label, " ".join(services._ms(v) for v in cp["samples"][k])]
            for k, label in (("cilia_full_s", "cilia: upsert_services, 10,000"),
                             ("cilia_add_one_s", "cilia: upsert_service, +1"),
                             ("ipt_full_s", "iptables-restore, 10,000"),
                             ("ipt_add_one_full_s", "iptables-restore, full sync +1"),
                             ("ipt_add_one_partial_s", "iptables-restore, partial sync +1"))]
    b = cp["restore_bytes"]
    out += [table(["control plane", "per run"], rows, left=2), "",
            f"iptables-restore input: {b['full'] / 1e6:.1f} MB for the full restore, "
            f"{b['add_one_partial'] / 1e6:.1f} MB for the partial sync; "
            + "after the full restore `iptables-save -t nat` lists "
            + ", ".join(f"{v:,} {k}" for k, v in (cp["checks"][0]["iptables_after_full"] or {}).items())
            + " (built-in chains and the nodeports jump included).", ""]
    f = dp["medians"]["flatness"]
    out += [f"Data plane: new connection latency (connect + HTTP/1.0 GET + response + close, "
            f"Python client in a pod, `cilia/echo` server, both on CPU {dp['cpu_pin']}), "
            f"{dp['conns']} connections per run, median of {dp['reps']} runs:", "",
            services.render_data(dp), "",
            f"{dp['counts'][-1]:,} ÷ {dp['counts'][0]:,} services, p50: cilia {f['cilia']:.2f}, "
            f"iptables {f['iptables']:.2f}, direct (control, no service involved) "
            f"{f['direct']:.2f}.", "", "Every run (p50 µs):", ""]
    rows = []
    for c in dp["counts"]:
        for path in services.PATHS:
            runs = dp["samples"][str(c)][path]
            rows.append([f"{c:,}", path, " ".join(fmt(s["p50"]) for s in runs),
                         sum(s.get("over_900ms", 0) for s in runs)])
    out += [table(["services", "path", "p50 per run", "connections > 0.9 s (all runs)"], rows,
                  left=3), ""]
    setup = dp["setup"]
    out += ["Set-up in the lab: " + "; ".join(
        f"{c}: {setup[c]['cilia_services_in_map']} frontends in node1's LB map "
        f"(dummies written in {services._ms(setup[c]['cilia_write_s'])}), "
        f"{setup[c]['iptables']['KUBE-SERVICES rules'] - 1} service rules in KUBE-SERVICES "
        f"(restored in {services._ms(setup[c]['iptables_restore_s'])})" for c in setup) + ".", ""]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    ap.add_argument("--write", metavar="FILE", help="update FILE between the markers")
    args = ap.parse_args(argv)
    text = render()
    if not args.write:
        print(text)
        return 0
    with open(args.write) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        print(f"{args.write}: markers {BEGIN} / {END} not found", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(args.write, "w") as f:
        f.write(head + BEGIN + "\n" + text + "\n" + END + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
