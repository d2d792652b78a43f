/* Drop reasons, numbered exactly like Cilium's bpf/lib/common.h so that metrics and
 * flow output read the same for a Cilium user. src/cilia/datapath/reasons.py holds the
 * names; tests/datapath/test_reasons.py fails if the two drift apart. */
#ifndef CILIA_DROP_REASONS_H
#define CILIA_DROP_REASONS_H

#define DROP_INVALID_SIP	-132
#define DROP_POLICY		-133
#define DROP_INVALID		-134
#define DROP_UNKNOWN_L3		-139
#define DROP_WRITE_ERROR	-141
#define DROP_UNKNOWN_L4		-142
#define DROP_NO_TUNNEL_KEY	-147
#define DROP_UNKNOWN_TARGET	-150
#define DROP_UNROUTABLE		-151
#define DROP_CSUM_L3		-153
#define DROP_CSUM_L4		-154
#define DROP_FRAG_NOSUPPORT	-157
#define DROP_NO_SERVICE		-158
#define DROP_NO_TUNNEL_ENDPOINT	-160
#define DROP_UNSUPPORTED_L2	-166
#define DROP_NAT_NO_MAPPING	-167
#define DROP_NAT_UNSUPP_PROTO	-168
#define DROP_NO_FIB		-169
#define DROP_INVALID_IDENTITY	-171
#define DROP_POLICY_DENY	-181
#define DROP_TTL_EXCEEDED	-196

#endif
