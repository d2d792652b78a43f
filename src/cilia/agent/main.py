"""cilia-agent entry point."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from cilia.agent import observe
from cilia.agent.daemon import AgentConfig, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cilia-agent")
    p.add_argument("--cluster", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--node-ip", required=True)
    p.add_argument("--pod-cidr", default="auto",
                   help="the node's pod CIDR, or auto to get one from cilia-operator")
    p.add_argument("--preferred-pod-cidr", default="")
    p.add_argument("--uplink", default="eth0", help="the node's underlay device")
    p.add_argument("--no-masquerade", action="store_true")
    p.add_argument("--lb-algorithm", choices=["random", "maglev"], default="random")
    p.add_argument("--store", default="", help="store URL: sqlite:///path or etcd://host:port")
    p.add_argument("--routing", choices=["tunnel", "native"], default="tunnel")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--node-id", type=int, default=0)
    p.add_argument("--socket", default="")
    p.add_argument("--state-dir", default="")
    p.add_argument("--pin-dir", default="")
    p.add_argument("--enable-policy", choices=["default", "always", "never"], default="default",
                   help="policy enforcement mode (the cluster config in the store overrides it)")
    p.add_argument("--policy-audit-mode", action="store_true",
                   help="report would-be policy drops as AUDIT and forward them")
    p.add_argument("--log-level", default="INFO")
    observe.add_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = AgentConfig(cluster=a.cluster, node=a.node, node_ip=a.node_ip, pod_cidr=a.pod_cidr,
                      preferred_pod_cidr=a.preferred_pod_cidr, store_url=a.store,
                      routing=a.routing, mtu=a.mtu, uplink=a.uplink,
                      masquerade=not a.no_masquerade, lb_algorithm=a.lb_algorithm,
                      socket=a.socket,
                      state_dir=a.state_dir, pin_dir=a.pin_dir, node_id=a.node_id,
                      policy_enforcement=a.enable_policy, policy_audit=a.policy_audit_mode)
    observe.apply_flags(cfg, a)
    return asyncio.run(run(cfg))


if __name__ == "__main__":
    sys.exit(main())
