"""Hubble FlowFilter semantics: values of one field OR, fields AND, allow/deny lists, and the
`hubble observe` flag -> filter translation (left/right trackers, --not)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cilia.cli.observe_cmd import ordered_filter_args, parse_when
from cilia.hubble import filters
from cilia.hubble.filters import FilterError, from_args, match


def flow(src_pod="client", src_ns="default", dst_pod="server", dst_ns="default",
         sport=43210, dport=80, proto="TCP", verdict="FORWARDED", src_ip="10.244.1.10",
         dst_ip="10.244.1.20", src_id=1234, dst_id=5678, etype=4, sub=0, direction="EGRESS",
         node="node1", is_reply=False, flags=None, src_labels=None, dst_labels=None,
         drop_desc=None, dst_svc=None):
    l4 = {proto: {"source_port": sport, "destination_port": dport}} if proto in ("TCP", "UDP") \
        else {proto: {"type": 8, "code": 0}}
    if proto == "TCP":
        l4["TCP"]["flags"] = flags or {"SYN": True}
    f = {
        "time": "2026-11-28T16:00:00.123456789Z",
        "verdict": verdict,
        "IP": {"source": src_ip, "destination": dst_ip, "ipVersion": "IPv4"},
        "l4": l4,
        "source": {"identity": src_id, "namespace": src_ns, "pod_name": src_pod,
                   "labels": src_labels or [f"k8s:app={src_pod}", f"k8s:io.kubernetes.pod.namespace={src_ns}"]},
        "destination": {"identity": dst_id, "namespace": dst_ns, "pod_name": dst_pod,
                        "labels": dst_labels or [f"k8s:app={dst_pod}", f"k8s:io.kubernetes.pod.namespace={dst_ns}"]},
        "event_type": {"type": etype, "sub_type": sub},
        "traffic_direction": direction,
        "node_name": node,
        "is_reply": is_reply,
    }
    if drop_desc:
        f["drop_reason_desc"] = drop_desc
    if dst_svc:
        f["destination_service"] = dst_svc
    return f


def obs(*argv: str) -> tuple[list, list]:
    return from_args(ordered_filter_args(list(argv)))


def sel(f: dict, *argv: str) -> bool:
    allow, deny = obs(*argv)
    return match(f, allow, deny)


def test_no_filters_match_everything():
    assert match(flow(), [], [])
    assert match({"flow": flow()}, None, None)


def test_repeated_values_of_one_flag_or():
    assert sel(flow(verdict="DROPPED"), "--verdict", "FORWARDED", "--verdict", "DROPPED")
    assert not sel(flow(verdict="AUDIT"), "--verdict", "FORWARDED", "--verdict", "DROPPED")


def test_different_flags_and():
    f = flow(verdict="DROPPED", proto="TCP")
    assert sel(f, "--verdict", "DROPPED", "--protocol", "tcp")
    assert not sel(f, "--verdict", "DROPPED", "--protocol", "udp")


def test_pod_is_source_or_destination_prefix():
    assert sel(flow(), "--pod", "default/cli")
    assert sel(flow(), "--pod", "server")         # no namespace: default
    assert not sel(flow(), "--pod", "kube-system/server")
    assert sel(flow(), "--from-pod", "client") and not sel(flow(), "--from-pod", "server")
    assert sel(flow(), "--to-pod", "server") and not sel(flow(), "--to-pod", "client")


def test_from_and_to_pod_combine_into_one_filter():
    allow, deny = obs("--from-pod", "a", "--to-pod", "b")
    assert allow == [{"source_pod": ["a"], "destination_pod": ["b"]}] and deny == []
    assert sel(flow(src_pod="a", dst_pod="b"), "--from-pod", "a", "--to-pod", "b")
    assert not sel(flow(src_pod="b", dst_pod="a"), "--from-pod", "a", "--to-pod", "b")


def test_pod_splits_left_right_and_direction_less_flags_join_both():
    allow, _ = obs("--pod", "x", "--verdict", "DROPPED")
    assert allow == [{"source_pod": ["x"], "verdict": ["DROPPED"]},
                     {"destination_pod": ["x"], "verdict": ["DROPPED"]}]
    assert sel(flow(dst_pod="x", verdict="DROPPED"), "--pod", "x", "--verdict", "DROPPED")
    assert not sel(flow(dst_pod="x", verdict="FORWARDED"), "--pod", "x", "--verdict", "DROPPED")


def test_hubble_pod_and_port_pair_sides():
    # hubble: --pod x --port 80 is (src x AND sport 80) OR (dst x AND dport 80)
    assert sel(flow(dst_pod="x", dport=80), "--pod", "x", "--port", "80")
    assert not sel(flow(dst_pod="x", dport=80, sport=1), "--pod", "client", "--port", "80")


def test_namespace():
    f = flow(src_ns="team-a", dst_ns="team-b")
    assert sel(f, "-n", "team-a") and sel(f, "--namespace", "team-b")
    assert not sel(f, "-n", "default")
    assert sel(f, "--from-namespace", "team-a") and not sel(f, "--to-namespace", "team-a")
    with pytest.raises(FilterError):
        obs("-n", "a/b")
    # hubble applies -n to pod and service values: -n ns --pod x is ns/x, on both sides
    allow, _ = obs("--pod", "web", "-n", "team-b")
    assert allow == [{"source_pod": ["team-b/web"]}, {"destination_pod": ["team-b/web"]}]
    assert sel(flow(dst_pod="web", dst_ns="team-b"), "-n", "team-b", "--pod", "web")
    assert not sel(flow(dst_pod="web", dst_ns="default"), "-n", "team-b", "--pod", "web")
    allow, _ = obs("--from-namespace", "a", "--to-namespace", "b")
    assert allow == [{"source_pod": ["a/"], "destination_pod": ["b/"]}]
    allow, _ = obs("-n", "a", "--service", "web")
    assert allow == [{"source_service": ["a/web"]}, {"destination_service": ["a/web"]}]
    with pytest.raises(FilterError):
        obs("-n", "a", "--to-pod", "x")
    with pytest.raises(FilterError):
        obs("--ip", "10.0.0.1", "--pod", "x")


def test_not_negates_only_the_next_flag():
    f = flow(verdict="DROPPED", src_pod="client")
    allow, deny = obs("--not", "--verdict", "DROPPED", "--pod", "client")
    assert deny == [{"verdict": ["DROPPED"]}]
    assert allow == [{"source_pod": ["client"]}, {"destination_pod": ["client"]}]
    assert not match(f, allow, deny)
    assert match(flow(verdict="FORWARDED"), allow, deny)
    with pytest.raises(FilterError):
        from_args([("verdict", "DROPPED"), ("not", None)])


def test_not_pod_excludes_both_directions():
    allow, deny = obs("--not", "--pod", "server")
    assert allow == []
    assert not match(flow(), allow, deny)
    assert not match(flow(src_pod="server", dst_pod="z"), allow, deny)
    assert match(flow(src_pod="a", dst_pod="b"), allow, deny)


def test_side_flags_conflict_with_their_directed_forms():
    for a, b in (("--pod", "--from-pod"), ("--label", "--to-label"), ("--ip", "--from-ip"),
                 ("-n", "--to-namespace"), ("--port", "--to-port")):
        with pytest.raises(FilterError):
            obs(a, "x1" if "ip" not in a else "10.0.0.1", b, "x2" if "ip" not in b else "10.0.0.2")
    # in different lists they do not conflict
    obs("--pod", "a", "--not", "--from-pod", "b")


def test_labels_selector():
    f = flow(src_labels=["k8s:app=web", "k8s:tier=front"], dst_labels=["k8s:app=db"])
    assert sel(f, "-l", "app=web")
    assert sel(f, "--label", "k8s:app=db")
    assert sel(f, "--from-label", "app in (web,api),tier")
    assert not sel(f, "--from-label", "app=web,!tier")
    assert not sel(f, "--to-label", "app!=db")
    assert sel(f, "--to-label", "app notin (web)")
    assert not sel(f, "--label", "reserved:app=web")
    with pytest.raises(FilterError):
        obs("-l", "a=(b")


def test_ip_and_cidr():
    f = flow()
    assert sel(f, "--ip", "10.244.1.20") and sel(f, "--from-ip", "10.244.1.0/24")
    assert not sel(f, "--to-ip", "10.244.1.10")
    with pytest.raises(FilterError):
        obs("--ip", "nope")


def test_ports_protocol_identity():
    f = flow()
    assert sel(f, "--to-port", "80") and not sel(f, "--from-port", "80")
    assert sel(f, "--identity", "5678") and sel(f, "--from-identity", "1234")
    assert not sel(f, "--to-identity", "1234")
    assert sel(flow(proto="ICMPv4"), "--protocol", "icmp")
    assert not sel(flow(proto="ICMPv4"), "--protocol", "tcp")
    assert sel(flow(proto="UDP"), "--protocol", "UDP")
    with pytest.raises(FilterError):
        obs("--port", "http")
    with pytest.raises(FilterError):
        obs("--protocol", "gre")


def test_type_with_subtype():
    assert sel(flow(etype=4, sub=0), "--type", "trace")
    assert sel(flow(etype=4, sub=0), "-t", "trace:to-endpoint")
    assert not sel(flow(etype=4, sub=3), "--type", "trace:to-endpoint")
    assert sel(flow(etype=1, sub=133), "--type", "drop")
    assert sel(flow(etype=5), "--type", "policy-verdict")
    assert not sel(flow(etype=5), "--type", "drop")
    with pytest.raises(FilterError):
        obs("--type", "bogus")


def test_verdict_direction_node_service_flags_reply():
    f = flow(direction="INGRESS", node="lab-node2", dst_svc={"name": "web", "namespace": "default"},
             flags={"SYN": True, "ACK": True}, drop_desc="POLICY_DENIED", verdict="DROPPED")
    assert sel(f, "--traffic-direction", "ingress") and not sel(f, "--traffic-direction", "egress")
    assert sel(f, "--node-name", "lab-node*") and sel(f, "--node-name", "cluster/lab-node2")
    assert not sel(f, "--node-name", "lab-node1")
    assert sel(f, "--to-service", "default/web") and sel(f, "--service", "web")
    assert not sel(f, "--from-service", "default/web")
    assert sel(f, "--tcp-flags", "SYN,ACK") and not sel(f, "--tcp-flags", "FIN")
    assert sel(f, "--drop-reason-desc", "policy_denied")
    assert sel(f, "--is-reply", "false") and not sel(f, "--is-reply", "true")
    with pytest.raises(FilterError):
        obs("--verdict", "MAYBE")


def test_api_filter_json_camel_and_unknown_field():
    allow, deny = filters.validate([{"sourcePod": ["default/client"]}], [{"verdict": "DROPPED"}])
    assert allow == [{"source_pod": ["default/client"]}] and deny == [{"verdict": ["DROPPED"]}]
    with pytest.raises(FilterError):
        filters.validate([{"source_pood": ["x"]}], [])


def test_ordered_args_forms():
    args = ["--verdict=DROPPED", "-n", "ns1", "-lapp=x", "--not", "--pod", "p", "-o", "json", "--last", "3"]
    assert ordered_filter_args(args) == [("verdict", "DROPPED"), ("namespace", "ns1"),
                                         ("label", "app=x"), ("not", None), ("pod", "p")]


def test_parse_when_relative_and_rfc3339():
    assert parse_when("since", "5m", now=1_000_000.0) == "1970-01-12T13:41:40.000000000Z"
    assert parse_when("since", "1h30m", now=10_000.0) == "1970-01-01T01:16:40.000000000Z"
    assert parse_when("since", "2026-11-28T16:00:00.5+01:00") == "2026-11-28T15:00:00.500000000Z"
    from cilia.cli.context import CLIError
    with pytest.raises(CLIError):
        parse_when("since", "yesterday")


# --- properties against an independent reading of the rules --------------------------------

PODS = st.sampled_from(["a", "b", "c"])
VERDICTS = st.sampled_from(["FORWARDED", "DROPPED", "AUDIT"])


@st.composite
def flows(draw):
    return flow(src_pod=draw(PODS), dst_pod=draw(PODS), verdict=draw(VERDICTS),
                dport=draw(st.sampled_from([80, 443])), proto=draw(st.sampled_from(["TCP", "UDP"])))


FLAG_VALUES = st.one_of(
    st.tuples(st.sampled_from(["pod", "from-pod", "to-pod"]), PODS),
    st.tuples(st.just("verdict"), VERDICTS),
    st.tuples(st.just("to-port"), st.sampled_from(["80", "443"])),
    st.tuples(st.just("protocol"), st.sampled_from(["tcp", "udp"])),
)


def reference(f: dict, pairs: list[tuple[str, str]]) -> bool:
    """Independent model of hubble observe's documented meaning, with --pod expanded into
    its source-side and destination-side alternatives."""
    def holds(flag, value, side):
        if flag == "pod":
            return f[side]["pod_name"] == value
        if flag == "from-pod":
            return f["source"]["pod_name"] == value
        if flag == "to-pod":
            return f["destination"]["pod_name"] == value
        if flag == "verdict":
            return f["verdict"] == value
        if flag == "to-port":
            l4 = next(iter(f["l4"].values()))
            return str(l4["destination_port"]) == value
        if flag == "protocol":
            return value.upper() in f["l4"]

    def side_ok(group, side):
        by_flag: dict[str, list[str]] = {}
        for flag, value in group:
            by_flag.setdefault(flag, []).append(value)
        return all(any(holds(fl, v, side) for v in vs) for fl, vs in by_flag.items())

    pos = [(fl, v) for neg, fl, v in pairs if not neg]
    neg = [(fl, v) for neg_, fl, v in pairs if neg_]

    def group_matches(group):
        return side_ok(group, "source") or side_ok(group, "destination")

    allowed = not pos or group_matches(pos)
    denied = bool(neg) and group_matches(neg)
    return allowed and not denied


@settings(max_examples=400, deadline=None)
@given(flows(), st.lists(st.tuples(st.booleans(), FLAG_VALUES), max_size=5))
def test_matches_reference_model(f, spec):
    pairs = [(neg, fl, v) for neg, (fl, v) in spec]
    args: list[tuple[str, str | None]] = []
    for neg, fl, v in pairs:
        if neg:
            args.append(("not", None))
        args.append((fl, v))
    try:
        allow, deny = from_args(args)
    except FilterError:
        # hubble refuses --pod with --from-pod/--to-pod in one list (ambiguous sides)
        kinds = [{fl for n, fl, _ in pairs if n == neg} for neg in (False, True)]
        assert any("pod" in k and k & {"from-pod", "to-pod"} for k in kinds)
        return
    assert match(f, allow, deny) == reference(f, pairs)


@settings(max_examples=200, deadline=None)
@given(flows(), st.lists(FLAG_VALUES, min_size=1, max_size=4))
def test_deny_is_complement_of_allow(f, spec):
    try:
        allow, _ = from_args(spec)
    except FilterError:
        return
    _, deny = from_args([x for fl_v in spec for x in (("not", None), fl_v)])
    assert match(f, allow, []) == (not match(f, [], deny))
