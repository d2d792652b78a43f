"""Policy map entries: the ABI shared with the datapath, and how entries are built.

Map ABI
=======
One BPF_MAP_TYPE_LPM_TRIE named ``cilia_policy`` (BPF_F_NO_PREALLOC, suggested
max_entries 65536), shared by every endpoint of the node::

    struct cilia_policy_key {        /* 16 bytes */
        __u32 prefixlen;             /* host order: bits of the data below that matter   */
        __be16 ep_id;                /* endpoint id                                      */
        __u8  direction;             /* 0 ingress, 1 egress                              */
        __u8  proto;                 /* IP protocol, 0 = any                             */
        __be32 identity;             /* peer security identity, 0 = any                  */
        __be16 dport;                /* destination port (ICMP: type), prefix-matched    */
        __u16 pad;                   /* always 0, never covered by prefixlen             */
    };
    struct cilia_policy_value {      /* 8 bytes */
        __u8  flags;                 /* ALLOW = 1, DENY = 2 (both may be set)            */
        __u8  pad1;
        __u16 pad2;
        __u32 rule_cookie;           /* host order; names the rule (PolicyEngine.rule_source) */
    };

Every field after prefixlen is big-endian (network order): the LPM trie compares key bits
most-significant first in memory order, so only big-endian fields make "the first N bits
of dport" the high bits of the port number. The packet's dport is already in that order
and can be copied as is; ep_id and identity need bpf_htons/bpf_htonl. An entry's
prefixlen is 64 + the port prefix length (0..16): ep_id, direction, proto and identity
are always matched exactly.

Datapath algorithm, per packet and direction, when the packet does not belong to a
tracked connection (replies of connections conntrack already allowed pass without a
lookup; that is the datapath's conntrack, not this map):

    key = {prefixlen 80, ep_id, direction, proto, identity, dport}   (ICMP: dport = type)
    look up 4 keys: (identity, proto), (identity, 0), (0, proto), (0, 0), full dport each
    any hit has DENY  -> drop (policy denied)
    any hit has ALLOW -> pass
    otherwise         -> drop (default deny)

A direction that is not enforced has an (identity 0, proto 0, port/0) ALLOW entry, so
the algorithm needs no separate "enforced" flag; audit mode is an endpoint flag of the
datapath (drop verdicts become "audit" and the packet passes), not part of this map.

Why the engine propagates flags: an LPM lookup returns only the most specific prefix, so
within one (ep, direction, identity, proto) the engine ORs the flags of every covering
(less specific) port prefix into the more specific entries; a DENY on "all ports" is
then still seen by a lookup that hits an ALLOW on port 80.
"""
from __future__ import annotations

import struct
from typing import Iterable, NamedTuple

from .models import PROTO_ANY
from .ports import PORT_BITS

MAP_NAME = "cilia_policy"
MAX_ENTRIES = 65536
ALLOW = 1
DENY = 2
KEY_SIZE = 16
VALUE_SIZE = 8
FIXED_BITS = 64  # ep_id + direction + proto + identity
LOOKUP_PREFIXLEN = FIXED_BITS + PORT_BITS

# Cookies of entries the engine adds by itself; rule cookies start above them.
COOKIE_NOT_ENFORCED = 1
COOKIE_ALLOW_LOCALHOST = 2
FIRST_RULE_COOKIE = 16

_KEY = struct.Struct("<I")
_KEY_DATA = struct.Struct(">HBBIHH")
_VALUE = struct.Struct("<BBHI")


def port_mask(port: int, plen: int) -> int:
    return (port >> (PORT_BITS - plen)) << (PORT_BITS - plen) if plen else 0


class EntryKey(NamedTuple):
    direction: int
    identity: int
    proto: int
    port: int
    plen: int  # port prefix length, 0..16

    def pack(self, ep_id: int) -> bytes:
        return (_KEY.pack(FIXED_BITS + self.plen)
                + _KEY_DATA.pack(ep_id, self.direction, self.proto, self.identity, self.port, 0))


class EntryValue(NamedTuple):
    flags: int
    cookie: int

    def pack(self) -> bytes:
        return _VALUE.pack(self.flags, 0, 0, self.cookie)


def lookup_key(ep_id: int, direction: int, identity: int, proto: int, port: int) -> bytes:
    return _KEY.pack(LOOKUP_PREFIXLEN) + _KEY_DATA.pack(ep_id, direction, proto, identity, port, 0)


def unpack_key(data: bytes) -> tuple[int, int, int, int, int, int]:
    """-> (prefixlen, ep_id, direction, proto, identity, dport)"""
    (prefixlen,) = _KEY.unpack_from(data)
    ep_id, direction, proto, identity, port, _ = _KEY_DATA.unpack_from(data, 4)
    return prefixlen, ep_id, direction, proto, identity, port


def unpack_value(data: bytes) -> EntryValue:
    flags, _, _, cookie = _VALUE.unpack(data)
    return EntryValue(flags, cookie)


Entries = dict[EntryKey, EntryValue]
# raw provenance: key -> (allow cookies, deny cookies) of the rules that produced it
Provenance = dict[EntryKey, tuple[tuple[int, ...], tuple[int, ...]]]


def lpm(entries: Entries, direction: int, identity: int, proto: int, port: int) -> tuple[EntryKey, EntryValue] | None:
    for plen in range(PORT_BITS, -1, -1):
        key = EntryKey(direction, identity, proto, port_mask(port, plen), plen)
        value = entries.get(key)
        if value is not None:
            return key, value
    return None


def lookup4(entries: Entries, direction: int, identity: int, proto: int, port: int) -> list[tuple[EntryKey, EntryValue]]:
    """The datapath's four lookups; the hits, most specific bucket first."""
    hits = []
    # identity or proto 0 makes some of the four keys equal; a hit is still one hit.
    for ident, pr in dict.fromkeys(((identity, proto), (identity, PROTO_ANY), (0, proto), (0, PROTO_ANY))):
        hit = lpm(entries, direction, ident, pr, port)
        if hit is not None:
            hits.append(hit)
    return hits


def verdict_flags(hits: Iterable[tuple[EntryKey, EntryValue]]) -> int:
    flags = 0
    for _, v in hits:
        flags |= v.flags
    return flags


class MapStateBuilder:
    """Collects (key, flag, cookie) from rules; finalize() applies LPM semantics."""

    def __init__(self) -> None:
        self._raw: dict[EntryKey, tuple[set[int], set[int]]] = {}

    def add(self, key: EntryKey, flag: int, cookie: int) -> None:
        entry = self._raw.get(key)
        if entry is None:
            entry = self._raw[key] = (set(), set())
        (entry[1] if flag == DENY else entry[0]).add(cookie)

    def __len__(self) -> int:
        return len(self._raw)

    def finalize(self, prune: bool = True, context: Entries | None = None) -> tuple[Entries, Provenance]:
        """(entries, provenance). `context`: final entries of other identities of the same
        endpoint, which the pruning of these entries may rely on (incremental patches)."""
        # Tuples, not sets: endpoints keep provenance for every entry, and a million live
        # sets made the cyclic GC dominate recomputation time (tuples of ints are untracked).
        provenance: Provenance = {k: (tuple(a), tuple(d)) for k, (a, d) in self._raw.items()}
        buckets: dict[tuple[int, int, int], dict[tuple[int, int], tuple[set[int], set[int]]]] = {}
        for k, v in self._raw.items():
            buckets.setdefault((k[0], k[1], k[2]), {})[(k[3], k[4])] = v
        entries: Entries = {}
        for (d, ident, proto), bucket in buckets.items():
            if len(bucket) == 1:
                ((port, plen), (allow, deny)), = bucket.items()
                flags = (ALLOW if allow else 0) | (DENY if deny else 0)
                entries[EntryKey(d, ident, proto, port, plen)] = EntryValue(flags, min(deny) if deny else min(allow))
                continue
            plens = sorted({plen for _, plen in bucket})
            for (port, plen), own in bucket.items():
                entries[EntryKey(d, ident, proto, port, plen)] = _inherit(bucket, plens, port, plen, own)
        if prune:
            index = _BucketIndex(entries, context)
            entries = {k: v for k, v in entries.items() if not index.redundant(k, v)}
        return entries, provenance


class _BucketIndex:
    """Which port prefix lengths each (direction, identity, proto) bucket holds, so the
    redundancy check probes only prefixes that exist."""

    def __init__(self, *sources: Entries | None) -> None:
        self.sources = [s for s in sources if s]
        self.plens: dict[tuple[int, int, int], set[int]] = {}
        for src in self.sources:
            for k in src:
                self.plens.setdefault((k[0], k[1], k[2]), set()).add(k[4])

    def _get(self, key: EntryKey) -> EntryValue | None:
        for src in self.sources:
            v = src.get(key)
            if v is not None:
                return v
        return None

    def covering(self, d: int, ident: int, proto: int, port: int, plen: int, flag: int) -> bool:
        for lp in self.plens.get((d, ident, proto), ()):
            if lp <= plen:
                v = self._get(EntryKey(d, ident, proto, port_mask(port, lp), lp))
                if v is not None and v[0] & flag:
                    return True
        return False

    def redundant(self, k: EntryKey, v: EntryValue) -> bool:
        """An entry the verdict never depends on: a more general bucket the datapath
        always looks up too already covers its whole port range with DENY (if it denies)
        or ALLOW (if it only allows). Entries of the (0, 0) bucket are never redundant, so
        every pruned entry is covered by a chain ending at a kept one."""
        d, ident, proto, port, plen = k
        if ident == 0 and proto == PROTO_ANY:
            return False
        flag = DENY if v[0] & DENY else ALLOW
        for ci, cp in ((ident, PROTO_ANY), (0, proto), (0, PROTO_ANY)):
            if (ci, cp) != (ident, proto) and self.covering(d, ci, cp, port, plen, flag):
                return True
        return False


# ---- per-identity templates ----
#
# Folding happens within one (direction, identity, proto) bucket and pruning of an
# identity's entry looks only at that identity's own proto-ANY bucket and at identity 0's
# buckets. So an identity's entries are a function of which rule contributions reach it
# (its signature) and of identity 0's folded state: computed once per distinct signature
# and stamped out for every identity sharing it. A cluster-wide rule reaching a thousand
# identities then folds once instead of a thousand times.

# (direction, flag, cookie, ((proto, port, plen), ...)): one rule's entries for any identity.
Contribution = tuple[int, int, int, tuple[tuple[int, int, int], ...]]
# (direction, proto) -> ({(port, plen): flags}, sorted port prefix lengths)
Folded = dict[tuple[int, int], tuple[dict[tuple[int, int], int], tuple[int, ...]]]
# (direction, proto, port, plen, value or None when pruned, provenance)
TemplateEntry = tuple[int, int, int, int, "EntryValue | None", tuple[tuple[int, ...], tuple[int, ...]]]

_tuple_new = tuple.__new__


def _inherit(bucket, plens, port: int, plen: int, own) -> EntryValue:
    """An entry's value in LPM terms: its own allow/deny cookies plus those of every wider
    port prefix of the same bucket (a lookup only returns the most specific prefix), with
    the cookie of the verdict that decides."""
    allow_all, deny_all = own
    for lp in plens:
        if lp >= plen:
            break
        anc = bucket.get((port_mask(port, lp), lp))
        if anc is not None:
            allow_all = allow_all | anc[0]
            deny_all = deny_all | anc[1]
    flags = (ALLOW if allow_all else 0) | (DENY if deny_all else 0)
    return EntryValue(flags, min(deny_all) if deny_all else min(allow_all))


def fold(contribs: list[Contribution], signature: Iterable[int]) -> tuple[dict, Folded, dict]:
    """-> ({(d, proto, port, plen): EntryValue}, folded buckets, {same key: provenance})."""
    raw: dict[tuple[int, int, int, int], tuple[set[int], set[int]]] = {}
    for ci in signature:
        d, flag, cookie, l4 = contribs[ci]
        j = 1 if flag == DENY else 0
        for proto, port, plen in l4:
            k = (d, proto, port, plen)
            e = raw.get(k)
            if e is None:
                e = raw[k] = (set(), set())
            e[j].add(cookie)
    buckets: dict[tuple[int, int], dict[tuple[int, int], tuple[set[int], set[int]]]] = {}
    for (d, proto, port, plen), e in raw.items():
        buckets.setdefault((d, proto), {})[(port, plen)] = e
    values: dict[tuple[int, int, int, int], EntryValue] = {}
    folded: Folded = {}
    for (d, proto), bucket in buckets.items():
        flags_of: dict[tuple[int, int], int] = {}
        plens = tuple(sorted({plen for _, plen in bucket}))
        for (port, plen), own in bucket.items():
            v = values[(d, proto, port, plen)] = _inherit(bucket, plens, port, plen, own)
            flags_of[(port, plen)] = v.flags
        folded[(d, proto)] = (flags_of, plens)
    provenance = {k: (tuple(sorted(a)), tuple(sorted(dn))) for k, (a, dn) in raw.items()}
    return values, folded, provenance


def _covers(bucket, port: int, plen: int, flag: int) -> bool:
    if bucket is None:
        return False
    flags_of, plens = bucket
    for lp in plens:
        if lp > plen:
            break
        f = flags_of.get((port_mask(port, lp), lp))
        if f is not None and f & flag:
            return True
    return False


def template(contribs: list[Contribution], signature: Iterable[int], wild: Folded | None,
             prune: bool = True) -> tuple[list[TemplateEntry], Folded]:
    """The entries of one identity reached by `signature`, as a template. `wild` is identity
    0's folded state; None means this template is identity 0 itself. Pruning is exactly
    _BucketIndex.redundant's."""
    values, folded, provenance = fold(contribs, signature)
    zero = wild is None
    if zero:
        wild = folded
    out: list[TemplateEntry] = []
    for k, v in values.items():
        d, proto, port, plen = k
        if prune and not (zero and proto == PROTO_ANY):
            flag = DENY if v[0] & DENY else ALLOW
            if ((proto != PROTO_ANY and _covers(folded.get((d, PROTO_ANY)), port, plen, flag))
                    or (not zero and _covers(wild.get((d, proto)), port, plen, flag))
                    or _covers(wild.get((d, PROTO_ANY)), port, plen, flag)):
                v = None
        out.append((d, proto, port, plen, v, provenance[k]))
    return out, folded


def stamp(tmpl: list[TemplateEntry], idents, entries: Entries, provenance: Provenance) -> None:
    """Instantiate a template for every identity in `idents`."""
    new = _tuple_new
    for d, proto, port, plen, v, prov in tmpl:
        keys = [new(EntryKey, (d, i, proto, port, plen)) for i in idents]
        provenance.update(dict.fromkeys(keys, prov))
        if v is not None:
            entries.update(dict.fromkeys(keys, v))


def partition(reach: Iterable[tuple[int, Iterable[int]]]) -> list[tuple[tuple[int, ...], set[int]]]:
    """[(contribution index, identities)] -> [(signature, identities reached by exactly
    the contributions of that signature)]. Refines disjoint groups with set operations, so
    the cost grows with rules x groups rather than with rules x identities."""
    groups: list[tuple[tuple[int, ...], set[int]]] = []
    for ci, ids in reach:
        rest = set(ids)
        out: list[tuple[tuple[int, ...], set[int]]] = []
        it = iter(groups)
        for sig, g in it:
            inter = g & rest
            if inter:
                rest -= inter
                if len(inter) == len(g):
                    out.append((sig + (ci,), g))
                else:
                    g -= inter
                    out.append((sig, g))
                    out.append((sig + (ci,), inter))
                if not rest:
                    # Groups are disjoint: none of the remaining ones can meet `ids`.
                    out.extend(it)
                    break
            else:
                out.append((sig, g))
        if rest:
            out.append(((ci,), rest))
        groups = out
    return groups
