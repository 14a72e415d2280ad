"""Published ports: Docker's port map decoded, host ports chosen, rules derived. Pure."""
from ipaddress import IPv4Address, IPv4Network

import pytest

from fan_driver.dataplane.firewall import port_rules
from fan_driver.dataplane.encap import VXLAN
from fan_driver.config import VXLAN_PORT
from fan_driver.dataplane.plan import NetworkPlan
from fan_driver.errors import FanError
from fan_driver.fanmap import FanMap, HostSlice
from fan_driver.model import Endpoint, State
from fan_driver.ports import (ANY_ADDRESS, EPHEMERAL_FALLBACK, PortBinding, PortRequest,
                              Publication, first_conflict, held_index, parse_port_range, runs)

from tests.unit.test_server import assert_err, call, client  # noqa: F401  (the fixture too)

CONTAINER = IPv4Address("250.0.28.2")
NETWORK_ID = "5" * 64
ENDPOINT_ID = "e" * 64


def plan(internal=False) -> NetworkPlan:
    host = HostSlice(FanMap(IPv4Network("250.0.0.0/8"), IPv4Network("172.30.0.0/16")),
                     IPv4Address("172.30.0.28"))
    return NetworkPlan(network_id=NETWORK_ID, host=host, underlay_interface="eth0", mtu=1450,
                       encap=VXLAN, mapping="ebpf", tc_pref=1, internal=internal,
                       vxlan_port=VXLAN_PORT)


def entry(**fields) -> dict:
    return {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080,
            "HostPortEnd": 8080, **fields}


def binding(port=8080, host_ip="0.0.0.0", proto="tcp") -> PortBinding:
    return PortBinding(proto, IPv4Address(host_ip), port, 80)


# --- decoding the port map ----------------------------------------------------------------

def test_docker_port_map_decodes_into_requests():
    publication = Publication.from_options({"com.docker.network.portmap": [
        entry(), entry(Proto=17, Port=9000, HostPort=9000, HostPortEnd=9000),
        entry(HostIP="127.0.0.1", HostPort=8081, HostPortEnd=8081),
        entry(HostPort=0, HostPortEnd=0, Port=7000)],
        "com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": 7000}]})
    assert publication.requests == (
        PortRequest("tcp", 80, ANY_ADDRESS, 8080, 8080),
        PortRequest("udp", 9000, ANY_ADDRESS, 9000, 9000),
        PortRequest("tcp", 80, IPv4Address("127.0.0.1"), 8081, 8081),
        PortRequest("tcp", 7000, ANY_ADDRESS, 0, 0))


def test_no_port_map_is_no_request():
    assert Publication.from_options(None).requests == ()
    assert Publication.from_options({"com.docker.network.portmap": None}).requests == ()


@pytest.mark.parametrize("bad,fragment", [
    (entry(Proto=1), "neither TCP (6) nor UDP (17)"),
    (entry(Port=0), "Port 0 is not a port number"),
    (entry(HostPort=70000), "HostPort 70000"),
    (entry(HostPort=9000, HostPortEnd=8000), "ends before it starts"),
    (entry(HostIP="::"), "IPv6"),
    (entry(HostIP="not-an-address"), "not an IP address"),
    (entry(Port="80"), "Port '80'"),
    ("8080:80", "is not a JSON object"),
])
def test_bad_port_map_entries_are_named(bad, fragment):
    with pytest.raises(FanError, match=None) as info:
        Publication.from_options({"com.docker.network.portmap": [bad]})
    assert fragment in str(info.value)


# A field of the wrong JSON type: the field, the value and how it should be written.
@pytest.mark.parametrize("bad,fragments", [
    (entry(Proto="6"), ["Proto '6' is not an integer", "6 (TCP) or 17 (UDP)"]),
    (entry(Proto=6.0), ["Proto 6.0 is not an integer"]),
    (entry(Proto=True), ["Proto True is not an integer"]),
    (entry(Proto=None), ["Proto None is not an integer"]),
    (entry(Port=80.5), ["Port '80.5' is not an integer", "as a JSON number"]),
    (entry(HostPort="8080"), ["HostPort '8080' is not an integer", "from 0 to 65535"]),
    (entry(HostPort=""), ["HostPort '' is not an integer"]),
    (entry(HostPort=False), ["HostPort 'False' is not an integer"]),
    (entry(HostPortEnd=[8080]), ["HostPortEnd '[8080]' is not an integer"]),
    (entry(HostIP=2130706433), ["HostIP '2130706433' is not a string", '"127.0.0.1"']),
    (entry(HostIP=["127.0.0.1"]), ["HostIP \"['127.0.0.1']\" is not a string"]),
    (entry(HostIP="localhost"), ["HostIP 'localhost' is not an IP address", '""']),
    ([8080, 80], ["is not a JSON object", '"HostPort": 8080']),
])
def test_port_map_fields_of_the_wrong_type_are_named_with_the_fix(bad, fragments):
    with pytest.raises(FanError) as info:
        Publication.from_options({"com.docker.network.portmap": [bad]})
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("portmap", [{}, "", 0, False, {"Proto": 6}, "8080:80"])
def test_a_port_map_that_is_not_a_list_is_refused(portmap):
    with pytest.raises(FanError) as info:
        Publication.from_options({"com.docker.network.portmap": portmap})
    assert "com.docker.network.portmap" in str(info.value)
    assert "is not a list; it must be a JSON list of port bindings" in str(info.value)


def test_null_or_missing_ports_default_as_docker_zero_values():
    request = PortRequest.from_json(entry(HostPort=None, HostPortEnd=None, HostIP=None))
    assert request == PortRequest("tcp", 80, ANY_ADDRESS, 0, 0)
    assert PortRequest.from_json({"Port": 80}) == PortRequest("tcp", 80, ANY_ADDRESS, 0, 0)


def test_candidate_host_ports():
    ephemeral = (49153, 49160)
    assert list(PortRequest("tcp", 80, ANY_ADDRESS, 8080, 8080).candidates(ephemeral)) == [8080]
    assert list(PortRequest("tcp", 80, ANY_ADDRESS, 8090, 8092).candidates(ephemeral)) == \
        [8090, 8091, 8092]
    assert PortRequest("tcp", 80, ANY_ADDRESS, 0, 0).candidates(ephemeral) == range(49153, 49161)


def test_ephemeral_range_is_read_or_docker_default():
    assert parse_port_range("32768\t60999\n") == (32768, 60999)
    assert parse_port_range("") == EPHEMERAL_FALLBACK
    assert parse_port_range("9 1") == EPHEMERAL_FALLBACK


# --- conflicts -----------------------------------------------------------------------------

def test_any_address_overlaps_every_address_of_the_same_port_and_protocol():
    assert binding().overlaps(binding(host_ip="127.0.0.1"))
    assert binding(host_ip="127.0.0.1").overlaps(binding())
    assert not binding(host_ip="127.0.0.1").overlaps(binding(host_ip="172.30.0.28"))
    assert not binding().overlaps(binding(proto="udp"))
    assert not binding().overlaps(binding(port=8081))


def test_first_conflict_names_the_holder():
    held = held_index([("endpoint a", binding()), ("endpoint b", binding(9000, proto="udp"))])
    assert first_conflict(binding(), held[("tcp", 8080)]) == "endpoint a"
    assert first_conflict(binding(9000), held.get(("tcp", 9000), ())) is None


def test_runs_group_consecutive_bindings():
    bindings = [PortBinding("tcp", ANY_ADDRESS, 10000 + i, 10000 + i) for i in range(1000)]
    bindings.append(binding())
    assert [(b.host_port, n) for b, n in runs(bindings)] == [(10000, 1000), (8080, 1)]


# --- state -------------------------------------------------------------------------------

def test_endpoint_ports_round_trip_and_old_state_loads():
    endpoint = Endpoint("250.0.28.2/24", "0e:fa:fa:00:1c:02",
                        ports=(binding(), binding(8081, "127.0.0.1")))
    state = State.from_json({"networks": {NETWORK_ID: {
        "pool_id": "fan:250.0.0.0/8", "encap": "vxlan", "mapping": "ebpf", "mtu": 1450,
        "tc_pref": 1, "endpoints": {ENDPOINT_ID: endpoint.to_json(),
                                    "f" * 64: {"address": "250.0.28.3/24", "mac": "0e:fa:fa:00:1c:03"}}}}})
    net = state.networks[NETWORK_ID]
    assert net.endpoints[ENDPOINT_ID] == endpoint
    assert net.endpoints["f" * 64].ports == () and net.internal is False
    assert State.from_json(state.to_json()).networks == state.networks


# --- rules -------------------------------------------------------------------------------

def test_port_rules_dnat_each_port_and_accept_and_hairpin_once():
    bindings = [PortBinding("tcp", ANY_ADDRESS, 10000 + i, 10000 + i) for i in range(1000)]
    rules = port_rules(plan(), ENDPOINT_ID, CONTAINER, bindings + [binding(8081, "127.0.0.1")])
    dnat = [spec for table, chain, spec in rules if spec[-3] == "DNAT"]
    assert len(dnat) == 1000 and len(rules) == 1002
    assert ["--to-destination", "250.0.28.2:10999"] == dnat[-1][-2:]
    assert all(f"fan-driver {NETWORK_ID[:12]} {ENDPOINT_ID[:12]}" in spec
               for _, _, spec in rules)
    specific = port_rules(plan(), ENDPOINT_ID, CONTAINER, [binding(8082, "172.30.0.28")])
    assert ["-d", "172.30.0.28/32", "-p", "tcp"] == specific[-1][2][:4]


def test_loopback_bindings_get_no_rules():
    assert port_rules(plan(), ENDPOINT_ID, CONTAINER, [binding(8081, "127.0.0.1")]) == []


# --- the web layer ---------------------------------------------------------------------

async def test_gateway_allocation_check(client):  # noqa: F811
    assert await call(client, "NetworkDriver.GwAllocCheck", {"Options": {}}) == (
        200, {"SkipIPv4": False, "SkipIPv6": False})
    status, reply = await call(client, "NetworkDriver.GwAllocCheck",
                               {"Options": {"com.docker.network.enable_ipv4": False}})
    assert_err(status, reply, "IPv6-only", "--ipv4=false")


async def test_bad_port_map_is_refused_before_the_driver(client):  # noqa: F811
    status, reply = await call(client, "NetworkDriver.ProgramExternalConnectivity", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID,
        "Options": {"com.docker.network.portmap": [entry(Proto=132)]}})
    assert_err(status, reply, "protocol 132")


@pytest.mark.parametrize("portmap,fragment", [
    ([entry(HostPort="8080")], "HostPort '8080' is not an integer"),
    ([entry(HostIP=127)], "HostIP '127' is not a string"),
    ({"0": entry()}, "is not a list"),
])
async def test_malformed_port_map_fields_get_a_docker_error(client, portmap, fragment):  # noqa: F811
    status, reply = await call(client, "NetworkDriver.ProgramExternalConnectivity", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID,
        "Options": {"com.docker.network.portmap": portmap}})
    assert_err(status, reply, fragment)


async def test_publishing_on_an_unknown_endpoint_is_not_found(client):  # noqa: F811
    status, reply = await call(client, "NetworkDriver.ProgramExternalConnectivity", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID,
        "Options": {"com.docker.network.portmap": [entry()]}})
    assert_err(status, reply, f"no fan network {NETWORK_ID[:12]}")
