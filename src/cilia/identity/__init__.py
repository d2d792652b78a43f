"""Security identities: label filtering, reserved numbers, cluster-wide allocation."""

from .allocator import (
    AllocationError,
    IdentityAllocator,
    IdentityExhausted,
    LocalIdentityAllocator,
)
from .labels import labels_key, pod_security_labels
from .reserved import Identity

__all__ = [
    "AllocationError",
    "Identity",
    "IdentityAllocator",
    "IdentityExhausted",
    "LocalIdentityAllocator",
    "labels_key",
    "pod_security_labels",
]
