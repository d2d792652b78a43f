"""Typed access to BPF maps by file descriptor, keys and values as ctypes structures."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Iterable, Iterator

from . import libbpf as lb
from .libbpf import BpfError


def _round8(n: int) -> int:
    return (n + 7) & ~7


class BpfMap:
    """A map seen through ``key_type``/``value_type``.

    Per-CPU maps return, for each key, a list with one value per possible CPU; the
    kernel lays them out every ``round_up(value_size, 8)`` bytes.
    """

    BATCH = 1024

    def __init__(self, fd: int, key_type, value_type, name: str = "", percpu: bool = False, owns_fd: bool = False):
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.name = name or f"fd{fd}"
        self.percpu = percpu
        self.owns_fd = owns_fd
        self.ncpus = lb.num_possible_cpus() if percpu else 1
        self._stride = _round8(ctypes.sizeof(value_type)) if percpu else ctypes.sizeof(value_type)
        self._batch_ok: bool | None = None
        info = lb.map_info_by_fd(fd)
        if info.key_size != ctypes.sizeof(key_type) or info.value_size != ctypes.sizeof(value_type):
            raise ValueError(
                f"map {self.name}: kernel key/value size {info.key_size}/{info.value_size}, "
                f"Python types {ctypes.sizeof(key_type)}/{ctypes.sizeof(value_type)}"
            )
        if percpu != (info.type in lb.PERCPU_MAP_TYPES):
            raise ValueError(f"map {self.name}: percpu={percpu} but kernel map type is {info.type}")
        self.max_entries = info.max_entries

    # -- value buffers ----------------------------------------------------
    def _value_buf(self, n: int = 1):
        return (ctypes.c_uint8 * (self._stride * self.ncpus * n))()

    def _decode_value(self, buf, index: int = 0):
        base = ctypes.addressof(buf) + index * self._stride * self.ncpus
        if not self.percpu:
            return self.value_type.from_buffer_copy(
                (ctypes.c_uint8 * self._stride).from_address(base))
        size = ctypes.sizeof(self.value_type)
        return [
            self.value_type.from_buffer_copy((ctypes.c_uint8 * size).from_address(base + cpu * self._stride))
            for cpu in range(self.ncpus)
        ]

    def _encode_value(self, value, buf, index: int = 0) -> None:
        base = ctypes.addressof(buf) + index * self._stride * self.ncpus
        values = value if self.percpu else [value]
        if self.percpu and not isinstance(value, (list, tuple)):
            values = [value] * self.ncpus
        if len(values) != self.ncpus:
            raise ValueError(f"map {self.name}: need {self.ncpus} per-CPU values, got {len(values)}")
        for cpu, v in enumerate(values):
            ctypes.memmove(base + cpu * self._stride, ctypes.addressof(v), ctypes.sizeof(self.value_type))

    # -- single elements ---------------------------------------------------
    def lookup(self, key):
        buf = self._value_buf()
        if not lb.map_lookup_elem(self.fd, key, buf):
            return None
        return self._decode_value(buf)

    def update(self, key, value, flags: int = lb.BPF_ANY) -> None:
        buf = self._value_buf()
        self._encode_value(value, buf)
        lb.map_update_elem(self.fd, key, buf, flags)

    def delete(self, key) -> bool:
        return lb.map_delete_elem(self.fd, key)

    def keys(self) -> Iterator:
        # get_next_key restarts from the first key if the current one was deleted
        # meanwhile; acceptable for the control plane's reconciling reads.
        cur = None
        while True:
            nxt = self.key_type()
            if not lb.map_get_next_key(self.fd, cur, nxt):
                return
            yield nxt
            cur = nxt

    def items(self) -> list[tuple]:
        out = []
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
        return out

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    # -- batches -----------------------------------------------------------
    def update_batch(self, pairs: Iterable[tuple], flags: int = lb.BPF_ANY) -> int:
        pairs = list(pairs)
        if not pairs:
            return 0
        keys = (self.key_type * len(pairs))()
        vals = self._value_buf(len(pairs))
        for i, (k, v) in enumerate(pairs):
            keys[i] = k
            self._encode_value(v, vals, i)
        if self._batch_ok is not False:
            try:
                n = lb.map_update_batch(self.fd, keys, vals, len(pairs), flags)
                self._batch_ok = True
                return n
            except BpfError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP) or self._batch_ok:
                    raise
                self._batch_ok = False
        for k, v in pairs:
            self.update(k, v, flags)
        return len(pairs)

    def lookup_batch(self) -> list[tuple]:
        """Every (key, value) pair; falls back to key iteration where the kernel has no
        batch support for this map type."""
        if self._batch_ok is False:
            return self.items()
        out: list[tuple] = []
        # Hash map batches are bucket-sized; a bucket larger than the chunk gives
        # ENOSPC, so the chunk starts generous.
        chunk = min(self.BATCH, max(self.max_entries, 1))
        keys = (self.key_type * chunk)()
        vals = self._value_buf(chunk)
        # The batch cursor is opaque to userspace but must be as large as a key.
        in_b = None
        out_b = (ctypes.c_uint8 * max(ctypes.sizeof(self.key_type), 8))()
        while True:
            try:
                n, done = lb.map_lookup_batch(self.fd, in_b, out_b, keys, vals, chunk)
            except BpfError as e:
                if e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP) and not out:
                    self._batch_ok = False
                    return self.items()
                raise
            self._batch_ok = True
            ks = ctypes.sizeof(self.key_type)
            for i in range(n):
                # Decode by address: indexing an array of a simple ctypes type gives an int.
                key = self.key_type.from_buffer_copy((ctypes.c_uint8 * ks).from_address(ctypes.addressof(keys) + i * ks))
                out.append((key, self._decode_value(vals, i)))
            if done:
                return out
            in_b = (ctypes.c_uint8 * len(out_b)).from_buffer_copy(out_b)

    def delete_batch(self, keys: Iterable) -> int:
        keys = list(keys)
        if not keys:
            return 0
        arr = (self.key_type * len(keys))(*keys)
        try:
            return lb.map_delete_batch(self.fd, arr, len(keys))
        except BpfError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
        return sum(1 for k in keys if self.delete(k))

    def clear(self) -> None:
        # Snapshot first: deleting while walking with get_next_key can restart the walk.
        self.delete_batch(list(self.keys()))

    def close(self) -> None:
        if self.owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"BpfMap({self.name!r}, fd={self.fd}, percpu={self.percpu})"


def open_pinned(path: str, key_type, value_type, percpu: bool | None = None) -> BpfMap:
    """Open a pinned map; per-CPU-ness is read from the kernel unless given."""
    fd = lb.obj_get(path)
    try:
        if percpu is None:
            percpu = lb.map_info_by_fd(fd).type in lb.PERCPU_MAP_TYPES
        return BpfMap(fd, key_type, value_type, name=os.path.basename(path), percpu=percpu, owns_fd=True)
    except Exception:
        os.close(fd)
        raise
