"""mapping=routes: per-peer state through kernel nexthop objects, in bulk.
Pure checks of the requests, then a real namespace per test: a /20 VXLAN fan
programmed, "rebooted" (its kernel state gone) and restored, removed; the
gateway-route fallback; the orphan sweep, which deletes only our nexthops, and
a leftover device's peers in bulk before the device;
and a nexthop id that another program holds, refused."""
from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv4Network

import pytest

from fan_driver.dataplane.netlink import RTM_NEWNEIGH, RTM_NEWNEXTHOP, RTM_NEWROUTE, parse_route
from fan_driver.dataplane.encap import IPIP, VXLAN
from fan_driver.config import ROUTES_VXLAN_PORT
from fan_driver.dataplane.encap.vxlan import vtep_address
from fan_driver.dataplane.mapping.routes import RTPROT_FAN, peer_requests
from fan_driver.dataplane.plan import NetworkPlan
from fan_driver.fanmap import FanMap, HostSlice

from .netns_run import Underlay, run_in, sh

HOST = IPv4Address("172.30.0.28")
PEERS_IN_20 = 2 ** 12 - 3      # usable addresses of a /20 but ours
SETUP = """
from ipaddress import IPv4Address, IPv4Network
from fan_driver.dataplane.encap import VXLAN
from fan_driver.dataplane.mapping.routes import RoutesMapping, programmed
from fan_driver.dataplane.plan import NetworkPlan
from fan_driver.fanmap import FanMap, HostSlice

def plan(underlay, overlay="250.0.0.0/8"):
    fan = FanMap(IPv4Network(overlay), IPv4Network(underlay))
    return NetworkPlan(network_id="ab" * 32, host=HostSlice(fan, IPv4Address("172.30.0.28")),
                       underlay_interface="eth0", mtu=1450, encap=VXLAN, mapping="routes",
                       tc_pref=1, vxlan_port=8472)
"""


def plan(encap, underlay="172.30.0.0/24") -> NetworkPlan:
    fan = FanMap(IPv4Network("250.0.0.0/8"), IPv4Network(underlay))
    return NetworkPlan(network_id="ab" * 32, host=HostSlice(fan, HOST), underlay_interface="eth0",
                       mtu=1450, encap=encap, mapping="routes", tc_pref=1,
                       vxlan_port=ROUTES_VXLAN_PORT if encap is VXLAN else None)


def test_vxlan_peer_is_neighbour_fdb_nexthop_then_route():
    p = plan(VXLAN)
    peers = list(p.host.fan.peers(HOST))
    requests = peer_requests(p, 7, peers, nexthops=True)
    assert len(requests) == 4 * len(peers) == 4 * 253
    assert [kind for kind, _, _ in requests[:4]] == [RTM_NEWNEIGH, RTM_NEWNEIGH, RTM_NEWNEXTHOP,
                                                     RTM_NEWROUTE]
    peer, slice_ = peers[-1]
    route = parse_route(requests[-1][2])
    assert (route.dst, route.nexthop, route.protocol) == (slice_, int(vtep_address(slice_)),
                                                          RTPROT_FAN)
    ids = {parse_route(body).nexthop for kind, _, body in requests if kind == RTM_NEWROUTE}
    assert len(ids) == len(peers)   # one nexthop object per peer, none shared


def test_ipip_routes_go_via_the_peer_or_its_nexthop():
    p = plan(IPIP)
    peer, slice_ = next(iter(p.host.fan.peers(HOST)))
    with_nexthops = peer_requests(p, 7, [(peer, slice_)], nexthops=True)
    assert [kind for kind, _, _ in with_nexthops] == [RTM_NEWNEXTHOP, RTM_NEWROUTE]
    assert parse_route(with_nexthops[1][2]).nexthop == int(peer)
    (kind, _, body), = peer_requests(p, 7, [(peer, slice_)], nexthops=False)
    route = parse_route(body)
    assert (kind, route.dst, route.oif, route.nexthop) == (RTM_NEWROUTE, slice_, 7, None)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, rtnetlink)")


@pytest.fixture
def underlay():
    u = Underlay()
    try:
        u.skip_without_nexthops()
        yield u
    finally:
        u.close()


def counts(u: Underlay, device: str) -> dict:
    return {"nexthops": u.count("nexthop", "show", "proto", str(RTPROT_FAN)),
            "routes": u.count("route", "show", "dev", device),
            "neighbours": u.count("neigh", "show", "dev", device, "nud", "permanent"),
            "fdb": u.count("link", "show", device) and
            len(sh("bridge", "-n", u.ns, "fdb", "show", "dev", device).stdout.splitlines())}


ENSURE = """
m = RoutesMapping({nexthops})
p = plan({underlay!r})
await m.ensure(links, p)
await programmed(m, p)
return m.tunnel_device(p)
"""
REMOVE = """
m = RoutesMapping()
p = plan({underlay!r})
await m.ensure(links, p)
await m.remove(links, p)
"""


@needs_root
def test_vxlan_peers_programmed_restored_after_reboot_and_removed(underlay):
    device = run_in(underlay.ns, ENSURE.format(nexthops=None, underlay="172.30.0.0/20"), SETUP)
    want = {"nexthops": PEERS_IN_20, "routes": PEERS_IN_20, "neighbours": PEERS_IN_20,
            "fdb": PEERS_IN_20}
    assert counts(underlay, device) == want
    slice_ = plan(VXLAN, "172.30.0.0/20").host.fan.slice_for(IPv4Address("172.30.15.254"))
    last = underlay.ip("route", "show", str(slice_))
    assert f"via {slice_.network_address} dev {device}" in last and "onlink" in last, last
    nexthop = underlay.ip("nexthop", "show", "id", str(int(slice_.network_address)))
    assert f"dev {device}" in nexthop and f"proto {RTPROT_FAN}" in nexthop, nexthop
    # A reboot: the kernel forgets everything; restore() ensures the network again.
    underlay.ip("link", "del", device)
    assert underlay.count("nexthop", "show") == 0
    run_in(underlay.ns, ENSURE.format(nexthops=None, underlay="172.30.0.0/20"), SETUP)
    assert counts(underlay, device) == want
    # A restart without a reboot: everything is there already, and stays as it is.
    run_in(underlay.ns, ENSURE.format(nexthops=None, underlay="172.30.0.0/20"), SETUP)
    assert counts(underlay, device) == want
    run_in(underlay.ns, REMOVE.format(underlay="172.30.0.0/20"), SETUP)
    assert underlay.count("link", "show", device) == 0
    assert underlay.count("nexthop", "show") == 0
    assert underlay.count("route", "show", "table", "main") == 1   # eth0's own


@needs_root
def test_without_nexthops_each_route_names_its_gateway(underlay):
    device = run_in(underlay.ns, ENSURE.format(nexthops=False, underlay="172.30.0.0/24"), SETUP)
    assert counts(underlay, device) == {"nexthops": 0, "routes": 253, "neighbours": 253,
                                        "fdb": 253}
    route = underlay.ip("route", "show", "250.254.0.0/16")
    assert route.startswith("250.254.0.0/16 via 250.254.0.0 dev") and "onlink" in route, route
    run_in(underlay.ns, REMOVE.format(underlay="172.30.0.0/24"), SETUP)
    assert underlay.count("route", "show", "table", "main") == 1


@needs_root
def test_orphan_sweep_deletes_only_our_stale_nexthops_and_routes(underlay):
    device = run_in(underlay.ns, ENSURE.format(nexthops=None, underlay="172.30.0.0/24"), SETUP)
    # Left by a crash: one of ours (protocol RTPROT_FAN) outside every overlay, with a
    # route through it; and another program's nexthop on the same device.
    underlay.ip("nexthop", "add", "id", "77", "via", "10.9.9.9", "dev", device, "onlink",
                "proto", str(RTPROT_FAN))
    underlay.ip("route", "add", "251.1.0.0/16", "nhid", "77", "proto", str(RTPROT_FAN))
    underlay.ip("nexthop", "add", "id", "78", "via", "10.9.9.8", "dev", device, "onlink")
    run_in(underlay.ns, """
        m = RoutesMapping()
        await m.remove_orphans(links, [plan("172.30.0.0/24")])
    """, SETUP)
    assert underlay.ip("nexthop", "show", "id", "77", check=False) == ""
    assert underlay.ip("route", "show", "251.1.0.0/16") == ""
    assert "via 10.9.9.8" in underlay.ip("nexthop", "show", "id", "78")
    assert counts(underlay, device)["routes"] == 253
    assert underlay.count("nexthop", "show", "proto", str(RTPROT_FAN)) == 253


DATAPLANE = """
from fan_driver import iptables
from fan_driver.dataplane import LinuxDataplane
from fan_driver.dataplane.firewall import IptablesFirewall
"""


@needs_root
def test_a_leftover_vxlan_device_loses_its_peers_in_bulk_then_goes(underlay):
    """A crash after the device was made and before the state said so: the
    sweep deletes its routes and nexthops (the kernel would delete them one by
    one with the device, 24 s for a /16), then the dataplane deletes the device."""
    device = run_in(underlay.ns, ENSURE.format(nexthops=None, underlay="172.30.0.0/24"), SETUP)
    run_in(underlay.ns, """
        await RoutesMapping().remove_orphans(links, [])
    """, SETUP)
    assert counts(underlay, device) == {"nexthops": 0, "routes": 0, "neighbours": 253,
                                        "fdb": 253}     # the device is still there
    run_in(underlay.ns, """
        firewall = IptablesFirewall(iptables.firewall_binary("auto"))
        await LinuxDataplane(links.ipr, firewall, {"routes": RoutesMapping()}).remove_orphans(
            [], set())
    """, SETUP + DATAPLANE)
    assert underlay.count("link", "show", device) == 0
    assert underlay.count("nexthop", "show") == 0
    assert underlay.count("route", "show", "table", "main") == 1   # eth0's own


@needs_root
def test_nexthop_id_held_by_another_program_is_refused(underlay):
    taken = int(IPv4Address("250.5.0.0"))    # the VTEP of peer 172.30.0.5
    underlay.ip("nexthop", "add", "id", str(taken), "via", "172.30.0.1", "dev", "eth0", "proto",
                "static")
    message = run_in(underlay.ns, """
        m = RoutesMapping()
        p = plan("172.30.0.0/24")
        await m.ensure(links, p)
        try:
            await programmed(m, p)
        except FanError as exc:
            return str(exc)
    """, SETUP + "from fan_driver.errors import FanError\n")
    print(message)
    assert message == (f"network abababababab needs nexthop id {taken} (250.5.0.0), which "
                       "another program made (protocol 4); delete it (`ip nexthop del id "
                       f"{taken}`) or use another underlay")
    assert "via 172.30.0.1 dev eth0" in underlay.ip("nexthop", "show", "id", str(taken))
