import pytest

from cilia.lab.topology import TopologyError, plan


def test_address_plan():
    s = plan("lab1", 3, "tunnel")
    assert [n.ip for n in s.nodes] == ["172.29.0.11", "172.29.0.12", "172.29.0.13"]
    assert [n.pod_cidr for n in s.nodes] == ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]
    assert s.nodes[0].router_ip == "10.244.1.1"
    assert s.fabric_netns == "lab1-fabric" and s.world_netns == "lab1-world"
    assert s.nodes[1].netns == "lab1-node2"
    assert s.pod_netns("default", "web") == "lab1-default-web"


def test_tunnel_mode_leaves_room_for_vxlan():
    assert plan("a", 1, "tunnel").pod_mtu == 1450
    assert plan("a", 1, "native").pod_mtu == 1500


@pytest.mark.parametrize("name", ["", "1abc", "UPPER", "has-dash", "waytoolongname"])
def test_bad_names(name):
    with pytest.raises(TopologyError, match="lab name"):
        plan(name, 1)


def test_bad_options():
    with pytest.raises(TopologyError, match="--routing"):
        plan("a", 1, "geneve")
    with pytest.raises(TopologyError, match="--nodes"):
        plan("a", 0)


def test_spec_round_trips_through_json():
    from cilia.lab.topology import LabSpec
    s = plan("rt", 2, "native")
    assert LabSpec.from_json(s.to_json()) == s
