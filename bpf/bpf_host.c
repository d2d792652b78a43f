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
#include "nodeport.h"
#include "policy.h"
#include "deliver.h"

SEC("tc")
int cil_from_netdev(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct endpoint_info *ep;
	int ret, verdict;
	bool reversed;

	/* ARP, IPv6 and the like are the node's own business. */
	if (!PKT_HAS(data, data_end, 0, sizeof(*eth)) || eth->h_proto != bpf_htons(ETH_P_IP))
		goto to_stack;
	if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*ip)) || ip->version != 4 || ip->ihl < 5)
		return send_drop(skb, DROP_INVALID, METRIC_INGRESS);

	/* Replies to the node IP first: masqueraded pod flows and NodePort flows SNATed to
	 * a remote backend share the NAT table. A NodePort reply then also gets its
	 * frontend back and returns to the client; a pod's reply is delivered below. */
	ret = snat_v4_ingress(skb, ip);
	if (ret < 0)
		return send_drop(skb, ret, METRIC_INGRESS);
	reversed = ret == 0;
	if (reversed && nodeport_rev_lb4(skb, METRIC_INGRESS, &verdict))
		return verdict;

	/* The helpers above may have moved the packet: bound-check again. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + sizeof(struct ethhdr);
	if (!PKT_HAS(data, data_end, sizeof(struct ethhdr), sizeof(*ip)))
		return send_drop(skb, DROP_INVALID, METRIC_INGRESS);

	/* NodePort, LoadBalancer and external IP frontends. */
	if (!reversed && nodeport_lb4(skb, ip, &verdict))
		return verdict;

	ep = lookup_pod(ip->daddr);
	if (ep)
		/* The sender is who the ipcache says the source address is (world if
		 * unknown); in native routing a remote backend's reply is reversed here. */
		return deliver_from_outside(skb, ep, policy_ipcache_identity(ip->saddr), reversed);

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
