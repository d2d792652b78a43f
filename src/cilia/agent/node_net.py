"""Node-level networking the agent owns: the VXLAN device, routes to remote pod CIDRs, and
the sysctls cross-node forwarding needs. Blocking; runs on the agent's endpoint thread."""
from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

VXLAN_DEVICE = "cilia_vxlan"
VXLAN_PORT = 4789
# Routes we install carry this protocol number, so reconciliation never touches others'.
RTPROT_CILIA = 0xC1
IFF_NOARP = 0x80


def _sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(value)


def prepare_sysctls() -> None:
    # Packets from remote pods arrive on eth0 while the route back points at the tunnel (or
    # the other way round): strict reverse-path filtering would drop them, as in Cilium.
    for dev in ("all", "default"):
        _sysctl(f"net/ipv4/conf/{dev}/rp_filter", "0")
    _sysctl("net/ipv4/ip_forward", "1")


def ifindex(name: str) -> int:
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=name)
        if not idx:
            raise RuntimeError(f"device {name} not found")
        return idx[0]


def ensure_vxlan(mtu: int) -> int:
    """An external (collect_md) VXLAN device: the datapath sets the remote and the VNI (the
    source identity) per packet with bpf_skb_set_tunnel_key."""
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=VXLAN_DEVICE)
        if not idx:
            ip.link("add", ifname=VXLAN_DEVICE, kind="vxlan", vxlan_collect_metadata=1,
                    vxlan_port=VXLAN_PORT, vxlan_learning=0, mtu=mtu)
            idx = ip.link_lookup(ifname=VXLAN_DEVICE)
        link = ip.get_links(idx[0])[0]
        # No ARP on the tunnel: the receiving side's program rewrites MACs anyway.
        ip.link("set", index=idx[0], state="up", mtu=mtu,
                flags=link["flags"] | IFF_NOARP | 1, change=IFF_NOARP | 1)
        return idx[0]


def remove_vxlan() -> bool:
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=VXLAN_DEVICE)
        if not idx:
            return False
        ip.link("del", index=idx[0])
        return True


def _our_routes(ip: IPRoute) -> dict[str, dict]:
    out = {}
    for r in ip.get_routes(family=2, table=254, proto=RTPROT_CILIA):
        if r.get("proto") != RTPROT_CILIA:
            continue
        out[f"{r.get_attr('RTA_DST')}/{r['dst_len']}"] = r
    return out


def sync_routes(remote: dict[str, str], tunnel: bool, uplink: str = "eth0") -> tuple[int, int]:
    """Make our routes exactly {pod CIDR: via node IP}; returns (added/changed, removed)."""
    changed = removed = 0
    with IPRoute() as ip:
        have = _our_routes(ip)
        if tunnel:
            oif = ip.link_lookup(ifname=VXLAN_DEVICE)[0]
        else:
            oif = ip.link_lookup(ifname=uplink)[0]
        for cidr, node_ip in remote.items():
            cur = have.pop(cidr, None)
            if cur is not None:
                gw = cur.get_attr("RTA_GATEWAY")
                if cur.get_attr("RTA_OIF") == oif and (tunnel or gw == node_ip):
                    continue
            if tunnel:
                ip.route("replace", dst=cidr, oif=oif, proto=RTPROT_CILIA, scope=253)
            else:
                ip.route("replace", dst=cidr, gateway=node_ip, oif=oif, proto=RTPROT_CILIA)
            changed += 1
        for cidr in have:
            try:
                ip.route("del", dst=cidr, proto=RTPROT_CILIA)
                removed += 1
            except NetlinkError:
                pass
    return changed, removed
