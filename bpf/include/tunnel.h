/* VXLAN in collect_md mode: the tunnel key carries the remote node and the source
 * security identity (as the VNI), so one device serves every peer node. */
#ifndef CILIA_TUNNEL_H
#define CILIA_TUNNEL_H

#include "common.h"

#define TUNNEL_TTL 64

/* BPF_PROG_TEST_RUN has no way to attach tunnel metadata to a test packet or to read
 * it back, so test builds (tests/datapath compiles them with -DCILIA_TEST_TUNNEL) also
 * mirror the key in skb->cb, which test-run accepts as input and returns as output.
 * Production objects never contain this code. */
#define TUNNEL_TEST_MAGIC 0x7e57c0de

static __always_inline int tunnel_set_key(struct __sk_buff *skb, __u32 endpoint_be, __u32 identity)
{
	struct bpf_tunnel_key key = {};

	key.tunnel_id = identity;
	key.remote_ipv4 = bpf_ntohl(endpoint_be); /* the helper wants host byte order */
	key.tunnel_ttl = TUNNEL_TTL;
#ifdef CILIA_TEST_TUNNEL
	skb->cb[0] = key.tunnel_id;
	skb->cb[1] = key.remote_ipv4;
	skb->cb[2] = key.tunnel_ttl;
	skb->cb[3] = TUNNEL_TEST_MAGIC;
#endif
	/* Like Cilium: no outer UDP checksum, the inner packet carries its own. */
	return bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX);
}

/* 0 and the identity carried in the VNI, or < 0 when the packet has no tunnel key. */
static __always_inline int tunnel_get_identity(struct __sk_buff *skb, __u32 *identity)
{
	struct bpf_tunnel_key key = {};
	int ret;

#ifdef CILIA_TEST_TUNNEL
	if (skb->cb[3] == TUNNEL_TEST_MAGIC) {
		*identity = skb->cb[0];
		return 0;
	}
#endif
	ret = bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0);
	if (ret < 0)
		return ret;
	*identity = key.tunnel_id;
	return 0;
}

#endif
