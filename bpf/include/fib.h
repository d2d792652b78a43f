/* Forwarding through the kernel's FIB from tc, for packets the stack must not see: their
 * source is one of the node's own addresses (NodePort SNAT, reverse-translated replies),
 * which the stack would drop as martian on input. */
#ifndef CILIA_FIB_H
#define CILIA_FIB_H

#include "common.h"
#include "config.h"
#include "metrics.h"
#include "ipv4.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* Routes the IPv4 packet at skb and redirects it to the egress device, as a router would
 * (TTL - 1). With an uplink configured the lookup is restricted to it: north-south
 * replies leave where their request came in. */
static __always_inline int fib_redirect_v4(struct __sk_buff *skb, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct bpf_fib_lookup fib = {};
	__u32 flags = 0;
	int ret;

	if (!PKT_HAS(data, data_end, sizeof(*eth), sizeof(*ip)))
		return send_drop(skb, DROP_INVALID, dir);
	if (ip->ttl <= 1)
		return send_drop(skb, DROP_TTL_EXCEEDED, dir);

	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	if (CONFIG.native_ifindex) {
		/* Output lookup: no ip_forward requirement, nexthops limited to the uplink. */
		fib.ifindex = CONFIG.native_ifindex;
		flags = BPF_FIB_LOOKUP_OUTPUT;
	} else {
		fib.ifindex = skb->ifindex;
	}
	/* The kernel answers FWD_DISABLED unless the uplink forwards (ip_forward=1), output
	 * lookup or not: a node that balances services must be a router anyway. */
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), flags);
	if (ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH)
		return send_drop(skb, DROP_NO_FIB, dir);

	ipv4_dec_ttl(ip);
	if (ret == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* Let the kernel resolve the neighbour (and queue the packet meanwhile). */
		struct bpf_redir_neigh nh = { .nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst };

		update_metrics(skb->len, dir, 0);
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	update_metrics(skb->len, dir, 0);
	return bpf_redirect(fib.ifindex, 0);
}

#endif
