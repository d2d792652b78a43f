"""cilia's own process supervisor for an installed host (there is no systemd here).

Keeps cilia-agent and cilia-operator running: each is restarted when it exits, with a backoff
that resets once a child has stayed up for a while. Every child's pid file holds pid + kernel
start time (procs.ProcRef), so uninstall never signals a recycled pid. SIGTERM stops the
children (operator first, then the agent) and removes their pid files.

Elsewhere, run the two daemons under systemd instead: contrib/systemd/.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

from cilia.install.config import InstallConfig, InstallRecord
from cilia.lab import state as jsonfile
from cilia.procs import ref_of, spawn

BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0
STABLE_AFTER = 30.0   # seconds up before a crash counts as a fresh failure again


def agent_argv(cfg: InstallConfig) -> list[str]:
    argv = [sys.executable, "-m", "cilia.agent.main", "--cluster", cfg.cluster,
            "--node", cfg.node, "--node-ip", cfg.node_ip, "--pod-cidr", cfg.pod_cidr,
            "--uplink", cfg.uplink, "--routing", cfg.routing, "--mtu", str(cfg.mtu),
            "--store", cfg.store_url(), "--socket", cfg.socket,
            "--state-dir", cfg.agent_state_dir, "--pin-dir", cfg.pin_dir]
    return argv


def operator_argv(cfg: InstallConfig) -> list[str]:
    return [sys.executable, "-m", "cilia.operator.main", "--store", cfg.store_url(),
            "--cluster-cidr", cfg.cluster_cidr]


class Child:
    def __init__(self, name: str, argv: list[str], cfg: InstallConfig):
        self.name, self.argv, self.cfg = name, argv, cfg
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.backoff = BACKOFF_MIN
        self.next_start = 0.0
        self.restarts = 0

    @property
    def pid_file(self) -> str:
        return self.cfg.pid_file(self.name)

    def start(self) -> None:
        self.proc = spawn(self.argv, os.path.join(self.cfg.log_dir, f"{self.name}.log"), cwd="/")
        self.started = time.monotonic()
        jsonfile.write_json(self.pid_file, ref_of(self.proc).to_json())

    def poll(self, now: float) -> None:
        if self.proc is None:
            if now >= self.next_start:
                self.start()
            return
        rc = self.proc.poll()
        if rc is None:
            return
        up = now - self.started
        self.backoff = BACKOFF_MIN if up > STABLE_AFTER else min(self.backoff * 2, BACKOFF_MAX)
        self.restarts += 1
        print(f"{time.strftime('%H:%M:%S')} {self.name} exited with {rc} after {up:.1f}s; "
              f"restart {self.restarts} in {self.backoff:.1f}s", flush=True)
        self.proc = None
        self.next_start = now + self.backoff

    def stop(self) -> None:
        if self.proc is not None:
            ref_of(self.proc).stop(5.0)
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pid_file)


def run(state_dir: str) -> int:
    record = InstallRecord.load(state_dir)
    if record is None:
        print(f"no install record in {state_dir}", file=sys.stderr)
        return 1
    cfg = record.config
    children = [Child("agent", agent_argv(cfg), cfg), Child("operator", operator_argv(cfg), cfg)]
    stopping = False

    def on_term(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print(f"{time.strftime('%H:%M:%S')} supervising agent and operator "
          f"(cluster {cfg.cluster}, node {cfg.node})", flush=True)
    while not stopping:
        now = time.monotonic()
        for c in children:
            c.poll(now)
        time.sleep(0.2)
    # Operator first: the agent is what keeps pods' datapath state coherent the longest.
    for c in reversed(children):
        c.stop()
    print(f"{time.strftime('%H:%M:%S')} stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cilia-install-supervisor")
    p.add_argument("--state-dir", required=True)
    a = p.parse_args(argv)
    return run(a.state_dir)


if __name__ == "__main__":
    sys.exit(main())
