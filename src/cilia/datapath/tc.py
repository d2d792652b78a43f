"""tc (clsact) and XDP attachment. Everything acts in the calling thread's netns,
because libbpf opens its netlink socket in the thread that calls it."""

from __future__ import annotations

import errno

from . import libbpf as lb
from .libbpf import BpfError

# One filter slot per direction: attaching again at the same handle/priority with
# BPF_TC_F_REPLACE swaps the program atomically (no window without a filter).
TC_HANDLE = 1
TC_PRIORITY = 1

_DIRECTIONS = {"ingress": lb.BPF_TC_INGRESS, "egress": lb.BPF_TC_EGRESS}
_XDP_MODES = {
    "skb": lb.XDP_FLAGS_SKB_MODE,
    "generic": lb.XDP_FLAGS_SKB_MODE,
    "native": lb.XDP_FLAGS_DRV_MODE,
    "drv": lb.XDP_FLAGS_DRV_MODE,
    "hw": lb.XDP_FLAGS_HW_MODE,
}


def _hook(ifindex: int, direction: str):
    try:
        return lb.tc_hook(ifindex, _DIRECTIONS[direction])
    except KeyError:
        raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}") from None


def tc_attach(ifindex: int, prog_fd: int, direction: str) -> None:
    hook = _hook(ifindex, direction)
    lb.tc_hook_create(hook)  # clsact covers both directions; EEXIST is fine
    lb.tc_attach(hook, lb.tc_opts(prog_fd=prog_fd, flags=lb.BPF_TC_F_REPLACE,
                                  handle=TC_HANDLE, priority=TC_PRIORITY))


def tc_detach(ifindex: int, direction: str) -> bool:
    """Remove our filter; False if it (or the link, or the qdisc) was already gone."""
    ret = lb.tc_detach(_hook(ifindex, direction), lb.tc_opts(handle=TC_HANDLE, priority=TC_PRIORITY))
    if ret in (-errno.ENOENT, -errno.ENODEV, -errno.EINVAL):
        # EINVAL is what the kernel answers when the clsact qdisc itself is missing.
        return False
    if ret < 0:
        raise BpfError(ret, f"bpf_tc_detach ifindex {ifindex} {direction}")
    return True


def tc_attached_prog_id(ifindex: int, direction: str) -> int | None:
    opts = lb.tc_opts(handle=TC_HANDLE, priority=TC_PRIORITY)
    ret = lb.tc_query(_hook(ifindex, direction), opts)
    if ret in (-errno.ENOENT, -errno.ENODEV, -errno.EINVAL):
        return None
    if ret < 0:
        raise BpfError(ret, f"bpf_tc_query ifindex {ifindex} {direction}")
    return opts.prog_id


def xdp_attach(ifindex: int, prog_fd: int, mode: str = "skb") -> None:
    try:
        flags = _XDP_MODES[mode]
    except KeyError:
        raise ValueError(f"xdp mode must be one of {sorted(_XDP_MODES)}, not {mode!r}") from None
    lb.xdp_attach(ifindex, prog_fd, flags)


def xdp_detach(ifindex: int, mode: str | None = None) -> None:
    """Detach whatever XDP program is attached in ``mode`` (default: any mode)."""
    if mode is not None:
        lb.xdp_detach(ifindex, _XDP_MODES[mode])
        return
    for flags in (lb.XDP_FLAGS_SKB_MODE, lb.XDP_FLAGS_DRV_MODE):
        try:
            lb.xdp_detach(ifindex, flags)
        except BpfError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP):
                raise
