"""Which kinds cilia understands: apiVersion(s), REST name, scope and validator.

Adding a kind (Service, EndpointSlice, NetworkPolicy, CiliumNetworkPolicy, ...) is one
``register(KindSpec(...))`` call with a validator that returns the normalized object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .deployments import validate_deployment
from .namespaces import validate_namespace
from .pods import validate_pod
from .services import validate_endpointslice, validate_service

Validator = Callable[[dict], dict]


@dataclass(frozen=True)
class KindSpec:
    kind: str
    api_versions: tuple[str, ...]
    plural: str
    namespaced: bool
    validator: Validator | None = None
    short_names: tuple[str, ...] = ()
    # Kinds the lab reports but users do not create (Node) have no validator.
    appliable: bool = True
    singular: str = field(default="")

    @property
    def resource_names(self) -> tuple[str, ...]:
        return (self.plural, self.singular or self.kind.lower(), *self.short_names)


KINDS: dict[str, KindSpec] = {}


def register(spec: KindSpec) -> KindSpec:
    KINDS[spec.kind] = spec
    return spec


def kind_spec(kind: str) -> KindSpec | None:
    return KINDS.get(kind)


def appliable_kinds() -> list[str]:
    return [k for k, s in KINDS.items() if s.appliable]


def resolve_resource(name: str) -> KindSpec | None:
    """`get pods`, `get po`, `get pod`, `get Pod`, `get deployments.apps` -> KindSpec."""
    wanted = name.lower().split(".", 1)[0]
    for spec in KINDS.values():
        if wanted == spec.kind.lower() or wanted in spec.resource_names:
            return spec
    return None


register(KindSpec("Namespace", ("v1",), "namespaces", False, validate_namespace, ("ns",)))
register(KindSpec("Pod", ("v1",), "pods", True, validate_pod, ("po",)))
register(KindSpec("Deployment", ("apps/v1",), "deployments", True, validate_deployment, ("deploy",)))
register(KindSpec("Node", ("v1",), "nodes", False, None, ("no",), appliable=False))
register(KindSpec("Service", ("v1",), "services", True, validate_service, ("svc",)))
register(KindSpec("EndpointSlice", ("discovery.k8s.io/v1",), "endpointslices", True,
                  validate_endpointslice))

from .policies import register_policy_kinds  # noqa: E402  (imports registry's KindSpec users)

register_policy_kinds(register, KindSpec)
