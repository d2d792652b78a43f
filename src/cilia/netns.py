"""Named network namespaces without forking.

`ip netns add` costs a process per namespace; cilia creates and enters namespaces from a
thread instead (setns moves only the calling thread), which is what makes pod start fast.
Namespaces are bind-mounted under /run/netns like iproute2 does, so `ip netns` and
`nsenter --net=/run/netns/NAME` see them.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from typing import Callable, Iterator, TypeVar

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]

T = TypeVar("T")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def path_of(name: str) -> str:
    return name if name.startswith("/") else os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path_of(name))


def _ensure_run_dir() -> None:
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    # Same dance as iproute2: /run/netns must be a shared mount point so that the netns
    # bind mounts propagate to every mount namespace that looks at it.
    if _libc.mount(b"", NETNS_RUN_DIR.encode(), b"none", MS_SHARED | MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:
        _check(-1, f"mount --make-rshared {NETNS_RUN_DIR}")
    _check(_libc.mount(NETNS_RUN_DIR.encode(), NETNS_RUN_DIR.encode(), b"none", MS_BIND | MS_REC, None),
           f"mount --bind {NETNS_RUN_DIR}")
    _check(_libc.mount(b"", NETNS_RUN_DIR.encode(), b"none", MS_SHARED | MS_REC, None),
           f"mount --make-rshared {NETNS_RUN_DIR}")


_run_dir_ready = False
_run_dir_lock = threading.Lock()


def create(name: str) -> str:
    """Create /run/netns/NAME holding a fresh network namespace; error if it exists."""
    global _run_dir_ready
    with _run_dir_lock:
        if not _run_dir_ready:
            _ensure_run_dir()
            _run_dir_ready = True
    path = path_of(name)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)
    failure: list[BaseException] = []

    def unshare_and_pin() -> None:
        # A throwaway thread: it leaves its netns behind in the bind mount and exits, so no
        # thread of ours ever has to switch back.
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            _check(_libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None),
                   f"bind mount netns on {path}")
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    t = threading.Thread(target=unshare_and_pin, name=f"netns-create-{name}")
    t.start()
    t.join()
    if failure:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise failure[0]
    return path


def delete(name: str) -> bool:
    """Remove a named netns; links inside it go with it once nothing else holds it."""
    path = path_of(name)
    if not os.path.exists(path):
        return False
    rc = _libc.umount2(path.encode(), MNT_DETACH)
    if rc != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        _check(rc, f"umount {path}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


def list_names(prefix: str = "") -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_RUN_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def inode(name: str) -> int:
    return os.stat(path_of(name)).st_ino


def enter(name: str) -> None:
    """Move the calling thread into netns NAME for good (a thread dedicated to that netns)."""
    fd = os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns({name})")
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Switch the calling thread into a netns and back. Only for threads we own."""
    target = os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(target, CLONE_NEWNET), f"setns({name})")
        try:
            yield
        finally:
            _check(_libc.setns(home, CLONE_NEWNET), "setns(back)")
    finally:
        os.close(target)
        os.close(home)


def run_in(name: str, fn: Callable[[], T]) -> T:
    """Run fn in a dedicated thread inside netns NAME and return its result."""
    result: list = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            with entered(name):
                result.append(fn())
        except BaseException as e:
            failure.append(e)

    t = threading.Thread(target=body, name=f"netns-{os.path.basename(name)}")
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return result[0]


def nsenter_argv(name: str, argv: list[str]) -> list[str]:
    """argv that runs a command inside netns NAME without `ip netns exec`, which would
    remount /sys and hide /sys/fs/bpf."""
    return ["nsenter", f"--net={path_of(name)}", "--", *argv]
