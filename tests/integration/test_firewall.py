"""The fan's rules in a real iptables, in a namespace the test made, with each
backend this machine has: a rule as the fan writes it is the line iptables
prints (so a container start checks its rules with one listing per table), and
a marked rule edited or added by hand is put right at the next check."""
from __future__ import annotations

import os
import shutil

import pytest

from .netns_run import Underlay, run_in, sh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, iptables)")
BACKENDS = [b for b in ("iptables-nft", "iptables-legacy") if shutil.which(b)]
SETUP = """
from fan_driver.dataplane.firewall import Firewall, network_rules, port_rules, endpoint_mark
from fan_driver.dataplane.plan import VXLAN, NetworkPlan
from fan_driver.fanmap import FanMap, HostSlice
from fan_driver.ports import PortBinding

def plan(internal, network_id="5" * 64):
    host = HostSlice(FanMap(IPv4Network("250.0.0.0/8"), IPv4Network("172.30.0.0/16")),
                     IPv4Address("172.30.0.28"))
    return NetworkPlan(network_id=network_id, host=host, underlay_interface="eth0", mtu=1450,
                       encap=VXLAN, mapping="ebpf", tc_pref=1, internal=internal)

def rule_sets(internal, network_id="5" * 64):
    p = plan(internal, network_id)
    ports = [PortBinding(proto=proto, port=80, host_ip=IPv4Address(host_ip), host_port=8080)
             for proto in ("tcp", "udp") for host_ip in ("0.0.0.0", "172.30.0.28")]
    return [(p.mark, network_rules(p, "fan-vxlan")),
            (endpoint_mark(p, "e" * 64),
             port_rules(p, "e" * 64, IPv4Address("250.0.28.2"), ports))]
"""


@pytest.fixture(params=BACKENDS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no iptables-nft or iptables-legacy on this machine"))])
def backend(request):
    return request.param


@pytest.fixture
def netns():
    namespace = Underlay()
    yield namespace
    namespace.close()


def save(ns: str, backend: str) -> list:
    return [line for line in sh("ip", "netns", "exec", ns, f"{backend}-save").stdout.splitlines()
            if line.startswith("-A ")]


@pytest.mark.parametrize("internal", [False, True], ids=["plain", "internal"])
def test_rules_as_written_are_the_lines_iptables_prints(netns, backend, internal):
    complete = run_in(netns.ns, f"""
    firewall = Firewall("{backend}")
    result = []
    for mark, rules in rule_sets({internal}):
        await firewall.replace_marked(mark, rules)
        result.append(await firewall._complete(mark, rules))
    return result""", SETUP)
    assert complete == [True, True]
    assert len(save(netns.ns, backend)) >= 10


@pytest.mark.parametrize("change", ["-R", "-A"], ids=["edited", "added"])
def test_a_rule_edited_or_added_by_hand_is_put_right(netns, backend, change):
    run_in(netns.ns, f"""
    firewall = Firewall("{backend}")
    for mark, rules in rule_sets(False):
        await firewall.replace_marked(mark, rules)""", SETUP)
    wanted = save(netns.ns, backend)
    accept = next(line for line in wanted if line.startswith("-A FAN-FORWARD -i "))
    chain, rest = accept.split()[1], accept.split(maxsplit=2)[2]
    edited = rest.replace("-j ACCEPT", "-j DROP")
    position = ["1"] if change == "-R" else []
    sh("ip", "netns", "exec", netns.ns, backend, change, chain, *position, *split_rule(edited))
    assert save(netns.ns, backend) != wanted
    run_in(netns.ns, f"""
    firewall = Firewall("{backend}")
    for mark, rules in rule_sets(False):
        await firewall.replace_marked(mark, rules)""", SETUP)
    assert sorted(save(netns.ns, backend)) == sorted(wanted)


def test_removing_a_network_leaves_nothing(netns, backend):
    run_in(netns.ns, f"""
    firewall = Firewall("{backend}")
    for mark, rules in rule_sets(True) + rule_sets(False):
        await firewall.replace_marked(mark, rules)
    await firewall.remove_marked(plan(False).mark)""", SETUP)
    assert save(netns.ns, backend) == []
    chains = sh("ip", "netns", "exec", netns.ns, f"{backend}-save").stdout
    assert "FAN-" not in chains


def test_a_swarm_networks_marks_parse_back_and_stay_apart(netns, backend):
    """A swarm-scoped network's ID (25 base-36 digits) next to a Docker ID: the
    sweep reads both networks' marks back as written, and removing one network
    leaves the other's rules."""
    marks = run_in(netns.ns, f"""
    firewall = Firewall("{backend}")
    for network_id in ("5" * 64, "r81e5w37k1jx7gcxaf5jokig3"):
        for mark, rules in rule_sets(False, network_id):
            await firewall.replace_marked(mark, rules)
    before = sorted(await firewall.marks())
    await firewall.remove_marked(plan(False).mark)
    return [before, sorted(await firewall.marks())]""", SETUP)
    swarm = ["fan-driver r81e5w37k1jx", "fan-driver r81e5w37k1jx eeeeeeeeeeee"]
    assert marks == [["fan-driver 555555555555", "fan-driver 555555555555 eeeeeeeeeeee",
                      *swarm], swarm]


def split_rule(text: str) -> list:
    """An `iptables -S` rule's words, the quoted comment kept as one."""
    head, quoted, tail = text.partition('"')
    if not quoted:
        return text.split()
    comment, _, tail = tail.partition('"')
    return [*head.split(), comment, *tail.split()]
