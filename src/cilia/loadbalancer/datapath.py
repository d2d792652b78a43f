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


# Cilium's service type names (what `service list` shows) -> the datapath's kind names.
DATAPATH_KINDS = {"ExternalIPs": "ExternalIP"}


def datapath_kind(kind: str) -> str:
    return DATAPATH_KINDS.get(kind, kind)


_CANDIDATE_MODULES = ("cilia.datapath.lb", "cilia.datapath.node", "cilia.datapath.loadbalancer",
                      "cilia.datapath.services", "cilia.datapath")


def _datapath_class(name: str) -> Any:
    for module_name in _CANDIDATE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if cls is not None:
            return cls
    return None


def default_backend_factory() -> Callable[..., Any]:
    return _datapath_class("LBBackend") or DatapathBackend


def default_service_factory() -> Callable[..., Any] | None:
    """The datapath's LBService (for batched upsert_services), if it has one."""
    return _datapath_class("LBService")
