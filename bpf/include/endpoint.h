/* Delivery to a pod on this node, shared by every program that can hand it a packet
 * (its own veth, the overlay device, the uplink). */
#ifndef CILIA_ENDPOINT_H
#define CILIA_ENDPOINT_H

#include "common.h"
#include "config.h"
#include "maps.h"
#include "metrics.h"
#include "eth.h"
#include "ipv4.h"

/* The pod behind ip4 on this node; NULL for other nodes and for host entries, which the
 * stack handles. */
static __always_inline struct endpoint_info *lookup_pod(__u32 ip4)
{
	struct endpoint_key key = { .ip4 = ip4 };
	struct endpoint_info *ep;

	if (ip4 == CONFIG.node_ip4)
		return NULL;
	ep = bpf_map_lookup_elem(&cilia_lxc, &key);
	if (!ep || (ep->flags & EP_F_HOST))
		return NULL;
	return ep;
}

/* Acts as the pod's router (L2 from its gateway, TTL - 1) and enters its netns directly.
 * Packet pointers are re-read: callers may have rewritten the packet through helpers. */
static __always_inline int deliver_to_pod(struct __sk_buff *skb, const struct endpoint_info *ep, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*ip)))
		return send_drop(skb, DROP_INVALID, dir);
	if (ip->ttl <= 1)
		return send_drop(skb, DROP_TTL_EXCEEDED, dir);
	ipv4_dec_ttl(ip);
	mac_copy(eth->h_source, ep->node_mac);
	mac_copy(eth->h_dest, ep->mac);

	update_metrics(skb->len, dir, 0);
	return bpf_redirect_peer(ep->ifindex, 0);
}

#endif
