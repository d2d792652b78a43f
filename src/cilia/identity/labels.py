"""Security labels of a pod, filtered the way Cilium's default labelsfilter does.

Only labels that survive the filter take part in the identity: churning labels such as
pod-template-hash would otherwise give every rollout a new identity and defeat caching.

The filter semantics follow Cilium's labelsfilter: every prefix is a regular expression that
must match at the start of the label key; a label is dropped when an ignore ("!") prefix
matches and no include prefix matches a longer section of the key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping
from urllib.parse import quote, unquote

SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"

POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels"
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
APP_KUBERNETES = "app.kubernetes.io"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class LabelPrefix:
    pattern: str
    source: str = ""  # empty: any source
    ignore: bool = False

    def match_len(self, source: str, key: str) -> int:
        """Length of the matched section at the start of key, 0 when no match."""
        if self.source and self.source != source:
            return 0
        m = re.match(self.pattern, key)
        # A zero-length match (".*" on "") still counts as a match in Cilium; keep it
        # distinguishable from "no match" for the reserved:.* include.
        return max(m.end(), 1) if m else 0


def _q(s: str) -> str:
    return re.escape(s)


# Cilium's defaultLabelPrefixCfg, in the same order.
DEFAULT_PREFIXES: tuple[LabelPrefix, ...] = (
    LabelPrefix(".*", source=SOURCE_RESERVED),
    LabelPrefix(_q(POD_NAMESPACE_LABEL)),
    LabelPrefix(_q(NAMESPACE_LABELS_PREFIX)),
    LabelPrefix(_q(APP_KUBERNETES)),
    LabelPrefix(_q(CLUSTER_LABEL)),
    LabelPrefix(r"io\.kubernetes", ignore=True),
    LabelPrefix(r"kubernetes\.io", ignore=True),
    LabelPrefix(_q("statefulset.kubernetes.io/pod-name"), ignore=True),
    LabelPrefix(_q("apps.kubernetes.io/pod-index"), ignore=True),
    LabelPrefix(_q("batch.kubernetes.io/job-completion-index"), ignore=True),
    LabelPrefix(r".*beta\.kubernetes\.io", ignore=True),
    LabelPrefix(r"k8s\.io", ignore=True),
    LabelPrefix("pod-template-generation", ignore=True),
    LabelPrefix("pod-template-hash", ignore=True),
    LabelPrefix("controller-revision-hash", ignore=True),
    LabelPrefix("annotation.*", ignore=True),
    LabelPrefix("etcd_node", ignore=True),
)


def keep_label(source: str, key: str, prefixes: Iterable[LabelPrefix] = DEFAULT_PREFIXES) -> bool:
    included = ignored = 0
    for p in prefixes:
        n = p.match_len(source, key)
        if not n:
            continue
        if p.ignore:
            ignored = n if ignored == 0 else min(ignored, n)
        else:
            included = max(included, n)
    # The default configuration is not a whitelist: a label no prefix matches is kept, and a
    # longer include beats a shorter ignore (io.kubernetes.pod.namespace vs io.kubernetes).
    return ignored == 0 or included > ignored


def format_label(source: str, key: str, value: str) -> str:
    # Cilium prints a label without a value as "source:key".
    return f"{source}:{key}={value}" if value else f"{source}:{key}"


def parse_label(label: str) -> tuple[str, str, str]:
    """'k8s:app=web' -> ('k8s', 'app', 'web'); a label without a source gets 'unspec'."""
    source, sep, rest = label.partition(":")
    if not sep:
        source, rest = "unspec", label
    key, _, value = rest.partition("=")
    return source, key, value


def filter_labels(labels: Mapping[str, str], source: str = SOURCE_K8S,
                  prefixes: Iterable[LabelPrefix] = DEFAULT_PREFIXES) -> dict[str, str]:
    prefixes = tuple(prefixes)
    return {k: v for k, v in labels.items() if keep_label(source, k, prefixes)}


def pod_security_labels(pod_labels: Mapping[str, str] | None, namespace: str,
                        namespace_labels: Mapping[str, str] | None = None,
                        service_account: str = "default", cluster: str = "default") -> list[str]:
    """The sorted 'source:key=value' labels that determine a pod's security identity."""
    if not namespace:
        raise ValueError("a pod's namespace is required for its security labels")
    all_labels: dict[str, str] = dict(pod_labels or {})
    ns_labels = dict(namespace_labels or {})
    # The API server puts this label on every namespace; add it so a pod gets the same
    # identity whether or not its Namespace object was loaded.
    ns_labels.setdefault(NAMESPACE_NAME_LABEL, namespace)
    for k, v in ns_labels.items():
        all_labels[f"{NAMESPACE_LABELS_PREFIX}.{k}"] = v
    all_labels[POD_NAMESPACE_LABEL] = namespace
    all_labels[SERVICE_ACCOUNT_LABEL] = service_account or "default"
    all_labels[CLUSTER_LABEL] = cluster or "default"
    kept = filter_labels(all_labels, SOURCE_K8S)
    return sorted(format_label(SOURCE_K8S, k, v) for k, v in kept.items())


# Characters that never need escaping in a label and keep the key readable in etcdctl.
_SAFE = ":=.-_@+,"


def normalize(labels: Iterable[str]) -> tuple[str, ...]:
    out = tuple(sorted(set(labels)))
    for label in out:
        if not isinstance(label, str) or not label:
            raise ValueError(f"invalid label {label!r}")
    return out


def labels_key(labels: Iterable[str]) -> str:
    """Canonical single-segment store key of a label set, independent of input order.

    Each label is percent-escaped ('/', ';' and '%' included) and the sorted labels are
    joined with ';', so the key has no '/' and different sets never share a key.
    """
    return ";".join(quote(label, safe=_SAFE) for label in normalize(labels))


def labels_from_key(key: str) -> tuple[str, ...]:
    if not key:
        return ()
    return tuple(unquote(part) for part in key.split(";"))
