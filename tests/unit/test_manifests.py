"""Manifest loading and validation: every error names file, object and field."""

from __future__ import annotations

import copy
import io
import json
import random
import re

import pytest
import yaml
from hypothesis import given, strategies as st

from cilia.k8s import (ManifestError, expand_deployment, fill_server_fields, load_manifest_objects,
                       load_manifests, pod_template_hash)
from cilia.k8s import names
from cilia.k8s.deployments import SAFE_ALPHABET, fnv32a, safe_encode
from cilia.k8s.timefmt import parse_rfc3339

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web", "labels": {"app": "web"}},
    "spec": {"containers": [{
        "name": "c",
        "image": "cilium/json-mock",
        "ports": [{"containerPort": 80, "name": "http"}, {"containerPort": 53, "protocol": "UDP"}],
    }]},
}

DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "namespace": "prod"},
    "spec": {
        "replicas": 3,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web", "tier": "fe"}},
                     "spec": {"containers": [{"name": "c", "image": "nginx:1.25"}]}},
    },
}

NAMESPACE = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}


def write(tmp_path, text, name="app.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_one(tmp_path, obj):
    """Load `obj` from tmp_path/app.yaml with cwd=tmp_path so errors say 'app.yaml'."""
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(obj))
    return load_manifests(["app.yaml"])


def error_of(tmp_path, obj) -> str:
    with pytest.raises(ManifestError) as exc:
        load_one(tmp_path, obj)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def mutate(base, fn):
    obj = copy.deepcopy(base)
    fn(obj)
    return obj


def c0(obj):
    return obj["spec"]["containers"][0]


def setp(path, value):
    """Mutation that sets a dotted path ('spec.containers.0.image'); None deletes it."""
    def fn(obj):
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        target = obj
        for k in keys[:-1]:
            target = target[k]
        if value is None:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return fn


SUBDOMAIN_MSG = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters"
LABEL_MSG = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters"

# (id, base object, mutation, expected error; a trailing '...' means "starts with")
ERROR_CASES = [
    ("port-too-big", POD, setp("spec.containers.0.ports.1.containerPort", 70000),
     "error: app.yaml: Pod default/web: spec.containers[0].ports[1].containerPort: must be between 1 and 65535, got 70000"),
    ("port-zero", POD, setp("spec.containers.0.ports.0.containerPort", 0),
     "error: app.yaml: Pod default/web: spec.containers[0].ports[0].containerPort: must be between 1 and 65535, got 0"),
    ("port-string", POD, setp("spec.containers.0.ports.0.containerPort", "80"),
     'error: app.yaml: Pod default/web: spec.containers[0].ports[0].containerPort: must be an integer, got string "80"'),
    ("port-bool", POD, setp("spec.containers.0.ports.0.containerPort", True),
     "error: app.yaml: Pod default/web: spec.containers[0].ports[0].containerPort: must be an integer, got boolean true"),
    ("port-missing", POD, setp("spec.containers.0.ports.0.containerPort", None),
     "error: app.yaml: Pod default/web: spec.containers[0].ports[0].containerPort: field is required"),
    ("host-port", POD, setp("spec.containers.0.ports.0.hostPort", 65536),
     "error: app.yaml: Pod default/web: spec.containers[0].ports[0].hostPort: must be between 1 and 65535, got 65536"),
    ("protocol", POD, setp("spec.containers.0.ports.1.protocol", "ICMP"),
     'error: app.yaml: Pod default/web: spec.containers[0].ports[1].protocol: unsupported value "ICMP": supported values: "SCTP", "TCP", "UDP"'),
    ("protocol-lowercase", POD, setp("spec.containers.0.ports.1.protocol", "udp"),
     'error: app.yaml: Pod default/web: spec.containers[0].ports[1].protocol: unsupported value "udp": supported values: "SCTP", "TCP", "UDP"'),
    ("port-name-long", POD, setp("spec.containers.0.ports.0.name", "a234567890123456"),
     'error: app.yaml: Pod default/web: spec.containers[0].ports[0].name: invalid value "a234567890123456": must be no more than 15 characters'),
    ("port-name-upper", POD, setp("spec.containers.0.ports.0.name", "HTTP"),
     'error: app.yaml: Pod default/web: spec.containers[0].ports[0].name: invalid value "HTTP": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)'),
    ("port-name-no-letter", POD, setp("spec.containers.0.ports.0.name", "8080"),
     'error: app.yaml: Pod default/web: spec.containers[0].ports[0].name: invalid value "8080": must contain at least one letter (a-z)'),
    ("port-name-hyphen-edge", POD, setp("spec.containers.0.ports.0.name", "http-"),
     'error: app.yaml: Pod default/web: spec.containers[0].ports[0].name: invalid value "http-": must not begin or end with a hyphen'),
    ("port-name-double-hyphen", POD, setp("spec.containers.0.ports.0.name", "h--p"),
     'error: app.yaml: Pod default/web: spec.containers[0].ports[0].name: invalid value "h--p": must not contain consecutive hyphens'),
    ("port-name-duplicate", POD, setp("spec.containers.0.ports.1.name", "http"),
     'error: app.yaml: Pod default/web: spec.containers[0].ports[1].name: duplicate value "http"'),
    ("ports-not-list", POD, setp("spec.containers.0.ports", {"containerPort": 80}),
     "error: app.yaml: Pod default/web: spec.containers[0].ports: must be a list, got object"),
    ("no-spec", POD, setp("spec", None),
     "error: app.yaml: Pod default/web: spec: field is required"),
    ("no-containers", POD, setp("spec.containers", None),
     "error: app.yaml: Pod default/web: spec.containers: field is required"),
    ("empty-containers", POD, setp("spec.containers", []),
     "error: app.yaml: Pod default/web: spec.containers: must have at least one container"),
    ("container-name-invalid", POD, setp("spec.containers.0.name", "Web"),
     f'error: app.yaml: Pod default/web: spec.containers[0].name: invalid value "Web": {LABEL_MSG}...'),
    ("container-name-missing", POD, setp("spec.containers.0.name", None),
     "error: app.yaml: Pod default/web: spec.containers[0].name: field is required"),
    ("container-name-duplicate", POD,
     lambda o: o["spec"]["containers"].append({"name": "c", "image": "busybox"}),
     'error: app.yaml: Pod default/web: spec.containers[1].name: duplicate value "c"'),
    ("init-and-app-name-clash", POD,
     setp("spec.initContainers", [{"name": "c", "image": "busybox"}]),
     'error: app.yaml: Pod default/web: spec.containers[0].name: duplicate value "c"'),
    ("image-missing", POD, setp("spec.containers.0.image", None),
     "error: app.yaml: Pod default/web: spec.containers[0].image: field is required"),
    ("image-not-string", POD, setp("spec.containers.0.image", 5),
     "error: app.yaml: Pod default/web: spec.containers[0].image: must be a string, got integer 5"),
    ("command-string", POD, setp("spec.containers.0.command", "sleep 1"),
     'error: app.yaml: Pod default/web: spec.containers[0].command: must be a list, got string "sleep 1"'),
    ("args-int", POD, setp("spec.containers.0.args", ["-c", 1]),
     "error: app.yaml: Pod default/web: spec.containers[0].args[1]: must be a string, got integer 1"),
    ("env-value-int", POD, setp("spec.containers.0.env", [{"name": "N", "value": 5}]),
     "error: app.yaml: Pod default/web: spec.containers[0].env[0].value: must be a string, got integer 5"),
    ("unknown-container-field", POD, setp("spec.containers.0.imgae", "x"),
     'error: app.yaml: Pod default/web: spec.containers[0].imgae: unknown field "imgae"'),
    ("unknown-top-field", POD, setp("specs", {}),
     'error: app.yaml: Pod default/web: specs: unknown field "specs"'),
    ("unknown-port-field", POD, setp("spec.containers.0.ports.0.port", 80),
     'error: app.yaml: Pod default/web: spec.containers[0].ports[0].port: unknown field "port"'),
    ("node-name-type", POD, setp("spec.nodeName", 1),
     "error: app.yaml: Pod default/web: spec.nodeName: must be a string, got integer 1"),
    ("node-name-syntax", POD, setp("spec.nodeName", "Node_1"),
     f'error: app.yaml: Pod default/web: spec.nodeName: invalid value "Node_1": {SUBDOMAIN_MSG}...'),
    ("restart-policy", POD, setp("spec.restartPolicy", "Sometimes"),
     'error: app.yaml: Pod default/web: spec.restartPolicy: unsupported value "Sometimes": supported values: "Always", "Never", "OnFailure"'),
    ("name-syntax", POD, setp("metadata.name", "Web_1"),
     f'error: app.yaml: Pod default/Web_1: metadata.name: invalid value "Web_1": {SUBDOMAIN_MSG}...'),
    ("name-too-long", POD, setp("metadata.name", "a" * 254),
     f'error: app.yaml: Pod default/{"a" * 254}: metadata.name: invalid value "{"a" * 254}": must be no more than 253 characters'),
    ("name-missing", POD, setp("metadata.name", None),
     "error: app.yaml: Pod in document 1: metadata.name: field is required"),
    ("metadata-missing", POD, setp("metadata", None),
     "error: app.yaml: Pod in document 1: metadata: field is required"),
    ("namespace-syntax", POD, setp("metadata.namespace", "Prod"),
     f'error: app.yaml: Pod Prod/web: metadata.namespace: invalid value "Prod": {LABEL_MSG}...'),
    ("namespace-subdomain-not-label", POD, setp("metadata.namespace", "a.b"),
     f'error: app.yaml: Pod a.b/web: metadata.namespace: invalid value "a.b": {LABEL_MSG}...'),
    ("label-key", POD, setp("metadata.labels", {"app name": "x"}),
     'error: app.yaml: Pod default/web: metadata.labels: invalid value "app name": name part must consist of alphanumeric characters...'),
    ("label-key-prefix", POD, setp("metadata.labels", {"Example.com/app": "x"}),
     f'error: app.yaml: Pod default/web: metadata.labels: invalid value "Example.com/app": prefix part {SUBDOMAIN_MSG}...'),
    ("label-key-two-slashes", POD, setp("metadata.labels", {"a/b/c": "x"}),
     'error: app.yaml: Pod default/web: metadata.labels: invalid value "a/b/c": a qualified name must consist of...'),
    ("label-key-name-too-long", POD, setp("metadata.labels", {"k" * 64: "x"}),
     f'error: app.yaml: Pod default/web: metadata.labels: invalid value "{"k" * 64}": name part must be no more than 63 characters'),
    ("label-value-syntax", POD, setp("metadata.labels", {"app": "a b"}),
     'error: app.yaml: Pod default/web: metadata.labels[app]: invalid value "a b": a valid label must be an empty string or consist of...'),
    ("label-value-too-long", POD, setp("metadata.labels", {"app": "v" * 64}),
     f'error: app.yaml: Pod default/web: metadata.labels[app]: invalid value "{"v" * 64}": must be no more than 63 characters'),
    ("label-value-int", POD, setp("metadata.labels", {"version": 1}),
     "error: app.yaml: Pod default/web: metadata.labels[version]: must be a string, got integer 1"),
    ("labels-list", POD, setp("metadata.labels", ["app=web"]),
     "error: app.yaml: Pod default/web: metadata.labels: must be an object, got list"),
    ("annotation-value-int", POD, setp("metadata.annotations", {"note": 1}),
     "error: app.yaml: Pod default/web: metadata.annotations[note]: must be a string, got integer 1"),
    ("pod-wrong-api-version", POD, setp("apiVersion", "apps/v1"),
     'error: app.yaml: Pod default/web: apiVersion: no matches for kind "Pod" in version "apps/v1" (supported: v1)'),
    ("pod-no-api-version", POD, setp("apiVersion", None),
     "error: app.yaml: Pod default/web: apiVersion: field is required"),
    ("namespace-name-label", NAMESPACE, setp("metadata.name", "a.b"),
     f'error: app.yaml: Namespace a.b: metadata.name: invalid value "a.b": {LABEL_MSG}...'),
    ("namespace-unknown-spec-field", NAMESPACE, setp("spec", {"foo": 1}),
     'error: app.yaml: Namespace prod: spec.foo: unknown field "foo"'),
    ("deploy-replicas-negative", DEPLOYMENT, setp("spec.replicas", -1),
     "error: app.yaml: Deployment prod/web: spec.replicas: must be greater than or equal to 0, got -1"),
    ("deploy-replicas-string", DEPLOYMENT, setp("spec.replicas", "3"),
     'error: app.yaml: Deployment prod/web: spec.replicas: must be an integer, got string "3"'),
    ("deploy-selector-mismatch", DEPLOYMENT, setp("spec.selector.matchLabels", {"app": "api"}),
     "error: app.yaml: Deployment prod/web: spec.template.metadata.labels: selector does not match template labels "
     "(selector: app=api, labels: app=web,tier=fe)"),
    ("deploy-selector-expression-mismatch", DEPLOYMENT,
     setp("spec.selector", {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["be"]}]}),
     "error: app.yaml: Deployment prod/web: spec.template.metadata.labels: selector does not match template labels..."),
    ("deploy-selector-missing", DEPLOYMENT, setp("spec.selector", None),
     "error: app.yaml: Deployment prod/web: spec.selector: field is required"),
    ("deploy-selector-empty", DEPLOYMENT, setp("spec.selector", {}),
     "error: app.yaml: Deployment prod/web: spec.selector: empty selector is invalid for deployment"),
    ("deploy-selector-operator", DEPLOYMENT,
     setp("spec.selector.matchExpressions", [{"key": "tier", "operator": "Has"}]),
     'error: app.yaml: Deployment prod/web: spec.selector.matchExpressions[0].operator: unsupported value "Has": '
     'supported values: "In", "NotIn", "Exists", "DoesNotExist"'),
    ("deploy-selector-in-without-values", DEPLOYMENT,
     setp("spec.selector.matchExpressions", [{"key": "tier", "operator": "In"}]),
     "error: app.yaml: Deployment prod/web: spec.selector.matchExpressions[0].values: must be specified when `operator` is 'In' or 'NotIn'"),
    ("deploy-template-missing", DEPLOYMENT, setp("spec.template", None),
     "error: app.yaml: Deployment prod/web: spec.template: field is required"),
    ("deploy-template-port", DEPLOYMENT,
     setp("spec.template.spec.containers.0.ports", [{"containerPort": 99999}]),
     "error: app.yaml: Deployment prod/web: spec.template.spec.containers[0].ports[0].containerPort: must be between 1 and 65535, got 99999"),
    ("deploy-template-label", DEPLOYMENT, setp("spec.template.metadata.labels.tier", "a b"),
     'error: app.yaml: Deployment prod/web: spec.template.metadata.labels[tier]: invalid value "a b": a valid label must be...'),
    ("deploy-restart-never", DEPLOYMENT, setp("spec.template.spec.restartPolicy", "Never"),
     'error: app.yaml: Deployment prod/web: spec.template.spec.restartPolicy: unsupported value "Never": supported values: "Always"'),
    ("deploy-strategy", DEPLOYMENT, setp("spec.strategy", {"type": "BlueGreen"}),
     'error: app.yaml: Deployment prod/web: spec.strategy.type: unsupported value "BlueGreen": supported values: "Recreate", "RollingUpdate"'),
    ("deploy-old-api", DEPLOYMENT, setp("apiVersion", "extensions/v1beta1"),
     'error: app.yaml: Deployment prod/web: apiVersion: no matches for kind "Deployment" in version "extensions/v1beta1" (supported: apps/v1)'),
    ("deploy-name", DEPLOYMENT, setp("metadata.name", "-web"),
     f'error: app.yaml: Deployment prod/-web: metadata.name: invalid value "-web": {SUBDOMAIN_MSG}...'),
]


@pytest.mark.parametrize("base,fn,expected", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_validation_errors(tmp_path, monkeypatch, base, fn, expected):
    monkeypatch.chdir(tmp_path)
    msg = error_of(tmp_path, mutate(base, fn))
    if expected.endswith("..."):
        assert msg.startswith(expected[:-3]), msg
    else:
        assert msg == expected


def test_base_fixtures_are_valid(tmp_path, monkeypatch):
    # Guards the table above: each error must come from the mutation, not the base.
    monkeypatch.chdir(tmp_path)
    for base in (POD, DEPLOYMENT, NAMESPACE):
        assert len(load_one(tmp_path, base)) == 1


@pytest.mark.parametrize("text,expected", [
    ("apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n   labels: {}\n",
     "error: app.yaml: line 5: invalid YAML: mapping values are not allowed here"),
    ("apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  name: b\n",
     'error: app.yaml: line 5: invalid YAML: mapping key "name" already defined at line 4'),
    ("kind: Namespace\napiVersion: v1\nmetadata: {name: a}\n---\nkind: Foo\napiVersion: v1\n",
     'error: app.yaml: document 2: kind: unsupported kind "Foo" (supported: Namespace, Pod, Deployment, Service, EndpointSlice, NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)'),
    ("kind: Node\napiVersion: v1\nmetadata: {name: n}\n",
     'error: app.yaml: document 1: kind: unsupported kind "Node" (supported: Namespace, Pod, Deployment, Service, EndpointSlice, NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)'),
    ("apiVersion: v1\nmetadata: {name: a}\n", "error: app.yaml: document 1: kind: field is required"),
    ("- a\n- b\n", "error: app.yaml: document 1: must be an object, got list"),
    ("just a string\n", 'error: app.yaml: document 1: must be an object, got string "just a string"'),
    ("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n- {kind: Foo}\n",
     'error: app.yaml: document 1: items[1].kind: unsupported kind "Foo" (supported: Namespace, Pod, Deployment, Service, EndpointSlice, NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)'),
    ("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: A}}\n",
     'error: app.yaml: Namespace A: metadata.name: invalid value "A": a lowercase RFC 1123 label must consist'),
    ("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {}}\n",
     "error: app.yaml: Namespace in document 1 items[0]: metadata.name: field is required"),
    ("apiVersion: v1\nkind: List\nitems: {a: 1}\n", "error: app.yaml: document 1: items: must be a list, got object"),
])
def test_document_errors(tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, text)
    with pytest.raises(ManifestError) as exc:
        load_manifests(["app.yaml"])
    assert str(exc.value).startswith(expected), str(exc.value)
    assert "\n" not in str(exc.value)


def test_first_error_wins_and_nothing_is_returned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs = [NAMESPACE, mutate(POD, setp("spec.containers.0.image", None)),
            mutate(POD, setp("metadata.name", "Bad"))]
    write(tmp_path, yaml.safe_dump_all(docs))
    with pytest.raises(ManifestError, match=r"^error: app.yaml: Pod default/web: spec.containers\[0\].image"):
        load_manifests(["app.yaml"])


def test_valid_documents_before_a_syntax_error_are_not_returned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, yaml.safe_dump(NAMESPACE) + "---\nkind: [\n")
    with pytest.raises(ManifestError, match=r"^error: app.yaml: line \d+: invalid YAML: "):
        load_manifests(["app.yaml"])


def test_multi_document_with_empty_documents(tmp_path):
    text = "---\n" + yaml.safe_dump(NAMESPACE) + "---\n---\n# only a comment\n---\n" + yaml.safe_dump(POD)
    loaded = load_manifest_objects([write(tmp_path, text)])
    assert [(lo.obj["kind"], lo.document) for lo in loaded] == [("Namespace", 1), ("Pod", 4)]


def test_document_numbers_count_empty_documents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, yaml.safe_dump(NAMESPACE) + "---\n---\nkind: Foo\n")
    with pytest.raises(ManifestError, match=r"^error: app.yaml: document 3: kind: "):
        load_manifests(["app.yaml"])


def test_list_and_typed_list(tmp_path):
    lst = {"apiVersion": "v1", "kind": "List", "items": [NAMESPACE, POD]}
    pod_list = {"apiVersion": "v1", "kind": "PodList", "items": [mutate(POD, setp("metadata.name", "b"))]}
    text = yaml.safe_dump(lst) + "---\n" + yaml.safe_dump(pod_list)
    objs = load_manifests([write(tmp_path, text)])
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [("Namespace", "prod"), ("Pod", "web"), ("Pod", "b")]


def test_json_single_and_stream(tmp_path):
    single = write(tmp_path, json.dumps(POD, indent=2), "pod.json")
    stream = write(tmp_path, json.dumps(NAMESPACE) + "\n" + json.dumps(DEPLOYMENT), "stream.json")
    objs = load_manifests([single, stream])
    assert [o["kind"] for o in objs] == ["Pod", "Namespace", "Deployment"]


def test_json_syntax_error_names_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '{\n  "kind": "Pod",\n  "apiVersion" "v1"\n}\n', "pod.json")
    with pytest.raises(ManifestError) as exc:
        load_manifests(["pod.json"])
    assert str(exc.value) == "error: pod.json: line 3: invalid JSON: Expecting ':' delimiter"


def test_json_duplicate_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '{"kind": "Pod", "kind": "Namespace"}', "x.json")
    with pytest.raises(ManifestError, match='^error: x.json: line 1: invalid JSON: duplicate field "kind"$'):
        load_manifests(["x.json"])


def test_yaml_flow_mapping_in_yaml_file(tmp_path):
    # Starts like JSON but is YAML (unquoted keys): must still load from a .yaml file.
    text = "{apiVersion: v1, kind: Namespace, metadata: {name: flow}}\n"
    assert load_manifests([write(tmp_path, text)])[0]["metadata"]["name"] == "flow"


def test_directory_sorted_non_recursive_by_extension(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "b.yaml").write_text(yaml.safe_dump(mutate(NAMESPACE, setp("metadata.name", "b"))))
    (d / "a.yml").write_text(yaml.safe_dump(mutate(NAMESPACE, setp("metadata.name", "a"))))
    (d / "c.json").write_text(json.dumps(mutate(NAMESPACE, setp("metadata.name", "c"))))
    (d / "notes.txt").write_text("not: [a manifest")
    (d / "sub").mkdir()
    (d / "sub" / "z.yaml").write_text(yaml.safe_dump(mutate(NAMESPACE, setp("metadata.name", "z"))))
    objs = load_manifests([str(d)])
    assert [o["metadata"]["name"] for o in objs] == ["a", "b", "c"]


def test_directory_error_names_the_file(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "a.yaml").write_text(yaml.safe_dump(NAMESPACE))
    (d / "b.yaml").write_text(yaml.safe_dump(mutate(POD, setp("spec.containers.0.name", "C"))))
    with pytest.raises(ManifestError) as exc:
        load_manifests([str(d)])
    assert str(exc.value).startswith(f"error: {d / 'b.yaml'}: Pod default/web: spec.containers[0].name: ")


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="no manifests found"):
        load_manifests([str(tmp_path)])


def test_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ManifestError) as exc:
        load_manifests(["nope.yaml"])
    assert str(exc.value) == 'error: the path "nope.yaml" does not exist'


def test_stdin(tmp_path):
    objs = load_manifests(["-"], stdin=io.StringIO(yaml.safe_dump_all([NAMESPACE, POD])))
    assert [o["kind"] for o in objs] == ["Namespace", "Pod"]


def test_stdin_from_sys_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(yaml.safe_dump(NAMESPACE)))
    assert load_manifests(["-"])[0]["metadata"]["name"] == "prod"


def test_stdin_error_says_stdin():
    with pytest.raises(ManifestError, match=r"^error: STDIN: Pod default/web: spec.containers\[0\].image"):
        load_manifests(["-"], stdin=io.StringIO(yaml.safe_dump(mutate(POD, setp("spec.containers.0.image", None)))))


def test_sources_combine_in_order(tmp_path):
    f = write(tmp_path, yaml.safe_dump(NAMESPACE))
    objs = load_manifests([f, "-"], stdin=io.StringIO(yaml.safe_dump(POD)))
    assert [o["kind"] for o in objs] == ["Namespace", "Pod"]


def test_normalization_defaults(tmp_path):
    pod, dep, ns = load_manifests([write(tmp_path, yaml.safe_dump_all(
        [POD, mutate(DEPLOYMENT, setp("spec.replicas", None)), mutate(NAMESPACE, setp("metadata.namespace", "x"))]))])
    assert pod["metadata"]["namespace"] == "default"
    assert [p["protocol"] for p in pod["spec"]["containers"][0]["ports"]] == ["TCP", "UDP"]
    assert pod["spec"]["restartPolicy"] == "Always"
    assert pod["spec"]["containers"][0]["imagePullPolicy"] == "Always"  # untagged image
    assert dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "namespace" not in ns["metadata"]  # cluster-scoped


def test_server_owned_fields_and_status_are_dropped(tmp_path):
    saved = mutate(POD, lambda o: (o["metadata"].update(uid="abc", resourceVersion="7",
                                                       creationTimestamp="2020-01-01T00:00:00Z"),
                                   o.update(status={"phase": "Running"})))
    pod = load_manifests([write(tmp_path, yaml.safe_dump(saved))])[0]
    assert not {"uid", "resourceVersion", "creationTimestamp"} & set(pod["metadata"])
    assert "status" not in pod


def test_yaml_timestamps_stay_strings(tmp_path):
    obj = mutate(POD, setp("metadata.annotations", {"built": "x"}))
    text = yaml.safe_dump(obj).replace("built: x", "built: 2024-01-02")
    pod = load_manifests([write(tmp_path, text)])[0]
    assert pod["metadata"]["annotations"]["built"] == "2024-01-02"


def test_input_is_not_mutated(tmp_path):
    # The loader must copy: callers may diff the loaded object against the file.
    pod = load_manifests(["-"], stdin=io.StringIO(yaml.safe_dump(POD)))[0]
    pod["spec"]["containers"][0]["ports"].append({"containerPort": 1})
    assert len(POD["spec"]["containers"][0]["ports"]) == 2


# --- deployment expansion -----------------------------------------------------------

HASH_RE = f"[{SAFE_ALPHABET}]{{10}}"
SUFFIX_RE = f"[{SAFE_ALPHABET}]{{5}}"


def _dep(obj=DEPLOYMENT):
    return load_manifests(["-"], stdin=io.StringIO(yaml.safe_dump(obj)))[0]


def test_expand_deployment_names_labels_owner():
    dep = fill_server_fields(_dep())
    pods = expand_deployment(dep, rng=random.Random(7))
    assert len(pods) == 3
    names_ = [p["metadata"]["name"] for p in pods]
    assert len(set(names_)) == 3
    for pod in pods:
        name = pod["metadata"]["name"]
        assert re.fullmatch(f"web-{HASH_RE}-{SUFFIX_RE}", name), name
        template_hash = name.split("-")[1]
        assert pod["metadata"]["labels"] == {"app": "web", "tier": "fe", "pod-template-hash": template_hash}
        assert pod["metadata"]["namespace"] == "prod"
        assert pod["metadata"]["ownerReferences"] == [{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
            "uid": dep["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
        assert pod["spec"] == dep["spec"]["template"]["spec"]
        assert pod["spec"] is not dep["spec"]["template"]["spec"]


def test_expanded_pods_are_valid_pods():
    pods = expand_deployment(_dep())
    again = load_manifests(["-"], stdin=io.StringIO(yaml.safe_dump_all(pods)))
    assert [p["metadata"]["name"] for p in again] == [p["metadata"]["name"] for p in pods]


def test_pod_template_hash_is_stable_and_template_sensitive():
    a, b = _dep(), _dep()
    assert pod_template_hash(a["spec"]["template"]) == pod_template_hash(b["spec"]["template"])
    # Key order in the manifest must not matter.
    reordered = copy.deepcopy(DEPLOYMENT)
    reordered["spec"]["template"] = dict(reversed(list(reordered["spec"]["template"].items())))
    assert pod_template_hash(_dep(reordered)["spec"]["template"]) == pod_template_hash(a["spec"]["template"])
    changed = _dep(mutate(DEPLOYMENT, setp("spec.template.spec.containers.0.image", "nginx:1.26")))
    assert pod_template_hash(changed["spec"]["template"]) != pod_template_hash(a["spec"]["template"])
    # replicas is not part of the template: scaling keeps the hash.
    scaled = _dep(mutate(DEPLOYMENT, setp("spec.replicas", 9)))
    assert pod_template_hash(scaled["spec"]["template"]) == pod_template_hash(a["spec"]["template"])


def test_hash_primitives_match_kubernetes():
    # FNV-1a 32 reference values and rand.SafeEncodeString's digit mapping.
    assert fnv32a(b"") == 0x811C9DC5
    assert fnv32a(b"a") == 0xE40C292C
    assert safe_encode("0123456789") == "456789bcdf"


def test_expand_zero_replicas_and_override():
    dep = _dep()
    assert expand_deployment(mutate(dep, setp("spec.replicas", 0))) == []
    assert len(expand_deployment(dep, replicas=5)) == 5


def test_expand_avoids_taken_names():
    dep = _dep()
    first = {p["metadata"]["name"] for p in expand_deployment(dep, rng=random.Random(1))}
    second = {p["metadata"]["name"] for p in expand_deployment(dep, rng=random.Random(1), taken=first)}
    assert not first & second


def test_expand_long_deployment_name_keeps_pod_name_short():
    dep = _dep(mutate(DEPLOYMENT, setp("metadata.name", "x" * 70)))
    name = expand_deployment(dep)[0]["metadata"]["name"]
    assert len(name) == 63 and not names.dns1123_subdomain(name)


# --- server fields --------------------------------------------------------------------

def test_fill_server_fields():
    from datetime import datetime, timezone
    now = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=timezone.utc)
    ns = fill_server_fields(_dep(NAMESPACE), now)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", ns["metadata"]["uid"])
    assert ns["metadata"]["creationTimestamp"] == "2024-05-01T10:00:00Z"
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "prod"}
    assert ns["status"] == {"phase": "Active"}
    assert "namespace" not in ns["metadata"]
    pod = fill_server_fields({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}, now)
    assert pod["metadata"]["namespace"] == "default"
    assert pod["status"]["phase"] == "Pending"
    uid = pod["metadata"]["uid"]
    later = datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert fill_server_fields(pod, later)["metadata"] == {**pod["metadata"], "uid": uid,
                                                         "creationTimestamp": "2024-05-01T10:00:00Z"}
    assert parse_rfc3339(pod["metadata"]["creationTimestamp"]) == now.replace(microsecond=0)


# --- name syntax properties --------------------------------------------------------------

dns_labels = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


@given(dns_labels)
def test_generated_dns_labels_are_valid_everywhere(label):
    assert names.dns1123_label(label) == []
    assert names.dns1123_subdomain(label) == []
    assert names.qualified_name(label) == []
    assert names.label_value(label) == []


@given(dns_labels, st.sampled_from("A_. /"), st.data())
def test_dns_label_rejects_foreign_characters(label, bad, data):
    pos = data.draw(st.integers(0, len(label)))
    assert names.dns1123_label(label[:pos] + bad + label[pos:]) != []


@given(st.lists(dns_labels, min_size=1, max_size=4))
def test_subdomain_accepts_dotted_labels_up_to_253(parts):
    name = ".".join(parts)
    assert (names.dns1123_subdomain(name) == []) == (len(name) <= 253)
