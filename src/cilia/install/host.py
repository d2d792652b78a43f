"""The host's network state as an install sees it: what to discover before, what to put
back after. Every function acts in the calling thread's netns; `in_netns` picks it."""
from __future__ import annotations

import errno
from typing import Callable, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cilia import netns
from cilia.agent.node_net import RTPROT_CILIA, VXLAN_DEVICE
from cilia.endpoint.link import HOST_DEVICE

T = TypeVar("T")

# What the agent changes (agent/node_net.py, endpoint/link.py); uninstall writes them back.
SYSCTLS = ("net/ipv4/conf/all/rp_filter", "net/ipv4/conf/default/rp_filter",
           "net/ipv4/ip_forward")
OUR_LINK_PREFIXES = ("lxc", HOST_DEVICE, "cilia_net", VXLAN_DEVICE)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    return netns.run_in(name, fn) if name else fn()


def read_sysctls() -> dict[str, str]:
    out = {}
    for s in SYSCTLS:
        with open(f"/proc/sys/{s}") as f:
            out[s] = f.read().strip()
    return out


def write_sysctls(values: dict[str, str]) -> None:
    for s, v in values.items():
        if s in SYSCTLS:
            with open(f"/proc/sys/{s}", "w") as f:
                f.write(v)


def link_names() -> list[str]:
    with IPRoute() as ip:
        return sorted(l.get_attr("IFLA_IFNAME") for l in ip.get_links())


def default_uplink() -> str | None:
    with IPRoute() as ip:
        for r in ip.get_routes(family=2, table=254):
            if r["dst_len"] == 0 and r.get_attr("RTA_OIF"):
                links = ip.get_links(r.get_attr("RTA_OIF"))
                return links[0].get_attr("IFLA_IFNAME") if links else None
    return None


def uplink_facts(dev: str) -> tuple[int, str | None, int]:
    """(ifindex, first IPv4 address, MTU) of dev; raises LookupError if it does not exist."""
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=dev)
        if not idx:
            raise LookupError(dev)
        mtu = ip.get_links(idx[0])[0].get_attr("IFLA_MTU")
        addrs = [a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=idx[0], family=2)]
        return idx[0], (addrs[0] if addrs else None), mtu


def has_clsact(dev: str) -> bool:
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=dev)
        if not idx:
            return False
        return any(q.get_attr("TCA_KIND") == "clsact" for q in ip.get_qdiscs(index=idx[0]))


def remove_datapath(uplink: str, keep_clsact: bool, links_before: list[str]) -> list[str]:
    """Detach our programs from the uplink, delete the links the agent made (pod veths,
    cilia_host/cilia_net, cilia_vxlan) and our routes. Returns what was removed."""
    from cilia.datapath import tc
    removed: list[str] = []
    before = set(links_before)
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=uplink)
        if idx and has_clsact(uplink):  # without it libbpf logs a "Parent Qdisc" error
            for direction in ("ingress", "egress"):
                if tc.tc_detach(idx[0], direction):
                    removed.append(f"tc {direction} filter on {uplink}")
            if not keep_clsact:
                ip.tc("del", kind="clsact", index=idx[0])
                removed.append(f"clsact qdisc on {uplink}")
        for name in link_names():
            if name in before or not name.startswith(OUR_LINK_PREFIXES):
                continue
            try:
                ip.link("del", ifname=name)
                removed.append(f"link {name}")
            except NetlinkError as e:
                if e.code != errno.ENODEV:  # a veth's peer went with its other end
                    raise
        for r in ip.get_routes(family=2, table=254, proto=RTPROT_CILIA):
            if r.get("proto") != RTPROT_CILIA:
                continue
            dst = f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
            try:
                ip.route("del", dst=dst, proto=RTPROT_CILIA)
                removed.append(f"route {dst}")
            except NetlinkError:
                pass
    return removed
