"""Loader behaviour against the real kernel: pin reuse, pin refusal, verifier logs."""

from __future__ import annotations

import ctypes
import os
import subprocess
import textwrap

import pytest

from cilia.datapath import abi
from cilia.datapath import libbpf as lb
from cilia.datapath.loader import BpfObject, PinnedMapMismatch
from cilia.datapath.node import EndpointEntry, NodeDatapath, find_object


def _pin_foreign_map(path: str, map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = lb.map_create(map_type, "tdp_foreign", key_size, value_size, max_entries)
    try:
        lb.obj_pin(fd, path)
        return lb.map_info_by_fd(fd).id
    finally:
        os.close(fd)


def _pinned_id(path: str) -> int:
    fd = lb.obj_get(path)
    try:
        return lb.map_info_by_fd(fd).id
    finally:
        os.close(fd)


def test_pinned_value_size_mismatch_is_refused(pin_dir, node_config):
    map_id = _pin_foreign_map(f"{pin_dir}/cilia_lxc", lb.BPF_MAP_TYPE_HASH, 4, 8, 65536)
    with pytest.raises(PinnedMapMismatch) as e:
        NodeDatapath(pin_dir, node_config).load()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"pinned map cilia_lxc at {pin_dir}/cilia_lxc is incompatible: "
                   f"value_size expected {ctypes.sizeof(abi.endpoint_info)}, pinned 8")
    assert (e.value.map_name, e.value.field, e.value.expected, e.value.pinned) == ("cilia_lxc", "value_size", 28, 8)
    # Never silently replaced: the foreign pin is still the same map.
    assert _pinned_id(f"{pin_dir}/cilia_lxc") == map_id


def test_pinned_max_entries_mismatch_is_refused(pin_dir, node_config):
    _pin_foreign_map(f"{pin_dir}/cilia_metrics", lb.BPF_MAP_TYPE_PERCPU_HASH, 8, 16, 512)
    with pytest.raises(PinnedMapMismatch, match="cilia_metrics .* max_entries expected 1024, pinned 512"):
        NodeDatapath(pin_dir, node_config).load()


def test_pinned_type_mismatch_is_refused(pin_dir, node_config):
    _pin_foreign_map(f"{pin_dir}/cilia_metrics", lb.BPF_MAP_TYPE_HASH, 8, 16, 1024)
    with pytest.raises(PinnedMapMismatch, match=r"cilia_metrics .* type expected 5, pinned 1$"):
        NodeDatapath(pin_dir, node_config).load()


def test_maps_survive_reload_with_contents(pin_dir, node_config):
    ep = EndpointEntry("10.200.0.77", 4242, 77, "0a:00:00:00:00:77", "ee:00:00:00:00:77", sec_id=5, flags=0)
    with NodeDatapath(pin_dir, node_config).load() as first:
        first.upsert_endpoint(ep)
        ids = {n: _pinned_id(f"{pin_dir}/{n}") for n in ("cilia_lxc", "cilia_lxc_if", "cilia_metrics")}
    # The first object is closed: only the pins keep the maps alive now.
    with NodeDatapath(pin_dir, node_config).load() as second:
        assert second.endpoints() == [ep]
        assert {n: _pinned_id(f"{pin_dir}/{n}") for n in ids} == ids


def test_missing_object_says_how_to_build(tmp_path, pin_dir, node_config):
    with pytest.raises(FileNotFoundError, match="make bpf"):
        NodeDatapath(pin_dir, node_config, obj_dir=str(tmp_path)).load()
    with pytest.raises(FileNotFoundError, match="make bpf"):
        BpfObject.open(str(tmp_path / "nope.o"))


def test_object_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CILIA_BPF_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        find_object("bpf_lxc.o")
    monkeypatch.delenv("CILIA_BPF_DIR")
    assert find_object("bpf_lxc.o").endswith("/build/bpf_lxc.o")


def test_wrong_python_types_are_refused_at_open(pin_dir):
    with pytest.raises(ValueError, match="cilia_lxc: object key/value size 4/28"):
        BpfObject.open(find_object("bpf_lxc.o"), pin_dir, map_types={"cilia_lxc": (abi.endpoint_key, abi.metrics_value)})


def test_wrong_rodata_type_is_refused(pin_dir):
    with pytest.raises(ValueError, match="CONFIG is 56 bytes"):
        BpfObject.open(find_object("bpf_lxc.o"), pin_dir, rodata=abi.metrics_value())


BAD_PROG = textwrap.dedent("""
    #include <linux/bpf.h>
    #include <bpf/bpf_helpers.h>
    SEC("tc")
    int tdp_bad(struct __sk_buff *skb)
    {
        /* No bound check against data_end: the verifier must refuse this. */
        unsigned char *p = (void *)(long)skb->data;
        return p[40];
    }
    char __license[] SEC("license") = "GPL";
""")


def test_verifier_log_is_in_the_exception(tmp_path):
    src, obj = tmp_path / "bad.c", tmp_path / "bad.o"
    src.write_text(BAD_PROG)
    arch_inc = f"/usr/include/{os.uname().machine}-linux-gnu"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-mcpu=v3", f"-I{arch_inc}", "-c", str(src), "-o", str(obj)],
                   check=True)
    with BpfObject.open(str(obj)) as o:
        with pytest.raises(lb.BpfError) as e:
            o.load()
    assert e.value.errno == 13  # EACCES: rejected by the verifier
    assert "invalid access to packet" in e.value.log
    assert "tdp_bad" in str(e.value)
