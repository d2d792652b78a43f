/* BPF masquerade (SNAT to the node IP) for pod traffic leaving the cluster, with state
 * in two LRU maps like Cilium's SNAT map: the forward entry keeps every packet of a flow
 * on the same translation, the reverse entry both claims the NAT port (per remote
 * address/port) and translates replies back. */
#ifndef CILIA_NAT_H
#define CILIA_NAT_H

#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include "common.h"
#include "config.h"
#include "metrics.h"
#include "ipcache.h"

#define CILIA_SNAT_MAX   65536
/* Bounded retries keep allocation O(1) and verifier friendly; a full range ends in
 * DROP_NAT_NO_MAPPING rather than a long scan. */
#define NAT_PORT_TRIES   32

#define IP_CSUM_OFF   (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SADDR_OFF  (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF  (ETH_HLEN + offsetof(struct iphdr, daddr))

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct nat_key4);
	__type(value, struct nat_entry4);
	__uint(max_entries, CILIA_SNAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_snat_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct nat_key4);
	__type(value, struct nat_entry4);
	__uint(max_entries, CILIA_SNAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_snat_v4_rev SEC(".maps");

/* Where the translated fields of one packet live. */
struct nat_pkt {
	struct nat_key4 key;  /* the packet's own tuple */
	__u32 csum_off;       /* L4 checksum field */
	__u32 sport_off;      /* field holding key.sport (egress) ... */
	__u32 dport_off;      /* ... and key.dport (ingress) */
	__u64 csum_flags;     /* BPF_F_* for bpf_l4_csum_replace */
	bool  pseudo_hdr;     /* L4 checksum covers the addresses */
};

static __always_inline __u32 nat_now(void)
{
	return (__u32)(bpf_ktime_get_ns() / 1000000000ULL);
}

/* Reads the tuple of a TCP, UDP or ICMP echo packet. want_icmp is the echo type that
 * carries the identifier in the direction at hand (request out, reply in). */
static __always_inline int nat_parse(struct __sk_buff *skb, const struct iphdr *ip, __u8 dir,
				     __u8 want_icmp, struct nat_pkt *p)
{
	__u32 l4 = ETH_HLEN + ip->ihl * 4;
	__u16 ports[2];

	p->key.saddr = ip->saddr;
	p->key.daddr = ip->daddr;
	p->key.nexthdr = ip->protocol;
	p->key.dir = dir;
	/* Only the first fragment has ports; the rest could not be translated. */
	if (ip->frag_off & bpf_htons(0x3fff))
		return DROP_FRAG_NOSUPPORT;

	switch (ip->protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) < 0)
			return DROP_INVALID;
		p->key.sport = ports[0];
		p->key.dport = ports[1];
		p->sport_off = l4;
		p->dport_off = l4 + 2;
		p->pseudo_hdr = true;
		if (ip->protocol == IPPROTO_TCP) {
			p->csum_off = l4 + offsetof(struct tcphdr, check);
			p->csum_flags = 0;
		} else {
			p->csum_off = l4 + offsetof(struct udphdr, check);
			/* A zero UDP checksum means "none" and must stay zero. */
			p->csum_flags = BPF_F_MARK_MANGLED_0;
		}
		return 0;
	case IPPROTO_ICMP: {
		struct icmphdr icmp;

		if (bpf_skb_load_bytes(skb, l4, &icmp, sizeof(icmp)) < 0)
			return DROP_INVALID;
		if (icmp.type != want_icmp)
			return DROP_NAT_UNSUPP_PROTO;
		/* The echo identifier plays the local port: sport going out, dport coming back. */
		if (dir == NAT_DIR_EGRESS)
			p->key.sport = icmp.un.echo.id;
		else
			p->key.dport = icmp.un.echo.id;
		p->sport_off = p->dport_off = l4 + offsetof(struct icmphdr, un.echo.id);
		p->csum_off = l4 + offsetof(struct icmphdr, checksum);
		p->csum_flags = 0;
		p->pseudo_hdr = false; /* ICMP's checksum does not cover the IP header */
		return 0;
	}
	default:
		return DROP_NAT_UNSUPP_PROTO;
	}
}

/* The reply tuple of the forward tuple p->key translated to (to_addr, to_port). */
static __always_inline void nat_reverse_key(const struct nat_key4 *fwd, __u32 to_addr, __u16 to_port,
					    struct nat_key4 *rev)
{
	rev->saddr = fwd->daddr;
	rev->daddr = to_addr;
	rev->nexthdr = fwd->nexthdr;
	rev->dir = NAT_DIR_INGRESS;
	if (fwd->nexthdr == IPPROTO_ICMP) {
		rev->sport = 0;
		rev->dport = to_port;
	} else {
		rev->sport = fwd->dport;
		rev->dport = to_port;
	}
}

/* Claims nat_port for this flow by inserting its reverse entry; BPF_NOEXIST makes the
 * claim atomic against other CPUs allocating the same port. */
static __always_inline bool nat_claim(const struct nat_key4 *fwd, __u16 nat_port_be, __u32 now)
{
	struct nat_key4 rev = {};
	struct nat_entry4 orig = {
		.to_addr = fwd->saddr, .to_port = fwd->sport, .created = now, .last_seen = now,
	};

	nat_reverse_key(fwd, CONFIG.node_ip4, nat_port_be, &rev);
	return bpf_map_update_elem(&cilia_snat_v4_rev, &rev, &orig, BPF_NOEXIST) == 0;
}

/* The translation for the flow of fwd: the existing one while its reverse entry still
 * belongs to it, otherwise a new port. 0 or a DROP_* reason. */
static __always_inline int snat_v4_mapping(const struct nat_key4 *fwd, struct nat_entry4 *out)
{
	__u32 now = nat_now();
	struct nat_entry4 *cur, new = {};
	struct nat_key4 rev = {};
	__u32 range, start, i;
	__u16 orig = bpf_ntohs(fwd->sport), port;
	bool claimed = false;

	cur = bpf_map_lookup_elem(&cilia_snat_v4, fwd);
	if (cur) {
		struct nat_entry4 *back;

		nat_reverse_key(fwd, cur->to_addr, cur->to_port, &rev);
		back = bpf_map_lookup_elem(&cilia_snat_v4_rev, &rev);
		if (back && back->to_addr == fwd->saddr && back->to_port == fwd->sport) {
			if (cur->last_seen != now)
				cur->last_seen = now;
			*out = *cur;
			return 0;
		}
		/* LRU evicted the reverse entry: reclaim the same port if nobody took it. */
		if (!back && cur->to_addr == CONFIG.node_ip4 && nat_claim(fwd, cur->to_port, now)) {
			cur->last_seen = now;
			*out = *cur;
			return 0;
		}
	}

	if (CONFIG.nat_port_max < CONFIG.nat_port_min)
		return DROP_NAT_NO_MAPPING;
	range = (__u32)CONFIG.nat_port_max - CONFIG.nat_port_min + 1;
	start = bpf_get_prandom_u32() % range;
	port = orig;
	for (i = 0; i < NAT_PORT_TRIES; i++) {
		/* First choice: the pod's own port, when the range allows it. */
		if (i > 0 || orig < CONFIG.nat_port_min || orig > CONFIG.nat_port_max)
			port = CONFIG.nat_port_min + (start + i) % range;
		if (nat_claim(fwd, bpf_htons(port), now)) {
			claimed = true;
			break;
		}
	}
	if (!claimed)
		return DROP_NAT_NO_MAPPING;

	new.to_addr = CONFIG.node_ip4;
	new.to_port = bpf_htons(port);
	new.created = now;
	new.last_seen = now;
	if (bpf_map_update_elem(&cilia_snat_v4, fwd, &new, BPF_ANY) < 0) {
		nat_reverse_key(fwd, new.to_addr, new.to_port, &rev);
		bpf_map_delete_elem(&cilia_snat_v4_rev, &rev);
		return DROP_NAT_NO_MAPPING;
	}
	*out = new;
	return 0;
}

/* Rewrites one address (at addr_off) and one port-like field with correct L3/L4 sums. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, const struct nat_pkt *p, __u32 addr_off,
				       __u32 old_addr, __u32 new_addr, __u32 port_off, __u16 old_port,
				       __u16 new_port)
{
	if (old_addr != new_addr) {
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, 4) < 0)
			return DROP_CSUM_L3;
		if (p->pseudo_hdr &&
		    bpf_l4_csum_replace(skb, p->csum_off, old_addr, new_addr,
					BPF_F_PSEUDO_HDR | p->csum_flags | 4) < 0)
			return DROP_CSUM_L4;
		if (bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) < 0)
			return DROP_WRITE_ERROR;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, p->csum_off, old_port, new_port, p->csum_flags | 2) < 0)
			return DROP_CSUM_L4;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0)
			return DROP_WRITE_ERROR;
	}
	return 0;
}

/* Masquerade decision for a packet leaving through the uplink. */
static __always_inline bool snat_v4_needed(const struct iphdr *ip)
{
	if (!CONFIG.masquerade || !CONFIG.node_ip4)
		return false;
	if (!ipv4_in_cidr(ip->saddr, CONFIG.pod_cidr4, CONFIG.pod_cidr4_mask))
		return false;
	if (ipv4_in_cidr(ip->daddr, CONFIG.cluster_cidr4, CONFIG.cluster_cidr4_mask))
		return false;
	return !ipcache_in_cluster(ipcache_lookup4(ip->daddr));
}

/* SNAT to CONFIG.node_ip4. 0 (translated) or a DROP_* reason. */
static __always_inline int snat_v4_egress(struct __sk_buff *skb, const struct iphdr *ip)
{
	struct nat_pkt p = {};
	struct nat_entry4 xlate;
	int ret;

	ret = nat_parse(skb, ip, NAT_DIR_EGRESS, ICMP_ECHO, &p);
	if (ret)
		return ret;
	ret = snat_v4_mapping(&p.key, &xlate);
	if (ret)
		return ret;
	return nat_rewrite(skb, &p, IP_SADDR_OFF, p.key.saddr, xlate.to_addr, p.sport_off, p.key.sport,
			   xlate.to_port);
}

/* Reverse SNAT of a reply to the node IP. 0 when translated, 1 when the packet belongs to
 * no masqueraded flow (the host's own traffic), or a DROP_* reason. NodePort's SNAT to
 * remote backends shares the table, so this runs with masquerade off too. */
static __always_inline int snat_v4_ingress(struct __sk_buff *skb, const struct iphdr *ip)
{
	struct nat_pkt p = {};
	struct nat_entry4 *orig, to;
	__u32 now;

	if (!CONFIG.node_ip4 || ip->daddr != CONFIG.node_ip4)
		return 1;
	/* Anything we cannot parse as a masqueraded reply is the host's business. */
	if (nat_parse(skb, ip, NAT_DIR_INGRESS, ICMP_ECHOREPLY, &p))
		return 1;
	orig = bpf_map_lookup_elem(&cilia_snat_v4_rev, &p.key);
	if (!orig)
		return 1;
	now = nat_now();
	if (orig->last_seen != now)
		orig->last_seen = now;
	to = *orig;
	return nat_rewrite(skb, &p, IP_DADDR_OFF, p.key.daddr, to.to_addr, p.dport_off, p.key.dport,
			   to.to_port);
}

#endif
