// SPDX-License-Identifier: GPL-2.0
/* Pod veth programs. One object is loaded per node and attached to every lxc device;
 * the endpoint a packet belongs to is found through maps keyed by ifindex and address,
 * so adding an endpoint is a map write, never a recompile or reload. */
#include "common.h"
#include "config.h"
#include "maps.h"
#include "metrics.h"
#include "eth.h"
#include "ipv4.h"
#include "endpoint.h"
#include "ipcache.h"
#include "tunnel.h"
#include "nat.h"
#include "fib.h"
#include "lb.h"
#include "policy.h"

static __always_inline int handle_arp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct arp_eth_ip4 *arp = data + sizeof(*eth);
	struct endpoint_info *ep;
	__u32 ifindex = skb->ifindex;

	if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*arp)))
		return send_drop(skb, DROP_INVALID, METRIC_EGRESS);

	/* Replies and gratuitous announcements (sip == tip) need no answer from us. */
	if (!arp_is_eth_ip4_request(arp) || arp->ar_sip == arp->ar_tip) {
		update_metrics(skb->len, METRIC_EGRESS, 0);
		return TC_ACT_OK;
	}

	/* Without its endpoint we do not know which MAC to answer with. */
	ep = bpf_map_lookup_elem(&cilia_lxc_if, &ifindex);
	if (!ep) {
		update_metrics(skb->len, METRIC_EGRESS, 0);
		return TC_ACT_OK;
	}

	arp_make_reply(eth, arp, ep->node_mac);
	update_metrics(skb->len, METRIC_EGRESS, 0);
	return bpf_redirect(ifindex, 0);
}

/* A pod on another node, in tunnel mode: encapsulate with the sender's identity as VNI
 * and hand the packet to the VXLAN device. Anything else goes to the stack, which
 * routes it (native mode: kernel routes to peer pod CIDRs; world and host traffic). */
static __always_inline int encap_or_stack(struct __sk_buff *skb, __u32 daddr,
					  const struct endpoint_info *src, struct event_trace_info *ti)
{
	struct ipcache_value *info;

	if (CONFIG.routing != ROUTING_TUNNEL || !CONFIG.tunnel_ifindex)
		goto to_stack;
	info = ipcache_lookup4(daddr);
	if (!info || !info->tunnel_endpoint)
		goto to_stack;
	if (tunnel_set_key(skb, info->tunnel_endpoint, src ? EP_IDENTITY(src) : IDENTITY_UNMANAGED) < 0)
		return send_drop(skb, DROP_WRITE_ERROR, METRIC_EGRESS);
	update_metrics(skb->len, METRIC_EGRESS, 0);
	ti->dst_identity = info->sec_identity;
	event_trace(skb, TRACE_TO_OVERLAY, ti);
	return bpf_redirect(CONFIG.tunnel_ifindex, 0);

to_stack:
	update_metrics(skb->len, METRIC_EGRESS, 0);
	event_trace(skb, TRACE_TO_STACK, ti);
	return TC_ACT_OK;
}

static __always_inline int handle_ipv4_from_lxc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct endpoint_info *src, *dst = NULL;
	struct endpoint_key key = {};
	__u32 ifindex = skb->ifindex;
	struct policy_pkt pp = {};
	struct nat_pkt p = {};
	struct event_trace_info ti = {};
	bool maybe_reply = false, hairpin;
	__u16 ct_flags = 0;
	int ret;

	if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*ip)))
		return send_drop(skb, DROP_INVALID, METRIC_EGRESS);
	if (ip->version != 4 || ip->ihl < 5)
		return send_drop(skb, DROP_INVALID, METRIC_EGRESS);
	/* Options announced by IHL must be present too, or the header is truncated. */
	if ((void *)ip + ip->ihl * 4 > data_end)
		return send_drop(skb, DROP_INVALID, METRIC_EGRESS);

	src = bpf_map_lookup_elem(&cilia_lxc_if, &ifindex);
	if (src && ip->saddr != src->ip4)
		return send_drop(skb, DROP_INVALID_SIP, METRIC_EGRESS);

	/* Services first, so everything after, policy included, sees the backend. A packet
	 * to no frontend may be a backend's reply to a flow balanced on this node: its
	 * reverse translation waits until policy has seen it as the backend sent it. */
	if (lb4_parse(skb, ip, &p) == 0) {
		ret = lb4_from_pod(skb, &p);
		if (ret < 0)
			return send_drop(skb, ret, METRIC_EGRESS);
		maybe_reply = ret == 1;
		if (ret == 0) {
			/* The frontend, for the flow's service name. */
			ti.orig_daddr = p.key.daddr;
			ti.orig_dport = p.key.dport;
		}
	}

	ret = policy_prepare(skb, &pp);
	if (ret)
		return send_drop(skb, ret, METRIC_EGRESS);
	ti.ct_state = pp.trace_ct;
	ti.tcp_flags = pp.tcp_flags;
	ti.first = pp.first_reply;
	if (src) {
		ti.src_identity = EP_IDENTITY(src);
		ti.ep_id = src->ep_id;
	}
	/* A pod reaching itself through a service: as in Cilium, policy is not asked (else
	 * every pod would need a rule allowing itself). Only hairpin DNAT makes daddr the
	 * sender's own address here; a pod's packets to itself never leave its netns. */
	hairpin = src && pp.tuple.daddr == src->ip4;
	if (src && !hairpin) {
		ret = policy_check(skb, &pp, src, POLICY_EGRESS,
				   pp.ct == POL_CT_NEW ? policy_dst_identity(pp.tuple.daddr) : 0);
		if (ret)
			return send_drop(skb, ret, METRIC_EGRESS);
	}

	if (maybe_reply) {
		ret = lb4_rev_nat(skb, &ct_flags);
		if (ret < 0)
			return send_drop(skb, ret, METRIC_EGRESS);
		/* North-south reply, now from the node's own address: the stack would drop it
		 * as martian, so it leaves through the FIB. */
		if (ret == 0 && (ct_flags & CT_F_NODEPORT)) {
			policy_ct_commit(&pp);
			return fib_redirect_v4(skb, METRIC_EGRESS);
		}
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + sizeof(*eth);
	if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*ip)))
		return send_drop(skb, DROP_INVALID, METRIC_EGRESS);

	/* Traffic for the node itself always goes up the stack, even if an endpoint entry
	 * for that address exists without EP_F_HOST. */
	if (ip->daddr != CONFIG.node_ip4) {
		key.ip4 = ip->daddr;
		dst = bpf_map_lookup_elem(&cilia_lxc, &key);
	}
	if (dst && !(dst->flags & EP_F_HOST)) {
		/* The destination's ingress policy, on the same packet, with the sender's
		 * identity (a pod hairpinned through a service meets its own identity). */
		ret = hairpin ? 0 : policy_check(skb, &pp, dst, POLICY_INGRESS,
						 src ? EP_IDENTITY(src) : IDENTITY_UNMANAGED);
		if (ret)
			return send_drop(skb, ret, METRIC_INGRESS);
		policy_ct_commit(&pp);
		ti.dst_identity = EP_IDENTITY(dst);
		ti.ifindex = dst->ifindex;
		ti.ep_id = dst->ep_id;
		event_trace(skb, TRACE_TO_LXC, &ti);
		/* Straight into the destination pod's netns, skipping the node's stack. */
		return deliver_to_pod(skb, dst, METRIC_EGRESS);
	}
	policy_ct_commit(&pp);
	if (!dst && ip->daddr != CONFIG.node_ip4)
		return encap_or_stack(skb, ip->daddr, src, &ti);

	update_metrics(skb->len, METRIC_EGRESS, 0);
	ti.dst_identity = IDENTITY_HOST;
	event_trace(skb, TRACE_TO_STACK, &ti);
	return TC_ACT_OK;
}

SEC("tc")
int cil_from_container(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if (!PKT_HAS(data, data_end, 0, sizeof(*eth)))
		return send_drop(skb, DROP_INVALID, METRIC_EGRESS);

	switch (eth->h_proto) {
	case bpf_htons(ETH_P_ARP):
		return handle_arp(skb);
	case bpf_htons(ETH_P_IP):
		return handle_ipv4_from_lxc(skb);
	default:
		return send_drop(skb, DROP_UNKNOWN_L3, METRIC_EGRESS);
	}
}

/* Who sent a packet the node's stack hands to a pod: the host itself for anything it
 * originated (no input device) or sent from its own addresses, else what the ipcache
 * says about the source (local node addresses are host there too), else world. */
static __always_inline __u32 stack_src_identity(struct __sk_buff *skb, __u32 saddr)
{
	if (!skb->ingress_ifindex || saddr == CONFIG.node_ip4 || saddr == CONFIG.router_ip4)
		return IDENTITY_HOST;
	return policy_ipcache_identity(saddr);
}

/* Packets the stack routes into a pod (bpf_redirect_peer deliveries skip this hook):
 * the pod's ingress policy, then replies of balanced flows get their frontend back. */
SEC("tc")
int cil_to_container(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct endpoint_info *ep;
	struct policy_pkt pp = {};
	__u32 ifindex = skb->ifindex;
	__u32 src_identity = 0;
	__u16 ct_flags = 0;
	int ret;

	if (PKT_HAS(data, data_end, 0, sizeof(*eth)) && eth->h_proto == bpf_htons(ETH_P_IP)) {
		if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*ip)))
			return send_drop(skb, DROP_INVALID, METRIC_INGRESS);
		ep = bpf_map_lookup_elem(&cilia_lxc_if, &ifindex);
		if (ep) {
			src_identity = stack_src_identity(skb, ip->saddr);
			ret = policy_ingress4(skb, ep, src_identity, &pp);
			if (ret)
				return send_drop(skb, ret, METRIC_INGRESS);
		}
		ret = lb4_rev_nat(skb, &ct_flags);
		if (ret < 0)
			return send_drop(skb, ret, METRIC_INGRESS);
		if (ep)
			policy_trace_to_pod(skb, &pp, ep, src_identity, 0, 0);
	}
	update_metrics(skb->len, METRIC_INGRESS, 0);
	return TC_ACT_OK;
}

char __license[] SEC("license") = "GPL";
