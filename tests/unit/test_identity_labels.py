"""Security labels of a pod (Cilium's default labelsfilter), canonical keys, reserved ids."""
from __future__ import annotations

import itertools
import random

import pytest

from cilia.identity import reserved
from cilia.identity.allocator import IdentityExhausted, LocalIdentityAllocator
from cilia.identity.labels import (
    keep_label,
    labels_from_key,
    labels_key,
    parse_label,
    pod_security_labels,
)

NS_DEFAULT = [
    "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
    "k8s:io.cilium.k8s.policy.cluster=default",
    "k8s:io.cilium.k8s.policy.serviceaccount=default",
    "k8s:io.kubernetes.pod.namespace=default",
]


@pytest.mark.parametrize(
    "pod_labels, expected_pod_part",
    [
        ({"app": "web"}, ["k8s:app=web"]),
        ({"app": "web", "pod-template-hash": "5d8f9c"}, ["k8s:app=web"]),
        ({"app": "db", "controller-revision-hash": "7b9", "pod-template-generation": "3",
          "statefulset.kubernetes.io/pod-name": "db-0", "apps.kubernetes.io/pod-index": "0"}, ["k8s:app=db"]),
        ({"app.kubernetes.io/name": "shop", "app.kubernetes.io/component": "cart"},
         ["k8s:app.kubernetes.io/component=cart", "k8s:app.kubernetes.io/name=shop"]),
        ({"io.kubernetes.container.name": "c", "kubernetes.io/os": "linux",
          "beta.kubernetes.io/arch": "amd64", "k8s.io/cluster-service": "true",
          "annotation.foo": "x", "etcd_node": "e1", "batch.kubernetes.io/job-completion-index": "2"}, []),
        # Cilium's prefixes are anchored: only keys *starting* with kubernetes.io are dropped.
        ({"topology.kubernetes.io/zone": "a"}, ["k8s:topology.kubernetes.io/zone=a"]),
        ({"flag": ""}, ["k8s:flag"]),
        ({}, []),
    ],
)
def test_pod_security_labels_table(pod_labels, expected_pod_part):
    got = pod_security_labels(pod_labels, "default", {})
    assert got == sorted(expected_pod_part + NS_DEFAULT)


def test_namespace_labels_service_account_and_cluster():
    got = pod_security_labels({"app": "web"}, "shop", {"team": "blue", "kubernetes.io/metadata.name": "shop"},
                              service_account="cart-sa", cluster="c2")
    assert got == [
        "k8s:app=web",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop",
        "k8s:io.cilium.k8s.namespace.labels.team=blue",
        "k8s:io.cilium.k8s.policy.cluster=c2",
        "k8s:io.cilium.k8s.policy.serviceaccount=cart-sa",
        "k8s:io.kubernetes.pod.namespace=shop",
    ]


def test_pod_cannot_spoof_namespace_label():
    # The namespace label is set from the pod's real namespace, whatever the pod says.
    got = pod_security_labels({"io.kubernetes.pod.namespace": "kube-system"}, "default", {})
    assert "k8s:io.kubernetes.pod.namespace=default" in got
    assert "k8s:io.kubernetes.pod.namespace=kube-system" not in got


def test_filter_longest_match_semantics():
    assert keep_label("k8s", "io.kubernetes.pod.namespace")
    assert not keep_label("k8s", "io.kubernetes.pod.name")
    assert keep_label("k8s", "ioXkubernetes")  # regex dots are escaped
    assert keep_label("reserved", "host")
    assert not keep_label("k8s", "annotation.kubernetes.io/config.seen")


def test_labels_key_canonical_and_stable():
    labels = pod_security_labels({"app": "web", "tier": "front", "app.kubernetes.io/name": "x"}, "default", {})
    keys = {labels_key(p) for p in itertools.islice(itertools.permutations(labels), 50)}
    keys.add(labels_key(labels + labels[:2]))  # duplicates do not change the set
    assert len(keys) == 1
    key = keys.pop()
    assert "/" not in key
    assert labels_from_key(key) == tuple(sorted(labels))
    assert labels_key(["k8s:a=1"]) != labels_key(["k8s:a=2"])
    # ';' and '/' inside a label cannot make two different sets collide.
    assert labels_key(["k8s:a=1;k8s:b=2"]) != labels_key(["k8s:a=1", "k8s:b=2"])
    assert labels_from_key(labels_key(["k8s:a=1;k8s:b=2"])) == ("k8s:a=1;k8s:b=2",)
    # Stable across releases: the store is shared by agents of different versions.
    assert labels_key(["k8s:app=web", "k8s:app.kubernetes.io/name=x"]) == "k8s:app.kubernetes.io%2Fname=x;k8s:app=web"


def test_labels_key_rejects_empty_label():
    with pytest.raises(ValueError):
        labels_key(["k8s:a=1", ""])


def test_parse_label():
    assert parse_label("k8s:app=web") == ("k8s", "app", "web")
    assert parse_label("reserved:host") == ("reserved", "host", "")
    assert parse_label("k8s:app.kubernetes.io/name=a=b") == ("k8s", "app.kubernetes.io/name", "a=b")


def test_reserved_numbers_match_cilium():
    expected = {0: "unknown", 1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init",
                6: "remote-node", 7: "kube-apiserver", 8: "ingress"}
    for n, name in expected.items():
        ident = reserved.reserved_identity(n)
        assert ident.labels == (f"reserved:{name}",)
        assert reserved.reserved_by_name(name) is ident
        assert reserved.reserved_by_name(f"reserved:{name}") is ident
        assert reserved.reserved_by_labels([f"reserved:{name}"]) is ident
        assert ident.reserved and not ident.local
    assert [i.id for i in reserved.reserved_identities()] == list(range(1, 9))
    assert reserved.MIN_GLOBAL == 256 and reserved.MAX_GLOBAL == 65535
    assert reserved.is_global(256) and not reserved.is_global(255) and not reserved.is_global(65536)
    assert reserved.MIN_LOCAL == 16777216 and reserved.is_local(16777216)


def test_local_identities_lowest_free_and_refcounted():
    a = LocalIdentityAllocator()
    c1 = a.allocate(["cidr:10.0.0.0/8"])
    c2 = a.allocate(["cidr:192.168.0.0/16", "reserved:world"])
    assert (c1.id, c2.id) == (1 << 24, (1 << 24) + 1)
    assert c1.local
    assert a.allocate(["cidr:10.0.0.0/8"]) == c1
    assert a.release(c1.id) is False
    assert a.release(c1.id) is True
    assert a.lookup(c1.id) is None
    # A freed number is reused, so CIDR identities stay dense.
    c3 = a.allocate(["cidr:172.16.0.0/12"])
    assert c3.id == 1 << 24
    with pytest.raises(KeyError):
        a.release(12345)


def test_local_identities_exhaustion():
    a = LocalIdentityAllocator(min_id=1 << 24, max_id=(1 << 24) + 2)
    ids = [a.allocate([f"cidr:10.{i}.0.0/16"]).id for i in range(3)]
    assert len(set(ids)) == 3
    with pytest.raises(IdentityExhausted):
        a.allocate(["cidr:11.0.0.0/8"])


def test_security_labels_deterministic_over_dict_order():
    base = {f"k{i}": str(i) for i in range(20)} | {"pod-template-hash": "x"}
    items = list(base.items())
    random.Random(1).shuffle(items)
    assert pod_security_labels(dict(items), "ns", {"a": "1", "b": "2"}) == \
        pod_security_labels(base, "ns", {"b": "2", "a": "1"})
