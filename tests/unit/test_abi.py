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


def test_objects_are_built():
    assert (ROOT / "build" / "bpf_lxc.o").exists(), "run `make bpf`"


@pytest.mark.parametrize("obj", [p for p in OBJECTS if p.name == "bpf_lxc.o"], ids=lambda p: p.name)
def test_mirrors_match_btf(obj):
    assert abi.check_against_btf(str(obj)) == []


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
        _fields_ = [
            ("node_ip4", ctypes.c_uint32),
            ("router_ip4", ctypes.c_uint16),
            ("pod_cidr4", ctypes.c_uint32),
            ("pod_cidr4_mask", ctypes.c_uint32),
            ("node_id", ctypes.c_uint32),
            ("flags", ctypes.c_uint32),
        ]

    problems = abi.check_against_btf(str(ROOT / "build" / "bpf_lxc.o"), mirrors=(cilia_config,))
    assert problems == [
        "cilia_config: size 22 in Python, 24 in BTF",
        "cilia_config.router_ip4: size 2 in Python, 4 in BTF",
        "cilia_config.pod_cidr4: offset 6 in Python, 8 in BTF",
        "cilia_config.pod_cidr4_mask: offset 10 in Python, 12 in BTF",
        "cilia_config.node_id: offset 14 in Python, 16 in BTF",
        "cilia_config.flags: offset 18 in Python, 20 in BTF",
    ]
