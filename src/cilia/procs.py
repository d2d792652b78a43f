"""Processes we start and may later stop: pid + kernel start time, so a recycled pid is never
mistaken for ours (we never kill by name, and never a process we did not start)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass


def start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces/parens: fields start after the last ')'.
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[19])  # field 22 (starttime) counted from field 3 (state)


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except FileNotFoundError:
        return True
    return data[data.rindex(")") + 2] == "Z"


@dataclass
class ProcRef:
    pid: int
    start: int

    def alive(self) -> bool:
        return start_time(self.pid) == self.start and not is_zombie(self.pid)

    def signal(self, sig: int, group: bool = True) -> bool:
        if not self.alive():
            return False
        try:
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            os.kill(self.pid, sig)
        return True

    def stop(self, grace: float = 3.0, group: bool = True) -> None:
        """SIGTERM, then SIGKILL after grace; reaps it if it is our child."""
        if not self.signal(signal.SIGTERM, group):
            self._reap()
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self._reap()
            if not self.alive():
                return
            time.sleep(0.02)
        self.signal(signal.SIGKILL, group)
        for _ in range(100):
            self._reap()
            if not self.alive():
                return
            time.sleep(0.02)

    def _reap(self) -> None:
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ProcRef":
        return cls(pid=int(d["pid"]), start=int(d["start"]))


def ref_of(p: subprocess.Popen) -> ProcRef:
    st = start_time(p.pid)
    return ProcRef(p.pid, st if st is not None else -1)


def spawn(argv: list[str], log_path: str, env: dict | None = None,
          cwd: str | None = None) -> subprocess.Popen:
    """Detached in its own session (own process group), output appended to log_path."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab", buffering=0) as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True, env=env, cwd=cwd)
