"""The fan's rules in a real iptables, in a namespace the test made, with each
backend this machine has: a rule as the fan writes it is the line iptables
prints (so a container start checks its rules with one listing per table), and
a marked rule edited or added by hand is put right at the next check."""
from __future__ import annotations

import os
import shlex
import shutil

import pytest

from .netns_run import Underlay, run_in, sh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, iptables)")
BACKENDS = [b for b in ("iptables-nft", "iptables-legacy") if shutil.which(b)]
SETUP = """
from ipaddress import IPv4Address, IPv4Network
from fan_driver.dataplane.firewall import IptablesFirewall, network_rules, port_rules
from fan_driver.dataplane.encap import VXLAN
from fan_driver.config import VXLAN_PORT
from fan_driver.dataplane.plan import NetworkPlan
from fan_driver.fanmap import FanMap, HostSlice
from fan_driver.ports import PortBinding

def plan(internal, network_id="5" * 64):
    host = HostSlice(FanMap(IPv4Network("250.0.0.0/8"), IPv4Network("172.30.0.0/16")),
                     IPv4Address("172.30.0.28"))
    return NetworkPlan(network_id=network_id, host=host, underlay_interface="eth0", mtu=1450,
                       encap=VXLAN, mapping="ebpf", tc_pref=1, internal=internal,
                       vxlan_port=VXLAN_PORT)

PORTS = [PortBinding(proto=proto, port=80, host_ip=IPv4Address(host_ip), host_port=8080)
         for proto in ("tcp", "udp") for host_ip in ("0.0.0.0", "172.30.0.28")]
CONTAINER = IPv4Address("250.0.28.2")

def rule_sets(internal, network_id="5" * 64):
    p = plan(internal, network_id)
    return [(p.mark, network_rules(p, "fan-vxlan")),
            (p.endpoint_mark("e" * 64), port_rules(p, "e" * 64, CONTAINER, PORTS))]

async def ensure(firewall, internal, network_id="5" * 64):
    p = plan(internal, network_id)
    await firewall.ensure_network(p, "fan-vxlan")
    await firewall.ensure_ports(p, "e" * 64, CONTAINER, PORTS)
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
    firewall = IptablesFirewall("{backend}")
    await ensure(firewall, {internal})
    return [await firewall._complete(mark, rules) for mark, rules in rule_sets({internal})]""",
                      SETUP)
    assert complete == [True, True]
    assert len(save(netns.ns, backend)) >= 10


@pytest.mark.parametrize("internal", [False, True], ids=["plain", "internal"])
def test_what_check_reads_back_is_what_the_rule_builders_make(netns, backend, internal):
    """`fan-driver check` compares iptables-save with saved_lines of the same
    builders: the lines match, and every jump is in place."""
    read = run_in(netns.ns, f"""
    from collections import Counter
    from fan_driver.check.kernel import read_iptables
    from fan_driver.dataplane.firewall import missing_jumps, saved_lines
    await ensure(IptablesFirewall("{backend}"), {internal})
    rules, chains, hooks, error = read_iptables("{backend}")
    wanted = [line for _, built in rule_sets({internal}) for line in saved_lines(built)]
    return [error, Counter(map(tuple, rules)) == Counter(wanted), len(rules),
            missing_jumps(hooks), len(chains)]""", SETUP)
    error, same, count, missing, chains = read
    assert (error, same, missing, chains) == ("", True, [], 6), read
    assert count >= 10


@pytest.mark.parametrize("change", ["-R", "-A"], ids=["edited", "added"])
def test_a_rule_edited_or_added_by_hand_is_put_right(netns, backend, change):
    run_in(netns.ns, f"""
    await ensure(IptablesFirewall("{backend}"), False)""", SETUP)
    wanted = save(netns.ns, backend)
    accept = next(line for line in wanted if line.startswith("-A FAN-FORWARD -i "))
    chain, rest = accept.split()[1], accept.split(maxsplit=2)[2]
    edited = rest.replace("-j ACCEPT", "-j DROP")
    position = ["1"] if change == "-R" else []
    sh("ip", "netns", "exec", netns.ns, backend, change, chain, *position, *shlex.split(edited))
    assert save(netns.ns, backend) != wanted
    run_in(netns.ns, f"""
    await ensure(IptablesFirewall("{backend}"), False)""", SETUP)
    assert sorted(save(netns.ns, backend)) == sorted(wanted)


def test_removing_a_network_leaves_nothing(netns, backend):
    run_in(netns.ns, f"""
    firewall = IptablesFirewall("{backend}")
    await ensure(firewall, True)
    await ensure(firewall, False)
    await firewall.remove_network(plan(False))""", SETUP)
    assert save(netns.ns, backend) == []
    chains = sh("ip", "netns", "exec", netns.ns, f"{backend}-save").stdout
    assert "FAN-" not in chains


def test_accepts_come_after_the_users_rules_wherever_dockerd_put_them(netns, backend):
    """Our jump in filter FORWARD goes right after DOCKER-USER's, and is moved
    there when found before it (dockerd started after the plugin)."""
    ns = ("ip", "netns", "exec", netns.ns, backend)
    sh(*ns, "-N", "DOCKER-USER")
    sh(*ns, "-A", "FORWARD", "-o", "docker0", "-j", "ACCEPT")
    sh(*ns, "-I", "FORWARD", "1", "-j", "DOCKER-USER")
    run_in(netns.ns, f"""
    await ensure(IptablesFirewall("{backend}"), False)""", SETUP)
    forward = [line for line in sh(*ns, "-S", "FORWARD").stdout.splitlines()
               if line.startswith("-A ")]
    assert forward[:2] == ["-A FORWARD -j DOCKER-USER", "-A FORWARD -j FAN-FORWARD"]
    sh(*ns, "-D", "FORWARD", "-j", "DOCKER-USER")
    sh(*ns, "-A", "FORWARD", "-j", "DOCKER-USER")   # now after ours
    run_in(netns.ns, f"""
    await ensure(IptablesFirewall("{backend}"), False)""", SETUP)
    forward = [line for line in sh(*ns, "-S", "FORWARD").stdout.splitlines()
               if line.startswith("-A ")]
    assert forward == ["-A FORWARD -o docker0 -j ACCEPT", "-A FORWARD -j DOCKER-USER",
                       "-A FORWARD -j FAN-FORWARD"]
    run_in(netns.ns, f"""
    await IptablesFirewall("{backend}").remove_network(plan(False))""", SETUP)
    assert [line for line in save(netns.ns, backend) if "FAN" in line] == []


def test_a_swarm_networks_marks_parse_back_and_stay_apart(netns, backend):
    """A swarm-scoped network's ID (25 base-36 digits) next to a Docker ID: the
    sweep reads both networks' marks back as written, and removing one network
    leaves the other's rules."""
    marks = run_in(netns.ns, f"""
    firewall = IptablesFirewall("{backend}")
    for network_id in ("5" * 64, "r81e5w37k1jx7gcxaf5jokig3"):
        await ensure(firewall, False, network_id)
    before = sorted(await firewall._marks())
    await firewall.remove_network(plan(False))
    return [before, sorted(await firewall._marks())]""", SETUP)
    swarm = ["fan-driver r81e5w37k1jx", "fan-driver r81e5w37k1jx eeeeeeeeeeee"]
    assert marks == [["fan-driver 555555555555", "fan-driver 555555555555 eeeeeeeeeeee",
                      *swarm], swarm]
