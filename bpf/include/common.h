/* Shared includes and small helpers for every cilia BPF program. */
#ifndef CILIA_COMMON_H
#define CILIA_COMMON_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "abi.h"
#include "drop_reasons.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* Direct packet access bound check: true when [off, off+len) lies inside the packet. */
#define PKT_HAS(skb_data, skb_data_end, off, len) \
	((void *)(skb_data) + (off) + (len) <= (void *)(skb_data_end))

#endif
