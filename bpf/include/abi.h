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
};
_Static_assert(sizeof(struct cilia_config) == 48, "cilia_config ABI");

#define ROUTING_NATIVE 0
#define ROUTING_TUNNEL 1

/* cilia_lxc: pod IPv4 -> local endpoint. */
struct endpoint_key {
	__u32 ip4;           /* network byte order */
};
_Static_assert(sizeof(struct endpoint_key) == 4, "endpoint_key ABI");

#define EP_F_HOST 0x1        /* the node's own address, deliver to the stack */

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

struct metrics_key {
	__u8  reason;        /* 0 = forwarded, otherwise -DROP_* */
	__u8  dir;           /* METRIC_* */
	__u16 reserved[3];
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

#endif
