"""The slice of the node datapath the load balancer drives, as an interface.

NodeDatapath (src/cilia/datapath/) implements it against the BPF service maps; unit tests
may pass any object with these three methods. The reconciler builds backend values with
the datapath's own LBBackend class when it exists, so the two sides share one type.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence


class LBDatapath(Protocol):
    def upsert_service(self, rev_nat_index: int, address: str, port: int, proto: int,
                       backends: Sequence[Any], *, kind: str = "ClusterIP",
                       scope: str = "external", algorithm: str = "random",
                       maglev_table: list[int] | None = None, affinity_timeout: int = 0,
                       local_only: bool = False) -> Any: ...

    def delete_service(self, address: str, port: int, proto: int, scope: str = "external") -> Any: ...

    def delete_backend(self, id: int) -> Any: ...


@dataclass(frozen=True)
class DatapathBackend:
    """Field-for-field the datapath's LBBackend, for when that class is not importable."""
    id: int
    address: str
    port: int
    proto: int = 6
    state: str = "active"


_CANDIDATE_MODULES = ("cilia.datapath.node", "cilia.datapath.lb", "cilia.datapath.loadbalancer",
                      "cilia.datapath.services", "cilia.datapath")


def default_backend_factory() -> Callable[..., Any]:
    for name in _CANDIDATE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        cls = getattr(module, "LBBackend", None)
        if cls is not None:
            return cls
    return DatapathBackend
