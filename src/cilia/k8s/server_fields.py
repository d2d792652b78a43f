"""Fields the Kubernetes API server fills in when an object is created."""

from __future__ import annotations

import uuid
from datetime import datetime

from .registry import KINDS
from .timefmt import format_rfc3339

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def fill_server_fields(obj: dict, now: datetime | None = None) -> dict:
    """Set uid, creationTimestamp, namespace and per-kind server defaults, in place.

    Existing uid/creationTimestamp are kept, so re-applying an object already stored
    (then carrying them) does not make it look new. Returns ``obj``.
    """
    meta = obj.setdefault("metadata", {})
    meta.setdefault("uid", str(uuid.uuid4()))
    meta.setdefault("creationTimestamp", format_rfc3339(now))
    spec = KINDS.get(obj.get("kind", ""))
    if spec is None or spec.namespaced:
        meta["namespace"] = meta.get("namespace") or "default"
    else:
        meta.pop("namespace", None)
    kind = obj.get("kind")
    if kind == "Namespace":
        # The NamespaceDefaultLabelName admission always sets this label to the name.
        meta.setdefault("labels", {})[NAMESPACE_NAME_LABEL] = meta["name"]
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {}).setdefault("phase", "Active")
    elif kind == "Pod":
        obj.setdefault("status", {}).setdefault("phase", "Pending")
    elif kind == "Deployment":
        meta.setdefault("generation", 1)
    return obj
