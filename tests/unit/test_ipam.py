import pytest
from hypothesis import given, settings, strategies as st

from cilia.ipam.pool import PodCIDRPool, PoolExhausted


def test_router_ip_is_first_host_and_never_handed_out():
    p = PodCIDRPool("10.244.1.0/29")
    assert p.router_ip == "10.244.1.1"
    got = {p.allocate(f"c{i}") for i in range(p.capacity)}
    assert got == {f"10.244.1.{i}" for i in range(2, 7)}
    with pytest.raises(PoolExhausted):
        p.allocate("one-too-many")


def test_allocate_is_idempotent_per_owner():
    p = PodCIDRPool("10.244.2.0/24")
    a = p.allocate("ctr/eth0")
    assert p.allocate("ctr/eth0") == a
    assert len(p.allocated) == 1


def test_released_address_is_not_reused_immediately():
    p = PodCIDRPool("10.244.3.0/24")
    a = p.allocate("a")
    p.release(a)
    assert p.allocate("b") != a


def test_claim_rebuilds_after_restart_and_refuses_conflicts():
    p = PodCIDRPool("10.244.4.0/24")
    p.claim("10.244.4.7", "x")
    assert p.allocate("x") == "10.244.4.7"
    with pytest.raises(ValueError):
        p.claim("10.244.4.7", "y")
    with pytest.raises(ValueError):
        p.claim("10.1.1.1", "z")


def test_rejects_host_bits_and_tiny_cidr():
    with pytest.raises(ValueError):
        PodCIDRPool("10.244.1.5/24")
    with pytest.raises(ValueError):
        PodCIDRPool("10.244.1.0/31")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=120))
def test_no_address_is_ever_owned_twice(ops):
    p = PodCIDRPool("10.244.5.0/28")
    owned: dict[str, str] = {}
    for alloc, n in ops:
        owner = f"o{n}"
        if alloc:
            try:
                ip = p.allocate(owner)
            except PoolExhausted:
                assert len(owned) == p.capacity
                continue
            assert owned.get(owner, ip) == ip
            owned[owner] = ip
        elif owner in owned:
            assert p.release(owned.pop(owner))
        assert len(set(owned.values())) == len(owned)
        assert p.allocated == {ip: o for o, ip in owned.items()}
