"""v1 Namespace validation."""

from __future__ import annotations

from . import names
from .fields import check_fields, get_map, string_list
from .meta import validate_object_meta
from .pods import TOP_LEVEL_FIELDS

NAMESPACE_SPEC_FIELDS = frozenset({"finalizers"})


def validate_namespace(obj: dict) -> dict:
    check_fields(obj, TOP_LEVEL_FIELDS, "")
    meta = validate_object_meta(obj, namespaced=False, name_validator=names.dns1123_label)
    out = {"apiVersion": obj["apiVersion"], "kind": "Namespace", "metadata": meta}
    spec = get_map(obj, "spec", "")
    if spec:
        check_fields(spec, NAMESPACE_SPEC_FIELDS, "spec")
        finalizers = string_list(spec, "finalizers", "spec")
        if finalizers:
            out["spec"] = {"finalizers": list(finalizers)}
    return out
