"""BpfMap on real kernel maps (created through bpf_map_create, no object needed)."""

from __future__ import annotations

import ctypes
import os

import pytest

from cilia.datapath import libbpf as lb
from cilia.datapath.maps import BpfMap, open_pinned


class K(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint32)]


class V12(ctypes.Structure):
    # 12 bytes: per-CPU values are laid out every 16 bytes, which this size exercises.
    _fields_ = [("x", ctypes.c_uint32), ("y", ctypes.c_uint32), ("z", ctypes.c_uint32)]


@pytest.fixture
def make_map():
    fds = []

    def make(map_type=lb.BPF_MAP_TYPE_HASH, key=K, value=V12, max_entries=8192, percpu=False):
        fd = lb.map_create(map_type, "tdp_test", ctypes.sizeof(key), ctypes.sizeof(value), max_entries)
        fds.append(fd)
        return BpfMap(fd, key, value, name="tdp_test", percpu=percpu)

    yield make
    for fd in fds:
        os.close(fd)


def v(x, y=0, z=0):
    return V12(x, y, z)


def test_lookup_update_delete(make_map):
    m = make_map()
    assert m.lookup(K(1)) is None
    m.update(K(1), v(10, 11, 12))
    got = m.lookup(K(1))
    assert (got.x, got.y, got.z) == (10, 11, 12)
    with pytest.raises(lb.BpfError) as e:
        m.update(K(1), v(0), lb.BPF_NOEXIST)
    assert "exists" in str(e.value).lower()
    assert m.delete(K(1)) is True
    assert m.delete(K(1)) is False
    assert m.lookup(K(1)) is None


def test_keys_and_items(make_map):
    m = make_map()
    for i in range(50):
        m.update(K(i), v(i * 2))
    assert sorted(k.a for k in m.keys()) == list(range(50))
    assert sorted((k.a, val.x) for k, val in m.items()) == [(i, i * 2) for i in range(50)]
    assert len(m) == 50


def test_update_batch_and_lookup_batch(make_map):
    m = make_map()
    n = m.update_batch((K(i), v(i, i + 1, i + 2)) for i in range(5000))
    assert n == 5000
    assert m._batch_ok is True, "kernel hash maps support batch ops; the fast path must be used"
    got = m.lookup_batch()
    assert len(got) == 5000
    assert sorted((k.a, x.x, x.y, x.z) for k, x in got) == [(i, i, i + 1, i + 2) for i in range(5000)]


def test_lookup_batch_fallback_agrees_with_batch(make_map):
    m = make_map()
    m.update_batch((K(i), v(i)) for i in range(300))
    fast = sorted((k.a, x.x) for k, x in m.lookup_batch())
    m._batch_ok = False  # what a kernel without batch support leads to
    slow = sorted((k.a, x.x) for k, x in m.lookup_batch())
    assert fast == slow == [(i, i) for i in range(300)]


def test_lookup_batch_on_empty_map(make_map):
    assert make_map().lookup_batch() == []


def test_clear(make_map):
    m = make_map()
    m.update_batch((K(i), v(i)) for i in range(2000))
    m.clear()
    assert list(m.keys()) == []


def test_percpu_values_are_one_per_possible_cpu(make_map):
    ncpu = lb.num_possible_cpus()
    m = make_map(lb.BPF_MAP_TYPE_PERCPU_HASH, percpu=True)
    m.update(K(7), [v(c, c * 10, c * 100) for c in range(ncpu)])
    got = m.lookup(K(7))
    assert len(got) == ncpu
    assert [(x.x, x.y, x.z) for x in got] == [(c, c * 10, c * 100) for c in range(ncpu)]

    m.update_batch([(K(i), [v(i, c) for c in range(ncpu)]) for i in range(100)])
    rows = dict((k.a, vals) for k, vals in m.lookup_batch())
    assert len(rows) == 100
    assert [(x.x, x.y) for x in rows[42]] == [(42, c) for c in range(ncpu)]


def test_percpu_scalar_value_is_written_to_every_cpu(make_map):
    m = make_map(lb.BPF_MAP_TYPE_PERCPU_HASH, percpu=True)
    m.update(K(1), v(5))
    assert [x.x for x in m.lookup(K(1))] == [5] * lb.num_possible_cpus()


def test_percpu_flag_must_match_kernel_map_type(make_map):
    with pytest.raises(ValueError, match="percpu"):
        make_map(lb.BPF_MAP_TYPE_PERCPU_HASH, percpu=False)


def test_type_size_mismatch_is_refused():
    fd = lb.map_create(lb.BPF_MAP_TYPE_HASH, "tdp_test", 4, 16, 8)
    try:
        with pytest.raises(ValueError, match="key/value size 4/16"):
            BpfMap(fd, K, V12)
    finally:
        os.close(fd)


def test_array_map_batch(make_map):
    m = make_map(lb.BPF_MAP_TYPE_ARRAY, max_entries=64)
    m.update_batch((K(i), v(i + 100)) for i in range(64))
    assert sorted((k.a, x.x) for k, x in m.lookup_batch()) == [(i, i + 100) for i in range(64)]


def test_open_pinned(pin_dir):
    os.makedirs(pin_dir)
    fd = lb.map_create(lb.BPF_MAP_TYPE_PERCPU_HASH, "tdp_pinned", 4, 12, 16)
    try:
        lb.obj_pin(fd, f"{pin_dir}/m")
        BpfMap(fd, K, V12, percpu=True).update(K(3), v(9))
    finally:
        os.close(fd)
    with open_pinned(f"{pin_dir}/m", K, V12) as m:
        assert m.percpu
        assert [x.x for x in m.lookup(K(3))] == [9] * lb.num_possible_cpus()
