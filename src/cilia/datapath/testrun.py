"""BPF_PROG_TEST_RUN: run a loaded program on a crafted packet without any device."""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from . import libbpf as lb

# Offsets in the UAPI struct __sk_buff (append-only ABI). The kernel accepts ctx_in
# shorter than the full struct and resolves ``ifindex`` to a device of the caller's
# netns (the packet then looks as if it came from that device; -ENODEV otherwise).
SKB_MARK_OFF = 8
SKB_PRIORITY_OFF = 32
SKB_INGRESS_IFINDEX_OFF = 36
SKB_IFINDEX_OFF = 40
SKB_CB_OFF = 48
SKB_CTX_LEN = 68  # up to and including cb[5]
CTX_OUT_MAX = 512  # > sizeof(struct __sk_buff) (192 on 6.x)

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7


@dataclass
class TestRunResult:
    __test__ = False  # not a pytest class
    retval: int
    data_out: bytes
    duration_ns: int
    ctx_out: bytes = b""

    @property
    def cb(self) -> tuple[int, ...]:
        """skb->cb[0..4] as the program left them (needs a ctx on input)."""
        return struct.unpack_from("=5I", self.ctx_out, SKB_CB_OFF) if len(self.ctx_out) >= SKB_CTX_LEN else ()


def skb_ctx(ifindex: int = 0, mark: int = 0, priority: int = 0, cb: tuple[int, ...] = (),
            ingress_ifindex: int = 0) -> bytes:
    """A ``struct __sk_buff`` prefix for ``ctx`` with the fields test-run honours.
    ``ingress_ifindex`` 0 is what a locally originated packet has; test-run copies any
    other value as is (no such device needs to exist)."""
    buf = bytearray(SKB_CTX_LEN)
    struct.pack_into("=I", buf, SKB_MARK_OFF, mark)
    struct.pack_into("=I", buf, SKB_PRIORITY_OFF, priority)
    struct.pack_into("=I", buf, SKB_INGRESS_IFINDEX_OFF, ingress_ifindex)
    struct.pack_into("=I", buf, SKB_IFINDEX_OFF, ifindex)
    cb = tuple(cb) + (0,) * (5 - len(cb))
    struct.pack_into("=5I", buf, SKB_CB_OFF, *cb)
    return bytes(buf)


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None,
                  out_size: int | None = None) -> TestRunResult:
    data_in = ctypes.create_string_buffer(bytes(data), len(data))
    out_len = out_size if out_size is not None else len(data) + 256
    data_out = ctypes.create_string_buffer(out_len)
    opts = lb.bpf_test_run_opts(
        sz=ctypes.sizeof(lb.bpf_test_run_opts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_out=ctypes.cast(data_out, ctypes.c_void_p),
        data_size_in=len(data),
        data_size_out=out_len,
        repeat=repeat,
    )
    ctx_out = None
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(bytes(ctx), len(ctx))
        opts.ctx_in = ctypes.cast(ctx_in, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
        # The kernel returns the whole struct __sk_buff and fails with ENOSPC if it
        # does not fit, even when ctx_in was a prefix.
        ctx_out = ctypes.create_string_buffer(CTX_OUT_MAX)
        opts.ctx_out = ctypes.cast(ctx_out, ctypes.c_void_p)
        opts.ctx_size_out = CTX_OUT_MAX
    lb.prog_test_run(prog_fd, opts)
    return TestRunResult(opts.retval, data_out.raw[: opts.data_size_out], opts.duration,
                         ctx_out.raw[: opts.ctx_size_out] if ctx_out is not None else b"")
