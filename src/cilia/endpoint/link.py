"""Pod network plumbing over netlink: the veth pair, addresses, routes and neighbours.

Runs in the agent's thread, which lives in the node netns; pod-side work switches that
thread into the pod netns for the duration (no fork per pod)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cilia import netns

HOST_DEVICE = "cilia_host"
HOST_PEER = "cilia_net"


def host_ifname(container_id: str, ifname: str) -> str:
    # Cilium-style lxc + hash: stable for a (container, interface) so CNI retries converge.
    return "lxc" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


@dataclass
class PodLink:
    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_ifname: str
    pod_mac: str


def _sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(value)


def ensure_host_device(router_ip: str) -> None:
    """cilia_host carries the router IP so pods can reach their gateway address itself.
    A veth pair (cilia_host/cilia_net) as in Cilium: no dummy driver on every kernel."""
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=HOST_DEVICE)
        if not idx:
            ip.link("add", ifname=HOST_DEVICE, kind="veth", peer={"ifname": HOST_PEER})
            idx = ip.link_lookup(ifname=HOST_DEVICE)
        ip.link("set", index=ip.link_lookup(ifname=HOST_PEER)[0], state="up")
        ip.link("set", index=idx[0], state="up")
        addrs = {a.get("address") for a in ip.get_addr(index=idx[0], family=2)}
        if router_ip not in addrs:
            ip.addr("add", index=idx[0], address=router_ip, prefixlen=32)
    _sysctl("net/ipv4/ip_forward", "1")


def create(container_id: str, netns_path: str, ifname: str, ip4: str, router_ip: str,
           mtu: int) -> PodLink:
    """Create the veth pair straight into the pod netns and configure both ends."""
    host = host_ifname(container_id, ifname)
    with IPRoute() as ip:
        if ip.link_lookup(ifname=host):
            # A retried ADD after a crash: start again from a clean pair.
            ip.link("del", ifname=host)
        ip.link("add", ifname=host, kind="veth", mtu=mtu,
                peer={"ifname": ifname, "net_ns_fd": netns_path, "mtu": mtu})
        hidx = ip.link_lookup(ifname=host)[0]
        ip.link("set", index=hidx, state="up")
        host_mac = ip.get_links(hidx)[0].get("address")

    def pod_side() -> str:
        # The pod is IPv4-only; without this the kernel's IPv6 autoconf chatter would
        # show up as datapath drops.
        _sysctl("net/ipv6/conf/all/disable_ipv6", "1")
        _sysctl("net/ipv6/conf/default/disable_ipv6", "1")
        with IPRoute() as ip:
            lo = ip.link_lookup(ifname="lo")[0]
            ip.link("set", index=lo, state="up")
            pidx = ip.link_lookup(ifname=ifname)[0]
            ip.addr("add", index=pidx, address=ip4, prefixlen=32)
            ip.link("set", index=pidx, state="up")
            ip.route("add", dst=f"{router_ip}/32", oif=pidx, scope=253)
            ip.route("add", dst="0.0.0.0/0", gateway=router_ip, oif=pidx)
            return ip.get_links(pidx)[0].get("address")

    try:
        pod_mac = netns.run_in(netns_path, pod_side)
        with IPRoute() as ip:
            ip.route("replace", dst=f"{ip4}/32", oif=hidx, scope=253)
            # Static neighbour: the node never needs to ARP for its pods.
            ip.neigh("replace", dst=ip4, lladdr=pod_mac, ifindex=hidx, state=0x80)
    except BaseException:
        delete_host(host)
        raise
    return PodLink(host, hidx, host_mac, ifname, pod_mac)


def delete_host(host: str) -> bool:
    """Deleting the host end takes the pod end, its routes and neighbours with it."""
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=host)
        if not idx:
            return False
        try:
            ip.link("del", index=idx[0])
        except NetlinkError as e:
            if e.code != 19:  # ENODEV: gone meanwhile
                raise
        return True


def lookup(host: str) -> tuple[int, str] | None:
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=host)
        if not idx:
            return None
        return idx[0], ip.get_links(idx[0])[0].get("address")


def check_pod(netns_path: str, ifname: str, ip4: str) -> list[str]:
    """CNI CHECK: what differs from what ADD set up (empty = fine)."""
    problems: list[str] = []

    def pod_side() -> None:
        with IPRoute() as ip:
            idx = ip.link_lookup(ifname=ifname)
            if not idx:
                problems.append(f"interface {ifname} missing in {netns_path}")
                return
            addrs = {a.get("address") for a in ip.get_addr(index=idx[0], family=2)}
            if ip4 not in addrs:
                problems.append(f"address {ip4} missing on {ifname}")
            if not ip.get_routes(family=2, dst="0.0.0.0/0", table=254) and \
               not [r for r in ip.get_routes(family=2, table=254) if r.get("dst_len") == 0]:
                problems.append("default route missing")

    try:
        netns.run_in(netns_path, pod_side)
    except FileNotFoundError:
        problems.append(f"netns {netns_path} missing")
    return problems
