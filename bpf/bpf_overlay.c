// SPDX-License-Identifier: GPL-2.0
/* Programs for the node's VXLAN device (cilia_vxlan, external/collect_md mode): one
 * device for every peer node, the remote node and the sender's identity travel in the
 * per-packet tunnel key. */
#include <linux/if_packet.h>
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
#include "nodeport.h"
#include "policy.h"
#include "deliver.h"

/* Decapsulated packets: pods on this node get them straight, the rest (node IP, router
 * IP) go up the stack. */
SEC("tc")
int cil_from_overlay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct endpoint_info *ep;
	__u32 src_identity = 0;
	bool reversed = false;
	int ret, verdict;

	if (!PKT_HAS(data, data_end, 0, sizeof(*eth)))
		return send_drop(skb, DROP_INVALID, METRIC_INGRESS);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return send_drop(skb, DROP_UNKNOWN_L3, METRIC_INGRESS);
	if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*ip)) || ip->version != 4 || ip->ihl < 5)
		return send_drop(skb, DROP_INVALID, METRIC_INGRESS);

	if (tunnel_get_identity(skb, &src_identity) < 0)
		return send_drop(skb, DROP_NO_TUNNEL_KEY, METRIC_INGRESS);
	/* Every cilia sender puts an identity in the VNI; 0 means a foreign or broken peer. */
	if (!src_identity)
		return send_drop(skb, DROP_INVALID_IDENTITY, METRIC_INGRESS);

	/* A remote backend's reply to a NodePort flow we SNATed: back to its client. */
	if (ip->daddr == CONFIG.node_ip4) {
		ret = snat_v4_ingress(skb, ip);
		if (ret < 0)
			return send_drop(skb, ret, METRIC_INGRESS);
		if (ret == 0) {
			if (nodeport_rev_lb4(skb, METRIC_INGRESS, &verdict))
				return verdict;
			reversed = true;
		}
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
		ip = data + sizeof(*eth);
		if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*ip)))
			return send_drop(skb, DROP_INVALID, METRIC_INGRESS);
	}

	ep = lookup_pod(ip->daddr);
	if (ep)
		/* Another node's host is a remote node to us (its VNI says host, as Cilium's
		 * receivers also map it). */
		return deliver_from_outside(skb, ep, src_identity == IDENTITY_HOST ?
					    IDENTITY_REMOTE_NODE : src_identity, reversed);

	/* The inner destination MAC is the sender's idea of a router (its lxc or its own
	 * vxlan MAC), never ours: without this the stack discards the packet as OTHERHOST. */
	bpf_skb_change_type(skb, PACKET_HOST);
	update_metrics(skb->len, METRIC_INGRESS, 0);
	return TC_ACT_OK;
}

/* Packets the node's stack routes into cilia_vxlan (host -> remote pod) and packets
 * bpf_lxc already keyed and redirected here. */
SEC("tc")
int cil_to_overlay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct ipcache_value *info;
	struct endpoint_key key = {};
	struct endpoint_info *src;
	__u32 identity;

	if (!PKT_HAS(data, data_end, 0, sizeof(*eth)))
		return send_drop(skb, DROP_INVALID, METRIC_EGRESS);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return send_drop(skb, DROP_UNKNOWN_L3, METRIC_EGRESS);
	if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*ip)))
		return send_drop(skb, DROP_INVALID, METRIC_EGRESS);

	/* Keyed by bpf_lxc (a redirect still passes this hook): keep the pod's identity. */
	if (tunnel_get_identity(skb, &identity) == 0) {
		update_metrics(skb->len, METRIC_EGRESS, 0);
		return TC_ACT_OK;
	}

	info = ipcache_lookup4(ip->daddr);
	if (!info || !info->tunnel_endpoint)
		return send_drop(skb, DROP_NO_TUNNEL_ENDPOINT, METRIC_EGRESS);

	/* A pod packet that reached us through the stack still carries the pod's identity,
	 * not the host's: policy on the far side must see who really sent it. */
	key.ip4 = ip->saddr;
	src = bpf_map_lookup_elem(&cilia_lxc, &key);
	identity = (src && !(src->flags & EP_F_HOST)) ? EP_IDENTITY(src) : IDENTITY_HOST;

	if (tunnel_set_key(skb, info->tunnel_endpoint, identity) < 0)
		return send_drop(skb, DROP_WRITE_ERROR, METRIC_EGRESS);
	update_metrics(skb->len, METRIC_EGRESS, 0);
	return TC_ACT_OK;
}

char __license[] SEC("license") = "GPL";
