"""The engine builds map state per signature (mapstate.partition/template/stamp) instead of
per identity: it must give exactly what MapStateBuilder.finalize gives for the same rule
contributions, entries and provenance, with and without pruning."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cilia.policy import PolicyEngine
from cilia.policy.mapstate import ALLOW, DENY, EntryKey, MapStateBuilder, partition
from cilia.policy.models import PROTO_ANY, PROTO_TCP, PROTO_UDP

PORTS = st.sampled_from([(0, 0), (80, 16), (81, 16), (64, 10), (0, 1), (32768, 1), (80, 12)])
L4 = st.lists(st.tuples(st.sampled_from([PROTO_ANY, PROTO_TCP, PROTO_UDP]), PORTS)
              .map(lambda t: (t[0], *t[1])), min_size=1, max_size=3)
CONTRIBUTION = st.tuples(st.sampled_from([0, 1]), st.sampled_from([ALLOW, DENY]),
                         st.integers(16, 24), L4.map(tuple),
                         st.sets(st.sampled_from([0, 1, 256, 257, 258, 300]), min_size=1))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(CONTRIBUTION, min_size=1, max_size=6), st.booleans())
def test_signature_templates_equal_the_reference_builder(contributions, prune):
    contribs = [(d, flag, cookie, l4) for d, flag, cookie, l4, _ in contributions]
    reach = [(ci, ids) for ci, (*_, ids) in enumerate(contributions)]

    ref = MapStateBuilder()
    for d, flag, cookie, l4, ids in contributions:
        for ident in ids:
            for proto, port, plen in l4:
                ref.add(EntryKey(d, ident, proto, port, plen), flag, cookie)
    want_entries, want_prov = ref.finalize(prune=prune)

    engine = PolicyEngine(prune=prune)
    entries, prov = {}, {}
    shapes = engine._realize(contribs, reach, entries, prov)
    assert entries == want_entries
    assert {k: (set(a), set(d)) for k, (a, d) in prov.items()} == \
           {k: (set(a), set(d)) for k, (a, d) in want_prov.items()}
    assert shapes == {(k[0], k[2], k[3], k[4]) for k in want_prov}


@given(st.lists(st.sets(st.integers(0, 12), min_size=1), min_size=1, max_size=8))
def test_partition_groups_identities_by_exactly_the_contributions_reaching_them(sets):
    groups = partition(list(enumerate(sets)))
    seen: set[int] = set()
    for sig, ids in groups:
        assert ids and not ids & seen
        seen |= ids
        for i in ids:
            assert sig == tuple(ci for ci, s in enumerate(sets) if i in s)
    assert seen == set().union(*sets)
    assert len({sig for sig, _ in groups}) == len(groups)
