"""ctypes bindings for the subset of libbpf 1.1 (Debian libbpf1) that cilia uses.

libbpf >= 1.0 returns -errno from the low-level API and NULL + errno from the
constructors; every wrapper here turns that into :class:`BpfError`.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno as _errno
import logging
import os
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class BpfError(OSError):
    """A libbpf call failed. ``log`` holds the tail of libbpf/verifier output, if any."""

    def __init__(self, err: int, what: str, log: str = ""):
        err = abs(err)
        msg = f"{what}: {os.strerror(err)} (errno {err})"
        if log:
            msg += "\n--- libbpf log (tail) ---\n" + log
        super().__init__(err, msg)
        self.what = what
        self.log = log

    def __str__(self) -> str:
        return self.args[1]


# ---------------------------------------------------------------------------
# Log capture: libbpf prints through a variadic callback; the va_list arrives as a
# pointer on x86_64/aarch64 and is formatted by libc's vsnprintf.

_log = logging.getLogger(__name__)
_LOG_LINES: collections.deque[str] = collections.deque(maxlen=400)
_LOG_LOCK = threading.Lock()
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2

_libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
_libc.vsnprintf.restype = c_int

_PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)


_VA_LIST_COPY = 32  # >= sizeof(va_list) on x86_64 (24) and aarch64 (32); va_copy is a memcpy there


def _print_cb(level: int, fmt: bytes, va: int) -> int:
    if level == LIBBPF_DEBUG:
        return 0
    # vsnprintf consumes the va_list, so measure with a copy and format with the original.
    saved = (c_uint8 * _VA_LIST_COPY)()
    ctypes.memmove(saved, va, _VA_LIST_COPY)
    buf = ctypes.create_string_buffer(4096)
    n = _libc.vsnprintf(buf, len(buf), fmt, ctypes.addressof(saved))
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        _libc.vsnprintf(buf, len(buf), fmt, va)
    text = buf.value.decode(errors="replace")
    _log.log(logging.WARNING if level == LIBBPF_WARN else logging.DEBUG, "%s", text.rstrip())
    with _LOG_LOCK:
        for line in text.splitlines():
            _LOG_LINES.append(line)
    return max(n, 0)


_print_cb_ref = _PRINT_FN(_print_cb)  # module global: libbpf keeps the raw pointer


def log_mark() -> int:
    with _LOG_LOCK:
        _LOG_LINES.append("\x00mark")
        return len(_LOG_LINES)


def log_tail(max_lines: int = 60) -> str:
    """Lines printed by libbpf since the last :func:`log_mark` (bounded)."""
    with _LOG_LOCK:
        lines = list(_LOG_LINES)
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] == "\x00mark":
            lines = lines[i + 1:]
            break
    return "\n".join(lines[-max_lines:])


# ---------------------------------------------------------------------------
# Structs (layouts from /usr/include/bpf/libbpf.h and bpf.h of libbpf 1.1).

class bpf_object_open_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_attach_prog_fd", c_uint32),
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_char_p),
        ("kernel_log_size", c_size_t),
        ("kernel_log_level", c_uint32),
    ]


class bpf_tc_hook(Structure):
    _fields_ = [("sz", c_size_t), ("ifindex", c_int), ("attach_point", c_int), ("parent", c_uint32)]


class bpf_tc_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
    ]


class bpf_xdp_attach_opts(Structure):
    _fields_ = [("sz", c_size_t), ("old_prog_fd", c_int)]


class bpf_test_run_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class bpf_map_create_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("btf_fd", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("inner_map_fd", c_uint32),
        ("map_flags", c_uint32),
        ("map_extra", c_uint64),
        ("numa_node", c_uint32),
        ("map_ifindex", c_uint32),
    ]


class bpf_map_batch_opts(Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class bpf_map_info(Structure):
    """Prefix of the kernel's struct bpf_map_info (UAPI, append-only)."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * 16),
        ("ifindex", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("btf_id", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("_pad", c_uint32),
        ("map_extra", c_uint64),
    ]


class btf_type(Structure):
    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32)]


class btf_var_secinfo(Structure):
    _fields_ = [("type", c_uint32), ("offset", c_uint32), ("size", c_uint32)]


# Constants
BPF_TC_INGRESS, BPF_TC_EGRESS = 1, 2
BPF_TC_F_REPLACE = 1
XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE, XDP_FLAGS_HW_MODE = 1, 2, 4, 8
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BTF_KIND_VAR, BTF_KIND_DATASEC = 14, 15
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY = 1, 2
BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY = 5, 6
BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH, BPF_MAP_TYPE_LPM_TRIE = 9, 10, 11
BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH_OF_MAPS = 12, 13
BPF_F_INNER_MAP = 1 << 12
# enum bpf_attach_type (cgroup sock_addr hooks used by socket-level load balancing)
BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_UDP4_SENDMSG = 10, 14
BPF_CGROUP_UDP4_RECVMSG, BPF_CGROUP_INET4_GETPEERNAME = 19, 29
BPF_F_ALLOW_MULTI = 2
PERCPU_MAP_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}


def _fn(name: str, restype, *argtypes):
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_p = c_void_p
_lib_open_file = _fn("bpf_object__open_file", _p, c_char_p, POINTER(bpf_object_open_opts))
_lib_load = _fn("bpf_object__load", c_int, _p)
_lib_close = _fn("bpf_object__close", None, _p)
_lib_find_prog = _fn("bpf_object__find_program_by_name", _p, _p, c_char_p)
_lib_find_map = _fn("bpf_object__find_map_by_name", _p, _p, c_char_p)
_lib_next_map = _fn("bpf_object__next_map", _p, _p, _p)
_lib_obj_btf = _fn("bpf_object__btf", _p, _p)
_lib_prog_fd = _fn("bpf_program__fd", c_int, _p)
_lib_map_fd = _fn("bpf_map__fd", c_int, _p)
_lib_map_name = _fn("bpf_map__name", c_char_p, _p)
_lib_map_type = _fn("bpf_map__type", c_int, _p)
_lib_map_key_size = _fn("bpf_map__key_size", c_uint32, _p)
_lib_map_value_size = _fn("bpf_map__value_size", c_uint32, _p)
_lib_map_max_entries = _fn("bpf_map__max_entries", c_uint32, _p)
_lib_map_flags = _fn("bpf_map__map_flags", c_uint32, _p)
_lib_map_pin_path = _fn("bpf_map__pin_path", c_char_p, _p)
_lib_map_set_pin_path = _fn("bpf_map__set_pin_path", c_int, _p, c_char_p)
_lib_map_initial_value = _fn("bpf_map__initial_value", _p, _p, POINTER(c_size_t))
_lib_map_set_initial_value = _fn("bpf_map__set_initial_value", c_int, _p, _p, c_size_t)
_lib_btf_find = _fn("btf__find_by_name_kind", c_int, _p, c_char_p, c_uint32)
_lib_btf_type_by_id = _fn("btf__type_by_id", _p, _p, c_uint32)
_lib_btf_name = _fn("btf__name_by_offset", c_char_p, _p, c_uint32)
_lib_obj_get = _fn("bpf_obj_get", c_int, c_char_p)
_lib_obj_pin = _fn("bpf_obj_pin", c_int, c_int, c_char_p)
_lib_map_create = _fn(
    "bpf_map_create", c_int, c_int, c_char_p, c_uint32, c_uint32, c_uint32, POINTER(bpf_map_create_opts)
)
_lib_map_get_fd_by_id = _fn("bpf_map_get_fd_by_id", c_int, c_uint32)
_lib_prog_attach = _fn("bpf_prog_attach", c_int, c_int, c_int, c_int, c_uint)
_lib_prog_detach2 = _fn("bpf_prog_detach2", c_int, c_int, c_int, c_int)
_lib_obj_info = _fn("bpf_obj_get_info_by_fd", c_int, c_int, _p, POINTER(c_uint32))
_lib_lookup = _fn("bpf_map_lookup_elem", c_int, c_int, _p, _p)
_lib_update = _fn("bpf_map_update_elem", c_int, c_int, _p, _p, c_uint64)
_lib_delete = _fn("bpf_map_delete_elem", c_int, c_int, _p)
_lib_next_key = _fn("bpf_map_get_next_key", c_int, c_int, _p, _p)
_batch_args = (c_int, _p, _p, _p, _p, POINTER(c_uint32), POINTER(bpf_map_batch_opts))
_lib_lookup_batch = _fn("bpf_map_lookup_batch", c_int, *_batch_args)
_lib_update_batch = _fn(
    "bpf_map_update_batch", c_int, c_int, _p, _p, POINTER(c_uint32), POINTER(bpf_map_batch_opts)
)
_lib_delete_batch = _fn(
    "bpf_map_delete_batch", c_int, c_int, _p, POINTER(c_uint32), POINTER(bpf_map_batch_opts)
)
_lib_tc_hook_create = _fn("bpf_tc_hook_create", c_int, POINTER(bpf_tc_hook))
_lib_tc_hook_destroy = _fn("bpf_tc_hook_destroy", c_int, POINTER(bpf_tc_hook))
_lib_tc_attach = _fn("bpf_tc_attach", c_int, POINTER(bpf_tc_hook), POINTER(bpf_tc_opts))
_lib_tc_detach = _fn("bpf_tc_detach", c_int, POINTER(bpf_tc_hook), POINTER(bpf_tc_opts))
_lib_tc_query = _fn("bpf_tc_query", c_int, POINTER(bpf_tc_hook), POINTER(bpf_tc_opts))
_lib_xdp_attach = _fn("bpf_xdp_attach", c_int, c_int, c_int, c_uint32, POINTER(bpf_xdp_attach_opts))
_lib_xdp_detach = _fn("bpf_xdp_detach", c_int, c_int, c_uint32, POINTER(bpf_xdp_attach_opts))
_lib_test_run = _fn("bpf_prog_test_run_opts", c_int, c_int, POINTER(bpf_test_run_opts))
_lib_num_cpus = _fn("libbpf_num_possible_cpus", c_int)
_lib_set_print = _fn("libbpf_set_print", _p, _PRINT_FN)

_lib_set_print(_print_cb_ref)


def _check(ret: int, what: str, with_log: bool = False) -> int:
    if ret < 0:
        raise BpfError(ret, what, log_tail() if with_log else "")
    return ret


def _check_ptr(ptr, what: str, with_log: bool = True):
    if not ptr:
        err = ctypes.get_errno() or _errno.EINVAL
        raise BpfError(err, what, log_tail() if with_log else "")
    return ptr


# ---------------------------------------------------------------------------
# Objects, programs, maps (pointers are opaque ints).

def object_open_file(path: str, pin_root_path: str | None = None) -> int:
    opts = bpf_object_open_opts(sz=ctypes.sizeof(bpf_object_open_opts))
    if pin_root_path:
        opts.pin_root_path = pin_root_path.encode()
    log_mark()
    return _check_ptr(_lib_open_file(path.encode(), ctypes.byref(opts)), f"open {path}")


def object_load(obj: int, what: str = "load") -> None:
    log_mark()
    _check(_lib_load(obj), what, with_log=True)


def object_close(obj: int) -> None:
    _lib_close(obj)


def object_find_program(obj: int, name: str) -> int:
    return _check_ptr(_lib_find_prog(obj, name.encode()), f"program {name!r} not in object", False)


def object_find_map(obj: int, name: str) -> int:
    return _check_ptr(_lib_find_map(obj, name.encode()), f"map {name!r} not in object", False)


def object_maps(obj: int):
    m = _lib_next_map(obj, None)
    while m:
        yield m
        m = _lib_next_map(obj, m)


def object_btf(obj: int) -> int | None:
    return _lib_obj_btf(obj) or None


def program_fd(prog: int) -> int:
    return _check(_lib_prog_fd(prog), "bpf_program__fd")


def map_fd(m: int) -> int:
    return _check(_lib_map_fd(m), "bpf_map__fd")


def map_name(m: int) -> str:
    return _lib_map_name(m).decode()


def map_type(m: int) -> int:
    return _lib_map_type(m)


def map_key_size(m: int) -> int:
    return _lib_map_key_size(m)


def map_value_size(m: int) -> int:
    return _lib_map_value_size(m)


def map_max_entries(m: int) -> int:
    return _lib_map_max_entries(m)


def map_flags(m: int) -> int:
    return _lib_map_flags(m)


def map_pin_path(m: int) -> str | None:
    p = _lib_map_pin_path(m)
    return p.decode() if p else None


def map_set_pin_path(m: int, path: str | None) -> None:
    _check(_lib_map_set_pin_path(m, path.encode() if path else None), "bpf_map__set_pin_path")


def map_initial_value(m: int) -> tuple[int, int]:
    """(address, size) of the map's initial data image (writable until load)."""
    size = c_size_t(0)
    addr = _check_ptr(_lib_map_initial_value(m, ctypes.byref(size)), "bpf_map__initial_value", False)
    return addr, size.value


def map_set_initial_value(m: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    _check(_lib_map_set_initial_value(m, ctypes.cast(buf, c_void_p), len(data)), "bpf_map__set_initial_value")


def btf_datasec_var_offset(btf: int, datasec: str, var: str) -> tuple[int, int]:
    """(offset, size) of global ``var`` inside section ``datasec`` of the object's BTF."""
    sec_id = _lib_btf_find(btf, datasec.encode(), BTF_KIND_DATASEC)
    _check(sec_id, f"BTF datasec {datasec}")
    t = btf_type.from_address(_lib_btf_type_by_id(btf, sec_id))
    vlen = t.info & 0xFFFF
    base = _lib_btf_type_by_id(btf, sec_id) + ctypes.sizeof(btf_type)
    for i in range(vlen):
        info = btf_var_secinfo.from_address(base + i * ctypes.sizeof(btf_var_secinfo))
        vt = btf_type.from_address(_lib_btf_type_by_id(btf, info.type))
        if _lib_btf_name(btf, vt.name_off).decode() == var:
            return info.offset, info.size
    raise BpfError(_errno.ENOENT, f"variable {var} not in {datasec}")


# ---------------------------------------------------------------------------
# fd-level calls

def obj_get(path: str) -> int:
    return _check(_lib_obj_get(path.encode()), f"bpf_obj_get {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(_lib_obj_pin(fd, path.encode()), f"bpf_obj_pin {path}")


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               map_flags: int = 0) -> int:
    """A new map without BTF; returns its fd (the caller closes it)."""
    opts = bpf_map_create_opts(sz=ctypes.sizeof(bpf_map_create_opts), map_flags=map_flags)
    return _check(
        _lib_map_create(map_type, name.encode(), key_size, value_size, max_entries, ctypes.byref(opts)),
        f"bpf_map_create {name}",
    )


def map_get_fd_by_id(map_id: int) -> int:
    """An fd for the map with kernel id map_id (the caller closes it)."""
    return _check(_lib_map_get_fd_by_id(map_id), f"bpf_map_get_fd_by_id {map_id}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    _check(_lib_prog_attach(prog_fd, target_fd, attach_type, flags), f"bpf_prog_attach type {attach_type}")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """0, or -errno for the caller to judge (-ENOENT: not attached)."""
    return _lib_prog_detach2(prog_fd, target_fd, attach_type)


def map_info_by_fd(fd: int) -> bpf_map_info:
    info = bpf_map_info()
    ln = c_uint32(ctypes.sizeof(info))
    _check(_lib_obj_info(fd, ctypes.addressof(info), ctypes.byref(ln)), "bpf_obj_get_info_by_fd")
    return info


def map_lookup_elem(fd: int, key, value) -> bool:
    ret = _lib_lookup(fd, ctypes.addressof(key), ctypes.addressof(value))
    if ret == -_errno.ENOENT:
        return False
    _check(ret, "bpf_map_lookup_elem")
    return True


def map_update_elem(fd: int, key, value, flags: int = BPF_ANY) -> None:
    _check(_lib_update(fd, ctypes.addressof(key), ctypes.addressof(value), flags), "bpf_map_update_elem")


def map_delete_elem(fd: int, key) -> bool:
    ret = _lib_delete(fd, ctypes.addressof(key))
    if ret == -_errno.ENOENT:
        return False
    _check(ret, "bpf_map_delete_elem")
    return True


def map_get_next_key(fd: int, key, next_key) -> bool:
    ret = _lib_next_key(fd, None if key is None else ctypes.addressof(key), ctypes.addressof(next_key))
    if ret == -_errno.ENOENT:
        return False
    _check(ret, "bpf_map_get_next_key")
    return True


def _batch_opts(elem_flags: int = 0, flags: int = 0) -> bpf_map_batch_opts:
    return bpf_map_batch_opts(sz=ctypes.sizeof(bpf_map_batch_opts), elem_flags=elem_flags, flags=flags)


def map_lookup_batch(fd: int, in_batch, out_batch, keys, values, count: int) -> tuple[int, bool]:
    """One BPF_MAP_LOOKUP_BATCH step: (entries returned, reached end)."""
    n = c_uint32(count)
    opts = _batch_opts()
    ret = _lib_lookup_batch(
        fd,
        None if in_batch is None else ctypes.addressof(in_batch),
        ctypes.addressof(out_batch),
        ctypes.addressof(keys),
        ctypes.addressof(values),
        ctypes.byref(n),
        ctypes.byref(opts),
    )
    if ret == -_errno.ENOENT:
        return n.value, True
    _check(ret, "bpf_map_lookup_batch")
    return n.value, False


def map_update_batch(fd: int, keys, values, count: int, elem_flags: int = BPF_ANY) -> int:
    n = c_uint32(count)
    opts = _batch_opts(elem_flags)
    _check(
        _lib_update_batch(fd, ctypes.addressof(keys), ctypes.addressof(values), ctypes.byref(n), ctypes.byref(opts)),
        "bpf_map_update_batch",
    )
    return n.value


def map_delete_batch(fd: int, keys, count: int) -> int:
    n = c_uint32(count)
    opts = _batch_opts()
    ret = _lib_delete_batch(fd, ctypes.addressof(keys), ctypes.byref(n), ctypes.byref(opts))
    if ret == -_errno.ENOENT:
        return n.value
    _check(ret, "bpf_map_delete_batch")
    return n.value


def num_possible_cpus() -> int:
    return _check(_lib_num_cpus(), "libbpf_num_possible_cpus")


# ---------------------------------------------------------------------------
# tc / xdp / test run

def tc_hook(ifindex: int, attach_point: int) -> bpf_tc_hook:
    return bpf_tc_hook(sz=ctypes.sizeof(bpf_tc_hook), ifindex=ifindex, attach_point=attach_point)


def tc_opts(**kw) -> bpf_tc_opts:
    return bpf_tc_opts(sz=ctypes.sizeof(bpf_tc_opts), **kw)


def tc_hook_create(hook: bpf_tc_hook) -> bool:
    """Creates the clsact qdisc; False when it already existed."""
    ret = _lib_tc_hook_create(ctypes.byref(hook))
    if ret == -_errno.EEXIST:
        return False
    _check(ret, f"bpf_tc_hook_create ifindex {hook.ifindex}")
    return True


def tc_hook_destroy(hook: bpf_tc_hook) -> None:
    _check(_lib_tc_hook_destroy(ctypes.byref(hook)), f"bpf_tc_hook_destroy ifindex {hook.ifindex}")


def tc_attach(hook: bpf_tc_hook, opts: bpf_tc_opts) -> None:
    _check(_lib_tc_attach(ctypes.byref(hook), ctypes.byref(opts)), f"bpf_tc_attach ifindex {hook.ifindex}")


def tc_detach(hook: bpf_tc_hook, opts: bpf_tc_opts) -> int:
    """Returns 0, or -errno for the caller to judge (e.g. -ENOENT, -ENODEV)."""
    return _lib_tc_detach(ctypes.byref(hook), ctypes.byref(opts))


def tc_query(hook: bpf_tc_hook, opts: bpf_tc_opts) -> int:
    """Returns 0 and fills opts.prog_id, or -errno."""
    return _lib_tc_query(ctypes.byref(hook), ctypes.byref(opts))


def xdp_attach(ifindex: int, prog_fd: int, flags: int) -> None:
    _check(_lib_xdp_attach(ifindex, prog_fd, flags, None), f"bpf_xdp_attach ifindex {ifindex}")


def xdp_detach(ifindex: int, flags: int) -> None:
    _check(_lib_xdp_detach(ifindex, flags, None), f"bpf_xdp_detach ifindex {ifindex}")


def prog_test_run(prog_fd: int, opts: bpf_test_run_opts) -> None:
    _check(_lib_test_run(prog_fd, ctypes.byref(opts)), "bpf_prog_test_run_opts")
