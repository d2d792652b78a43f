/* Service conntrack (cilia_ct4_global): what the load balancer decided for a flow, so every
 * packet of it reaches the same backend and every reply gets the frontend back. Only
 * translated flows have entries; LRU eviction and a per-protocol lifetime bound its size. */
#ifndef CILIA_CONNTRACK_H
#define CILIA_CONNTRACK_H

#include "common.h"

#define CILIA_CT_MAX 131072
/* Cilium's defaults (ct-global-max lifetimes): an idle TCP flow keeps its backend for 6 h,
 * anything else for a minute, after which it is balanced like a new flow. */
#define CT_LIFETIME_TCP    21600
#define CT_LIFETIME_NONTCP 60

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct4_key);
	__type(value, struct ct4_entry);
	__uint(max_entries, CILIA_CT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ct4_global SEC(".maps");

static __always_inline bool ct4_expired(const struct ct4_entry *ct, __u8 nexthdr, __u32 now)
{
	__u32 lifetime = nexthdr == IPPROTO_TCP ? CT_LIFETIME_TCP : CT_LIFETIME_NONTCP;

	return now - ct->last_seen > lifetime;
}

/* Writes last_seen at most once a second: a store per packet would bounce the entry's
 * cache line between CPUs for nothing. True when it was written. */
static __always_inline bool ct4_touch(struct ct4_entry *ct, __u32 now)
{
	if (ct->last_seen == now)
		return false;
	ct->last_seen = now;
	return true;
}

#endif
