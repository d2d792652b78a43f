"""Network policy engine: NetworkPolicy / CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy
-> selector cache -> per-endpoint policy map entries (ABI in mapstate.py) -> explanations."""

from .compute import (Endpoint, EndpointPolicy, EndpointUpdate, DirectionState, PolicyEngine,
                      Update)
from .explain import ALLOWED, AUDIT, DENIED, DirectionVerdict, Verdict
from .mapstate import ALLOW, DENY, MAP_NAME, EntryKey, EntryValue, lookup4
from .models import EGRESS, INGRESS, RuleSource

__all__ = [
    "ALLOW", "ALLOWED", "AUDIT", "DENIED", "DENY", "DirectionState", "DirectionVerdict", "EGRESS",
    "Endpoint", "EndpointPolicy", "EndpointUpdate", "EntryKey", "EntryValue", "INGRESS",
    "MAP_NAME", "PolicyEngine", "RuleSource", "Update", "Verdict", "lookup4",
]
