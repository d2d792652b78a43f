"""An endpoint (one pod interface) and its persisted state."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from cilia.paths import write_atomic

# Lifecycle as Cilium names it; "waiting-for-identity" etc. collapse into these here.
CREATING = "creating"
READY = "ready"
DISCONNECTING = "disconnecting"


@dataclass
class Endpoint:
    id: int
    container_id: str
    ifname: str
    netns: str
    ip4: str
    pod_namespace: str = ""
    pod_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    identity: int = 0
    identity_labels: list[str] = field(default_factory=list)
    host_ifname: str = ""
    host_ifindex: int = 0
    host_mac: str = ""
    pod_mac: str = ""
    state: str = CREATING
    created: float = 0.0

    @property
    def owner(self) -> str:
        return f"{self.container_id}/{self.ifname}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Endpoint":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class EndpointStateDir:
    """One JSON file per endpoint; written before any kernel object exists so that a crash
    mid-ADD leaves a record that restore can finish or undo."""

    def __init__(self, path: str):
        self.path = os.path.join(path, "endpoints")
        os.makedirs(self.path, exist_ok=True)

    def _file(self, ep_id: int) -> str:
        return os.path.join(self.path, f"{ep_id}.json")

    def save(self, ep: Endpoint) -> None:
        write_atomic(self._file(ep.id), json.dumps(ep.to_json(), indent=1, sort_keys=True))

    def remove(self, ep_id: int) -> None:
        try:
            os.unlink(self._file(ep_id))
        except FileNotFoundError:
            pass

    def load_all(self) -> tuple[list[Endpoint], list[str]]:
        eps: list[Endpoint] = []
        bad: list[str] = []
        for name in sorted(os.listdir(self.path)):
            if not name.endswith(".json"):
                continue
            p = os.path.join(self.path, name)
            try:
                with open(p) as f:
                    eps.append(Endpoint.from_json(json.load(f)))
            except (OSError, ValueError, TypeError) as e:
                bad.append(f"{p}: {e}")
        return eps, bad
