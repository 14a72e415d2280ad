"""Docker's plugin protocol as typed values (fan_driver/protocol.py): every
request shape decoded, every malformed field refused with its message, every
reply encoded in Docker's shape. Bodies as dockerd 20.10 sends them."""
import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from hypothesis import given

from fan_driver.config import MTU_OPTION, NetworkOptions, UnderlaySpec
from fan_driver.errors import FanError
from fan_driver.ipam import IpamDriver
from fan_driver.model import Endpoint
from fan_driver.network import NetworkDriver
from fan_driver.ports import PortBinding, PortRequest, Publication
from fan_driver.protocol import (ENDPOINT_NAME, GATEWAY_REQUEST, Activation, AddressGranted,
                                 AddressRelease, AddressRequest, AddressSpaces, BadRequest,
                                 CreateEndpoint, CreateNetwork, EndpointCreated, EndpointInfo,
                                 EndpointRef, ExternalConnectivity, GatewayAllocation,
                                 GatewayCheck, IpamCapabilities, JoinInfo, NetworkCapabilities,
                                 NetworkRef, PoolGranted, PoolRef, PoolRequest, StaticRoute,
                                 encode)
from fan_driver.server import routes

from tests.unit import ids

NID, EID = "5" * 64, "e" * 64
SWARM_NID = "r81e5w37k1jx7gcxaf5jokig3"   # a swarm-scoped network's, as dockerd sent it
IPV4_DATA = [{"AddressSpace": "fan", "Pool": "250.0.0.0/8", "Gateway": "250.0.28.1/24"}]


def create_network_body(**changes) -> dict:
    """CreateNetwork as dockerd 20.10 sends it for `-d fan --ipam-driver fan`."""
    body = {"NetworkID": NID,
            "Options": {"com.docker.network.enable_ipv6": False,
                        "com.docker.network.generic": {}},
            "IPv4Data": IPV4_DATA, "IPv6Data": []}
    body.update(changes)
    return body


# --- network driver requests ---------------------------------------------------------------

def test_network_and_endpoint_references():
    assert NetworkRef.decode({"NetworkID": NID}) == NetworkRef(NID)
    assert NetworkRef.decode({"NetworkID": SWARM_NID}) == NetworkRef(SWARM_NID)
    assert EndpointRef.decode({"NetworkID": NID, "EndpointID": EID, "Options": {}}) == \
        EndpointRef(NID, EID)
    assert EndpointRef.decode({"NetworkID": SWARM_NID, "EndpointID": EID}) == \
        EndpointRef(SWARM_NID, EID)


@pytest.mark.parametrize("body, message", [
    ({}, "request is missing NetworkID"),
    ({"NetworkID": None}, "request is missing NetworkID"),
    ({"NetworkID": 5}, "request field NetworkID must be a string"),
    ({"NetworkID": "5" * 63}, "request field NetworkID must be a Docker ID (64 hexadecimal "
                              "digits) or a swarm ID (25 lower-case letters and digits), not '"
                              + "5" * 63 + "'"),
    ({"NetworkID": "A" * 64}, "must be a Docker ID"),
    ({"NetworkID": NID}, "request is missing EndpointID"),
    ({"NetworkID": NID, "EndpointID": "$(reboot)"}, "EndpointID must be a Docker ID"),
    ({"NetworkID": NID, "EndpointID": SWARM_NID}, "request field EndpointID must be a Docker ID "
                                                  "(64 hexadecimal digits), not '"
                                                  + SWARM_NID + "'"),
])
def test_malformed_ids(body, message):
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        EndpointRef.decode(body)


# Every method whose body names a network, and those naming an endpoint too, found
# by what each decoder says of a body without them (the driver classes stand in
# for drivers: only the decoders are used).
ROUTES = routes(NetworkDriver, IpamDriver)


def _refusal(decode, body) -> str:
    try:
        decode(body)
    except BadRequest as exc:
        return str(exc)
    return ""


NAMING_A_NETWORK = sorted(path for path, route in ROUTES.items()
                          if route.decode and _refusal(route.decode, {}) ==
                          "request is missing NetworkID")
NAMING_AN_ENDPOINT = sorted(path for path in NAMING_A_NETWORK
                            if _refusal(ROUTES[path].decode, {"NetworkID": NID}) ==
                            "request is missing EndpointID")


def test_the_methods_naming_networks_and_endpoints():
    endpoints = ["/NetworkDriver." + m for m in (
        "CreateEndpoint", "DeleteEndpoint", "EndpointOperInfo", "Join", "Leave",
        "ProgramExternalConnectivity", "RevokeExternalConnectivity")]
    assert NAMING_AN_ENDPOINT == sorted(endpoints)
    assert NAMING_A_NETWORK == sorted(endpoints + ["/NetworkDriver.CreateNetwork",
                                                   "/NetworkDriver.DeleteNetwork"])


@pytest.mark.parametrize("path", NAMING_A_NETWORK)
@given(nid=ids.network_ids, eid=ids.endpoint_ids)
def test_every_method_takes_docker_and_swarm_network_ids(path, nid, eid):
    request = ROUTES[path].decode({"NetworkID": nid, "EndpointID": eid})
    assert request.network_id == nid
    assert getattr(request, "endpoint_id", eid) == eid


@pytest.mark.parametrize("path", NAMING_A_NETWORK)
@given(nid=ids.bad_network_ids, eid=ids.endpoint_ids)
def test_every_method_refuses_near_misses_of_a_network_id(path, nid, eid):
    with pytest.raises(BadRequest) as err:
        ROUTES[path].decode({"NetworkID": nid, "EndpointID": eid})
    assert str(err.value) == ("request field NetworkID must be a Docker ID (64 hexadecimal "
                              "digits) or a swarm ID (25 lower-case letters and digits), "
                              f"not {nid[:80]!r}")


@pytest.mark.parametrize("path", NAMING_AN_ENDPOINT)
@given(nid=ids.network_ids, eid=ids.bad_endpoint_ids)
def test_every_method_refuses_an_endpoint_id_that_is_not_a_docker_id(path, nid, eid):
    with pytest.raises(BadRequest) as err:
        ROUTES[path].decode({"NetworkID": nid, "EndpointID": eid})
    assert str(err.value) == ("request field EndpointID must be a Docker ID (64 hexadecimal "
                              f"digits), not {eid[:80]!r}")


def test_create_network_as_docker_sends_it():
    request = CreateNetwork.decode(create_network_body())

    assert request == CreateNetwork(network_id=NID, options=NetworkOptions(), internal=False,
                                    address_space="fan", pool=IPv4Network("250.0.0.0/8"),
                                    pool_as_sent="250.0.0.0/8")


def test_create_network_options_are_typed():
    request = CreateNetwork.decode(create_network_body(Options={
        "com.docker.network.generic": {"encap": "vxlan", MTU_OPTION: "1400",
                                       "underlay": "172.30.0.0/16"},
        "com.docker.network.internal": True, "com.docker.network.enable_ipv4": "true"}))

    assert request.options == NetworkOptions(underlay=UnderlaySpec.parse("172.30.0.0/16"),
                                             encap="vxlan", mtu=1400)
    assert request.internal is True


def test_create_network_without_ipv4_data_names_no_pool():
    request = CreateNetwork.decode({"NetworkID": NID})

    assert (request.pool, request.address_space, request.options) == (None, None,
                                                                       NetworkOptions())


@pytest.mark.parametrize("changes, message", [
    ({"Options": "x"}, "request field Options must be a JSON object"),
    ({"IPv4Data": {}}, "request field IPv4Data must be a JSON list"),
    ({"IPv6Data": "x"}, "request field IPv6Data must be a JSON list"),
    ({"Options": {"com.docker.network.generic": {"colour": "blue"}}},
     "unknown network option 'colour'"),
    ({"Options": {"com.docker.network.generic": "x"}}, "network options must be a map"),
    ({"Options": {"com.docker.network.enable_ipv4": False}}, "IPv6-only network"),
    ({"Options": {"com.docker.network.enable_ipv4": "maybe"}},
     "network option com.docker.network.enable_ipv4='maybe' must be true or false"),
    ({"Options": {"com.docker.network.internal": "maybe"}},
     "network option com.docker.network.internal='maybe' must be true or false"),
    ({"IPv6Data": [{"Pool": "fd00::/64"}]}, "the fan is IPv4 only; create the network without "
                                            "--ipv6"),
    ({"IPv4Data": ["x"]}, "IPv4Data must be a list of objects with a Pool string"),
    ({"IPv4Data": [{"Pool": 5}]}, "IPv4Data must be a list of objects with a Pool string"),
    ({"IPv4Data": [dict(IPV4_DATA[0], AuxAddresses={"r": "250.0.28.9"})]},
     "--aux-address is not supported"),
    ({"IPv4Data": [{"AddressSpace": "fan", "Pool": "250.0.0.0/33"}]},
     "subnet '250.0.0.0/33' is not an IPv4 CIDR"),
])
def test_malformed_create_network(changes, message):
    with pytest.raises(FanError) as err:
        CreateNetwork.decode(create_network_body(**changes))
    assert message in str(err.value)


def test_create_network_checks_fields_in_dockers_order():
    """Options are read before IPv4 is required, IPv4 before IPv6, both before the pool."""
    body = create_network_body(Options={"com.docker.network.enable_ipv4": False},
                               IPv6Data=[{}], IPv4Data=["x"])
    with pytest.raises(FanError, match="IPv6-only"):
        CreateNetwork.decode(body)
    with pytest.raises(FanError, match="without --ipv6"):
        CreateNetwork.decode(dict(body, Options={}))


def test_create_endpoint_as_docker_sends_it():
    request = CreateEndpoint.decode({"NetworkID": NID, "EndpointID": EID, "Options": {},
                                     "Interface": {"Address": "250.0.28.2/24",
                                                   "AddressIPv6": "", "MacAddress": ""}})

    assert request == CreateEndpoint(network_id=NID, endpoint_id=EID,
                                     address=IPv4Interface("250.0.28.2/24"), mac=None,
                                     address_as_sent="250.0.28.2/24")


def test_create_endpoint_mac_is_lower_case_and_the_address_may_be_left_out():
    request = CreateEndpoint.decode({"NetworkID": NID, "EndpointID": EID,
                                     "Interface": {"MacAddress": "0E:FA:FA:00:1C:02"}})

    assert (request.address, request.mac) == (None, "0e:fa:fa:00:1c:02")
    assert CreateEndpoint.decode({"NetworkID": NID, "EndpointID": EID}).address is None


@pytest.mark.parametrize("interface, message", [
    ("x", "request field Interface must be a JSON object"),
    ({"Address": "250.0.28.2/24", "AddressIPv6": "fd00::2/64"}, "the fan is IPv4 only; drop --ip6"),
    ({"Address": 4194311170}, "endpoint address 4194311170 is not an IPv4 address"),
    ({"Address": "250.0.28.2/33"}, "endpoint address '250.0.28.2/33' is not an IPv4 address"),
    ({"Address": "::1"}, "endpoint address '::1' is not an IPv4 address"),
    ({"Address": "250.0.28.2/24", "MacAddress": "01:00:5e:00:00:01"},
     "endpoint MAC address '01:00:5e:00:00:01' is not a unicast MAC address"),
    ({"Address": "250.0.28.2/24", "MacAddress": 5}, "endpoint MAC address '5' is not a unicast"),
    ({"Address": "250.0.28.2/24", "MacAddress": "0e:fa:fa:00:1c:0"}, "is not a unicast"),
])
def test_malformed_create_endpoint(interface, message):
    with pytest.raises(FanError) as err:
        CreateEndpoint.decode({"NetworkID": NID, "EndpointID": EID, "Interface": interface})
    assert message in str(err.value)


def test_external_connectivity_decodes_the_port_map():
    portmap = [{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080,
                "HostPortEnd": 8080}]
    request = ExternalConnectivity.decode({"NetworkID": NID, "EndpointID": EID,
                                           "Options": {"com.docker.network.portmap": portmap}})

    assert request == ExternalConnectivity(
        NID, EID, Publication((PortRequest("tcp", 80, IPv4Address("0.0.0.0"), 8080, 8080),)))
    assert ExternalConnectivity.decode({"NetworkID": NID, "EndpointID": EID}).publication == \
        Publication()


def test_malformed_external_connectivity():
    with pytest.raises(BadRequest, match="Options must be a JSON object"):
        ExternalConnectivity.decode({"NetworkID": NID, "EndpointID": EID, "Options": []})
    with pytest.raises(FanError, match="is not a list; it must be a JSON list of port bindings"):
        ExternalConnectivity.decode({"NetworkID": NID, "EndpointID": EID,
                                     "Options": {"com.docker.network.portmap": "x"}})


@pytest.mark.parametrize("options", [{}, {"com.docker.network.enable_ipv4": True},
                                     {"com.docker.network.enable_ipv4": "True"}])
def test_gateway_check_of_an_ipv4_network(options):
    assert GatewayCheck.decode({"Options": options}) == GatewayCheck()
    assert GatewayCheck.decode({}) == GatewayCheck()


@pytest.mark.parametrize("options, message", [
    ({"com.docker.network.enable_ipv4": False}, "an IPv6-only network (--ipv4=false) cannot"),
    ({"com.docker.network.enable_ipv4": "no"}, "must be true or false"),
    ("x", "request field Options must be a JSON object"),
])
def test_malformed_gateway_check(options, message):
    with pytest.raises(FanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GatewayCheck.decode({"Options": options})


# --- IPAM requests ---------------------------------------------------------------------

def test_request_pool_as_docker_sends_it():
    body = {"AddressSpace": "fan", "Pool": "250.0.0.0/8", "SubPool": "",
            "Options": {"underlay": "eth0/16"}, "V6": False}

    assert PoolRequest.decode(body) == PoolRequest(overlay=IPv4Network("250.0.0.0/8"),
                                                   underlay=UnderlaySpec.parse("eth0/16"))
    assert PoolRequest.decode({}) == PoolRequest(overlay=None, underlay=None)
    assert PoolRequest.decode({"Options": None, "V6": None}) == PoolRequest(None, None)


@pytest.mark.parametrize("body, message", [
    ({"Pool": ["250.0.0.0/8"]}, "request field Pool must be a string"),
    ({"SubPool": 5}, "request field SubPool must be a string"),
    ({"Options": []}, "request field Options must be a JSON object"),
    ({"V6": "yes"}, "request field V6 must be a boolean"),
    ({"V6": 0}, "request field V6 must be a boolean"),
    ({"Pool": "fd00::/64", "V6": True}, "the fan is IPv4 only; create the network without "
                                         "--ipv6 and without an IPv6 --subnet"),
    ({"SubPool": "250.0.28.0/25"}, "--ip-range 250.0.28.0/25 is not supported"),
    ({"Pool": "250.0.0.0/33"}, "subnet '250.0.0.0/33' is not an IPv4 CIDR"),
    ({"Options": {"encap": "vxlan"}}, "unknown IPAM option 'encap'"),
    ({"Options": {"underlay": "eth0/99"}}, "prefix length must be a number from 1 to 30"),
])
def test_malformed_request_pool(body, message):
    with pytest.raises(FanError) as err:
        PoolRequest.decode(body)
    assert message in str(err.value)


def test_pool_reference():
    assert PoolRef.decode({"PoolID": "fan:250.0.0.0/8"}) == PoolRef("fan:250.0.0.0/8")
    with pytest.raises(BadRequest, match="request is missing PoolID"):
        PoolRef.decode({})
    with pytest.raises(BadRequest, match="request field PoolID must be a string"):
        PoolRef.decode({"PoolID": 5})


@pytest.mark.parametrize("body, expected", [
    ({"PoolID": "fan:250.0.0.0/8", "Address": "", "Options": None},
     AddressRequest("fan:250.0.0.0/8", None, gateway=False, name=None)),
    ({"PoolID": "fan:250.0.0.0/8", "Address": "250.0.28.9", "Options": {}},
     AddressRequest("fan:250.0.0.0/8", IPv4Address("250.0.28.9"), gateway=False, name=None)),
    ({"PoolID": "p", "Address": "250.0.28.9/24"},
     AddressRequest("p", IPv4Address("250.0.28.9"), gateway=False, name=None)),
    ({"PoolID": "p", "Options": {"RequestAddressType": GATEWAY_REQUEST}},
     AddressRequest("p", None, gateway=True, name=None)),
    ({"PoolID": "p", "Options": {"RequestAddressType": GATEWAY_REQUEST, ENDPOINT_NAME: 7}},
     AddressRequest("p", None, gateway=True, name=None)),   # a gateway has no name
    ({"PoolID": "p", "Options": {ENDPOINT_NAME: "web-1"}},
     AddressRequest("p", None, gateway=False, name="web-1")),
    ({"PoolID": "p", "Options": {ENDPOINT_NAME: ""}},
     AddressRequest("p", None, gateway=False, name=None)),
    ({"PoolID": "p", "Options": {"RequestAddressType": "other", "x": 1}},
     AddressRequest("p", None, gateway=False, name=None)),
])
def test_request_address(body, expected):
    assert AddressRequest.decode(body) == expected


@pytest.mark.parametrize("body, message", [
    ({"Address": ""}, "request is missing PoolID"),
    ({"PoolID": "p", "Address": 250}, "request field Address must be a string"),
    ({"PoolID": "p", "Options": []}, "request field Options must be a JSON object"),
    ({"PoolID": "p", "Address": "nonsense"}, "'nonsense' is not an IPv4 address"),
    ({"PoolID": "p", "Address": "::1"}, "'::1' is not an IPv4 address"),
    ({"PoolID": "p", "Options": {ENDPOINT_NAME: 7}},
     f"RequestAddress option {ENDPOINT_NAME} must be a string"),
    ({"PoolID": "p", "Options": {ENDPOINT_NAME: ["web"]}}, "must be a string"),
])
def test_malformed_request_address(body, message):
    with pytest.raises(FanError) as err:
        AddressRequest.decode(body)
    assert message in str(err.value)


def test_release_address():
    assert AddressRelease.decode({"PoolID": "p", "Address": "250.0.28.2"}) == \
        AddressRelease("p", IPv4Address("250.0.28.2"))
    assert AddressRelease.decode({"PoolID": "p", "Address": "250.0.28.2/24"}).address == \
        IPv4Address("250.0.28.2")
    with pytest.raises(BadRequest, match="request is missing Address"):
        AddressRelease.decode({"PoolID": "p"})
    with pytest.raises(FanError, match="'x' is not an IPv4 address"):
        AddressRelease.decode({"PoolID": "p", "Address": "x"})


def test_a_hostile_value_is_quoted_short():
    with pytest.raises(FanError) as err:
        AddressRelease.decode({"PoolID": "p", "Address": "x" * 5000})
    assert len(str(err.value)) < 120


# --- replies -------------------------------------------------------------------------------

PORT = PortBinding("tcp", IPv4Address("0.0.0.0"), 8080, 80)


@pytest.mark.parametrize("reply, docker", [
    (None, {}),
    (Activation(), {"Implements": ["NetworkDriver", "IpamDriver"]}),
    (NetworkCapabilities("local", "global", True),
     {"Scope": "local", "ConnectivityScope": "global", "GwAllocChecker": True}),
    (GatewayAllocation(skip_ipv4=False, skip_ipv6=False), {"SkipIPv4": False, "SkipIPv6": False}),
    (EndpointCreated(mac="0e:fa:fa:00:1c:02"), {"Interface": {"MacAddress": "0e:fa:fa:00:1c:02"}}),
    (EndpointCreated(mac=None), {"Interface": {}}),
    (EndpointInfo(IPv4Interface("250.0.28.2/24"), "0e:fa:fa:00:1c:02",
                  Endpoint.host_ifname(EID), (PORT,)),
     {"Value": {"Address": "250.0.28.2/24", "MacAddress": "0e:fa:fa:00:1c:02",
                "HostInterface": "fve" + EID[:12],
                "com.docker.network.portmap": [{"Proto": 6, "IP": "250.0.28.2", "Port": 80,
                                                "HostIP": "", "HostPort": 8080,
                                                "HostPortEnd": 8080}]}}),
    (JoinInfo(src_name="fvc" + EID[:12], gateway=IPv4Address("250.0.28.1")),
     {"InterfaceName": {"SrcName": "fvc" + EID[:12], "DstPrefix": "eth"},
      "Gateway": "250.0.28.1", "StaticRoutes": [], "DisableGatewayService": False}),
    (JoinInfo(src_name="fvc1", gateway=IPv4Address("250.0.28.1"), static_routes=(
        StaticRoute(IPv4Network("250.0.0.0/8"), IPv4Address("250.0.28.1")),)),
     {"InterfaceName": {"SrcName": "fvc1", "DstPrefix": "eth"}, "Gateway": "250.0.28.1",
      "StaticRoutes": [{"Destination": "250.0.0.0/8", "RouteType": 0,
                        "NextHop": "250.0.28.1"}],
      "DisableGatewayService": False}),
    (IpamCapabilities(requires_mac_address=False, requires_request_replay=False),
     {"RequiresMACAddress": False, "RequiresRequestReplay": False}),
    (AddressSpaces(local="fan", global_="fan"),
     {"LocalDefaultAddressSpace": "fan", "GlobalDefaultAddressSpace": "fan"}),
    (PoolGranted("fan:250.0.0.0/8", IPv4Network("250.0.0.0/8")),
     {"PoolID": "fan:250.0.0.0/8", "Pool": "250.0.0.0/8", "Data": {}}),
    (AddressGranted(IPv4Interface("250.0.28.2/24")), {"Address": "250.0.28.2/24", "Data": {}}),
], ids=lambda v: type(v).__name__ if not isinstance(v, dict) else "")
def test_replies_encode_in_dockers_shape_and_key_order(reply, docker):
    encoded = encode(reply)

    assert json.dumps(encoded) == json.dumps(docker)     # the bytes on the wire, keys in order
    assert json.loads(json.dumps(encoded)) == docker
