/* Delivery into a local pod of a packet that came from outside the node's pods (the
 * overlay or the uplink): ingress policy as the packet was sent, then the reverse service
 * translation for a remote backend's reply, then redirect_peer into the pod. */
#ifndef CILIA_DELIVER_H
#define CILIA_DELIVER_H

#include "endpoint.h"
#include "nodeport.h"
#include "policy.h"

static __always_inline int deliver_from_outside(struct __sk_buff *skb,
						const struct endpoint_info *ep,
						__u32 src_identity, bool reversed)
{
	struct policy_pkt pp = {};
	__u16 ct_flags = 0;
	int ret;

	/* Policy first: a backend's reply is known by the tuple it was sent with. */
	ret = policy_ingress4(skb, ep, src_identity, &pp);
	if (ret)
		return send_drop(skb, ret, METRIC_INGRESS);
	if (!reversed) {
		ret = lb4_rev_nat(skb, &ct_flags);
		if (ret < 0)
			return send_drop(skb, ret, METRIC_INGRESS);
	}
	policy_trace_to_pod(skb, &pp, ep, src_identity, 0, 0);
	return deliver_to_pod(skb, ep, METRIC_INGRESS);
}

#endif
