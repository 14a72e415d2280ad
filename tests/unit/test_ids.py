"""What the plugin derives from network and endpoint IDs, for swarm's network
IDs as for Docker's: state keys, marks that the orphan sweeps parse back, eBPF
program names, interface names, `fan-driver show`. The marks in a real
iptables: tests/integration/test_firewall.py."""
import re
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from hypothesis import given

from fan_driver import cli
from fan_driver.check.probe import read_state
from fan_driver.config import UnderlaySpec
from fan_driver.config import VXLAN_PORT
from fan_driver.dataplane.mapping.ebpf import PROGRAM_PREFIX, EbpfMapping
from fan_driver.dataplane.firewall import (mark_of, _restore_line,
                                           network_rules, port_rules)
from fan_driver.dataplane.netlink import is_ours
from fan_driver.dataplane.encap import VXLAN
from fan_driver.dataplane.plan import NetworkPlan
from fan_driver.fanmap import FanMap, HostSlice
from fan_driver.hostfacts import HostFacts, Interface, KernelFeatures
from fan_driver.ipam import IpamDriver
from fan_driver.model import Endpoint, Network, Pool, State
from fan_driver.network import NetworkDriver
from fan_driver.ports import PortBinding
from fan_driver.protocol import GATEWAY_REQUEST
from fan_driver.store import Store

from tests.unit import ids
from tests.unit.docker_calls import (create_endpoint, create_network, delete_endpoint,
                                     delete_network, request_address, request_pool)
from tests.unit.fakes import FakeDataplane

SWARM_NID, NID, EID = "r81e5w37k1jx7gcxaf5jokig3", "5" * 64, "e" * 64
# The kernel's rules: an interface name is at most 15 bytes and has no '/',
# ':' or white space (dev_valid_name); a BPF object's name at most 15
# characters, each alphanumeric, '_' or '.' (bpf_obj_name_cpy).
IFNAME = re.compile(r"[^/:\s]{1,15}", re.ASCII)
BPF_NAME = re.compile(r"[A-Za-z0-9_.]{1,15}", re.ASCII)


def plan(network_id: str) -> NetworkPlan:
    host = HostSlice(FanMap(IPv4Network("250.0.0.0/8"), IPv4Network("172.30.0.0/16")),
                     IPv4Address("172.30.0.28"))
    return NetworkPlan(network_id=network_id, host=host, underlay_interface="eth0", mtu=1450,
                       encap=VXLAN, mapping="ebpf", tc_pref=1, vxlan_port=VXLAN_PORT)


def marks_as_iptables_prints_them(rules) -> set:
    return {mark_of(_restore_line(["-A", chain, *spec])) for _, chain, spec in rules}


def test_a_swarm_networks_names():
    p = plan(SWARM_NID)
    binding = PortBinding(proto="tcp", port=80, host_ip=IPv4Address("0.0.0.0"), host_port=8080)

    assert p.mark == "fan-driver r81e5w37k1jx"
    assert p.endpoint_mark(EID) == "fan-driver r81e5w37k1jx eeeeeeeeeeee"
    assert marks_as_iptables_prints_them(network_rules(p, "fan-vxlan")) == {p.mark}
    assert marks_as_iptables_prints_them(
        port_rules(p, EID, IPv4Address("250.0.28.2"), [binding])) == {p.endpoint_mark(EID)}
    assert EbpfMapping._program_name(p) == "fan_r81e5w37"


@given(nid=ids.network_ids, eid=ids.endpoint_ids)
def test_marks_parse_back_and_program_names_are_valid(nid, eid):
    p = plan(nid)
    binding = PortBinding(proto="udp", port=53, host_ip=IPv4Address("172.30.0.28"), host_port=53)

    assert marks_as_iptables_prints_them(network_rules(p, "fan-vxlan")) == {p.mark}
    assert marks_as_iptables_prints_them(
        port_rules(p, eid, IPv4Address("250.0.28.2"), [binding])) == {p.endpoint_mark(eid)}
    name = EbpfMapping._program_name(p)
    assert BPF_NAME.fullmatch(name) and name.startswith(PROGRAM_PREFIX)


@given(eid=ids.endpoint_ids)
def test_endpoint_interface_names_fit_and_a_left_veth_is_recognised(eid):
    host, container = Endpoint.host_ifname(eid), Endpoint.container_ifname(eid)

    assert IFNAME.fullmatch(host) and IFNAME.fullmatch(container)
    assert is_ours(None, host) and host != container


def test_show_names_a_swarm_network_by_its_first_12_characters(tmp_path, capsys):
    pool = Pool(overlay="250.0.0.0/8", underlay="172.30.0.0/16", underlay_address="172.30.0.28",
                interface="eth0", mtu=1500)
    other = Pool(overlay="251.0.0.0/8", underlay="172.30.0.0/16",
                 underlay_address="172.30.0.28", interface="eth0", mtu=1500)
    state = State(pools={"fan:250.0.0.0/8": pool, "fan:251.0.0.0/8": other}, networks={
        SWARM_NID: Network(pool_id="fan:250.0.0.0/8", encap="vxlan", mapping="ebpf", mtu=1450,
                           tc_pref=1),
        NID: Network(pool_id="fan:251.0.0.0/8", encap="vxlan", mapping="ebpf", mtu=1450,
                     tc_pref=2)})
    Store(tmp_path).save(state)

    cli.show(tmp_path)

    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[:2] for row in rows] == [["555555555555", "fan-251-0-28"],
                                                 ["r81e5w37k1jx", "fan-250-0-28"]]


def test_show_and_check_give_each_networks_vxlan_port(tmp_path, capsys):
    pools = {f"fan:{o}.0.0.0/8": Pool(overlay=f"{o}.0.0.0/8", underlay="172.30.0.0/16",
                                      underlay_address="172.30.0.28", interface="eth0", mtu=1500)
             for o in (250, 251)}
    state = State(pools=pools, networks={
        SWARM_NID: Network(pool_id="fan:250.0.0.0/8", encap="vxlan", mapping="ebpf", mtu=1450,
                           tc_pref=1, vxlan_port=4790),
        NID: Network(pool_id="fan:251.0.0.0/8", encap="ipip", mapping="ebpf", mtu=1480,
                     tc_pref=2)})
    Store(tmp_path).save(state)

    cli.show(tmp_path)

    header, *rows = capsys.readouterr().out.splitlines()
    column = header.split().index("PORT")
    assert [row.split()[column] for row in rows] == ["-", "4790"]
    lines = read_state(tmp_path)[1].networks
    assert "vxlan/ebpf, UDP port 4790, MTU 1450" in lines[1] and "UDP port" not in lines[0]


async def read_facts() -> HostFacts:
    return HostFacts(interfaces=(Interface("eth0", 1500, (IPv4Interface("172.30.0.28/16"),)),),
                     default_interface="eth0", routes=(IPv4Network("172.30.0.0/16"),))


async def test_a_swarm_network_through_the_drivers(ledger):
    """A swarm-scoped network's life as dockerd calls it, keyed by swarm's ID."""
    dataplane = FakeDataplane()
    features = KernelFeatures(fan_map=False, ipip=False, vxlan=True, ebpf=True)
    network = NetworkDriver(ledger, dataplane, features, read_facts)
    ipam = IpamDriver(ledger, read_facts, UnderlaySpec.parse("default/16"), network=network)
    pool_id = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    await request_address(ipam, pool_id, "", {"RequestAddressType": GATEWAY_REQUEST})
    await create_network(network, SWARM_NID, {}, [{"AddressSpace": "fan",
                                                    "Pool": "250.0.0.0/8"}], [])
    address = (await request_address(ipam, pool_id, "", None))["Address"]
    await create_endpoint(network, SWARM_NID, EID, {"Address": address})

    assert list(ledger.state.networks) == [SWARM_NID]
    assert list(ledger.state.networks[SWARM_NID].endpoints) == [EID]
    assert ledger.state.pools[pool_id].addresses[address.split("/")[0]] == EID
    ensured = [args[0] for name, args in dataplane.calls if name == "ensure_network"]
    assert [p.mark for p in ensured] == ["fan-driver r81e5w37k1jx"]

    await delete_endpoint(network, SWARM_NID, EID)
    await delete_network(network, SWARM_NID)
    assert ledger.state.networks == {}
