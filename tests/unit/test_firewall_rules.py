"""The firewall's rules for a network, as data (no iptables here: the
isolation itself is shown with real traffic in tests/e2e/test_isolation.py)."""
from ipaddress import IPv4Address, IPv4Network

import pytest

from fan_driver.config import VXLAN_PORT
from fan_driver.dataplane.firewall import (DOCKER_BRIDGES, ISOLATION_CHAIN, TUNNEL_CHAIN,
                                           _restore_line, network_rules)
from fan_driver.dataplane.encap import IPIP, VXLAN
from fan_driver.dataplane.plan import NetworkPlan
from fan_driver.fanmap import FanMap, HostSlice

BRIDGE = "fan-250-0-28"


def plan(internal=False, encap=VXLAN, port=VXLAN_PORT) -> NetworkPlan:
    host = HostSlice(FanMap(IPv4Network("250.0.0.0/8"), IPv4Network("172.30.0.0/16")),
                     IPv4Address("172.30.0.28"))
    return NetworkPlan(network_id="5" * 64, host=host, underlay_interface="eth0", mtu=1450,
                       encap=encap, mapping="ebpf", tc_pref=1, internal=internal,
                       vxlan_port=port if encap is VXLAN else None)


def chain(rules, name):
    return [spec for _, chain_, spec in rules if chain_ == name]


@pytest.mark.parametrize("internal", [False, True])
def test_every_rule_carries_the_networks_mark(internal):
    for _, _, spec in network_rules(plan(internal), "fan-vxlan"):
        assert spec[spec.index("--comment") + 1] == "fan-driver 555555555555"


def test_internal_network_has_no_nat_and_keeps_to_its_overlay():
    rules = network_rules(plan(internal=True), "fan-vxlan")
    assert not [r for r in rules if r[0] == "nat"]
    isolation = chain(rules, ISOLATION_CHAIN)
    assert [s[-1] for s in isolation] == ["RETURN", "RETURN", "RETURN", "DROP", "DROP"]
    assert isolation[-2][:2] == ["-o", BRIDGE] and isolation[-1][:2] == ["-i", BRIDGE]
    assert ["!", "-d", "250.0.28.1/32", "-i", BRIDGE] == rules[-1][2][:5]


def test_plain_network_admits_only_replies_published_ports_and_its_overlay():
    isolation = chain(network_rules(plan(), "fan-vxlan"), ISOLATION_CHAIN)
    into = [s for s in isolation if s[:2] == ["-o", BRIDGE]]
    assert into[-1][-1] == "DROP"
    assert "RELATED,ESTABLISHED,DNAT" in into[0]
    from_tunnel = [s for s in isolation if "-i" in s and s[s.index("-i") + 1] == "fan-vxlan"]
    assert from_tunnel[0][:2] == ["-s", "250.0.0.0/8"] and from_tunnel[0][-1] == "RETURN"
    # nothing new out of the bridge into Docker's bridge networks
    assert [s[3] for s in isolation if s[-1] == "DROP" and s[:2] == ["-i", BRIDGE]] == \
        list(DOCKER_BRIDGES)
    assert any("MASQUERADE" in spec for _, _, spec in network_rules(plan(), "fan-vxlan"))


def test_tunnel_guard_matches_the_networks_vni_or_overlay():
    vxlan = chain(network_rules(plan(), "fan-vxlan"), TUNNEL_CHAIN)
    assert vxlan[0][:3] == ["!", "-s", "172.30.0.0/16"]
    assert vxlan[0][vxlan[0].index("--u32") + 1].endswith(f"={plan().vni:#x}")
    ipip = chain(network_rules(plan(encap=IPIP), "fan-ipip"), TUNNEL_CHAIN)
    assert ipip[0][ipip[0].index("--u32") + 1].endswith("&0xff000000=0xfa000000")
    # tunnel traffic routed to the underlay (only containers send it) is dropped
    for rules in (vxlan, ipip):
        assert [r[:2] for r in rules[1:]] == [["-d", "172.30.0.0/16"]] * 2
        assert all(r[-1] == "DROP" for r in rules)


def test_restore_lines_quote_as_iptables_prints():
    assert _restore_line(["-m", "u32", "--u32", "0x0>>0x16=0x1", "--comment", "a b"]) == \
        '-m u32 --u32 "0x0>>0x16=0x1" --comment "a b"'


def value_after(spec, option):
    return spec[spec.index(option) + 1]


def test_tunnel_guard_matches_the_networks_own_port():
    foreign, routed_udp, _ = chain(network_rules(plan(port=4790), "fan-vxlan-4790"), TUNNEL_CHAIN)
    assert value_after(foreign, "--dport") == "4790"
    assert value_after(foreign, "--u32").endswith(f"={plan().vni:#x}")
    # what containers route towards the underlay: the default ports and this one
    assert value_after(routed_udp, "--dports") == "4789,4790,8472"


def test_tunnel_guard_on_the_default_port_is_as_before():
    foreign, routed_udp, _ = chain(network_rules(plan(), "fan-vxlan"), TUNNEL_CHAIN)
    assert value_after(foreign, "--dport") == "4789"
    assert value_after(routed_udp, "--dports") == "4789,8472"
    _, ipip_udp, _ = chain(network_rules(plan(encap=IPIP), "fan-ipip"), TUNNEL_CHAIN)
    assert value_after(ipip_udp, "--dports") == "4789,8472"
