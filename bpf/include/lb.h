/* Service load balancing (kube-proxy replacement), IPv4, TCP and UDP: frontend lookup,
 * backend selection (random, Maglev, session affinity), DNAT, and the reverse translation
 * of replies. Every step is a hash lookup: nothing loops over services or backends. */
#ifndef CILIA_LB_H
#define CILIA_LB_H

#include "common.h"
#include "config.h"
#include "metrics.h"
#include "nat.h"
#include "conntrack.h"

#define CILIA_LB_MAP_MAX      65536
#define CILIA_LB_AFFINITY_MAX 65536

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(max_entries, CILIA_LB_MAP_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(max_entries, CILIA_LB_MAP_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16);
	__type(value, struct lb4_reverse_nat);
	__uint(max_entries, CILIA_LB_MAP_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_reverse_nat SEC(".maps");

/* Template for the per-service Maglev tables. BPF_F_INNER_MAP lets the agent insert
 * arrays of any size M (CONFIG.lb_maglev_m, a per-node setting) without recompiling;
 * the price is a lookup through the helper instead of an inlined array access. */
struct lb4_maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_INNER_MAP);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__type(key, struct lb4_maglev_key);
	__uint(max_entries, CILIA_LB_MAP_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct lb4_maglev_inner);
} cilia_lb4_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_affinity_key);
	__type(value, struct lb4_affinity_val);
	__uint(max_entries, CILIA_LB_AFFINITY_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lb4_affinity SEC(".maps");

/* Linux's jhash_3words; src/cilia/datapath/lb.py mirrors it so the control plane and the
 * tests can tell which Maglev entry a flow maps to. */
#define LB_JHASH_INITVAL 0xdeadbeef
#define LB_HASH_SEED     0x63696c69 /* "cili" */

static __always_inline __u32 lb_rol32(__u32 w, __u32 s)
{
	return (w << s) | (w >> (32 - s));
}

static __always_inline __u32 lb_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	initval += LB_JHASH_INITVAL + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	c ^= b; c -= lb_rol32(b, 14);
	a ^= c; a -= lb_rol32(c, 11);
	b ^= a; b -= lb_rol32(a, 25);
	c ^= b; c -= lb_rol32(b, 16);
	a ^= c; a -= lb_rol32(c, 4);
	b ^= a; b -= lb_rol32(a, 14);
	c ^= b; c -= lb_rol32(b, 24);
	return c;
}

/* Over the tuple as it sits in memory (addresses and ports in network order). */
static __always_inline __u32 lb4_hash(const struct nat_key4 *t)
{
	return lb_jhash_3words(t->saddr, t->daddr, ((__u32)t->dport << 16) | t->sport,
			       LB_HASH_SEED ^ t->nexthdr);
}

/* The tuple and rewrite offsets of a TCP/UDP packet: 0, or 1 when the packet has no
 * ports to balance on (other protocols, fragments, truncated headers: left alone). */
static __always_inline int lb4_parse(struct __sk_buff *skb, const struct iphdr *ip, struct nat_pkt *p)
{
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return 1;
	/* Later fragments carry no ports; without fragment tracking a translated first
	 * fragment would be separated from them, so fragmented datagrams stay untouched. */
	if (ip->frag_off & bpf_htons(0x3fff))
		return 1;
	/* Truncated headers are not ours to judge here: the stack or the peer will. */
	return nat_parse(skb, ip, NAT_DIR_EGRESS, 0, p) ? 1 : 0;
}

static __always_inline struct lb4_service *lb4_lookup_service(struct lb4_key *key, bool internal)
{
	struct lb4_service *svc;

	svc = bpf_map_lookup_elem(&cilia_lb4_services, key);
	if (svc && internal && (svc->flags2 & SVC_F2_TWO_SCOPES)) {
		struct lb4_service *in;

		key->scope = LB_SCOPE_INT;
		in = bpf_map_lookup_elem(&cilia_lb4_services, key);
		if (in)
			return in;
		key->scope = LB_SCOPE_EXT;
	}
	return svc;
}

static __always_inline struct lb4_backend *lb4_lookup_backend(__u32 id)
{
	return bpf_map_lookup_elem(&cilia_lb4_backends, &id);
}

static __always_inline __u32 lb4_select_slot(struct lb4_key *key, const struct lb4_service *svc,
					     const struct nat_key4 *t)
{
	struct lb4_service *slot;

	if (svc->flags2 & SVC_F2_MAGLEV) {
		struct lb4_maglev_key mk = { .rev_nat_index = svc->rev_nat_index, .scope = key->scope };
		__u32 idx, *id;
		void *table;

		table = bpf_map_lookup_elem(&cilia_lb4_maglev, &mk);
		if (!table || !CONFIG.lb_maglev_m)
			return 0;
		idx = lb4_hash(t) % CONFIG.lb_maglev_m;
		id = bpf_map_lookup_elem(table, &idx);
		return id ? *id : 0;
	}
	key->backend_slot = (bpf_get_prandom_u32() % svc->count) + 1;
	slot = bpf_map_lookup_elem(&cilia_lb4_services, key);
	key->backend_slot = 0;
	return slot ? slot->backend_id : 0;
}

/* What the balancer decided for one packet addressed to a frontend. */
struct lb4_decision {
	struct lb4_backend backend;
	__u32 backend_id;
	__u16 rev_nat_index;
	__u8  svc_flags;
	__u8  svc_flags2;
	bool  write_reply;    /* new flow, or a second passed: (re)write the REPLY entry */
};

/* Frontend lookup and backend choice for the flow of p (CT first). 0 with *d filled,
 * 1 when p is not addressed to a service (of this traffic direction), or a DROP_*. */
static __always_inline int lb4_decide(const struct nat_pkt *p, bool internal, struct lb4_decision *d)
{
	struct lb4_key key = {
		.address = p->key.daddr, .dport = p->key.dport, .proto = p->key.nexthdr,
	};
	struct ct4_key ctk = {
		.daddr = p->key.daddr, .saddr = p->key.saddr, .dport = p->key.dport,
		.sport = p->key.sport, .nexthdr = p->key.nexthdr, .flags = CT_TUPLE_SERVICE,
	};
	struct lb4_service *svc;
	struct lb4_backend *be = NULL;
	struct ct4_entry *ct, new_ct = {};
	__u32 now, id = 0;

	svc = lb4_lookup_service(&key, internal);
	if (!svc)
		return 1;
	/* A ClusterIP is not a frontend for traffic from outside the cluster. */
	if (!internal && !(svc->flags & SVC_F_ROUTABLE))
		return 1;

	now = nat_now();
	ct = bpf_map_lookup_elem(&cilia_ct4_global, &ctk);
	if (ct && !ct4_expired(ct, p->key.nexthdr, now) && ct->rev_nat_index == svc->rev_nat_index) {
		/* Established: keep the backend while it exists, terminating or not. */
		be = lb4_lookup_backend(ct->backend_id);
		if (be) {
			d->backend_id = ct->backend_id;
			d->write_reply = ct4_touch(ct, now);
			goto found;
		}
	}

	if (!svc->count)
		return DROP_NO_SERVICE;
	if (svc->flags & SVC_F_AFFINITY) {
		struct lb4_affinity_key ak = { .client_ip = p->key.saddr, .rev_nat_index = svc->rev_nat_index };
		struct lb4_affinity_val *av = bpf_map_lookup_elem(&cilia_lb4_affinity, &ak);

		if (av && now - av->last_used <= svc->affinity_timeout) {
			be = lb4_lookup_backend(av->backend_id);
			if (be && be->state == BE_STATE_ACTIVE)
				id = av->backend_id;
			else
				be = NULL;
		}
	}
	if (!be) {
		id = lb4_select_slot(&key, svc, &p->key);
		be = id ? lb4_lookup_backend(id) : NULL;
		if (!be)
			return DROP_NO_SERVICE;
	}
	if (svc->flags & SVC_F_AFFINITY) {
		struct lb4_affinity_key ak = { .client_ip = p->key.saddr, .rev_nat_index = svc->rev_nat_index };
		struct lb4_affinity_val av = { .backend_id = id, .last_used = now };

		bpf_map_update_elem(&cilia_lb4_affinity, &ak, &av, BPF_ANY);
	}
	new_ct.backend_id = id;
	new_ct.rev_nat_index = svc->rev_nat_index;
	new_ct.created = now;
	new_ct.last_seen = now;
	if (bpf_map_update_elem(&cilia_ct4_global, &ctk, &new_ct, BPF_ANY) < 0)
		return DROP_WRITE_ERROR;
	d->backend_id = id;
	d->write_reply = true;

found:
	d->backend = *be;
	d->rev_nat_index = svc->rev_nat_index;
	d->svc_flags = svc->flags;
	d->svc_flags2 = svc->flags2;
	return 0;
}

/* Records how to translate replies of the flow: they arrive as backend -> reply_daddr
 * (the client, or the hairpin address), to leave as frontend -> client. */
static __always_inline int lb4_write_reply(const struct nat_pkt *p, const struct lb4_decision *d,
					   __u32 reply_daddr, __u16 flags)
{
	__u32 now = nat_now();
	struct ct4_key k = {
		.daddr = reply_daddr, .saddr = d->backend.address, .dport = p->key.sport,
		.sport = d->backend.port, .nexthdr = p->key.nexthdr, .flags = CT_TUPLE_REPLY,
	};
	struct ct4_entry e = {
		.backend_id = d->backend_id, .rev_nat_index = d->rev_nat_index, .flags = flags,
		.created = now, .last_seen = now,
	};

	if (bpf_map_update_elem(&cilia_ct4_global, &k, &e, BPF_ANY) < 0)
		return DROP_WRITE_ERROR;
	return 0;
}

/* Destination -> backend. */
static __always_inline int lb4_dnat(struct __sk_buff *skb, const struct nat_pkt *p, const struct lb4_decision *d)
{
	return nat_rewrite(skb, p, IP_DADDR_OFF, p->key.daddr, d->backend.address, p->dport_off,
			   p->key.dport, d->backend.port);
}

/* A new direct TCP connection that reuses the port pair of a finished service flow to
 * the same backend: that flow's reply entry would rewrite the new connection's replies to
 * the frontend, so it goes (Cilium closes such entries on FIN/RST; we only see the SYN). */
static __always_inline void lb4_forget_stale_reply(struct __sk_buff *skb, const struct nat_pkt *p)
{
	struct ct4_key k = {
		.daddr = p->key.saddr, .saddr = p->key.daddr, .dport = p->key.sport,
		.sport = p->key.dport, .nexthdr = p->key.nexthdr, .flags = CT_TUPLE_REPLY,
	};
	__u8 tcp_flags;

	if (p->key.nexthdr != IPPROTO_TCP)
		return;
	/* dport_off + 11 = TCP header offset + 13: the flags byte. */
	if (bpf_skb_load_bytes(skb, p->dport_off + 11, &tcp_flags, 1) < 0)
		return;
	if ((tcp_flags & 0x12) != 0x02) /* SYN without ACK */
		return;
	bpf_map_delete_elem(&cilia_ct4_global, &k);
}

/* East-west, from a pod: a packet to a frontend is translated to its backend (a pod
 * reaching itself gets the hairpin source). 0 translated, 1 not a service, or DROP_*. */
static __always_inline int lb4_from_pod(struct __sk_buff *skb, const struct nat_pkt *p)
{
	struct lb4_decision d = {};
	__u32 reply_daddr = p->key.saddr;
	__u16 flags = 0;
	int ret;

	ret = lb4_decide(p, true, &d);
	if (ret == 1)
		lb4_forget_stale_reply(skb, p);
	if (ret)
		return ret;
	if (d.backend.address == p->key.saddr && CONFIG.lb_hairpin_ip4) {
		/* Loopback through the service: with its own address as source the pod would
		 * answer itself locally and never reach the reverse translation. */
		reply_daddr = CONFIG.lb_hairpin_ip4;
		flags |= CT_F_HAIRPIN;
	}
	if (d.write_reply) {
		ret = lb4_write_reply(p, &d, reply_daddr, flags);
		if (ret)
			return ret;
	}
	ret = lb4_dnat(skb, p, &d);
	if (ret)
		return ret;
	if (flags & CT_F_HAIRPIN)
		ret = nat_rewrite(skb, p, IP_SADDR_OFF, p->key.saddr, reply_daddr, p->sport_off,
				  p->key.sport, p->key.sport);
	return ret;
}

/* Reverse translation of a reply: source back to the frontend (and, for hairpin, the
 * destination back to the pod). One CT lookup; 0 translated (*ct_flags set), 1 not a
 * reply of a balanced flow, or DROP_*. */
static __always_inline int lb4_rev_nat(struct __sk_buff *skb, __u16 *ct_flags)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct nat_pkt p = {};
	struct ct4_key k = {};
	struct ct4_entry *ct;
	struct lb4_reverse_nat *rn;
	__u16 idx, flags;
	int ret;

	if (!PKT_HAS(data, data_end, sizeof(struct ethhdr), sizeof(*ip)))
		return 1;
	if (lb4_parse(skb, ip, &p))
		return 1;
	k.daddr = p.key.daddr;
	k.saddr = p.key.saddr;
	k.dport = p.key.dport;
	k.sport = p.key.sport;
	k.nexthdr = p.key.nexthdr;
	k.flags = CT_TUPLE_REPLY;
	ct = bpf_map_lookup_elem(&cilia_ct4_global, &k);
	if (!ct)
		return 1;
	idx = ct->rev_nat_index;
	flags = ct->flags;
	ct4_touch(ct, nat_now());
	rn = bpf_map_lookup_elem(&cilia_lb4_reverse_nat, &idx);
	if (!rn)
		return 1; /* the service is gone: nothing to restore */
	if (flags & CT_F_HAIRPIN) {
		ret = nat_rewrite(skb, &p, IP_DADDR_OFF, p.key.daddr, p.key.saddr, p.dport_off,
				  p.key.dport, p.key.dport);
		if (ret)
			return ret;
	}
	ret = nat_rewrite(skb, &p, IP_SADDR_OFF, p.key.saddr, rn->address, p.sport_off, p.key.sport,
			  rn->port);
	if (ret)
		return ret;
	*ct_flags = flags;
	return 0;
}

#endif
