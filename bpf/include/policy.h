/* Network policy enforcement: a fixed number of lookups per packet, never a loop over rules.
 *
 * A packet first meets the policy conntrack (cilia_ct4_policy): packets of a connection
 * policy already let through, in either direction, and ICMP errors about one, pass
 * without a policy lookup (1 hash lookup forward, 2 for replies). Only a packet opening
 * a connection is judged: 4 LPM lookups per enforced direction, (identity, proto),
 * (identity, any), (any, proto), (any, any), each with the full port; any DENY hit drops
 * (DROP_POLICY_DENY), else any ALLOW hit passes, else DROP_POLICY.
 *
 * Connections are tracked whether or not anything is enforced: turning enforcement on
 * must not cut the replies of connections opened before. A TCP SYN without ACK always
 * counts as a new connection, so a reused tuple or a policy tightened since the first
 * connection is judged again; an established connection keeps flowing until it has been
 * idle for its lifetime (the agent may flush the table to cut them).
 *
 * Where, and who the peer is (the packet as it is after service translation):
 *   egress   cil_from_container, after DNAT: the destination pod's identity (local
 *            endpoint map), the host for node addresses, else the ipcache (LPM: pods on
 *            other nodes, remote nodes, CIDR identities), else world.
 *   ingress  local delivery in cil_from_container: the sending pod's identity (a pod
 *            hairpinned through a service meets its own); cil_from_overlay: the VNI, with
 *            another node's "host" read as remote-node; cil_from_netdev (also NodePort to
 *            a local backend, client address intact): the ipcache of the source, else
 *            world; cil_to_container (the node stack): host when the host originated the
 *            packet or it comes from the node's addresses, else the ipcache, else world.
 *   NodePort to a backend on another node arrives SNATed to the first node: as world
 *   through the tunnel (that node's VNI), as that node's ipcache identity (remote-node)
 *   with native routing.
 * Drops count under (reason, direction of the policy): an egress policy drop under
 * METRIC_EGRESS, an ingress one under METRIC_INGRESS, wherever it happened. */
#ifndef CILIA_POLICY_H
#define CILIA_POLICY_H

#include <linux/tcp.h>
#include <linux/icmp.h>
#include "common.h"
#include "config.h"
#include "maps.h"
#include "metrics.h"
#include "ipcache.h"
#include "conntrack.h"

#define CILIA_POLICY_MAX    (1 << 20)
#define CILIA_POLICY_CT_MAX 131072

#ifndef IPPROTO_SCTP
#define IPPROTO_SCTP 132
#endif

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct cilia_policy_key);
	__type(value, struct cilia_policy_value);
	__uint(max_entries, CILIA_POLICY_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct4_key);
	__type(value, struct ct4_policy_entry);
	__uint(max_entries, CILIA_POLICY_CT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ct4_policy SEC(".maps");

#define POL_CT_NEW         0
#define POL_CT_ESTABLISHED 1
#define POL_CT_REPLY       2
#define POL_CT_RELATED     3 /* an ICMP error about a tracked connection */

/* One packet as policy sees it at one hook. */
struct policy_pkt {
	struct ct4_key tuple;  /* its own tuple; ICMP queries: see policy_icmp_ports */
	struct ct4_key inner;  /* ICMP error: the tuple of the packet it reports on */
	__u16 port;            /* what rules match, network order: dport, or the ICMP type */
	__u8  proto;
	__u8  ct;              /* POL_CT_* */
	__u16 ct_flags;        /* PCT_F_* gathered by the checks, stored on commit */
	bool  syn;             /* TCP SYN without ACK */
	bool  icmp_error;
	__u8  tcp_flags;       /* TCP header byte 13, 0 for other protocols */
	__u8  trace_ct;        /* ct as classified (commit turns NEW into ESTABLISHED): events */
	bool  first_reply;     /* the connection's first reply: reported like a new connection */
};

static __always_inline __u32 policy_now(void)
{
	return (__u32)(bpf_ktime_get_ns() / 1000000000ULL);
}

/* Query/answer ICMP: the request carries (id, type) as (sport, dport), the answer
 * (request type, id), so the answer's tuple is the request's reversed and an echo does
 * not open the way for a timestamp request with the same id. */
static __always_inline void policy_icmp_ports(struct ct4_key *t, __u8 type, __u16 id)
{
	switch (type) {
	case ICMP_ECHO:
	case ICMP_TIMESTAMP:
	case ICMP_INFO_REQUEST:
	case ICMP_ADDRESS:
		t->sport = id;
		t->dport = bpf_htons(type);
		break;
	case ICMP_ECHOREPLY:
		t->sport = bpf_htons(ICMP_ECHO);
		t->dport = id;
		break;
	case ICMP_TIMESTAMPREPLY:
	case ICMP_INFO_REPLY:
	case ICMP_ADDRESSREPLY:
		t->sport = bpf_htons(type - 1);
		t->dport = id;
		break;
	}
}

static __always_inline bool policy_has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* The tuple of an ICMP error's quoted packet (IP header + 8 bytes, RFC 792). */
static __always_inline bool policy_parse_icmp_error(struct __sk_buff *skb, __u32 off, struct ct4_key *in)
{
	struct iphdr qip;
	__u32 l4;

	if (bpf_skb_load_bytes(skb, off, &qip, sizeof(qip)) < 0 || qip.ihl < 5)
		return false;
	in->saddr = qip.saddr;
	in->daddr = qip.daddr;
	in->nexthdr = qip.protocol;
	l4 = off + qip.ihl * 4;
	if (policy_has_ports(qip.protocol)) {
		__u16 ports[2];

		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) < 0)
			return false;
		in->sport = ports[0];
		in->dport = ports[1];
	} else if (qip.protocol == IPPROTO_ICMP) {
		struct icmphdr q;

		if (bpf_skb_load_bytes(skb, l4, &q, sizeof(q)) < 0)
			return false;
		policy_icmp_ports(in, q.type, q.un.echo.id);
	}
	return true;
}

/* Later fragments and truncated L4 headers keep ports 0: rules for specific ports do not
 * match them (fragment tracking is not implemented). */
static __always_inline void policy_parse(struct __sk_buff *skb, const struct iphdr *ip, struct policy_pkt *pp)
{
	__u32 l4 = ETH_HLEN + ip->ihl * 4;

	pp->tuple.saddr = ip->saddr;
	pp->tuple.daddr = ip->daddr;
	pp->tuple.nexthdr = ip->protocol;
	pp->proto = ip->protocol;
	if (ip->frag_off & bpf_htons(0x1fff))
		return;

	if (policy_has_ports(ip->protocol)) {
		/* Direct access where the headers are in the linear part (always, for what a
		 * veth or tunnel hands us): the helper costs more than the rest of the parse. */
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		__u8 *h = data + (l4 & 0x7f);
		__u16 ports[2];
		__u8 tcp_flags = 0;

		if ((void *)(h + 14) <= data_end) {
			__builtin_memcpy(ports, h, sizeof(ports));
			tcp_flags = h[13];
		} else if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) < 0) {
			return;
		} else if (ip->protocol == IPPROTO_TCP) {
			bpf_skb_load_bytes(skb, l4 + 13, &tcp_flags, 1);
		}
		pp->tuple.sport = ports[0];
		pp->tuple.dport = ports[1];
		pp->port = ports[1];
		/* tcphdr byte 13: CWR ECE URG ACK PSH RST SYN FIN */
		if (ip->protocol == IPPROTO_TCP) {
			pp->syn = (tcp_flags & 0x12) == 0x02;
			pp->tcp_flags = tcp_flags;
		}
	} else if (ip->protocol == IPPROTO_ICMP) {
		struct icmphdr icmp;

		if (bpf_skb_load_bytes(skb, l4, &icmp, sizeof(icmp)) < 0)
			return;
		pp->port = bpf_htons(icmp.type);
		if (icmp.type == ICMP_DEST_UNREACH || icmp.type == ICMP_TIME_EXCEEDED ||
		    icmp.type == ICMP_PARAMETERPROB || icmp.type == ICMP_SOURCE_QUENCH)
			pp->icmp_error = policy_parse_icmp_error(skb, l4 + sizeof(icmp), &pp->inner);
		else
			policy_icmp_ports(&pp->tuple, icmp.type, icmp.un.echo.id);
	}
}

static __always_inline void ct4_key_reverse(const struct ct4_key *k, struct ct4_key *r)
{
	r->saddr = k->daddr;
	r->daddr = k->saddr;
	r->sport = k->dport;
	r->dport = k->sport;
	r->nexthdr = k->nexthdr;
	r->flags = 0;
	r->pad = 0;
}

static __always_inline struct ct4_policy_entry *policy_ct_get(const struct ct4_key *k, __u32 now)
{
	struct ct4_policy_entry *e = bpf_map_lookup_elem(&cilia_ct4_policy, k);
	__u32 lifetime;

	if (!e)
		return NULL;
	lifetime = k->nexthdr == IPPROTO_TCP ? CT_LIFETIME_TCP : CT_LIFETIME_NONTCP;
	if (now - e->last_seen > lifetime)
		return NULL;
	/* At most one store a second: see ct4_touch. */
	if (e->last_seen != now)
		e->last_seen = now;
	return e;
}

static __always_inline void policy_ct_classify(struct policy_pkt *pp)
{
	__u32 now = policy_now();
	struct ct4_key rev = {};
	struct ct4_policy_entry *e;

	pp->ct = POL_CT_NEW;
	if (pp->icmp_error) {
		/* Quoted packets may be from either direction of the connection. */
		ct4_key_reverse(&pp->inner, &rev);
		if (policy_ct_get(&pp->inner, now) || policy_ct_get(&rev, now))
			pp->ct = POL_CT_RELATED;
		return;
	}
	if (pp->syn)
		return;
	if (policy_ct_get(&pp->tuple, now)) {
		pp->ct = POL_CT_ESTABLISHED;
		return;
	}
	ct4_key_reverse(&pp->tuple, &rev);
	e = policy_ct_get(&rev, now);
	if (e) {
		pp->ct = POL_CT_REPLY;
		/* One store per connection, so events can report its first reply (a UDP or ICMP
		 * answer is otherwise never new). */
		if (!(e->flags & PCT_F_REPLIED)) {
			e->flags |= PCT_F_REPLIED;
			pp->first_reply = true;
		}
	}
}

/* Parses the IPv4 packet at skb and classifies it against the policy conntrack. */
static __always_inline int policy_prepare(struct __sk_buff *skb, struct policy_pkt *pp)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;

	if (!PKT_HAS(data, data_end, ETH_HLEN, sizeof(*ip)) || ip->ihl < 5)
		return DROP_INVALID;
	policy_parse(skb, ip, pp);
	policy_ct_classify(pp);
	pp->trace_ct = pp->ct;
	return 0;
}

/* Which entry decided, for the policy verdict event: the deny that won, else the
 * most specific allow (the lookup order below is from most to least specific). */
struct policy_match {
	__u32 cookie;
	__u8  type;          /* POLICY_MATCH_* */
};

static __always_inline void policy_note(struct policy_match *m, const struct cilia_policy_value *v,
					__u8 *seen, __u8 type)
{
	__u8 f = v->flags & (POLICY_F_ALLOW | POLICY_F_DENY);

	/* The first deny beats earlier allows; otherwise the first hit (most specific) stays. */
	if ((f & POLICY_F_DENY) ? !(*seen & POLICY_F_DENY) : !*seen) {
		m->cookie = v->rule_cookie;
		m->type = type;
	}
	*seen |= f;
}

/* The 4 lookups. 0 (allowed), DROP_POLICY_DENY or DROP_POLICY; *m names the deciding entry. */
static __always_inline int policy_lookup4(__u16 ep_id, __u8 dir, __u32 identity, __u8 proto, __u16 port_be,
					  struct policy_match *m)
{
	struct cilia_policy_key key = {
		.prefixlen = POLICY_FULL_PREFIX, .ep_id = bpf_htons(ep_id), .direction = dir,
		.proto = proto, .identity = bpf_htonl(identity), .dport = port_be,
	};
	struct cilia_policy_value *v;
	__u8 flags = 0;

	v = bpf_map_lookup_elem(&cilia_policy, &key);
	if (v)
		policy_note(m, v, &flags, POLICY_MATCH_L3_L4);
	key.proto = 0;
	v = bpf_map_lookup_elem(&cilia_policy, &key);
	if (v)
		policy_note(m, v, &flags, POLICY_MATCH_L3_ONLY);
	key.identity = 0;
	key.proto = proto;
	v = bpf_map_lookup_elem(&cilia_policy, &key);
	if (v)
		policy_note(m, v, &flags, POLICY_MATCH_L4_ONLY);
	key.proto = 0;
	v = bpf_map_lookup_elem(&cilia_policy, &key);
	if (v)
		policy_note(m, v, &flags, POLICY_MATCH_ALL);

	if (flags & POLICY_F_DENY)
		return DROP_POLICY_DENY;
	if (flags & POLICY_F_ALLOW)
		return 0;
	return DROP_POLICY;
}

/* Verdict of ep's policy in direction dir (POLICY_*) for a packet opening a connection
 * with the peer `identity`. Audit mode counts the would-be drop (METRIC_F_AUDIT) and
 * lets the packet through. 0 or DROP_POLICY*. */
static __always_inline int policy_check(struct __sk_buff *skb, struct policy_pkt *pp,
					const struct endpoint_info *ep, __u8 dir, __u32 identity)
{
	__u16 enforced = dir == POLICY_INGRESS ? EP_F_POLICY_INGRESS_ENFORCED : EP_F_POLICY_EGRESS_ENFORCED;
	struct policy_match m = {};
	struct cilia_event *e;
	__u8 action;
	int ret;

	if (pp->ct != POL_CT_NEW || !(ep->flags & enforced))
		return 0;
	ret = policy_lookup4(ep->ep_id, dir, identity, pp->proto, pp->port, &m);
	action = ret ? EVT_ACTION_DENY : EVT_ACTION_ALLOW;
	if (ret && (ep->flags & EP_F_POLICY_AUDIT)) {
		update_metrics_flags(skb->len, dir == POLICY_INGRESS ? METRIC_INGRESS : METRIC_EGRESS,
				     (__u8)(-ret), METRIC_F_AUDIT);
		pp->ct_flags |= PCT_F_AUDIT;
		action = EVT_ACTION_AUDIT;
	}
	/* Verdicts are only raised for new connections: already aggregated. */
	e = event_reserve(skb, CILIA_EVENT_POLICY_VERDICT, 0);
	if (e) {
		e->ep_id = ep->ep_id;
		e->flags = dir == POLICY_INGRESS ? EVT_F_INGRESS : EVT_F_EGRESS;
		e->src_identity = dir == POLICY_INGRESS ? identity : EP_IDENTITY(ep);
		e->dst_identity = dir == POLICY_INGRESS ? EP_IDENTITY(ep) : identity;
		e->ct_state = pp->trace_ct;
		e->action = action;
		e->match_type = m.type;
		e->rule_cookie = m.cookie;
		e->proto = pp->proto;
		e->dport = bpf_ntohs(pp->port);
		event_submit(e);
	}
	return action == EVT_ACTION_DENY ? ret : 0;
}

/* Records a connection every check let through. ICMP errors open nothing. A failed
 * insert only means the next packet is judged again. */
static __always_inline void policy_ct_commit(struct policy_pkt *pp)
{
	__u32 now = policy_now();
	struct ct4_policy_entry e = { .created = now, .last_seen = now, .flags = pp->ct_flags };

	if (pp->ct != POL_CT_NEW || pp->icmp_error)
		return;
	bpf_map_update_elem(&cilia_ct4_policy, &pp->tuple, &e, BPF_ANY);
	pp->ct = POL_CT_ESTABLISHED;
}

/* Ingress policy of ep for a packet about to be delivered to it from outside any local
 * pod (overlay, uplink, node stack). 0 or a DROP_* reason. */
static __always_inline int policy_ingress4(struct __sk_buff *skb, const struct endpoint_info *ep, __u32 src_identity,
					   struct policy_pkt *pp)
{
	int ret;

	ret = policy_prepare(skb, pp);
	if (ret)
		return ret;
	ret = policy_check(skb, pp, ep, POLICY_INGRESS, src_identity);
	if (ret)
		return ret;
	policy_ct_commit(pp);
	return 0;
}

/* Trace of a packet entering pod ep from outside (overlay, uplink, the stack), as policy
 * classified it. orig_daddr/orig_dport: the frontend when a service was translated here. */
static __always_inline void policy_trace_to_pod(struct __sk_buff *skb, const struct policy_pkt *pp,
						const struct endpoint_info *ep, __u32 src_identity,
						__u32 orig_daddr, __u16 orig_dport)
{
	struct event_trace_info ti = {
		.src_identity = src_identity, .dst_identity = EP_IDENTITY(ep), .ifindex = ep->ifindex,
		.orig_daddr = orig_daddr, .orig_dport = orig_dport, .ep_id = ep->ep_id,
		.ct_state = pp->trace_ct, .tcp_flags = pp->tcp_flags, .first = pp->first_reply,
	};

	event_trace(skb, TRACE_TO_LXC, &ti);
}

/* The identity a peer address stands for, as the ipcache knows it; unknown is world. */
static __always_inline __u32 policy_ipcache_identity(__u32 addr)
{
	struct ipcache_value *info = ipcache_lookup4(addr);

	return info && info->sec_identity ? info->sec_identity : IDENTITY_WORLD;
}

/* Identity of a packet's destination for the sender's egress policy. */
static __always_inline __u32 policy_dst_identity(__u32 daddr)
{
	struct endpoint_key key = { .ip4 = daddr };
	struct endpoint_info *ep;

	if (daddr == CONFIG.node_ip4 || daddr == CONFIG.router_ip4)
		return IDENTITY_HOST;
	ep = bpf_map_lookup_elem(&cilia_lxc, &key);
	if (ep)
		return (ep->flags & EP_F_HOST) ? IDENTITY_HOST : EP_IDENTITY(ep);
	return policy_ipcache_identity(daddr);
}

#endif
