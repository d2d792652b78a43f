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
};
_Static_assert(sizeof(struct cilia_config) == 24, "cilia_config ABI");

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

#endif
