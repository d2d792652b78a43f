/* Structs shared between the datapath and the Python control plane.
 * Declared once here; src/cilia/datapath/abi.py mirrors them and a test checks that
 * mirror against the BTF of the compiled objects, so drift fails the build, not the lab. */
#ifndef CILIA_ABI_H
#define CILIA_ABI_H

#include <linux/types.h>

/* Node-wide settings, one const volatile instance per loaded object (set at load time). */
struct cilia_config {
	__u32 node_ip4;      /* network byte order */
	__u32 router_ip4;    /* pod default gateway (on cilia_host), network byte order */
	__u32 pod_cidr4;     /* network byte order */
	__u32 pod_cidr4_mask;/* network byte order */
	__u32 node_id;
	__u32 flags;
	/* Multi-node: how traffic for pods on other nodes leaves, and what gets masqueraded. */
	__u32 tunnel_ifindex;     /* cilia_vxlan; 0 = none */
	__u32 native_ifindex;     /* uplink (eth0); 0 = none */
	__u32 cluster_cidr4;      /* pod pool, network byte order: the "in-cluster" test */
	__u32 cluster_cidr4_mask; /* network byte order */
	__u8  routing;            /* ROUTING_* */
	__u8  masquerade;         /* 1 = SNAT pod -> outside-cluster traffic to node_ip4 */
	__u16 nat_port_min;       /* host byte order, inclusive */
	__u16 nat_port_max;       /* host byte order, inclusive */
	__u16 pad;
	/* Service load balancing. */
	__u32 lb_hairpin_ip4;     /* source of hairpinned flows (169.254.42.1), network order */
	__u32 lb_maglev_m;        /* Maglev table size M (a prime, Cilium's default 16381) */
};
_Static_assert(sizeof(struct cilia_config) == 56, "cilia_config ABI");

#define ROUTING_NATIVE 0
#define ROUTING_TUNNEL 1

/* cilia_lxc: pod IPv4 -> local endpoint. */
struct endpoint_key {
	__u32 ip4;           /* network byte order */
};
_Static_assert(sizeof(struct endpoint_key) == 4, "endpoint_key ABI");

#define EP_F_HOST 0x1        /* the node's own address, deliver to the stack */
/* Network policy: a direction without its ENFORCED bit allows everything (and looks
 * nothing up); AUDIT turns that endpoint's policy drops into counted forwards. */
#define EP_F_POLICY_INGRESS_ENFORCED 0x2
#define EP_F_POLICY_EGRESS_ENFORCED  0x4
#define EP_F_POLICY_AUDIT            0x8

struct endpoint_info {
	__u32 ifindex;       /* host-side veth (lxc...) in the node netns */
	__u32 ip4;           /* network byte order */
	__u16 ep_id;
	__u16 flags;         /* EP_F_* */
	__u32 sec_id;        /* security identity */
	__u8  mac[6];        /* pod eth0 MAC */
	__u8  node_mac[6];   /* host-side veth MAC: the router MAC the pod sees */
};
_Static_assert(sizeof(struct endpoint_info) == 28, "endpoint_info ABI");

/* cilia_metrics: per-CPU counters by (reason, direction), Cilium's layout. */
#define METRIC_INGRESS 1
#define METRIC_EGRESS  2

/* METRIC_F_AUDIT: a policy drop (reason DROP_POLICY or DROP_POLICY_DENY) that audit mode
 * forwarded instead. Its own key, so drop counters only ever count real drops. */
#define METRIC_F_AUDIT 0x1

struct metrics_key {
	__u8  reason;        /* 0 = forwarded, otherwise -DROP_* */
	__u8  dir;           /* METRIC_* */
	__u16 flags;         /* METRIC_F_* */
	__u16 reserved[2];
};
_Static_assert(sizeof(struct metrics_key) == 8, "metrics_key ABI");

struct metrics_value {
	__u64 count;
	__u64 bytes;
};
_Static_assert(sizeof(struct metrics_value) == 16, "metrics_value ABI");

/* Reserved security identities, Cilium's numbers. */
#define IDENTITY_HOST        1
#define IDENTITY_WORLD       2
#define IDENTITY_UNMANAGED   3
#define IDENTITY_INIT        5 /* an endpoint whose identity is not resolved yet */
#define IDENTITY_REMOTE_NODE 6
/* What a packet from endpoint ep carries in the VNI: never 0, which receivers refuse. */
#define EP_IDENTITY(ep) ((ep)->sec_id ? (ep)->sec_id : IDENTITY_INIT)
/* Identities at or above this are node-local (CIDR); below are cluster-wide. */
#define IDENTITY_LOCAL_MIN   (1U << 24)
#define IDENTITY_USER_MIN    256

/* cilia_ipcache (LPM trie): prefix -> identity and the node that hosts it. */
struct ipcache_key {
	__u32 prefixlen;     /* LPM: bits of ip4 that count */
	__u32 ip4;           /* network byte order */
};
_Static_assert(sizeof(struct ipcache_key) == 8, "ipcache_key ABI");

#define IPCACHE_F_REMOTE_NODE 0x1 /* a node or host address (never masqueraded) */

struct ipcache_value {
	__u32 sec_identity;
	__u32 tunnel_endpoint; /* node IP, network byte order; 0 = not behind a tunnel */
	__u8  flags;           /* IPCACHE_F_* */
	__u8  pad[3];
};
_Static_assert(sizeof(struct ipcache_value) == 12, "ipcache_value ABI");

/* cilia_snat_v4 (forward, keyed by the original tuple going out) and cilia_snat_v4_rev
 * (reverse, keyed by the reply tuple coming in). For ICMP echo the identifier is the
 * port: sport going out, dport coming back. */
#define NAT_DIR_EGRESS  1
#define NAT_DIR_INGRESS 2

struct nat_key4 {
	__u32 saddr;         /* network byte order */
	__u32 daddr;
	__u16 sport;         /* network byte order */
	__u16 dport;
	__u8  nexthdr;       /* IPPROTO_* */
	__u8  dir;           /* NAT_DIR_* */
	__u8  pad[2];
};
_Static_assert(sizeof(struct nat_key4) == 16, "nat_key4 ABI");

struct nat_entry4 {
	__u32 to_addr;       /* forward: node IP; reverse: pod IP (network byte order) */
	__u16 to_port;       /* forward: NAT port; reverse: original port (network order) */
	__u16 pad;
	__u32 created;       /* seconds of bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u32 last_seen;
};
_Static_assert(sizeof(struct nat_entry4) == 16, "nat_entry4 ABI");

/* -- Service load balancing (Cilium's lb4 maps) ---------------------------------------
 * cilia_lb4_services: one entry per (frontend, scope, slot). Slot 0 describes the service,
 * slots 1..count name its active backends, so picking a backend is one lookup by slot. */
#define LB_SCOPE_EXT 0 /* north-south, and east-west unless the service has two scopes */
#define LB_SCOPE_INT 1 /* east-west when SVC_F2_TWO_SCOPES (ETP/ITP Local split the sets) */

struct lb4_key {
	__u32 address;       /* frontend IPv4, network byte order */
	__u16 dport;         /* frontend port, network byte order */
	__u16 backend_slot;  /* 0 = the service entry, 1..count = backends */
	__u8  proto;         /* IPPROTO_TCP / IPPROTO_UDP */
	__u8  scope;         /* LB_SCOPE_* */
	__u8  pad[2];
};
_Static_assert(sizeof(struct lb4_key) == 12, "lb4_key ABI");

/* flags: Cilium's SVC_FLAG_* bit numbers. */
#define SVC_F_EXTERNAL_IP     0x01
#define SVC_F_NODEPORT        0x02
#define SVC_F_EXT_LOCAL_SCOPE 0x04 /* externalTrafficPolicy=Local */
#define SVC_F_HOSTPORT        0x08
#define SVC_F_AFFINITY        0x10 /* sessionAffinity=ClientIP */
#define SVC_F_LOADBALANCER    0x20
#define SVC_F_ROUTABLE        0x40 /* reachable from outside the cluster (not ClusterIP only) */
/* flags2 */
#define SVC_F2_INT_LOCAL_SCOPE 0x10 /* internalTrafficPolicy=Local */
#define SVC_F2_TWO_SCOPES      0x20 /* an LB_SCOPE_INT entry exists for east-west traffic */
#define SVC_F2_MAGLEV          0x80 /* cilia: Maglev selection for this service */

struct lb4_service {
	__u32 backend_id;       /* slots >= 1: the backend; slot 0: unused */
	__u16 count;            /* slot 0: active backends (slots 1..count) */
	__u16 rev_nat_index;    /* slot 0: key of cilia_lb4_reverse_nat and the Maglev table */
	__u8  flags;            /* SVC_F_* */
	__u8  flags2;           /* SVC_F2_* */
	__u16 pad;
	__u32 affinity_timeout; /* seconds, with SVC_F_AFFINITY */
};
_Static_assert(sizeof(struct lb4_service) == 16, "lb4_service ABI");

#define BE_STATE_ACTIVE      0
#define BE_STATE_TERMINATING 1 /* keeps established flows, gets no new ones */

struct lb4_backend {
	__u32 address;       /* network byte order */
	__u16 port;          /* network byte order */
	__u8  proto;
	__u8  state;         /* BE_STATE_* */
};
_Static_assert(sizeof(struct lb4_backend) == 8, "lb4_backend ABI");

struct lb4_reverse_nat {
	__u32 address;       /* frontend, network byte order */
	__u16 port;          /* network byte order */
	__u16 pad;
};
_Static_assert(sizeof(struct lb4_reverse_nat) == 8, "lb4_reverse_nat ABI");

/* cilia_lb4_maglev: outer key; each scope has its own backend set, hence its own table. */
struct lb4_maglev_key {
	__u16 rev_nat_index;
	__u8  scope;
	__u8  pad;
};
_Static_assert(sizeof(struct lb4_maglev_key) == 4, "lb4_maglev_key ABI");

struct lb4_affinity_key {
	__u32 client_ip;     /* network byte order */
	__u16 rev_nat_index;
	__u16 pad;
};
_Static_assert(sizeof(struct lb4_affinity_key) == 8, "lb4_affinity_key ABI");

struct lb4_affinity_val {
	__u32 backend_id;
	__u32 last_used;     /* seconds of CLOCK_MONOTONIC */
};
_Static_assert(sizeof(struct lb4_affinity_val) == 8, "lb4_affinity_val ABI");

/* cilia_ct4_global: service conntrack. Two entries per flow: the SERVICE entry, keyed by
 * the tuple the client sent (to the frontend), pins the backend; the REPLY entry, keyed
 * by the tuple replies carry (backend -> client, after any reverse SNAT), names the
 * frontend to restore. Cilium's ipv4_ct_tuple field order. */
#define CT_TUPLE_REPLY   0x1
#define CT_TUPLE_SERVICE 0x4

struct ct4_key {
	__u32 daddr;         /* network byte order */
	__u32 saddr;
	__u16 dport;         /* network byte order */
	__u16 sport;
	__u8  nexthdr;
	__u8  flags;         /* CT_TUPLE_* */
	__u16 pad;
};
_Static_assert(sizeof(struct ct4_key) == 16, "ct4_key ABI");

#define CT_F_HAIRPIN  0x1 /* client == backend: source was rewritten to lb_hairpin_ip4 */
#define CT_F_NODEPORT 0x2 /* north-south: replies leave through the uplink (FIB) */
#define CT_F_SNAT     0x4 /* north-south to a remote backend: source SNATed to the node IP */

struct ct4_entry {
	__u32 backend_id;
	__u16 rev_nat_index;
	__u16 flags;         /* CT_F_* */
	__u32 created;       /* seconds of CLOCK_MONOTONIC */
	__u32 last_seen;
};
_Static_assert(sizeof(struct ct4_entry) == 16, "ct4_entry ABI");

/* cilia_lb4_reverse_sk: socket-level LB. A socket connected (or sending) to a frontend
 * was given the backend instead; recvmsg/getpeername show the frontend again. */
struct lb4_sk_rev_key {
	__u64 cookie;        /* bpf_get_socket_cookie() */
	__u32 address;       /* backend, network byte order */
	__u16 port;          /* backend, network byte order */
	__u16 pad;
};
_Static_assert(sizeof(struct lb4_sk_rev_key) == 16, "lb4_sk_rev_key ABI");

struct lb4_sk_rev_val {
	__u32 address;       /* frontend, network byte order */
	__u16 port;
	__u16 rev_nat_index;
};
_Static_assert(sizeof(struct lb4_sk_rev_val) == 8, "lb4_sk_rev_val ABI");

/* -- Network policy ---------------------------------------------------------------------
 * cilia_policy (LPM trie, shared by every endpoint of the node). Every field after
 * prefixlen is in network byte order: the trie compares key bits most significant first
 * in memory order, so only a big-endian dport makes "the first N bits" the high bits of
 * the port; ep_id and identity follow suit so that the bytes are the policy engine's
 * (src/cilia/policy/mapstate.py). prefixlen = 64 (ep_id, direction, proto, identity,
 * always exact) + 0..16 bits of dport. proto 0 and identity 0 mean "any": the datapath
 * looks up (identity, proto), (identity, 0), (0, proto) and (0, 0), each with the full
 * port. ICMP: proto 1, dport = the ICMP type. */
#define POLICY_INGRESS 0
#define POLICY_EGRESS  1
#define POLICY_FIXED_PREFIX 64
#define POLICY_FULL_PREFIX  80

struct cilia_policy_key {
	__u32 prefixlen;     /* host byte order */
	__u16 ep_id;         /* network byte order */
	__u8  direction;     /* POLICY_INGRESS / POLICY_EGRESS */
	__u8  proto;         /* IPPROTO_*, 0 = any */
	__u32 identity;      /* peer identity, network byte order, 0 = any */
	__u16 dport;         /* network byte order; ICMP: the type */
	__u16 pad;           /* 0, never covered by prefixlen */
};
_Static_assert(sizeof(struct cilia_policy_key) == 16, "cilia_policy_key ABI");

#define POLICY_F_ALLOW 0x1
#define POLICY_F_DENY  0x2   /* wins over any ALLOW hit of the same packet */

struct cilia_policy_value {
	__u8  flags;         /* POLICY_F_* */
	__u8  pad1;
	__u16 pad2;
	__u32 rule_cookie;   /* host byte order; names the rule for the control plane */
};
_Static_assert(sizeof(struct cilia_policy_value) == 8, "cilia_policy_value ABI");

/* cilia_ct4_policy (LRU): connections policy already let through, keyed by the tuple of
 * the packet that opened them (ct4_key, flags 0) as egress policy saw it: after service
 * DNAT, before any reverse translation. Packets with that tuple, or its reverse, skip
 * the policy lookups. */
#define PCT_F_AUDIT 0x1      /* let through only because an endpoint was in audit mode */
#define PCT_F_REPLIED 0x2    /* a reply was seen: events report only the first one */

struct ct4_policy_entry {
	__u32 created;       /* seconds of CLOCK_MONOTONIC */
	__u32 last_seen;
	__u16 flags;         /* PCT_F_* */
	__u16 pad;
};
_Static_assert(sizeof(struct ct4_policy_entry) == 12, "ct4_policy_entry ABI");

#endif
