// SPDX-License-Identifier: GPL-2.0
/* Programs for the node's uplink (eth0): masquerade of pod traffic leaving the cluster,
 * its reverse translation, and direct delivery of arriving pod traffic (native routing,
 * replies from the world). */
#include "common.h"
#include "config.h"
#include "maps.h"
#include "metrics.h"
#include "eth.h"
#include "ipv4.h"
#include "endpoint.h"
#include "ipcache.h"
#include "nat.h"

SEC("tc")
int cil_from_netdev(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct endpoint_info *ep;
	__u32 daddr;
	int ret;

	/* ARP, IPv6 and the like are the node's own business. */
	if (!PKT_HAS(data, data_end, 0, sizeof(*eth)) || eth->h_proto != bpf_htons(ETH_P_IP))
		goto to_stack;
	if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*ip)) || ip->version != 4 || ip->ihl < 5)
		return send_drop(skb, DROP_INVALID, METRIC_INGRESS);

	ret = snat_v4_ingress(skb, ip);
	if (ret < 0)
		return send_drop(skb, ret, METRIC_INGRESS);

	/* The helpers above may have moved the packet: bound-check again. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + sizeof(struct ethhdr);
	if (!PKT_HAS(data, data_end, sizeof(struct ethhdr), sizeof(*ip)))
		return send_drop(skb, DROP_INVALID, METRIC_INGRESS);
	daddr = ip->daddr;

	ep = lookup_pod(daddr);
	if (ep)
		return deliver_to_pod(skb, ep, METRIC_INGRESS);

to_stack:
	update_metrics(skb->len, METRIC_INGRESS, 0);
	return TC_ACT_OK;
}

SEC("tc")
int cil_to_netdev(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	int ret;

	if (!PKT_HAS(data, data_end, 0, sizeof(*eth)) || eth->h_proto != bpf_htons(ETH_P_IP))
		goto out;
	if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*ip)) || ip->version != 4 || ip->ihl < 5)
		return send_drop(skb, DROP_INVALID, METRIC_EGRESS);

	if (snat_v4_needed(ip)) {
		ret = snat_v4_egress(skb, ip);
		if (ret < 0)
			return send_drop(skb, ret, METRIC_EGRESS);
	}
out:
	update_metrics(skb->len, METRIC_EGRESS, 0);
	return TC_ACT_OK;
}

char __license[] SEC("license") = "GPL";
