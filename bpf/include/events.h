/* Datapath events for the monitor and Hubble flows: trace, drop and policy verdict, one
 * fixed-size record each in a BPF ring buffer the agent reads through mmap.
 *
 * Cost: nothing at all for packets that report nothing (the decision is a few compares on
 * what the program already parsed); a reported packet costs one ring reserve, one header
 * fill and one bpf_skb_load_bytes of its first CILIA_EVENT_CAP bytes. Aggregation follows
 * Cilium's monitorAggregation=medium: traces for a new connection, its first reply (one
 * flag store in the policy conntrack entry, PCT_F_REPLIED), TCP packets with SYN, FIN or
 * RST (flag changes and closing) and nothing else; drops always; policy
 * verdicts when an enforced policy judges a new connection. CONFIG_F_EVENTS_PER_PACKET
 * traces every packet instead, CONFIG_F_EVENTS_OFF emits nothing.
 *
 * A full ring is never silent: each event that did not fit is counted in the per-CPU
 * cilia_events_lost. Numbers (event types, observation points, ct states, match types)
 * are Cilium's so `cilia monitor` and flows read like theirs. */
#ifndef CILIA_EVENTS_H
#define CILIA_EVENTS_H

#include "common.h"
#include "config.h"

/* cilia_config.flags */
#define CONFIG_F_EVENTS_PER_PACKET 0x1
#define CONFIG_F_EVENTS_OFF        0x2

#define CILIA_EVENTS_RING_SIZE (4 << 20)
#define CILIA_EVENT_CAP 128 /* Ethernet + IPv4 with options + TCP with options */

/* Cilium's CILIUM_NOTIFY_* message types. */
#define CILIA_EVENT_DROP           1
#define CILIA_EVENT_TRACE          4
#define CILIA_EVENT_POLICY_VERDICT 5

/* Cilium's trace observation points (enum trace_point). */
#define TRACE_TO_LXC       0
#define TRACE_TO_STACK     3
#define TRACE_TO_OVERLAY   4
#define TRACE_FROM_LXC     5
#define TRACE_FROM_OVERLAY 9
#define TRACE_FROM_NETWORK 10

/* ct_state: Cilium's TRACE_REASON_* (and the policy conntrack's POL_CT_*). */
#define EVT_CT_NEW         0
#define EVT_CT_ESTABLISHED 1
#define EVT_CT_REPLY       2
#define EVT_CT_RELATED     3

/* flags */
#define EVT_F_INGRESS  0x1 /* drop / verdict: the ingress side (a pod receiving) */
#define EVT_F_EGRESS   0x2 /* the egress side (a pod sending) */
#define EVT_F_SERVICE  0x4 /* orig_daddr/orig_dport: the frontend before service DNAT */

/* Policy verdict action and match type (Cilium's POLICY_MATCH_*). */
#define EVT_ACTION_ALLOW 0
#define EVT_ACTION_DENY  1
#define EVT_ACTION_AUDIT 2
#define POLICY_MATCH_NONE     0
#define POLICY_MATCH_L3_ONLY  1
#define POLICY_MATCH_L3_L4    2
#define POLICY_MATCH_L4_ONLY  3
#define POLICY_MATCH_ALL      4

struct cilia_event {
	__u64 ktime_ns;      /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 ifindex;       /* trace to-endpoint: the pod's veth; else the program's device */
	__u32 src_identity;  /* 0 = not known where the event was raised */
	__u32 dst_identity;
	__u32 orig_len;      /* skb->len */
	__u32 orig_daddr;    /* with EVT_F_SERVICE: frontend address, network order */
	__u32 rule_cookie;   /* verdict: cookie of the deciding policy entry, 0 = none */
	__u16 ep_id;         /* the local endpoint concerned; 0 = none or unknown */
	__u16 orig_dport;    /* with EVT_F_SERVICE: frontend port, network order */
	__u16 cap_len;       /* valid bytes in data[] */
	__u16 dport;         /* verdict: the port rules matched (host order; ICMP: type) */
	__u8  type;          /* CILIA_EVENT_* */
	__u8  subtype;       /* drop: reason (positive); trace: TRACE_*; verdict: 0 */
	__u8  ct_state;      /* EVT_CT_* */
	__u8  flags;         /* EVT_F_* */
	__u8  action;        /* verdict: EVT_ACTION_* */
	__u8  match_type;    /* verdict: POLICY_MATCH_* */
	__u8  proto;         /* verdict: IPPROTO_* */
	__u8  pad;
	__u8  data[CILIA_EVENT_CAP]; /* the packet from its Ethernet header */
};
_Static_assert(sizeof(struct cilia_event) == 48 + CILIA_EVENT_CAP, "cilia_event ABI");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CILIA_EVENTS_RING_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_events_lost SEC(".maps");

static __always_inline void event_count_lost(void)
{
	__u32 key = 0;
	__u64 *lost = bpf_map_lookup_elem(&cilia_events_lost, &key);

	if (lost)
		*lost += 1; /* per-CPU: no other writer */
}

/* A zeroed record with the packet's first bytes, or NULL (events off, or ring full:
 * counted). The caller fills its fields and submits. */
static __always_inline struct cilia_event *event_reserve(struct __sk_buff *skb, __u8 type, __u8 subtype)
{
	struct cilia_event *e;
	__u32 n = skb->len;

	if (CONFIG.flags & CONFIG_F_EVENTS_OFF)
		return NULL;
	e = bpf_ringbuf_reserve(&cilia_events, sizeof(*e), 0);
	if (!e) {
		event_count_lost();
		return NULL;
	}
	__builtin_memset(e, 0, __builtin_offsetof(struct cilia_event, data));
	e->ktime_ns = bpf_ktime_get_ns();
	e->ifindex = skb->ifindex;
	e->orig_len = skb->len;
	e->type = type;
	e->subtype = subtype;
	if (n > CILIA_EVENT_CAP)
		n = CILIA_EVENT_CAP;
	if (n >= 1 && n <= CILIA_EVENT_CAP && bpf_skb_load_bytes(skb, 0, e->data, n) == 0)
		e->cap_len = n;
	return e;
}

/* Not inlined on purpose: records reach the ring through void pointers, and this
 * function's parameter is what puts struct cilia_event into the objects' BTF, where the
 * Python mirror is checked. One call per reported event. */
static __attribute__((noinline)) void event_submit(struct cilia_event *e)
{
	/* Flags 0: the kernel wakes the reader only when it has caught up (adaptive). */
	bpf_ringbuf_submit(e, 0);
}

/* Whether a packet in conntrack state ct_state with TCP flags tcp_flags (0 for other
 * protocols) is traced: the aggregation decision, no map access. */
static __always_inline bool event_trace_wanted(__u8 ct_state, __u8 tcp_flags)
{
	if (CONFIG.flags & CONFIG_F_EVENTS_PER_PACKET)
		return true;
	/* tcphdr byte 13: FIN 0x01, SYN 0x02, RST 0x04 */
	return ct_state == EVT_CT_NEW || (tcp_flags & 0x07);
}

static __always_inline void event_drop(struct __sk_buff *skb, int reason, __u8 dir)
{
	struct cilia_event *e = event_reserve(skb, CILIA_EVENT_DROP, (__u8)(-reason));

	if (!e)
		return;
	/* dir is METRIC_INGRESS (1) or METRIC_EGRESS (2): the same bits as EVT_F_*. */
	e->flags = dir & (EVT_F_INGRESS | EVT_F_EGRESS);
	event_submit(e);
}

/* What a trace says beyond the packet. */
struct event_trace_info {
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;       /* 0 = the program's device */
	__u32 orig_daddr;    /* service frontend, 0 = none */
	__u16 orig_dport;
	__u16 ep_id;
	__u8  ct_state;
	__u8  tcp_flags;
	bool  first;         /* report regardless of aggregation (a connection's first reply) */
};

static __always_inline void event_trace(struct __sk_buff *skb, __u8 obs, const struct event_trace_info *ti)
{
	struct cilia_event *e;

	if (!ti->first && !event_trace_wanted(ti->ct_state, ti->tcp_flags))
		return;
	e = event_reserve(skb, CILIA_EVENT_TRACE, obs);
	if (!e)
		return;
	e->src_identity = ti->src_identity;
	e->dst_identity = ti->dst_identity;
	if (ti->ifindex)
		e->ifindex = ti->ifindex;
	e->ep_id = ti->ep_id;
	e->ct_state = ti->ct_state;
	if (ti->orig_daddr) {
		e->orig_daddr = ti->orig_daddr;
		e->orig_dport = ti->orig_dport;
		e->flags |= EVT_F_SERVICE;
	}
	event_submit(e);
}

#endif
