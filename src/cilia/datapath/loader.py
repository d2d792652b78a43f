"""Open, configure and load a BPF object with pinned maps, refusing incompatible pins."""

from __future__ import annotations

import ctypes
import errno
import os

from . import libbpf as lb
from .libbpf import BpfError
from .maps import BpfMap

RODATA_VAR = "CONFIG"


class PinnedMapMismatch(Exception):
    """A map pinned by an earlier load differs from the object's definition.

    libbpf would refuse it too, but only with a generic EINVAL; this names the map and
    field so an operator knows which pin to remove (after checking nothing still uses it).
    """

    def __init__(self, map_name: str, pin_path: str, field: str, expected, pinned):
        self.map_name, self.pin_path, self.field = map_name, pin_path, field
        self.expected, self.pinned = expected, pinned
        super().__init__(
            f"pinned map {map_name} at {pin_path} is incompatible: {field} expected {expected}, pinned {pinned}"
        )


class BpfObject:
    """One opened (then loaded) BPF object file.

    ``rodata`` is written over the ``CONFIG`` variable of the object's ``.rodata``
    section before load, so the verifier sees node settings as constants.
    """

    def __init__(self, path: str, obj: int, pin_root: str | None):
        self.path = path
        self._obj = obj
        self.pin_root = pin_root
        self.loaded = False
        self._maps: dict[str, BpfMap] = {}

    @classmethod
    def open(
        cls,
        path: str,
        pin_root: str | None = None,
        rodata: ctypes.Structure | None = None,
        map_types: dict[str, tuple[type, type]] | None = None,
    ) -> "BpfObject":
        """``map_types`` {name: (key_type, value_type)} is checked against the object's
        map definitions right away, before anything reaches the kernel."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"BPF object {path} not found (run `make bpf`)")
        obj = lb.object_open_file(path, pin_root)
        self = cls(path, obj, pin_root)
        try:
            for name, (kt, vt) in (map_types or {}).items():
                self._check_map_types(name, kt, vt)
            if rodata is not None:
                self._set_rodata(rodata)
        except BaseException:
            self.close()
            raise
        return self

    # -- before load -------------------------------------------------------
    def _rodata_map(self) -> int:
        for m in lb.object_maps(self._obj):
            if lb.map_name(m).endswith(".rodata"):
                return m
        raise BpfError(errno.ENOENT, f"{self.path}: no .rodata section (no const volatile {RODATA_VAR})")

    def rodata_map_name(self) -> str:
        """libbpf's name for the .rodata map (object name prefix, e.g. "bpf_lxc.rodata")."""
        return lb.map_name(self._rodata_map())

    def _set_rodata(self, rodata: ctypes.Structure) -> None:
        m = self._rodata_map()
        btf = lb.object_btf(self._obj)
        if btf is None:
            raise BpfError(errno.ENOENT, f"{self.path}: no BTF (compile with -g)")
        off, size = lb.btf_datasec_var_offset(btf, ".rodata", RODATA_VAR)
        if size != ctypes.sizeof(rodata):
            raise ValueError(
                f"{self.path}: {RODATA_VAR} is {size} bytes in BTF, {type(rodata).__name__} is {ctypes.sizeof(rodata)}"
            )
        addr, total = lb.map_initial_value(m)
        if off + size > total:
            raise ValueError(f"{self.path}: {RODATA_VAR} outside .rodata ({off}+{size} > {total})")
        image = bytearray(ctypes.string_at(addr, total))
        image[off:off + size] = bytes(rodata)
        lb.map_set_initial_value(m, bytes(image))

    def rodata(self, struct_type):
        """The CONFIG value the object will be (or was) loaded with, as ``struct_type``."""
        m = self._rodata_map()
        off, size = lb.btf_datasec_var_offset(lb.object_btf(self._obj), ".rodata", RODATA_VAR)
        addr, _ = lb.map_initial_value(m)
        return struct_type.from_buffer_copy(ctypes.string_at(addr + off, size))

    def check_pinned_maps(self) -> None:
        """Raise :class:`PinnedMapMismatch` if any existing pin differs from our map."""
        for m in lb.object_maps(self._obj):
            pin = lb.map_pin_path(m)
            if not pin or not os.path.exists(pin):
                continue
            fd = lb.obj_get(pin)
            try:
                info = lb.map_info_by_fd(fd)
            finally:
                os.close(fd)
            name = lb.map_name(m)
            for field, want, have in (
                ("type", lb.map_type(m), info.type),
                ("key_size", lb.map_key_size(m), info.key_size),
                ("value_size", lb.map_value_size(m), info.value_size),
                ("max_entries", lb.map_max_entries(m), info.max_entries),
                ("map_flags", lb.map_flags(m), info.map_flags),
            ):
                if want != have:
                    raise PinnedMapMismatch(name, pin, field, want, have)

    def load(self) -> "BpfObject":
        if self.pin_root:
            os.makedirs(self.pin_root, exist_ok=True)
        self.check_pinned_maps()
        lb.object_load(self._obj, f"load {self.path}")
        self.loaded = True
        return self

    # -- after load --------------------------------------------------------
    def program_fd(self, name: str) -> int:
        return lb.program_fd(lb.object_find_program(self._obj, name))

    def map_fd(self, name: str) -> int:
        return lb.map_fd(lb.object_find_map(self._obj, name))

    def map_pin_path(self, name: str) -> str | None:
        return lb.map_pin_path(lb.object_find_map(self._obj, name))

    def _check_map_types(self, name: str, key_type, value_type) -> int:
        m = lb.object_find_map(self._obj, name)
        ks, vs = lb.map_key_size(m), lb.map_value_size(m)
        if ks != ctypes.sizeof(key_type) or vs != ctypes.sizeof(value_type):
            raise ValueError(
                f"map {name}: object key/value size {ks}/{vs}, Python types "
                f"{key_type.__name__}/{value_type.__name__} are {ctypes.sizeof(key_type)}/{ctypes.sizeof(value_type)}"
            )
        return m

    def map(self, name: str, key_type, value_type) -> BpfMap:
        """Typed view of one of the object's maps; sizes are checked against the object
        (at open) and the kernel map (after load)."""
        m = self._check_map_types(name, key_type, value_type)
        if not self.loaded:
            raise RuntimeError(f"map {name}: object {self.path} not loaded yet")
        if name not in self._maps:
            percpu = lb.map_type(m) in lb.PERCPU_MAP_TYPES
            # The fd belongs to the bpf_object; it is closed by close(), not by BpfMap.
            self._maps[name] = BpfMap(lb.map_fd(m), key_type, value_type, name=name, percpu=percpu)
        return self._maps[name]

    def close(self) -> None:
        if self._obj:
            lb.object_close(self._obj)
            self._obj = 0
            self._maps.clear()
            self.loaded = False

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
