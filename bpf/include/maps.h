/* Maps shared by the programs of one node. Pinned by name so they outlive the agent
 * and the loaded programs (the agent reuses them after a restart). */
#ifndef CILIA_MAPS_H
#define CILIA_MAPS_H

#include "common.h"

#define CILIA_LXC_MAX     65536
#define CILIA_METRICS_MAX 1024

/* Pod IPv4 -> local endpoint: where a packet to that address is delivered. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
	__uint(max_entries, CILIA_LXC_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lxc SEC(".maps");

/* Host-side veth ifindex -> endpoint: who sent a packet seen on that veth. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct endpoint_info);
	__uint(max_entries, CILIA_LXC_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_lxc_if SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct metrics_key);
	__type(value, struct metrics_value);
	__uint(max_entries, CILIA_METRICS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilia_metrics SEC(".maps");

#endif
