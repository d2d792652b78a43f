"""The Python mirrors of bpf/include/abi.h must match the compiled object's BTF."""

from __future__ import annotations

import ctypes
import re
import shutil
from pathlib import Path

import pytest

from cilia.datapath import abi

ROOT = Path(__file__).resolve().parents[2]
OBJECTS = sorted((ROOT / "build").glob("*.o"))

pytestmark = pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool reads the BTF")


DATAPATH_OBJECTS = ("bpf_lxc.o", "bpf_overlay.o", "bpf_host.o", "bpf_sock.o")
_SOCK_ONLY = {"lb4_sk_rev_key", "lb4_sk_rev_val"}
# Policy is enforced by the tc objects only; socket LB never sees a packet.
_TC_ONLY = {"cilia_policy_key", "cilia_policy_value", "ct4_policy_entry"}
# Which mirrored structs each object must carry (a struct an object stops using would
# silently escape the check otherwise).
USES = {
    # Service translation (and its NAT/conntrack state) runs in all three objects.
    "bpf_lxc.o": {m.__name__ for m in abi.MIRRORS} - _SOCK_ONLY,
    "bpf_overlay.o": {m.__name__ for m in abi.MIRRORS} - _SOCK_ONLY,
    "bpf_host.o": {m.__name__ for m in abi.MIRRORS} - _SOCK_ONLY,
    # Every map is declared in every object that includes the LB headers.
    "bpf_sock.o": {m.__name__ for m in abi.MIRRORS} - _TC_ONLY,
}


def test_objects_are_built():
    for name in DATAPATH_OBJECTS:
        assert (ROOT / "build" / name).exists(), f"{name}: run `make bpf`"


@pytest.mark.parametrize("name", DATAPATH_OBJECTS)
def test_mirrors_match_btf(name):
    mirrors = tuple(m for m in abi.MIRRORS if m.__name__ in USES[name])
    assert abi.check_against_btf(str(ROOT / "build" / name), mirrors) == []


def test_every_mirror_is_checked_against_some_object():
    assert abi.check_objects_against_btf([ROOT / "build" / n for n in DATAPATH_OBJECTS]) == []
    assert set().union(*USES.values()) == {m.__name__ for m in abi.MIRRORS}


def test_multi_object_check_reports_unused_mirror_and_drift():
    class ipcache_value(ctypes.Structure):  # flags as u32: size and offsets drift
        _fields_ = [("sec_identity", ctypes.c_uint32), ("tunnel_endpoint", ctypes.c_uint32),
                    ("flags", ctypes.c_uint32)]

    class unused_struct(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint32)]

    problems = abi.check_objects_against_btf([ROOT / "build" / n for n in DATAPATH_OBJECTS],
                                             mirrors=(ipcache_value, unused_struct))
    assert "unused_struct: not in BTF of any object" in problems
    assert "ipcache_value.flags: size 4 in Python, 1 in BTF" in problems
    assert "ipcache_value: members ['sec_identity', 'tunnel_endpoint', 'flags'] in Python, " \
           "['sec_identity', 'tunnel_endpoint', 'flags', 'pad'] in BTF" in problems


def test_sizes_match_static_asserts_in_header():
    header = (ROOT / "bpf" / "include" / "abi.h").read_text()
    asserts = dict(re.findall(r"sizeof\(struct (\w+)\) == (\d+)", header))
    assert set(asserts) == {m.__name__ for m in abi.MIRRORS}
    for m in abi.MIRRORS:
        assert ctypes.sizeof(m) == int(asserts[m.__name__]), m.__name__


def test_checker_catches_a_wrong_mirror():
    class endpoint_info(ctypes.Structure):  # flags and ep_id swapped, sec_id too small
        _fields_ = [
            ("ifindex", ctypes.c_uint32),
            ("ip4", ctypes.c_uint32),
            ("flags", ctypes.c_uint16),
            ("ep_id", ctypes.c_uint16),
            ("sec_id", ctypes.c_uint16),
            ("mac", ctypes.c_uint8 * 6),
            ("node_mac", ctypes.c_uint8 * 6),
        ]

    class metrics_value(ctypes.Structure):  # right names, wrong widths
        _fields_ = [("count", ctypes.c_uint32), ("bytes", ctypes.c_uint64)]

    class no_such_struct(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint32)]

    problems = abi.check_against_btf(str(ROOT / "build" / "bpf_lxc.o"),
                                     mirrors=(endpoint_info, metrics_value, no_such_struct))
    text = "\n".join(problems)
    assert "endpoint_info: members ['ifindex', 'ip4', 'flags', 'ep_id'" in text
    assert "endpoint_info.flags: offset 8 in Python, 10 in BTF" in problems
    assert "endpoint_info.ep_id: offset 10 in Python, 8 in BTF" in problems
    assert "endpoint_info.sec_id: size 2 in Python, 4 in BTF" in problems
    assert "endpoint_info.mac: offset 14 in Python, 16 in BTF" in problems
    assert "metrics_value.count: size 4 in Python, 8 in BTF" in problems
    assert "no_such_struct: not in BTF" in text


def test_checker_catches_offset_drift():
    class cilia_config(ctypes.Structure):  # packed with a u16: every later member shifts
        _pack_ = 1
        _fields_ = [(n, t) if n != "router_ip4" else (n, ctypes.c_uint16) for n, t in abi.cilia_config._fields_]

    problems = abi.check_against_btf(str(ROOT / "build" / "bpf_lxc.o"), mirrors=(cilia_config,))
    assert problems[:4] == [
        "cilia_config: size 54 in Python, 56 in BTF",
        "cilia_config.router_ip4: size 2 in Python, 4 in BTF",
        "cilia_config.pod_cidr4: offset 6 in Python, 8 in BTF",
        "cilia_config.pod_cidr4_mask: offset 10 in Python, 12 in BTF",
    ]
    # Every member after router_ip4 is reported two bytes early.
    shifted = [p for p in problems[2:]]
    assert len(shifted) == len(abi.cilia_config._fields_) - 2
    assert all("offset" in p for p in shifted)
    assert problems[-1] == "cilia_config.lb_maglev_m: offset 50 in Python, 52 in BTF"
