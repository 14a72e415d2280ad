"""Docker's plugin protocol over HTTP, with real drivers.

The network driver has no dataplane (None): every call made here must succeed or
fail before reaching it, and a call that did reach it would show up as an
"internal error" Err.
"""
import json
from ipaddress import IPv4Interface, IPv4Network

import pytest
from aiohttp.test_utils import TestClient, TestServer

from fan_driver.config import UnderlaySpec
from fan_driver.hostfacts import HostFacts, Interface, KernelFeatures
from fan_driver.ipam import IpamDriver
from fan_driver.network import NetworkDriver
from fan_driver.server import MAX_BODY, make_app

DOCKER_CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
NETWORK_ID = "5" * 64


async def read_facts() -> HostFacts:
    return HostFacts(
        interfaces=(Interface("eth0", 1500, (IPv4Interface("172.30.0.28/16"),)),),
        default_interface="eth0",
        routes=(IPv4Network("172.30.0.0/16"),))


@pytest.fixture
async def client(ledger):
    features = KernelFeatures(fan_map=False, ipip=False, vxlan=True, ebpf=True)
    network = NetworkDriver(ledger, None, features, read_facts)
    ipam = IpamDriver(ledger, read_facts, UnderlaySpec.parse("default/16"))
    async with TestClient(TestServer(make_app(network, ipam))) as client:
        yield client


async def call(client, method: str, body=None, raw: bytes = None):
    """POST as Docker does; return (status, decoded JSON reply)."""
    data = raw if raw is not None else json.dumps(body if body is not None else {})
    resp = await client.post(f"/{method}", data=data,
                             headers={"Content-Type": DOCKER_CONTENT_TYPE})
    assert resp.content_type == "application/json"
    return resp.status, json.loads(await resp.text())


def assert_err(status: int, reply, *fragments: str) -> str:
    """Docker's error form: non-200, a JSON object with a non-empty Err string."""
    assert status != 200
    assert isinstance(reply, dict)
    err = reply.get("Err")
    assert isinstance(err, str) and err.strip()
    assert "internal error" not in err
    for fragment in fragments:
        assert fragment in err
    return err


# --- handshake and capabilities -------------------------------------------------------

async def test_activate(client):
    assert await call(client, "Plugin.Activate") == (
        200, {"Implements": ["NetworkDriver", "IpamDriver"]})


async def test_activate_with_an_empty_body(client):
    status, reply = await call(client, "Plugin.Activate", raw=b"")

    assert (status, reply["Implements"]) == (200, ["NetworkDriver", "IpamDriver"])


async def test_network_capabilities(client):
    assert await call(client, "NetworkDriver.GetCapabilities") == (
        200, {"Scope": "local", "ConnectivityScope": "global", "GwAllocChecker": True})


async def test_ipam_capabilities(client):
    status, reply = await call(client, "IpamDriver.GetCapabilities")

    assert status == 200
    assert reply["RequiresMACAddress"] is False


async def test_default_address_spaces(client):
    assert await call(client, "IpamDriver.GetDefaultAddressSpaces") == (
        200, {"LocalDefaultAddressSpace": "fan", "GlobalDefaultAddressSpace": "fan"})


# --- IPAM round trip, shaped like dockerd 20.10's calls ---------------------------------

async def test_pool_and_address_round_trip(client, ledger):
    status, pool = await call(client, "IpamDriver.RequestPool", {
        "AddressSpace": "fan", "Pool": "250.0.0.0/8", "SubPool": "", "Options": {},
        "V6": False})
    assert (status, pool) == (200, {"PoolID": "fan:250.0.0.0/8", "Pool": "250.0.0.0/8",
                                    "Data": {}})
    pid = pool["PoolID"]

    gateway = await call(client, "IpamDriver.RequestAddress", {
        "PoolID": pid, "Address": "",
        "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    first = await call(client, "IpamDriver.RequestAddress",
                       {"PoolID": pid, "Address": "", "Options": None})
    second = await call(client, "IpamDriver.RequestAddress",
                        {"PoolID": pid, "Address": "250.0.28.50", "Options": None})
    assert gateway == (200, {"Address": "250.0.28.1/24", "Data": {}})
    assert first == (200, {"Address": "250.0.28.2/24", "Data": {}})
    assert second == (200, {"Address": "250.0.28.50/24", "Data": {}})

    assert await call(client, "IpamDriver.ReleaseAddress",
                      {"PoolID": pid, "Address": "250.0.28.2"}) == (200, {})
    again = await call(client, "IpamDriver.RequestAddress",
                       {"PoolID": pid, "Address": "", "Options": None})
    assert again == (200, {"Address": "250.0.28.2/24", "Data": {}})

    for address in ("250.0.28.1", "250.0.28.2", "250.0.28.50"):
        assert await call(client, "IpamDriver.ReleaseAddress",
                          {"PoolID": pid, "Address": address}) == (200, {})
    assert await call(client, "IpamDriver.ReleasePool", {"PoolID": pid}) == (200, {})
    assert ledger.state.pools == {}

    status, reply = await call(client, "IpamDriver.RequestAddress",
                               {"PoolID": pid, "Address": "", "Options": None})
    assert_err(status, reply, "no fan pool", "--ipam-driver fan")


async def test_request_address_outside_the_slice_reaches_the_user(client):
    await call(client, "IpamDriver.RequestPool", {"Pool": "250.0.0.0/8"})

    status, reply = await call(client, "IpamDriver.RequestAddress", {
        "PoolID": "fan:250.0.0.0/8", "Address": "250.0.29.5", "Options": None})

    assert_err(status, reply, "outside this host's fan slice 250.0.28.0/24")


async def test_request_pool_v6_is_refused(client):
    status, reply = await call(client, "IpamDriver.RequestPool",
                               {"AddressSpace": "fan", "Pool": "", "V6": True})

    assert_err(status, reply, "IPv4 only")


# --- CreateNetwork that must stop before the dataplane --------------------------------

async def test_create_network_with_dockers_default_ipam_says_what_to_type(client, ledger):
    status, reply = await call(client, "NetworkDriver.CreateNetwork", {
        "NetworkID": NETWORK_ID,
        "Options": {"com.docker.network.enable_ipv6": False,
                    "com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Gateway": "250.0.0.1/8",
                      "Pool": "250.0.0.0/8"}],
        "IPv6Data": []})

    assert_err(status, reply, "fan IPAM driver",
               "docker network create -d fan --ipam-driver fan --subnet 250.0.0.0/8")
    assert ledger.state.networks == {}


async def test_create_network_with_an_unknown_option_names_it(client, ledger):
    await call(client, "IpamDriver.RequestPool", {"Pool": "250.0.0.0/8"})

    status, reply = await call(client, "NetworkDriver.CreateNetwork", {
        "NetworkID": NETWORK_ID,
        "Options": {"com.docker.network.enable_ipv6": False,
                    "com.docker.network.generic": {"colour": "blue"}},
        "IPv4Data": [{"AddressSpace": "fan", "Gateway": "250.0.28.1/24",
                      "Pool": "250.0.0.0/8"}],
        "IPv6Data": []})

    assert_err(status, reply, "'colour'", "-o")
    assert ledger.state.networks == {}


# --- malformed requests ---------------------------------------------------------------

async def test_unknown_method_is_404_with_err(client):
    status, reply = await call(client, "NetworkDriver.NoSuchMethod", {"Options": {}})

    assert status == 404
    assert_err(status, reply, "NetworkDriver.NoSuchMethod")


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00garbage", b"{\"PoolID\": "],
                         ids=["syntax", "binary", "truncated"])
async def test_non_json_body(client, raw):
    status, reply = await call(client, "IpamDriver.ReleasePool", raw=raw)

    assert_err(status, reply, "not JSON")


@pytest.mark.parametrize("raw", [b"[]", b'["PoolID"]', b'"PoolID"', b"42", b"null"])
async def test_json_that_is_not_an_object(client, raw):
    status, reply = await call(client, "IpamDriver.ReleasePool", raw=raw)

    assert_err(status, reply, "must be a JSON object")


@pytest.mark.parametrize("method, body, complaint", [
    ("NetworkDriver.DeleteNetwork", {"NetworkID": 5}, "NetworkID must be a string"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": NETWORK_ID, "Options": "x"},
     "Options must be a JSON object"),
    ("NetworkDriver.CreateNetwork", {"NetworkID": NETWORK_ID, "IPv4Data": {}},
     "IPv4Data must be a JSON list"),
    ("IpamDriver.RequestPool", {"Pool": ["250.0.0.0/8"]}, "Pool must be a string"),
    ("IpamDriver.RequestPool", {"V6": "yes"}, "V6 must be a boolean"),
    ("IpamDriver.RequestPool", {"V6": 0}, "V6 must be a boolean"),
    ("IpamDriver.RequestAddress", {"PoolID": "fan:250.0.0.0/8", "Options": []},
     "Options must be a JSON object"),
    ("IpamDriver.ReleaseAddress", {"PoolID": "fan:250.0.0.0/8", "Address": 250},
     "Address must be a string"),
])
async def test_wrong_field_types(client, method, body, complaint):
    status, reply = await call(client, method, body)

    assert_err(status, reply, complaint)


@pytest.mark.parametrize("method, body, missing", [
    ("NetworkDriver.CreateNetwork", {"Options": {}}, "NetworkID"),
    ("NetworkDriver.DeleteNetwork", {}, "NetworkID"),
    ("NetworkDriver.DeleteNetwork", {"NetworkID": None}, "NetworkID"),
    ("NetworkDriver.Join", {"NetworkID": NETWORK_ID}, "EndpointID"),
    ("IpamDriver.ReleasePool", {}, "PoolID"),
    ("IpamDriver.RequestAddress", {"Address": ""}, "PoolID"),
    ("IpamDriver.ReleaseAddress", {"PoolID": "fan:250.0.0.0/8"}, "Address"),
])
async def test_missing_required_fields(client, method, body, missing):
    status, reply = await call(client, method, body)

    assert_err(status, reply, f"missing {missing}")


async def test_body_over_one_mebibyte_is_refused_with_err(client):
    body = json.dumps({"PoolID": "x" * MAX_BODY}).encode()
    assert len(body) > MAX_BODY

    status, reply = await call(client, "IpamDriver.ReleasePool", raw=body)

    assert_err(status, reply)


async def test_unknown_fields_are_tolerated(client):
    status, reply = await call(client, "IpamDriver.RequestPool", {
        "AddressSpace": "fan", "Pool": "250.0.0.0/8", "SomethingNew": {"x": 1}})

    assert status == 200
    assert reply["PoolID"] == "fan:250.0.0.0/8"
