"""apps/v1 Deployment: validation, pod-template-hash, and expansion into Pods."""

from __future__ import annotations

import copy
import json
import random

from . import names
from .errors import FieldError
from .fields import (check_fields, get_bool, get_int, get_map, get_str, join, unsupported)
from .meta import validate_object_meta
from .pods import TOP_LEVEL_FIELDS, validate_pod_template
from .selectors import format_label_selector, selector_matches, validate_label_selector

DEPLOYMENT_SPEC_FIELDS = frozenset({
    "replicas", "selector", "template", "strategy", "minReadySeconds", "revisionHistoryLimit",
    "paused", "progressDeadlineSeconds",
})
STRATEGY_FIELDS = frozenset({"type", "rollingUpdate"})
STRATEGY_TYPES = ("Recreate", "RollingUpdate")

# k8s.io/apimachinery/pkg/util/rand: consonants and digits only, so generated names
# never spell words.
SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
POD_TEMPLATE_HASH_LABEL = "pod-template-hash"
HASH_LENGTH = 10
SUFFIX_LENGTH = 5
MAX_GENERATED_BASE = 63 - SUFFIX_LENGTH


def _non_negative(spec: dict, key: str, path: str) -> int | None:
    value = get_int(spec, key, path)
    if value is not None and value < 0:
        raise FieldError(join(path, key), f"must be greater than or equal to 0, got {value}")
    return value


def validate_deployment(obj: dict) -> dict:
    check_fields(obj, TOP_LEVEL_FIELDS, "")
    meta = validate_object_meta(obj, namespaced=True, name_validator=names.dns1123_subdomain)
    spec = get_map(obj, "spec", "", need=True)
    assert spec is not None
    check_fields(spec, DEPLOYMENT_SPEC_FIELDS, "spec")
    replicas = _non_negative(spec, "replicas", "spec")
    for key in ("minReadySeconds", "revisionHistoryLimit", "progressDeadlineSeconds"):
        _non_negative(spec, key, "spec")
    get_bool(spec, "paused", "spec")

    raw_selector = get_map(spec, "selector", "spec", need=True)
    assert raw_selector is not None
    selector = validate_label_selector(raw_selector, "spec.selector")
    if not selector:
        raise FieldError("spec.selector", "empty selector is invalid for deployment")

    raw_template = get_map(spec, "template", "spec", need=True)
    assert raw_template is not None
    template = validate_pod_template(raw_template, "spec.template")
    if not selector_matches(selector, template["metadata"].get("labels", {})):
        raise FieldError("spec.template.metadata.labels",
                         f"selector does not match template labels (selector: "
                         f"{format_label_selector(selector)}, labels: "
                         f"{_format_labels(template['metadata'].get('labels', {}))})")
    restart = template["spec"]["restartPolicy"]
    if restart != "Always":
        raise unsupported("spec.template.spec.restartPolicy", restart, ["Always"])

    strategy = get_map(spec, "strategy", "spec") or {}
    check_fields(strategy, STRATEGY_FIELDS, "spec.strategy")
    stype = get_str(strategy, "type", "spec.strategy") or "RollingUpdate"
    if stype not in STRATEGY_TYPES:
        raise unsupported("spec.strategy.type", stype, STRATEGY_TYPES)
    strategy = copy.deepcopy(strategy)
    strategy["type"] = stype
    if stype == "RollingUpdate":
        strategy.setdefault("rollingUpdate", {"maxSurge": "25%", "maxUnavailable": "25%"})

    out_spec = copy.deepcopy(spec)
    out_spec.update({
        "replicas": 1 if replicas is None else replicas,
        "selector": selector,
        "template": template,
        "strategy": strategy,
    })
    out_spec.setdefault("revisionHistoryLimit", 10)
    out_spec.setdefault("progressDeadlineSeconds", 600)
    return {"apiVersion": obj["apiVersion"], "kind": "Deployment", "metadata": meta, "spec": out_spec}


def _format_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>"


def fnv32a(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def safe_encode(text: str) -> str:
    """rand.SafeEncodeString: map each character into SAFE_ALPHABET."""
    return "".join(SAFE_ALPHABET[ord(c) % len(SAFE_ALPHABET)] for c in text)


def pod_template_hash(template: dict) -> str:
    """Kubernetes' scheme (FNV-32a of the template, decimal, safe-encoded).

    Kubernetes hashes Go's spew dump of the typed template; we hash canonical JSON, so
    values differ from a real cluster's but are equally stable. Zero-padded to a fixed
    10 characters so names have a predictable shape.
    """
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return safe_encode(str(fnv32a(canonical.encode())).zfill(HASH_LENGTH))


def random_suffix(rng: random.Random, length: int = SUFFIX_LENGTH) -> str:
    return "".join(rng.choice(SAFE_ALPHABET) for _ in range(length))


def expand_deployment(dep: dict, *, replicas: int | None = None,
                      rng: random.Random | None = None, taken: frozenset[str] | set[str] = frozenset()
                      ) -> list[dict]:
    """Pods for a validated Deployment, named ``<deploy>-<hash>-<5 chars>``.

    ``replicas`` overrides spec.replicas (scale-up creates only the missing pods);
    ``taken`` are names already in use, so a new pod never reuses one.
    """
    rng = rng or random.SystemRandom()
    meta = dep["metadata"]
    template = dep["spec"]["template"]
    count = dep["spec"].get("replicas", 1) if replicas is None else replicas
    template_hash = pod_template_hash(template)
    # names.SimpleNameGenerator caps the generateName base so the pod name stays <= 63.
    prefix = f"{meta['name']}-{template_hash}-"[:MAX_GENERATED_BASE]
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
             "controller": True, "blockOwnerDeletion": True}
    if meta.get("uid"):
        owner["uid"] = meta["uid"]
    used = set(taken)
    pods = []
    for _ in range(count):
        name = prefix + random_suffix(rng)
        while name in used:
            name = prefix + random_suffix(rng)
        used.add(name)
        pod_meta: dict = {
            "name": name,
            "generateName": prefix,
            "namespace": meta.get("namespace", "default"),
            "labels": {**template["metadata"].get("labels", {}), POD_TEMPLATE_HASH_LABEL: template_hash},
            "ownerReferences": [dict(owner)],
        }
        if template["metadata"].get("annotations"):
            pod_meta["annotations"] = dict(template["metadata"]["annotations"])
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta,
                     "spec": copy.deepcopy(template["spec"])})
    return pods
