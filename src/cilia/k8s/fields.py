"""Typed access to manifest fields that reports the exact field path on error."""

from __future__ import annotations

import json
from typing import Any, Iterable

from .errors import FieldError

_MISSING = object()


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def describe(value: Any) -> str:
    """Type name (and short value) as a user would say it, for 'got ...' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {quote(value)}"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def quote(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def required(path: str) -> FieldError:
    return FieldError(path, "field is required")


def invalid(path: str, value: Any, reason: str) -> FieldError:
    return FieldError(path, f"invalid value {quote(value)}: {reason}")


def unsupported(path: str, value: Any, supported: Iterable[str]) -> FieldError:
    choices = ", ".join(quote(s) for s in supported)
    return FieldError(path, f"unsupported value {quote(value)}: supported values: {choices}")


def duplicate(path: str, value: Any) -> FieldError:
    return FieldError(path, f"duplicate value {quote(value)}")


def check_fields(obj: dict, allowed: frozenset[str], path: str) -> None:
    """Reject keys Kubernetes would not know, as kubectl's strict field validation does."""
    for key in obj:
        if key not in allowed:
            raise FieldError(join(path, str(key)), f"unknown field {quote(str(key))}")


def get_map(obj: dict, key: str, path: str, *, need: bool = False) -> dict | None:
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        if need:
            raise required(join(path, key))
        return None
    if not isinstance(value, dict):
        raise FieldError(join(path, key), f"must be an object, got {describe(value)}")
    return value


def get_list(obj: dict, key: str, path: str, *, need: bool = False) -> list | None:
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        if need:
            raise required(join(path, key))
        return None
    if not isinstance(value, list):
        raise FieldError(join(path, key), f"must be a list, got {describe(value)}")
    return value


def get_str(obj: dict, key: str, path: str, *, need: bool = False) -> str | None:
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None or (need and value == ""):
        if need:
            raise required(join(path, key))
        return None
    if not isinstance(value, str):
        raise FieldError(join(path, key), f"must be a string, got {describe(value)}")
    return value


def get_int(obj: dict, key: str, path: str, *, need: bool = False) -> int | None:
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        if need:
            raise required(join(path, key))
        return None
    # bool is an int subclass in Python; Kubernetes would reject `true` for an integer.
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(join(path, key), f"must be an integer, got {describe(value)}")
    return value


def get_bool(obj: dict, key: str, path: str) -> bool | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise FieldError(join(path, key), f"must be a boolean, got {describe(value)}")
    return value


def string_list(obj: dict, key: str, path: str) -> list[str] | None:
    items = get_list(obj, key, path)
    if items is None:
        return None
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise FieldError(join(join(path, key), i), f"must be a string, got {describe(item)}")
    return items


def string_map(obj: dict, key: str, path: str) -> dict[str, str] | None:
    mapping = get_map(obj, key, path)
    if mapping is None:
        return None
    for k, v in mapping.items():
        if not isinstance(k, str):
            raise FieldError(join(path, key), f"keys must be strings, got {describe(k)}")
        if not isinstance(v, str):
            raise FieldError(f"{join(path, key)}[{k}]", f"must be a string, got {describe(v)}")
    return mapping
