/* Ethernet and ARP (Ethernet/IPv4 only) layouts and the ARP responder. */
#ifndef CILIA_ETH_H
#define CILIA_ETH_H

#include "common.h"

#define ARPHRD_ETHER_BE  bpf_htons(1)
#define ARPOP_REQUEST_BE bpf_htons(1)
#define ARPOP_REPLY_BE   bpf_htons(2)

/* ARP payload for hardware type Ethernet and protocol IPv4 (RFC 826). */
struct arp_eth_ip4 {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8   ar_hln;
	__u8   ar_pln;
	__be16 ar_op;
	__u8   ar_sha[ETH_ALEN];
	__be32 ar_sip;
	__u8   ar_tha[ETH_ALEN];
	__be32 ar_tip;
} __attribute__((packed));

static __always_inline void mac_copy(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, ETH_ALEN);
}

static __always_inline bool arp_is_eth_ip4_request(const struct arp_eth_ip4 *arp)
{
	return arp->ar_op == ARPOP_REQUEST_BE && arp->ar_hrd == ARPHRD_ETHER_BE &&
	       arp->ar_pro == bpf_htons(ETH_P_IP) && arp->ar_hln == ETH_ALEN &&
	       arp->ar_pln == 4;
}

/* Turns the request in place into the reply "tip is at router_mac", addressed to the
 * requester. The pod then sends everything to its host-side veth, whatever the next hop. */
static __always_inline void arp_make_reply(struct ethhdr *eth, struct arp_eth_ip4 *arp,
					   const __u8 *router_mac)
{
	__be32 tip = arp->ar_tip;

	arp->ar_op = ARPOP_REPLY_BE;
	mac_copy(arp->ar_tha, arp->ar_sha);
	arp->ar_tip = arp->ar_sip;
	mac_copy(arp->ar_sha, router_mac);
	arp->ar_sip = tip;

	mac_copy(eth->h_dest, arp->ar_tha);
	mac_copy(eth->h_source, router_mac);
}

#endif
