"""ObjectMeta validation shared by every kind."""

from __future__ import annotations

from typing import Callable

from . import names
from .errors import FieldError
from .fields import check_fields, describe, get_list, get_map, get_str, invalid, join, required

OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
    "annotations", "ownerReferences", "finalizers", "managedFields",
})

# Written by the server: a manifest saved with `get -o yaml` still applies, but these
# values are replaced, never trusted.
SERVER_OWNED_META = ("selfLink", "uid", "resourceVersion", "generation", "creationTimestamp",
                     "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields")

NameValidator = Callable[[str], list[str]]


def validate_labels(labels: object, path: str) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise FieldError(path, f"must be an object, got {describe(labels)}")
    for key, value in labels.items():
        if not isinstance(key, str):
            raise FieldError(path, f"keys must be strings, got {describe(key)}")
        errs = names.qualified_name(key)
        if errs:
            raise invalid(path, key, errs[0])
        if not isinstance(value, str):
            raise FieldError(f"{path}[{key}]", f"must be a string, got {describe(value)}")
        errs = names.label_value(value)
        if errs:
            raise invalid(f"{path}[{key}]", value, errs[0])
    return dict(labels)


def validate_annotations(annotations: object, path: str) -> dict[str, str]:
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise FieldError(path, f"must be an object, got {describe(annotations)}")
    for key, value in annotations.items():
        if not isinstance(key, str):
            raise FieldError(path, f"keys must be strings, got {describe(key)}")
        # The API server lower-cases annotation keys before checking them.
        errs = names.qualified_name(key.lower())
        if errs:
            raise invalid(path, key, errs[0])
        if not isinstance(value, str):
            raise FieldError(f"{path}[{key}]", f"must be a string, got {describe(value)}")
    return dict(annotations)


def validate_name(value: str, path: str, validator: NameValidator) -> None:
    errs = validator(value)
    if errs:
        raise invalid(path, value, errs[0])


def validate_object_meta(obj: dict, *, namespaced: bool, name_validator: NameValidator) -> dict:
    """Return normalized metadata: name, namespace (namespaced kinds), labels, annotations."""
    meta = get_map(obj, "metadata", "", need=True)
    assert meta is not None
    check_fields(meta, OBJECT_META_FIELDS, "metadata")
    name = get_str(meta, "name", "metadata")
    if not name:
        raise required("metadata.name")
    validate_name(name, "metadata.name", name_validator)
    out: dict = {"name": name}
    if namespaced:
        ns = get_str(meta, "namespace", "metadata") or "default"
        validate_name(ns, "metadata.namespace", names.dns1123_label)
        out["namespace"] = ns
    labels = validate_labels(meta.get("labels"), "metadata.labels")
    if labels:
        out["labels"] = labels
    annotations = validate_annotations(meta.get("annotations"), "metadata.annotations")
    if annotations:
        out["annotations"] = annotations
    for key in ("ownerReferences", "finalizers"):
        value = get_list(meta, key, "metadata")
        if value:
            out[key] = value
    for key in ("finalizers",):
        for i, item in enumerate(out.get(key, [])):
            if not isinstance(item, str):
                raise FieldError(join(join("metadata", key), i), f"must be a string, got {describe(item)}")
    return out
