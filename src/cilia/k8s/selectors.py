"""LabelSelector validation, matching and kubectl's one-line rendering."""

from __future__ import annotations

from typing import Callable

from . import names
from .errors import FieldError
from .fields import check_fields, get_list, get_str, invalid, join, string_list, unsupported
from .meta import validate_labels

LABEL_SELECTOR_FIELDS = frozenset({"matchLabels", "matchExpressions"})
REQUIREMENT_FIELDS = frozenset({"key", "operator", "values"})
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def validate_label_selector(selector: dict, path: str) -> dict:
    check_fields(selector, LABEL_SELECTOR_FIELDS, path)
    out: dict = {}
    match_labels = validate_labels(selector.get("matchLabels"), join(path, "matchLabels"))
    if match_labels:
        out["matchLabels"] = match_labels
    exprs = validate_match_expressions(selector, path, _k8s_key)
    if exprs:
        out["matchExpressions"] = exprs
    return out


def _k8s_key(key: str, path: str) -> None:
    errs = names.qualified_name(key)
    if errs:
        raise invalid(path, key, errs[0])


def validate_match_expressions(selector: dict, path: str,
                               check_key: Callable[[str, str], object]) -> list[dict]:
    """selector.matchExpressions normalized; check_key(key, path) validates a key (plain
    Kubernetes keys here, keys with a Cilium label source for CiliumNetworkPolicy)."""
    norm = []
    for i, expr in enumerate(get_list(selector, "matchExpressions", path) or []):
        epath = join(join(path, "matchExpressions"), i)
        if not isinstance(expr, dict):
            raise FieldError(epath, "must be an object")
        check_fields(expr, REQUIREMENT_FIELDS, epath)
        key = get_str(expr, "key", epath, need=True)
        assert key is not None
        check_key(key, join(epath, "key"))
        op = get_str(expr, "operator", epath, need=True)
        if op not in OPERATORS:
            raise unsupported(join(epath, "operator"), op, OPERATORS)
        values = string_list(expr, "values", epath) or []
        if op in ("In", "NotIn") and not values:
            raise FieldError(join(epath, "values"), "must be specified when `operator` is 'In' or 'NotIn'")
        if op in ("Exists", "DoesNotExist") and values:
            raise FieldError(join(epath, "values"), "may not be specified when `operator` is 'Exists' or 'DoesNotExist'")
        item = {"key": key, "operator": op}
        if values:
            item["values"] = list(values)
        norm.append(item)
    return norm


def selector_matches(selector: dict, labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics; an empty selector matches everything."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def format_label_selector(selector: dict | None) -> str:
    """metav1.FormatLabelSelector: 'app=web,tier in (a,b)'; '<none>' when empty."""
    if not selector:
        return "<none>"
    # LabelSelectorAsSelector sorts requirements by key before String().
    parts = [(k, f"{k}={v}") for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In":
            parts.append((key, f"{key} in ({','.join(sorted(values))})"))
        elif op == "NotIn":
            parts.append((key, f"{key} notin ({','.join(sorted(values))})"))
        elif op == "Exists":
            parts.append((key, key))
        else:
            parts.append((key, f"!{key}"))
    parts.sort(key=lambda p: p[0])
    return ",".join(text for _, text in parts) or "<none>"
