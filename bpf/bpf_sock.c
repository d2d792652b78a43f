// SPDX-License-Identifier: GPL-2.0
/* Socket-level load balancing (cgroup v2 sock_addr hooks): a socket connecting or sending
 * to a frontend is given a backend before any packet exists, so its packets need no
 * per-packet DNAT, no conntrack and no reverse NAT. recvmsg and getpeername hand the
 * frontend back to the application. Services with session affinity or Maglev are left
 * to the tc datapath: both select on the packet's tuple, which a socket does not have
 * yet at connect time. */
#include "common.h"
#include "config.h"
#include "lb.h"

#define SYS_PROCEED 1
#define CILIA_SK_REV_MAX 65536

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_sk_rev_key);
	__type(value, struct lb4_sk_rev_val);
	__uint(max_entries, CILIA_SK_REV_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_reverse_sk SEC(".maps");

static __always_inline void sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct lb4_key key = {
		.address = ctx->user_ip4, .dport = (__u16)ctx->user_port, .proto = (__u8)ctx->protocol,
	};
	struct lb4_sk_rev_key rk = {};
	struct lb4_sk_rev_val rv = {};
	struct lb4_service *svc, *slot;
	struct lb4_backend *be;

	if (key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP)
		return;
	svc = lb4_lookup_service(&key, true);
	/* No backend: let the packet path drop it, counted with its reason. */
	if (!svc || !svc->count)
		return;
	if ((svc->flags & SVC_F_AFFINITY) || (svc->flags2 & SVC_F2_MAGLEV))
		return;
	key.backend_slot = (bpf_get_prandom_u32() % svc->count) + 1;
	slot = bpf_map_lookup_elem(&cilia_lb4_services, &key);
	if (!slot)
		return;
	be = lb4_lookup_backend(slot->backend_id);
	if (!be)
		return;

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.address = be->address;
	rk.port = be->port;
	rv.address = ctx->user_ip4;
	rv.port = (__u16)ctx->user_port;
	rv.rev_nat_index = svc->rev_nat_index;
	/* Without the reverse entry the application would see the backend's address. */
	if (bpf_map_update_elem(&cilia_lb4_reverse_sk, &rk, &rv, BPF_ANY) < 0)
		return;
	ctx->user_ip4 = be->address;
	ctx->user_port = (__u32)be->port;
}

static __always_inline void sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct lb4_sk_rev_key rk = {
		.cookie = bpf_get_socket_cookie(ctx), .address = ctx->user_ip4, .port = (__u16)ctx->user_port,
	};
	struct lb4_sk_rev_val *rv;

	rv = bpf_map_lookup_elem(&cilia_lb4_reverse_sk, &rk);
	if (!rv)
		return;
	ctx->user_ip4 = rv->address;
	ctx->user_port = (__u32)rv->port;
}

SEC("cgroup/connect4")
int cil_sock4_connect(struct bpf_sock_addr *ctx)
{
	sock4_xlate_fwd(ctx);
	return SYS_PROCEED;
}

SEC("cgroup/sendmsg4")
int cil_sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	sock4_xlate_fwd(ctx);
	return SYS_PROCEED;
}

SEC("cgroup/recvmsg4")
int cil_sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int cil_sock4_getpeername(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}

char __license[] SEC("license") = "GPL";
