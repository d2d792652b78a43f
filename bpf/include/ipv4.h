/* IPv4 header helpers. */
#ifndef CILIA_IPV4_H
#define CILIA_IPV4_H

#include "common.h"

/* Same incremental update as the kernel's ip_decrease_ttl(): TTL is the high byte of
 * its 16-bit word, so the one's complement sum changes by htons(0x0100). The caller
 * must have checked ttl > 1. */
static __always_inline void ipv4_dec_ttl(struct iphdr *ip)
{
	__u32 check = (__u32)ip->check;

	check += (__u32)bpf_htons(0x0100);
	ip->check = (__sum16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

#endif
