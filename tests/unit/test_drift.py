"""`fan-driver check`'s comparison of the state with the kernel (pure): a
hand-made state, the kernel view that matches it, and each kind of difference
named with its fix; and how the report shows them."""
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from fan_driver.check.drift import RESTART, RESTART_CONTAINER, SWEEP, Difference, differences
from fan_driver.check.judge import judge
from fan_driver.check.kernel import KernelView
from fan_driver.check.probe import StateInfo
from fan_driver.check.report import FAIL, OK, exit_status, format_report
from fan_driver.cli import peer_mappings
from fan_driver.dataplane.firewall import CHAINS, network_rules, port_rules, saved_lines
from fan_driver.model import Endpoint, Network, Owner, Pool, State, pool_id
from fan_driver.lookup import plan_for
from fan_driver.ports import PortBinding
from fan_driver.settings import Settings

from .test_check import probe

NET = "0123456789ab" + "c" * 52
EP = "e" * 64
VETH = "fve" + EP[:12]
BRIDGE = "fan-250-0-28"
WEB = PortBinding(proto="tcp", host_ip=IPv4Address("0.0.0.0"), host_port=8080, port=80)


def state(mapping="ebpf", encap="vxlan", receive="conntrack", ports=(WEB,)) -> State:
    pid = pool_id(IPv4Network("250.0.0.0/8"))
    pool = Pool(overlay="250.0.0.0/8", underlay="172.30.0.0/16", underlay_address="172.30.0.28",
                interface="eth0", mtu=1500, addresses={"250.0.28.1": Owner.GATEWAY,
                                                        "250.0.28.2": EP})
    endpoint = Endpoint(address="250.0.28.2/24", mac="02:42:fa:00:1c:02", ports=ports)
    net = Network(pool_id=pid, encap=encap, mapping=mapping, mtu=1450, tc_pref=1,
                  receive=receive, endpoints={EP: endpoint})
    return State(pools={pid: pool}, networks={NET: net})


def matching(st: State) -> KernelView:
    """The kernel as the plugin leaves it for `st`, built from the same plans."""
    mappings = peer_mappings()
    view = dict(marked={}, ports={}, routes={}, filters={}, ingress_filters={}, decaps=[],
                rules=[], endpoint_links=[], chains=[], hooks={})
    for nid, net in st.networks.items():
        plan = plan_for(st, nid)
        tunnel = mappings[net.mapping].tunnel_device(plan)
        veths = [Endpoint.host_ifname(e) for e in net.endpoints]
        view["marked"].update({plan.bridge: plan.mark, tunnel: "fan-driver",
                               **{v: plan.mark for v in veths}})
        view["endpoint_links"] += veths
        view["ports"][plan.bridge] = veths
        view["routes"][tunnel] = [str(plan.overlay)]
        if net.mapping == "ebpf":
            view["filters"][tunnel] = view["ingress_filters"][tunnel] = [plan.tc_pref]
        if plan.receive != "tunnel":
            view["decaps"].append(("eth0", 0xF000 + plan.tc_pref))
        view["rules"] += saved_lines(network_rules(plan, tunnel))
        for eid, ep in net.endpoints.items():
            view["rules"] += saved_lines(port_rules(plan, eid, ep.ip, ep.ports))
    view["chains"] = sorted({(t, c) for t, _, c in CHAINS})
    view["hooks"] = {}
    for table, builtin, chain in CHAINS:
        view["hooks"].setdefault(table, []).append(
            f"-A {builtin} -j {chain}" if chain != "FAN-PORTS" else
            f"-A {builtin} -m addrtype --dst-type LOCAL -j {chain}" if builtin == "PREROUTING"
            else f"-A {builtin} ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j {chain}")
    return KernelView(**view)


def diff(st: State, kernel: KernelView):
    return differences(st, kernel, peer_mappings())


@pytest.mark.parametrize("mapping,encap,receive", [
    ("ebpf", "vxlan", "conntrack"), ("ebpf", "ipip", "tunnel"), ("routes", "vxlan", "tunnel"),
    ("kernel", "ipip", "tunnel")])
def test_a_kernel_that_holds_the_state_has_no_difference(mapping, encap, receive):
    st = state(mapping, encap, receive)
    assert diff(st, matching(st)) == []


def test_a_network_on_its_own_vxlan_port_wants_that_ports_device():
    st = state()
    st.networks[NET].vxlan_port = 4790
    kernel = matching(st)
    assert "fan-vxlan-4790" in kernel.marked and diff(st, kernel) == []
    # the default port's device instead: missing, and left by no network
    moved = {("fan-vxlan" if k == "fan-vxlan-4790" else k): v for k, v in kernel.marked.items()}
    whats = [d.what for d in diff(st, replace(kernel, marked=moved))]
    assert any("tunnel device fan-vxlan-4790 of network" in w for w in whats), whats
    assert any("interface fan-vxlan (marked" in w for w in whats), whats


def test_the_view_survives_json():
    kernel = matching(state())
    assert KernelView.from_json(kernel.to_json()) == kernel


def test_a_missing_bridge_is_restored_by_a_restart():
    st = state()
    kernel = matching(st)
    marked = {k: v for k, v in kernel.marked.items() if k != BRIDGE}
    found = diff(st, replace(kernel, marked=marked, ports={}))
    assert found == [Difference("0123456789ab", f"bridge {BRIDGE} of network 0123456789ab "
                                "missing", RESTART)]


def test_a_missing_veth_is_the_containers_to_make_again():
    st = state()
    kernel = matching(st)
    found = diff(st, replace(kernel, marked={k: v for k, v in kernel.marked.items() if k != VETH},
                             endpoint_links=[], ports={BRIDGE: []}))
    assert [(d.what, d.fix) for d in found] == [
        (f"interface {VETH} of endpoint eeeeeeeeeeee (250.0.28.2/24) missing: its container "
         "has no interface on network 0123456789ab", RESTART_CONTAINER)]


def test_a_veth_off_its_bridge_goes_back_at_a_restart():
    st = state()
    found = diff(st, replace(matching(st), ports={BRIDGE: []}))
    assert [(d.what, d.fix) for d in found] == [
        (f"interface {VETH} of endpoint eeeeeeeeeeee is not on bridge {BRIDGE}", RESTART)]


def test_a_stranger_on_the_bridge_is_named_with_how_to_unplug_it():
    st = state()
    found = diff(st, replace(matching(st), ports={BRIDGE: [VETH, "eth9"]}))
    assert [(d.what, d.fix) for d in found] == [
        (f"interface eth9 is a port of bridge {BRIDGE} but no endpoint's",
         "ip link set eth9 nomaster")]


def test_missing_rules_are_counted_from_the_builders():
    st = state()
    kernel = matching(st)
    plan = plan_for(st, NET)
    wanted = saved_lines(network_rules(plan, "fan-vxlan"))
    gone = wanted[:3]
    found = diff(st, replace(kernel, rules=[r for r in kernel.rules if r not in gone]))
    assert len(found) == 1 and found[0].fix == RESTART
    assert found[0].what.startswith(f"network 0123456789ab: 3 of {len(wanted)} iptables rules "
                                    f"missing (first: {gone[0][0]} {gone[0][1]})")


def test_a_marked_rule_edited_by_hand_is_named():
    st = state()
    kernel = matching(st)
    wanted = len(network_rules(plan_for(st, NET), "fan-vxlan"))
    table, line = kernel.rules[0]
    edited = (table, line.replace(" -j DROP", " -j ACCEPT"))
    found = diff(st, replace(kernel, rules=[edited, *kernel.rules[1:]]))
    assert [d.what.split(" (first")[0] for d in found] == [
        f"network 0123456789ab: 1 of {wanted} iptables rules missing",
        "network 0123456789ab: 1 iptables rule(s) carry its mark but are not the ones the "
        "plugin builds"]


def test_missing_port_rules_are_the_endpoints():
    st = state()
    kernel = matching(st)
    found = diff(st, replace(kernel, rules=[r for r in kernel.rules if "-j DNAT" not in r[1]]))
    assert [d.what.split(" (first")[0] for d in found] == [
        "endpoint eeeeeeeeeeee of network 0123456789ab (its published ports): 1 of 3 iptables "
        "rules missing"]


def test_rules_of_a_network_not_in_the_state_are_swept():
    st = state()
    kernel = matching(st)
    stray = ("filter", '-A FAN-FORWARD -i fan-250-1-28 -m comment --comment '
             '"fan-driver 999999999999" -j ACCEPT')
    found = diff(st, replace(kernel, rules=[*kernel.rules, stray]))
    assert found == [Difference("", "1 iptables rule(s) marked 'fan-driver 999999999999' "
                                "belong to no network in the state", SWEEP)]


def test_a_jump_missing_or_before_docker_users_is_named():
    st = state()
    kernel = matching(st)
    hooks = dict(kernel.hooks, filter=["-A FORWARD -j FAN-FORWARD", "-A FORWARD -j DOCKER-USER",
                                       "-A INPUT -j FAN-INPUT"])
    found = diff(st, replace(kernel, hooks=hooks))
    assert [d.what for d in found] == [
        "filter FORWARD does not jump to FAN-FORWARD (or jumps before DOCKER-USER): its rules "
        "are never reached"]


def test_leftover_interfaces_routes_and_filters_are_swept():
    st = state()
    kernel = matching(st)
    orphan = "fve" + "f" * 12
    found = diff(st, replace(
        kernel, marked={**kernel.marked, orphan: "fan-driver 999999999999",
                        "fan-250-1-28": "fan-driver 999999999999"},
        routes={"fan-vxlan": ["240.0.0.0/8", "250.0.0.0/8"]},
        filters={"fan-vxlan": [1, 2]}, decaps=[("eth0", 0xF001), ("eth0", 0xF002)]))
    assert [(d.what, d.fix) for d in found] == [
        ("interface fan-250-1-28 (marked 'fan-driver 999999999999') belongs to no network in "
         "the state", SWEEP),
        (f"interface {orphan} left by no endpoint", SWEEP),
        ("route 240.0.0.0/8 through fan-vxlan belongs to no network in the state", SWEEP),
        ("eBPF filter at pref 2 of fan-vxlan's egress belongs to no network in the state", SWEEP),
        ("receive filter at pref 61442 of eth0's ingress belongs to no network in the state",
         SWEEP)]


def test_missing_tunnel_pieces_are_named():
    st = state()
    kernel = matching(st)
    found = diff(st, replace(kernel, routes={}, ingress_filters={"fan-vxlan": []}, decaps=[]))
    assert [d.what.split(":")[0] for d in found] == [
        "route to overlay 250.0.0.0/8 through fan-vxlan (network 0123456789ab) missing",
        "eBPF filter of network 0123456789ab at pref 1 of fan-vxlan's ingress missing",
        "receive filter of network 0123456789ab at pref 61441 of eth0's ingress missing"]
    assert "another tool's filter" in found[-1].fix


def test_a_missing_tunnel_device_is_restored_by_a_restart():
    st = state()
    kernel = matching(st)
    found = diff(st, replace(kernel, marked={k: v for k, v in kernel.marked.items()
                                             if k != "fan-vxlan"}))
    assert found == [Difference("0123456789ab", "tunnel device fan-vxlan of network "
                                "0123456789ab missing", RESTART)]


def test_chains_without_networks_are_swept_and_unreadable_rules_said():
    found = diff(State(), KernelView(chains=[("filter", "FAN-FORWARD")]))
    assert found == [Difference("", "iptables chains left by no network: filter FAN-FORWARD",
                                SWEEP)]
    found = diff(State(), KernelView(iptables_error="Permission denied"))
    assert "iptables-save failed: Permission denied" in found[0].what


def test_the_report_has_a_line_per_network_then_each_difference_and_fails():
    st = state()
    kernel = matching(st)
    items = judge(Settings(), probe(stored=st, kernel=kernel, state=StateInfo("/s")),
                  mappings=peer_mappings())
    drift = [i for i in items if i.section == "drift"]
    assert [(i.name, i.status) for i in drift] == [("0123456789ab", OK)]
    assert "receive=conntrack: tunnel traffic straight from the underlay device" in \
        drift[0].detail
    assert exit_status(items) == 0

    broken = replace(kernel, ports={BRIDGE: []})
    items = judge(Settings(), probe(stored=st, kernel=broken, state=StateInfo("/s")),
                  mappings=peer_mappings())
    drift = [i for i in items if i.section == "drift"]
    assert [(i.name, i.status) for i in drift] == [("0123456789ab", "info"),
                                                   ("0123456789ab", FAIL)]
    assert exit_status(items) == 1
    text = format_report(items)
    assert "state vs kernel:" in text and "fix: restart the plugin" in text
    assert text.endswith("state and kernel differ: 1 difference(s), each with its fix above")
