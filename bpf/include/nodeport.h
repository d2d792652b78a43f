/* North-south service traffic on the uplink: NodePort, LoadBalancer and external IP
 * frontends. A local backend gets the packet with the client's address intact; a remote
 * backend gets it SNATed to this node's IP (so the reply comes back here to be reversed)
 * through the tunnel or the FIB. */
#ifndef CILIA_NODEPORT_H
#define CILIA_NODEPORT_H

#include "common.h"
#include "config.h"
#include "metrics.h"
#include "endpoint.h"
#include "ipcache.h"
#include "tunnel.h"
#include "nat.h"
#include "fib.h"
#include "lb.h"
#include "policy.h"

/* To the node of a remote backend, SNATed to us. The VNI says world: that is who sent it. */
static __always_inline int nodeport_forward(struct __sk_buff *skb, __u32 backend)
{
	if (CONFIG.routing == ROUTING_TUNNEL && CONFIG.tunnel_ifindex) {
		struct ipcache_value *info = ipcache_lookup4(backend);

		if (info && info->tunnel_endpoint) {
			if (tunnel_set_key(skb, info->tunnel_endpoint, IDENTITY_WORLD) < 0)
				return send_drop(skb, DROP_WRITE_ERROR, METRIC_INGRESS);
			update_metrics(skb->len, METRIC_INGRESS, 0);
			return bpf_redirect(CONFIG.tunnel_ifindex, 0);
		}
	}
	return fib_redirect_v4(skb, METRIC_INGRESS);
}

/* True when the packet was addressed to a routable frontend; *verdict is then the tc
 * verdict (delivered, forwarded or dropped). */
static __always_inline bool nodeport_lb4(struct __sk_buff *skb, const struct iphdr *ip, int *verdict)
{
	struct nat_pkt p = {};
	struct policy_pkt pp = {};
	struct lb4_decision d = {};
	struct endpoint_info *ep;
	struct nat_key4 fwd = {};
	struct nat_entry4 xlate;
	int ret;

	if (lb4_parse(skb, ip, &p))
		return false;
	ret = lb4_decide(&p, false, &d);
	if (ret == 1)
		return false;
	if (ret)
		goto drop;

	ep = lookup_pod(d.backend.address);
	if (ep) {
		if (d.write_reply && (ret = lb4_write_reply(&p, &d, p.key.saddr, CT_F_NODEPORT)))
			goto drop;
		if ((ret = lb4_dnat(skb, &p, &d)))
			goto drop;
		/* The backend's ingress policy sees the client as it is: nothing hides it on
		 * the way to a local backend. */
		if ((ret = policy_ingress4(skb, ep, policy_ipcache_identity(p.key.saddr), &pp)))
			goto drop;
		policy_trace_to_pod(skb, &pp, ep, policy_ipcache_identity(p.key.saddr), p.key.daddr, p.key.dport);
		*verdict = deliver_to_pod(skb, ep, METRIC_INGRESS);
		return true;
	}
	/* externalTrafficPolicy=Local: the client address must survive, so the flow may
	 * not leave this node; the agent writes only local backends for that scope. */
	if (d.svc_flags & SVC_F_EXT_LOCAL_SCOPE) {
		ret = DROP_NO_SERVICE;
		goto drop;
	}
	if (d.write_reply && (ret = lb4_write_reply(&p, &d, p.key.saddr, CT_F_NODEPORT | CT_F_SNAT)))
		goto drop;
	if ((ret = lb4_dnat(skb, &p, &d)))
		goto drop;
	/* Same NAT table and port range as masquerade, so replies are reversed by the
	 * rev-SNAT step every program already does for the node IP. */
	fwd.saddr = p.key.saddr;
	fwd.daddr = d.backend.address;
	fwd.sport = p.key.sport;
	fwd.dport = d.backend.port;
	fwd.nexthdr = p.key.nexthdr;
	fwd.dir = NAT_DIR_EGRESS;
	if ((ret = snat_v4_mapping(&fwd, &xlate)))
		goto drop;
	if ((ret = nat_rewrite(skb, &p, IP_SADDR_OFF, p.key.saddr, xlate.to_addr, p.sport_off, p.key.sport,
			       xlate.to_port)))
		goto drop;
	*verdict = nodeport_forward(skb, d.backend.address);
	return true;
drop:
	*verdict = send_drop(skb, ret, METRIC_INGRESS);
	return true;
}

/* Reverse translation of a packet entering from outside any pod (uplink, tunnel) whose
 * destination is, after reverse SNAT, a client of ours. 0 = nothing more to do here,
 * or true with *verdict when a north-south reply was sent back out. */
static __always_inline bool nodeport_rev_lb4(struct __sk_buff *skb, __u8 dir, int *verdict)
{
	__u16 ct_flags = 0;
	int ret;

	ret = lb4_rev_nat(skb, &ct_flags);
	if (ret < 0) {
		*verdict = send_drop(skb, ret, dir);
		return true;
	}
	if (ret == 0 && (ct_flags & CT_F_NODEPORT)) {
		*verdict = fib_redirect_v4(skb, dir);
		return true;
	}
	return false;
}

#endif
