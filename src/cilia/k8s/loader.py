"""Read manifests from files, directories and stdin; validate everything up front.

Nothing is returned unless every document is valid, so callers never half-apply.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, TextIO

import yaml

from .errors import FieldError, ManifestError
from .fields import describe, join
from .registry import KINDS, KindSpec, appliable_kinds

MANIFEST_SUFFIXES = (".json", ".yaml", ".yml")
STDIN_NAME = "STDIN"  # what kubectl calls it in messages


@dataclass(frozen=True)
class LoadedObject:
    source: str     # file name as shown to the user
    document: int   # 1-based position of the YAML/JSON document in that file
    obj: dict       # validated, normalized object


class _Loader(yaml.SafeLoader):
    """YAML as the API server reads it: timestamps stay strings, duplicate keys are errors."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"mapping key {json.dumps(str(key))} already defined at line {seen[key]}",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "found unhashable key", key_node.start_mark) from None
    return yaml.SafeLoader.construct_mapping(loader, node, deep=True)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _no_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate field {json.dumps(key)}")
        out[key] = value
    return out


def _read_sources(sources: list[str], stdin: TextIO | None) -> Iterator[tuple[str, str]]:
    for src in sources:
        if src == "-":
            yield STDIN_NAME, (stdin or sys.stdin).read()
            continue
        if not os.path.exists(src):
            raise ManifestError(f'the path "{src}" does not exist')
        if os.path.isdir(src):
            files = sorted(f for f in os.listdir(src)
                           if f.endswith(MANIFEST_SUFFIXES) and os.path.isfile(os.path.join(src, f)))
            if not files:
                raise ManifestError("no manifests found (recognized file extensions are "
                                    + ", ".join(MANIFEST_SUFFIXES) + ")", source=src)
            for f in files:
                path = os.path.join(src, f)
                yield path, _read_file(path)
        else:
            yield src, _read_file(src)


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError:
        raise ManifestError("not a UTF-8 text file", source=path) from None
    except OSError as e:
        raise ManifestError(e.strerror or str(e), source=path) from None


def _json_documents(source: str, text: str) -> Iterator[Any]:
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicate_json_keys)
    idx, end = 0, len(text)
    while True:
        while idx < end and text[idx].isspace():
            idx += 1
        if idx >= end:
            return
        try:
            doc, idx = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as e:
            raise ManifestError(f"invalid JSON: {e.msg}", source=source, object_ref=f"line {e.lineno}") from None
        except ValueError as e:
            line = text.count("\n", 0, idx) + 1
            raise ManifestError(f"invalid JSON: {e}", source=source, object_ref=f"line {line}") from None
        yield doc


def _yaml_documents(source: str, text: str) -> Iterator[Any]:
    try:
        yield from yaml.load_all(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        reason = e.problem or e.context or "syntax error"
        where = f"line {mark.line + 1}" if mark else None
        raise ManifestError(f"invalid YAML: {reason}", source=source, object_ref=where) from None
    except yaml.YAMLError as e:
        raise ManifestError(f"invalid YAML: {e}", source=source) from None


def _documents(source: str, text: str) -> Iterator[Any]:
    looks_json = source.endswith(".json") or text.lstrip().startswith(("{", "["))
    if looks_json:
        try:
            docs = list(_json_documents(source, text))
        except ManifestError:
            # A YAML file may start with a flow mapping; only .json files must be JSON.
            if source.endswith(".json"):
                raise
        else:
            yield from docs
            return
    yield from _yaml_documents(source, text)


def object_ref(obj: Any, spec: KindSpec | None = None, fallback: str = "") -> str:
    """'Pod default/web', 'Namespace prod'; `fallback` when the object has no usable name."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        return f"{kind} in {fallback}" if kind and fallback else fallback
    spec = spec or KINDS.get(kind or "")
    if spec is not None and not spec.namespaced:
        return f"{kind} {name}"
    ns = meta.get("namespace")
    if not isinstance(ns, str) or not ns:
        ns = "default"
    return f"{kind} {ns}/{name}"


def _is_list_kind(kind: str) -> bool:
    return kind == "List" or (kind.endswith("List") and kind[:-4] in KINDS)


def _validate_document(doc: Any, source: str, docno: int, prefix: str = "") -> list[dict]:
    """Validate one document (or, recursively, the items of a List) into objects.

    Shape and kind problems are reported against the document and the path inside it
    (``document 2: items[1].kind``); problems inside an object against the object.
    """
    where = f"document {docno}"

    def doc_error(message: str, field: str | None) -> ManifestError:
        return ManifestError(message, source=source, object_ref=where, path=field or None)

    if not isinstance(doc, dict):
        raise doc_error(f"must be an object, got {describe(doc)}", prefix)
    kind = doc.get("kind")
    if kind is None or kind == "":
        raise doc_error("field is required", join(prefix, "kind"))
    if not isinstance(kind, str):
        raise doc_error(f"must be a string, got {describe(kind)}", join(prefix, "kind"))
    if _is_list_kind(kind):
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise doc_error(f"must be a list, got {describe(items)}", join(prefix, "items"))
        out = []
        for i, item in enumerate(items):
            out.extend(_validate_document(item, source, docno, join(join(prefix, "items"), i)))
        return out
    spec = KINDS.get(kind)
    if spec is None or spec.validator is None or not spec.appliable:
        supported = ", ".join(appliable_kinds())
        raise doc_error(f'unsupported kind "{kind}" (supported: {supported})', join(prefix, "kind"))
    ref = object_ref(doc, spec, f"{where} {prefix}" if prefix else where)
    api_version = doc.get("apiVersion")
    if api_version is None or api_version == "":
        raise ManifestError("field is required", source=source, object_ref=ref, path="apiVersion")
    if api_version not in spec.api_versions:
        raise ManifestError(f'no matches for kind "{kind}" in version "{api_version}" '
                            f'(supported: {", ".join(spec.api_versions)})',
                            source=source, object_ref=ref, path="apiVersion")
    try:
        return [spec.validator(doc)]
    except FieldError as e:
        raise ManifestError(e.message, source=source, object_ref=ref, path=e.path or None) from None


def load_manifest_objects(sources: list[str], stdin: TextIO | None = None) -> list[LoadedObject]:
    """Like load_manifests, but keeps where each object came from for later errors."""
    out: list[LoadedObject] = []
    for source, text in _read_sources(sources, stdin):
        for docno, doc in enumerate(_documents(source, text), start=1):
            if doc is None:  # empty document between '---' separators
                continue
            for obj in _validate_document(doc, source, docno):
                out.append(LoadedObject(source, docno, obj))
    return out


def load_manifests(sources: list[str], stdin: TextIO | None = None) -> list[dict]:
    """Validated, normalized objects from files, directories or '-' (stdin).

    Raises ManifestError (one line, naming file, object and field) on the first problem.
    """
    return [lo.obj for lo in load_manifest_objects(sources, stdin)]
