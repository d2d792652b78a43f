"""ctypes mirrors of bpf/include/abi.h, checked against the BTF of the compiled objects.

The mirrors are written by hand for readability; :func:`check_against_btf` is the guard
that makes drift a test failure instead of silently corrupt map entries.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from ctypes import Structure, c_uint8, c_uint16, c_uint32, c_uint64

EP_F_HOST = 0x1
EP_F_POLICY_INGRESS_ENFORCED = 0x2
EP_F_POLICY_EGRESS_ENFORCED = 0x4
EP_F_POLICY_AUDIT = 0x8
EP_F_POLICY_MASK = EP_F_POLICY_INGRESS_ENFORCED | EP_F_POLICY_EGRESS_ENFORCED | EP_F_POLICY_AUDIT
METRIC_INGRESS = 1
METRIC_EGRESS = 2
METRIC_F_AUDIT = 0x1  # metrics_key.flags: a policy drop that audit mode forwarded

ROUTING_NATIVE = 0
ROUTING_TUNNEL = 1

# Reserved identities (Cilium's numbers).
IDENTITY_HOST = 1
IDENTITY_WORLD = 2
IDENTITY_UNMANAGED = 3
IDENTITY_INIT = 5  # endpoint identity not resolved yet (what sec_id 0 travels as)
IDENTITY_REMOTE_NODE = 6

IPCACHE_F_REMOTE_NODE = 0x1

NAT_DIR_EGRESS = 1
NAT_DIR_INGRESS = 2

# Service load balancing (bpf/include/abi.h; flag bits are Cilium's SVC_FLAG_*).
LB_SCOPE_EXT = 0
LB_SCOPE_INT = 1
SVC_F_EXTERNAL_IP = 0x01
SVC_F_NODEPORT = 0x02
SVC_F_EXT_LOCAL_SCOPE = 0x04
SVC_F_HOSTPORT = 0x08
SVC_F_AFFINITY = 0x10
SVC_F_LOADBALANCER = 0x20
SVC_F_ROUTABLE = 0x40
SVC_F2_INT_LOCAL_SCOPE = 0x10
SVC_F2_TWO_SCOPES = 0x20
SVC_F2_MAGLEV = 0x80
BE_STATE_ACTIVE = 0
BE_STATE_TERMINATING = 1
CT_TUPLE_REPLY = 0x1
CT_TUPLE_SERVICE = 0x4
CT_F_HAIRPIN = 0x1
CT_F_NODEPORT = 0x2
CT_F_SNAT = 0x4

# Network policy (cilia_policy LPM trie; key fields after prefixlen in network byte order).
POLICY_INGRESS = 0
POLICY_EGRESS = 1
POLICY_FIXED_PREFIX = 64  # ep_id + direction + proto + identity, always exact
POLICY_FULL_PREFIX = 80   # + all 16 bits of dport: what the datapath looks up
POLICY_F_ALLOW = 0x1
POLICY_F_DENY = 0x2
PCT_F_AUDIT = 0x1         # ct4_policy_entry.flags
PCT_F_REPLIED = 0x2       # a reply was seen (datapath events report the first one)


class cilia_config(Structure):
    _fields_ = [
        ("node_ip4", c_uint32),
        ("router_ip4", c_uint32),
        ("pod_cidr4", c_uint32),
        ("pod_cidr4_mask", c_uint32),
        ("node_id", c_uint32),
        ("flags", c_uint32),
        ("tunnel_ifindex", c_uint32),
        ("native_ifindex", c_uint32),
        ("cluster_cidr4", c_uint32),
        ("cluster_cidr4_mask", c_uint32),
        ("routing", c_uint8),
        ("masquerade", c_uint8),
        ("nat_port_min", c_uint16),
        ("nat_port_max", c_uint16),
        ("pad", c_uint16),
        ("lb_hairpin_ip4", c_uint32),
        ("lb_maglev_m", c_uint32),
    ]


class endpoint_key(Structure):
    _fields_ = [("ip4", c_uint32)]


class endpoint_info(Structure):
    _fields_ = [
        ("ifindex", c_uint32),
        ("ip4", c_uint32),
        ("ep_id", c_uint16),
        ("flags", c_uint16),
        ("sec_id", c_uint32),
        ("mac", c_uint8 * 6),
        ("node_mac", c_uint8 * 6),
    ]


class metrics_key(Structure):
    _fields_ = [("reason", c_uint8), ("dir", c_uint8), ("flags", c_uint16), ("reserved", c_uint16 * 2)]


class metrics_value(Structure):
    _fields_ = [("count", c_uint64), ("bytes", c_uint64)]


class ipcache_key(Structure):
    _fields_ = [("prefixlen", c_uint32), ("ip4", c_uint32)]


class ipcache_value(Structure):
    _fields_ = [
        ("sec_identity", c_uint32),
        ("tunnel_endpoint", c_uint32),
        ("flags", c_uint8),
        ("pad", c_uint8 * 3),
    ]


class nat_key4(Structure):
    _fields_ = [
        ("saddr", c_uint32),
        ("daddr", c_uint32),
        ("sport", c_uint16),
        ("dport", c_uint16),
        ("nexthdr", c_uint8),
        ("dir", c_uint8),
        ("pad", c_uint8 * 2),
    ]


class nat_entry4(Structure):
    _fields_ = [
        ("to_addr", c_uint32),
        ("to_port", c_uint16),
        ("pad", c_uint16),
        ("created", c_uint32),
        ("last_seen", c_uint32),
    ]


class lb4_key(Structure):
    _fields_ = [
        ("address", c_uint32),
        ("dport", c_uint16),
        ("backend_slot", c_uint16),
        ("proto", c_uint8),
        ("scope", c_uint8),
        ("pad", c_uint8 * 2),
    ]


class lb4_service(Structure):
    _fields_ = [
        ("backend_id", c_uint32),
        ("count", c_uint16),
        ("rev_nat_index", c_uint16),
        ("flags", c_uint8),
        ("flags2", c_uint8),
        ("pad", c_uint16),
        ("affinity_timeout", c_uint32),
    ]


class lb4_backend(Structure):
    _fields_ = [("address", c_uint32), ("port", c_uint16), ("proto", c_uint8), ("state", c_uint8)]


class lb4_reverse_nat(Structure):
    _fields_ = [("address", c_uint32), ("port", c_uint16), ("pad", c_uint16)]


class lb4_maglev_key(Structure):
    _fields_ = [("rev_nat_index", c_uint16), ("scope", c_uint8), ("pad", c_uint8)]


class lb4_affinity_key(Structure):
    _fields_ = [("client_ip", c_uint32), ("rev_nat_index", c_uint16), ("pad", c_uint16)]


class lb4_affinity_val(Structure):
    _fields_ = [("backend_id", c_uint32), ("last_used", c_uint32)]


class ct4_key(Structure):
    _fields_ = [
        ("daddr", c_uint32),
        ("saddr", c_uint32),
        ("dport", c_uint16),
        ("sport", c_uint16),
        ("nexthdr", c_uint8),
        ("flags", c_uint8),
        ("pad", c_uint16),
    ]


class ct4_entry(Structure):
    _fields_ = [
        ("backend_id", c_uint32),
        ("rev_nat_index", c_uint16),
        ("flags", c_uint16),
        ("created", c_uint32),
        ("last_seen", c_uint32),
    ]


class lb4_sk_rev_key(Structure):
    _fields_ = [("cookie", c_uint64), ("address", c_uint32), ("port", c_uint16), ("pad", c_uint16)]


class lb4_sk_rev_val(Structure):
    _fields_ = [("address", c_uint32), ("port", c_uint16), ("rev_nat_index", c_uint16)]


class cilia_policy_key(Structure):
    # ep_id, identity and dport hold network-order values (socket.htons/htonl).
    _fields_ = [
        ("prefixlen", c_uint32),
        ("ep_id", c_uint16),
        ("direction", c_uint8),
        ("proto", c_uint8),
        ("identity", c_uint32),
        ("dport", c_uint16),
        ("pad", c_uint16),
    ]


class cilia_policy_value(Structure):
    _fields_ = [("flags", c_uint8), ("pad1", c_uint8), ("pad2", c_uint16), ("rule_cookie", c_uint32)]


class ct4_policy_entry(Structure):
    _fields_ = [("created", c_uint32), ("last_seen", c_uint32), ("flags", c_uint16), ("pad", c_uint16)]


MIRRORS: tuple[type[Structure], ...] = (
    cilia_config, endpoint_key, endpoint_info, metrics_key, metrics_value,
    ipcache_key, ipcache_value, nat_key4, nat_entry4,
    lb4_key, lb4_service, lb4_backend, lb4_reverse_nat, lb4_maglev_key, lb4_affinity_key,
    lb4_affinity_val, ct4_key, ct4_entry, lb4_sk_rev_key, lb4_sk_rev_val,
    cilia_policy_key, cilia_policy_value, ct4_policy_entry,
)


# ---------------------------------------------------------------------------
# BTF comparison (via `bpftool -j btf dump file`, an independent BTF reader).

_SIZED_KINDS = {"INT", "STRUCT", "UNION", "ENUM", "ENUM64", "FLOAT", "DATASEC"}
_ALIAS_KINDS = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}


def _btf_types(obj_path: str) -> dict[int, dict]:
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", obj_path], check=True, capture_output=True, text=True
    ).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


def _btf_size(types: dict[int, dict], type_id: int) -> int:
    t = types[type_id]
    kind = t["kind"]
    if kind in _SIZED_KINDS:
        return t["size"]
    if kind in _ALIAS_KINDS:
        return _btf_size(types, t["type_id"])
    if kind == "ARRAY":
        return t["nr_elems"] * _btf_size(types, t["type_id"])
    if kind == "PTR":
        return 8
    raise ValueError(f"cannot size BTF kind {kind}")


def _ctypes_member_size(ctype) -> int:
    return ctypes.sizeof(ctype)


def check_objects_against_btf(obj_paths, mirrors=MIRRORS) -> list[str]:
    """Like :func:`check_against_btf` over several objects: each mirror is compared
    with every object that uses the struct, and must be used by at least one."""
    problems: list[str] = []
    seen: set[str] = set()
    for path in obj_paths:
        problems += check_against_btf(str(path), mirrors, missing_ok=True, seen=seen)
    problems += [f"{m.__name__}: not in BTF of any object" for m in mirrors if m.__name__ not in seen]
    return problems


def check_against_btf(obj_path: str, mirrors=MIRRORS, missing_ok: bool = False,
                      seen: set[str] | None = None) -> list[str]:
    """Differences between the ctypes ``mirrors`` and the structs of the same name in
    ``obj_path``'s BTF; empty when they agree. With ``missing_ok`` a struct the object
    does not use is no problem; ``seen`` collects the names that were compared."""
    types = _btf_types(obj_path)
    structs = {t["name"]: t for t in types.values() if t["kind"] == "STRUCT" and t.get("name")}
    problems: list[str] = []
    for mirror in mirrors:
        name = mirror.__name__
        bt = structs.get(name)
        if bt is None:
            if not missing_ok:
                problems.append(f"{name}: not in BTF of {obj_path}")
            continue
        if seen is not None:
            seen.add(name)
        if bt["size"] != ctypes.sizeof(mirror):
            problems.append(f"{name}: size {ctypes.sizeof(mirror)} in Python, {bt['size']} in BTF")
        py_members = [(f[0], getattr(mirror, f[0]).offset, _ctypes_member_size(f[1])) for f in mirror._fields_]
        btf_members = []
        for m in bt["members"]:
            if m.get("bitfield_size"):
                problems.append(f"{name}.{m['name']}: bitfields are not supported in the ABI")
            btf_members.append((m["name"], m["bits_offset"] // 8, _btf_size(types, m["type_id"])))
        if [m[0] for m in py_members] != [m[0] for m in btf_members]:
            problems.append(
                f"{name}: members {[m[0] for m in py_members]} in Python, {[m[0] for m in btf_members]} in BTF"
            )
        btf_by_name = {m[0]: m for m in btf_members}
        for pn, po, ps in py_members:
            if pn not in btf_by_name:
                continue  # already reported in the member list
            _, bo, bs = btf_by_name[pn]
            if po != bo:
                problems.append(f"{name}.{pn}: offset {po} in Python, {bo} in BTF")
            if ps != bs:
                problems.append(f"{name}.{pn}: size {ps} in Python, {bs} in BTF")
    return problems
