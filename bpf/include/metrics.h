/* Per-CPU packet/byte counters keyed like Cilium's metrics map (reason, direction). */
#ifndef CILIA_METRICS_H
#define CILIA_METRICS_H

#include "common.h"
#include "maps.h"
#include "events.h"

static __always_inline void update_metrics_flags(__u64 bytes, __u8 dir, __u8 reason, __u16 flags)
{
	struct metrics_key key = { .reason = reason, .dir = dir, .flags = flags };
	struct metrics_value *val;

	val = bpf_map_lookup_elem(&cilia_metrics, &key);
	if (val) {
		/* Per-CPU value: no other CPU writes it, a plain add is race free. */
		val->count += 1;
		val->bytes += bytes;
	} else {
		struct metrics_value init = { .count = 1, .bytes = bytes };

		bpf_map_update_elem(&cilia_metrics, &key, &init, BPF_ANY);
	}
}

static __always_inline void update_metrics(__u64 bytes, __u8 dir, __u8 reason)
{
	update_metrics_flags(bytes, dir, reason, 0);
}

/* Counts the drop with Cilium's positive reason number, reports it (drops are never
 * aggregated away) and returns the tc verdict. */
static __always_inline int send_drop(struct __sk_buff *skb, int reason, __u8 dir)
{
	update_metrics(skb->len, dir, (__u8)(-reason));
	event_drop(skb, reason, dir);
	return TC_ACT_SHOT;
}

#endif
