"""Entry point: `python -m bench.run [--only podstart,samenode,crossnode,store] [--quick]` (what
`make bench` runs).

Prints a table per benchmark and writes bench/results/<benchmark>.json (git-ignored).
`python -m bench.report` turns the results into the tables of docs/benchmarks.md."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from bench import crossnode, events, podstart, policy, samenode, services, store_latency
from bench.common import install_signal_handlers, machine, write_result

BENCHMARKS = {"podstart": podstart, "samenode": samenode, "crossnode": crossnode,
              "store": store_latency, "services": services,
              "events": events, "policy": policy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    ap.add_argument("--only", default=",".join(BENCHMARKS),
                    help="comma-separated benchmarks (default: all): " + ", ".join(BENCHMARKS))
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions (2 per samenode/crossnode measurement, 1 burst of "
                         "pods, 300 store operations and 1 resync, services: 2 runs of 1000 "
                         "connections)")
    ap.add_argument("--reps", type=int, default=None, help="override the repetition count")
    ap.add_argument("--seconds", type=int, default=5,
                    help="duration of each sockperf/iperf3 measurement (default 5)")
    ap.add_argument("--pods", type=int, default=100, help="pods for podstart (default 100)")
    args = ap.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, BPF)", file=sys.stderr)
        return 2
    install_signal_handlers()
    info = machine()
    cmd = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, kernel {info['kernel']}, "
          f"cilia {info['git_commit']}")
    failed = []
    for b in chosen:
        t = time.monotonic()
        load_before = os.getloadavg()
        print(f"\n== {b} == (load average {load_before[0]:.2f})", flush=True)
        try:
            if b == "podstart":
                res = podstart.run(quick=args.quick, pods=args.pods, reps=args.reps)
            elif b == "samenode":
                res = samenode.run(quick=args.quick, reps=args.reps, secs=args.seconds)
            elif b == "services":
                res = services.run(quick=args.quick, reps=args.reps)
            elif b == "events":
                res = events.run(quick=args.quick, reps=args.reps, secs=args.seconds)
            elif b == "policy":
                res = policy.run(quick=args.quick, reps=args.reps)
            elif b == "crossnode":
                res = crossnode.run(quick=args.quick, reps=args.reps, secs=args.seconds)
            else:
                res = store_latency.run(quick=args.quick, reps=args.reps)
        except KeyboardInterrupt:
            print(f"\n{b}: interrupted; lab and namespaces removed", file=sys.stderr)
            return 130
        except Exception as e:  # one broken benchmark does not hide the others
            print(f"{b}: FAILED: {e}", file=sys.stderr)
            failed.append(b)
            continue
        res["machine"] = info
        res["command"] = cmd.strip()
        res["quick"] = args.quick
        res["wall_s"] = time.monotonic() - t
        # Other work on a 2-CPU machine skews every number here: keep the evidence.
        res["loadavg_before"], res["loadavg_after"] = list(load_before), list(os.getloadavg())
        path = write_result(b, res)
        print(BENCHMARKS[b].render(res))
        print(f"({res['wall_s']:.0f} s; {os.path.relpath(path)})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
