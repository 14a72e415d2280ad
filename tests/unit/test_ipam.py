"""The IPAM: pure allocation over a Pool, then IpamDriver over a real Store and Ledger."""
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from fan_driver.config import HostFacts, Interface, UnderlaySpec
from fan_driver.errors import FanError, NotFound
from fan_driver.ipam import GATEWAY_REQUEST, IpamDriver, allocate, capacity, reserved
from fan_driver.ledger import Ledger
from fan_driver.model import Network, Pool
from fan_driver.store import STATE_FILE, Store

GATEWAY = {"RequestAddressType": GATEWAY_REQUEST}


# --- allocate / reserved / capacity on a Pool -----------------------------------------

def small_pool(host_reserve: int = 1) -> Pool:
    """Overlay 10.100.0.0/16 over underlay 192.168.1.0/24: host .28 owns 10.100.28.0/24."""
    return Pool(overlay="10.100.0.0/16", underlay="192.168.1.0/24",
                underlay_address="192.168.1.28", interface="eth0", mtu=1500,
                host_reserve=host_reserve)


def take(pool: Pool, address: IPv4Address) -> None:
    pool.addresses[str(address)] = ""


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def test_the_small_pool_is_a_24():
    assert small_pool().host_slice.slice == IPv4Network("10.100.28.0/24")


def test_reserved_is_network_broadcast_and_the_first_host_reserve_addresses():
    assert reserved(small_pool()) == {ip("10.100.28.0"), ip("10.100.28.1"), ip("10.100.28.255")}
    assert reserved(small_pool(host_reserve=3)) == {
        ip("10.100.28.0"), ip("10.100.28.1"), ip("10.100.28.2"), ip("10.100.28.3"),
        ip("10.100.28.255")}


@pytest.mark.parametrize("host_reserve, expected", [(1, 253), (3, 251), (250, 4)])
def test_capacity(host_reserve, expected):
    assert capacity(small_pool(host_reserve)) == expected


def test_allocate_gives_lowest_free_address_first():
    pool = small_pool()

    first = allocate(pool, None)
    take(pool, first)
    second = allocate(pool, None)

    assert (first, second) == (ip("10.100.28.2"), ip("10.100.28.3"))


def test_allocate_fills_holes_before_going_higher():
    pool = small_pool()
    for last in (2, 3, 5):
        take(pool, ip(f"10.100.28.{last}"))

    assert allocate(pool, None) == ip("10.100.28.4")


def test_allocate_respects_host_reserve():
    assert allocate(small_pool(host_reserve=10), None) == ip("10.100.28.11")


def test_allocate_requested_address_exactly():
    assert allocate(small_pool(), ip("10.100.28.77")) == ip("10.100.28.77")


def test_allocate_requested_address_outside_the_slice():
    with pytest.raises(FanError) as err:
        allocate(small_pool(), ip("10.100.29.5"))

    assert "outside this host's fan slice 10.100.28.0/24" in str(err.value)


@pytest.mark.parametrize("address", ["10.100.28.0", "10.100.28.1", "10.100.28.4", "10.100.28.255"])
def test_allocate_requested_reserved_address(address):
    with pytest.raises(FanError) as err:
        allocate(small_pool(host_reserve=4), ip(address))

    assert "reserved" in str(err.value) and "host_reserve=4" in str(err.value)


def test_allocate_requested_address_already_taken():
    pool = small_pool()
    take(pool, ip("10.100.28.9"))

    with pytest.raises(FanError, match="10.100.28.9 is already in use"):
        allocate(pool, ip("10.100.28.9"))


def test_exhaustion_names_the_slice_and_its_capacity():
    pool = small_pool(host_reserve=200)   # 54 container addresses: .201 .. .254
    given = []
    for _ in range(capacity(pool)):
        address = allocate(pool, None)
        take(pool, address)
        given.append(address)

    with pytest.raises(FanError) as err:
        allocate(pool, None)

    assert given == [ip(f"10.100.28.{last}") for last in range(201, 255)]
    assert "10.100.28.0/24 is full" in str(err.value)
    assert "all 54 container addresses" in str(err.value)


def test_exhaustion_with_the_default_reserve():
    pool = small_pool()
    for last in range(2, 255):
        take(pool, ip(f"10.100.28.{last}"))

    with pytest.raises(FanError, match="all 253 container addresses"):
        allocate(pool, None)


def test_released_address_is_reused():
    pool = small_pool()
    for _ in range(3):
        take(pool, allocate(pool, None))

    del pool.addresses["10.100.28.3"]

    assert allocate(pool, None) == ip("10.100.28.3")


# --- IpamDriver over a Store in tmp_path ----------------------------------------------

def host_facts(routes=("172.30.0.0/16",)) -> HostFacts:
    """This host: eth0 at 172.30.0.28/16 holds the default route."""
    return HostFacts(
        interfaces=(Interface("eth0", 1500, (IPv4Interface("172.30.0.28/16"),)),),
        default_interface="eth0",
        routes=tuple(IPv4Network(r) for r in routes))


class Host:
    """The host as the IPAM reads it; tests change `facts` to change the host."""

    def __init__(self):
        self.facts = host_facts()

    async def read_facts(self) -> HostFacts:
        return self.facts


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path)
    yield store
    store.close()


@pytest.fixture
def ledger(store):
    return Ledger(store, store.open())


@pytest.fixture
def host():
    return Host()


@pytest.fixture
def ipam(ledger, host):
    return IpamDriver(ledger, host.read_facts, UnderlaySpec.parse("default/16"))


def state_bytes(store: Store) -> bytes:
    return (store.directory / STATE_FILE).read_bytes()


async def test_request_pool_with_no_pool_gives_the_default_overlay(ipam, ledger):
    reply = await ipam.request_pool("", "", {}, False)

    assert reply == {"PoolID": "fan:250.0.0.0/8", "Pool": "250.0.0.0/8", "Data": {}}
    pool = ledger.state.pools["fan:250.0.0.0/8"]
    assert (pool.underlay, pool.underlay_address, pool.interface, pool.mtu) == (
        "172.30.0.0/16", "172.30.0.28", "eth0", 1500)
    assert pool.host_slice.slice == IPv4Network("250.0.28.0/24")


async def test_request_pool_ids_follow_the_overlay(ipam, ledger):
    first = await ipam.request_pool("250.0.0.0/8", "", None, False)
    second = await ipam.request_pool("10.100.0.0/16", "", {"underlay": "172.30.0.0/24"}, False)

    assert first["PoolID"] == "fan:250.0.0.0/8"
    assert second["PoolID"] == "fan:10.100.0.0/16"
    assert ledger.state.pools["fan:10.100.0.0/16"].host_slice.slice == IPv4Network(
        "10.100.28.0/24")


async def test_request_pool_is_saved_to_the_store(ipam, store):
    await ipam.request_pool("250.0.0.0/8", "", {}, False)

    assert list(store.load().pools) == ["fan:250.0.0.0/8"]


async def test_request_pool_with_ipam_opt_underlay_interface(ipam, ledger):
    await ipam.request_pool("250.0.0.0/8", "", {"underlay": "eth0/24"}, False)

    pool = ledger.state.pools["fan:250.0.0.0/8"]
    assert pool.underlay == "172.30.0.0/24"
    assert pool.host_slice.slice == IPv4Network("250.28.0.0/16")


async def test_overlapping_overlay_is_refused(ipam, ledger):
    await ipam.request_pool("250.0.0.0/8", "", {}, False)

    with pytest.raises(FanError) as err:
        await ipam.request_pool("250.0.0.0/7", "", {}, False)

    assert "overlaps 250.0.0.0/8" in str(err.value)
    assert list(ledger.state.pools) == ["fan:250.0.0.0/8"]


async def test_overlapping_overlay_names_the_network_that_holds_it(ipam, ledger):
    await ipam.request_pool("250.0.0.0/8", "", {}, False)
    async with ledger.change() as state:
        state.networks["0123456789abcdef"] = Network(
            pool_id="fan:250.0.0.0/8", encap="vxlan", mapping="ebpf", mtu=1450, tc_pref=1)

    with pytest.raises(FanError, match="fan network 0123456789ab"):
        await ipam.request_pool("250.1.0.0/16", "", {"underlay": "172.30.0.0/24"}, False)


@pytest.mark.parametrize("route", ["10.0.0.0/8", "10.100.5.0/24", "0.0.0.0/1"])
async def test_overlay_overlapping_a_host_route_is_refused(ipam, host, route):
    host.facts = host_facts(routes=("172.30.0.0/16", route))

    with pytest.raises(FanError) as err:
        await ipam.request_pool("10.0.0.0/8", "", {}, False)

    assert f"overlaps route {route}" in str(err.value)


async def test_v6_is_refused(ipam):
    with pytest.raises(FanError, match="IPv4 only"):
        await ipam.request_pool("", "", {}, True)


async def test_sub_pool_is_refused(ipam):
    with pytest.raises(FanError, match="--ip-range 250.0.28.0/25 is not supported"):
        await ipam.request_pool("250.0.0.0/8", "250.0.28.0/25", {}, False)


async def test_overlay_too_small_for_the_underlay_is_refused(ipam):
    with pytest.raises(FanError, match="too small"):
        await ipam.request_pool("10.100.0.0/16", "", {}, False)


async def test_gateway_request_gives_dot_one_of_the_slice(ipam, ledger):
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]

    reply = await ipam.request_address(pid, "", GATEWAY)

    assert reply == {"Address": "250.0.28.1/24", "Data": {}}
    assert ledger.state.pools[pid].addresses == {"250.0.28.1": "gateway"}


async def test_gateway_request_naming_dot_one_is_accepted(ipam):
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]

    reply = await ipam.request_address(pid, "250.0.28.1", GATEWAY)

    assert reply["Address"] == "250.0.28.1/24"


async def test_gateway_request_naming_another_address_is_refused(ipam):
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]

    with pytest.raises(FanError, match="gateway is always 250.0.28.1"):
        await ipam.request_address(pid, "250.0.0.1", GATEWAY)


async def test_gateway_request_with_a_malformed_address_is_a_fan_error(ipam):
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]

    # ipam.py parses the gateway with a bare IPv4Address(): ValueError escapes.
    with pytest.raises(FanError):
        await ipam.request_address(pid, "not-an-address", GATEWAY)


async def test_container_requests_get_slice_addresses_with_the_slice_length(ipam, ledger):
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]
    await ipam.request_address(pid, "", GATEWAY)

    first = await ipam.request_address(pid, "", None)
    second = await ipam.request_address(pid, "", {})

    assert first == {"Address": "250.0.28.2/24", "Data": {}}
    assert second == {"Address": "250.0.28.3/24", "Data": {}}
    assert set(ledger.state.pools[pid].addresses) == {"250.0.28.1", "250.0.28.2", "250.0.28.3"}


async def test_container_request_for_a_given_address(ipam):
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]

    reply = await ipam.request_address(pid, "250.0.28.77", None)

    assert reply["Address"] == "250.0.28.77/24"


async def test_container_request_outside_the_slice_is_refused(ipam):
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]

    with pytest.raises(FanError, match="outside this host's fan slice 250.0.28.0/24"):
        await ipam.request_address(pid, "250.0.29.5", None)


async def test_request_address_from_an_unknown_pool(ipam):
    with pytest.raises(NotFound, match="--ipam-driver fan"):
        await ipam.request_address("fan:250.0.0.0/8", "", None)


async def test_release_address_frees_it(ipam, ledger):
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]
    await ipam.request_address(pid, "", None)
    await ipam.request_address(pid, "", None)

    assert await ipam.release_address(pid, "250.0.28.2") == {}

    assert "250.0.28.2" not in ledger.state.pools[pid].addresses
    assert (await ipam.request_address(pid, "", None))["Address"] == "250.0.28.2/24"


async def test_release_address_with_prefix_length_or_unknown_pool(ipam, ledger):
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]
    await ipam.request_address(pid, "", None)

    await ipam.release_address(pid, "250.0.28.2/24")
    await ipam.release_address("fan:251.0.0.0/8", "251.0.28.2")   # nothing to do

    assert ledger.state.pools[pid].addresses == {}


async def test_release_pool_removes_an_unused_pool(ipam, ledger, store):
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]

    assert await ipam.release_pool(pid) == {}

    assert ledger.state.pools == {}
    assert store.load().pools == {}
    # and the overlay can be had again
    assert (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"] == pid


async def test_release_pool_keeps_a_pool_a_network_still_uses(ipam, ledger):
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]
    async with ledger.change() as state:
        state.networks["n1"] = Network(pool_id=pid, encap="vxlan", mapping="ebpf",
                                       mtu=1450, tc_pref=1)

    await ipam.release_pool(pid)

    assert pid in ledger.state.pools


@pytest.mark.parametrize("failing_request", [
    lambda ipam, pid: ipam.request_pool("250.0.0.0/7", "", {}, False),          # overlap
    lambda ipam, pid: ipam.request_pool("10.0.0.0/8", "", {}, False),           # host route
    lambda ipam, pid: ipam.request_pool("", "", {}, True),                      # v6
    lambda ipam, pid: ipam.request_pool("240.0.0.0/8", "", {"underlay": "10.9.0.0/16"},
                                        False),                                 # no address
    lambda ipam, pid: ipam.request_pool("240.0.0.0/8", "", {"bogus": "1"}, False),
    lambda ipam, pid: ipam.request_address(pid, "250.0.28.2", None),           # taken
    lambda ipam, pid: ipam.request_address(pid, "250.0.29.2", None),           # outside
    lambda ipam, pid: ipam.request_address(pid, "nonsense", None),
    lambda ipam, pid: ipam.request_address(pid, "250.0.28.9", GATEWAY),
    lambda ipam, pid: ipam.request_address("fan:240.0.0.0/8", "", None),
], ids=["overlap", "route", "v6", "no-address", "unknown-option", "taken", "outside",
        "nonsense", "gateway", "no-pool"])
async def test_failed_request_leaves_the_state_file_unchanged(ipam, ledger, host, store,
                                                              failing_request):
    host.facts = host_facts(routes=("172.30.0.0/16", "10.0.0.0/8"))
    pid = (await ipam.request_pool("250.0.0.0/8", "", {}, False))["PoolID"]
    await ipam.request_address(pid, "", GATEWAY)
    await ipam.request_address(pid, "", None)
    before_file, before_state = state_bytes(store), ledger.state.to_json()

    with pytest.raises(FanError):
        await failing_request(ipam, pid)

    assert state_bytes(store) == before_file
    assert ledger.state.to_json() == before_state
