/* ipcache: every known prefix -> security identity and, for pods on other nodes, the
 * node to tunnel to. Written by the agent; one LPM lookup per packet. */
#ifndef CILIA_IPCACHE_H
#define CILIA_IPCACHE_H

#include "common.h"

#define CILIA_IPCACHE_MAX 512000

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, CILIA_IPCACHE_MAX);
	/* LPM tries cannot be preallocated; the kernel refuses them without this flag. */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_ipcache SEC(".maps");

static __always_inline struct ipcache_value *ipcache_lookup4(__u32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .ip4 = addr };

	return bpf_map_lookup_elem(&cilia_ipcache, &key);
}

/* Inside the cluster: a node or host address, a pod behind a tunnel, or any cluster-wide
 * identity. World (2) and node-local CIDR identities are outside. */
static __always_inline bool ipcache_in_cluster(const struct ipcache_value *v)
{
	if (!v)
		return false;
	if ((v->flags & IPCACHE_F_REMOTE_NODE) || v->tunnel_endpoint)
		return true;
	return v->sec_identity != IDENTITY_WORLD && v->sec_identity < IDENTITY_LOCAL_MIN;
}

static __always_inline bool ipv4_in_cidr(__u32 addr, __u32 net, __u32 mask)
{
	/* A zero mask would put everything "in"; an unset CIDR means nothing is in it. */
	return mask && (addr & mask) == net;
}

#endif
