"""The IPAM: pure allocation over a Pool, then IpamDriver over a real Store and Ledger."""
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from fan_driver.config import UnderlaySpec
from fan_driver.hostfacts import HostFacts, Interface
from fan_driver.errors import FanError, NotFound
from fan_driver.ipam import (MAX_NAME, MAX_REMEMBERED, IpamDriver, allocate, capacity, kept_name,
                             remember, reserved, seen_leaving)
from fan_driver.ledger import Ledger
from fan_driver.model import Network, Owner, Pool
from fan_driver.protocol import ENDPOINT_NAME, GATEWAY_REQUEST
from fan_driver.store import STATE_FILE, Store

from tests.unit.docker_calls import release_address, release_pool, request_address, request_pool

GATEWAY = {"RequestAddressType": GATEWAY_REQUEST}


def named(name: str) -> dict:
    """RequestAddress options as Docker 29 sends them for container `name`."""
    return {ENDPOINT_NAME: name}


# --- allocate / reserved / capacity on a Pool -----------------------------------------

def small_pool(host_reserve: int = 1) -> Pool:
    """Overlay 10.100.0.0/16 over underlay 192.168.1.0/24: host .28 owns 10.100.28.0/24."""
    return Pool(overlay="10.100.0.0/16", underlay="192.168.1.0/24",
                underlay_address="192.168.1.28", interface="eth0", mtu=1500,
                host_reserve=host_reserve)


def take(pool: Pool, address: IPv4Address) -> None:
    pool.addresses[str(address)] = Owner.PENDING


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


# --- addresses remembered by endpoint name (Docker 29 and later) -------------------------

def hand_out(pool: Pool, name=None) -> IPv4Address:
    """What request_address does for a container: allocate, remember, take."""
    address = allocate(pool, None, name)
    remember(pool, str(address), name)
    take(pool, address)
    return address


def give_back(pool: Pool, address: IPv4Address) -> None:
    """What release_address does."""
    del pool.addresses[str(address)]
    seen_leaving(pool, str(address))


def test_a_name_gets_its_free_address_back_before_lower_free_ones():
    pool = small_pool()
    first, second = hand_out(pool, "web"), hand_out(pool, "db")
    give_back(pool, first)
    give_back(pool, second)

    assert hand_out(pool, "db") == second == ip("10.100.28.3")
    assert hand_out(pool, "web") == first == ip("10.100.28.2")


def test_newcomers_get_never_remembered_addresses_while_there_are_any():
    pool = small_pool()
    web = hand_out(pool, "web")
    give_back(pool, web)

    assert hand_out(pool, "cache") == ip("10.100.28.3")
    assert hand_out(pool, None) == ip("10.100.28.4")    # Docker 28 sends no name
    assert hand_out(pool, "web") == web


def test_when_only_remembered_addresses_are_free_the_least_recently_seen_goes_first():
    pool = small_pool(host_reserve=250)    # .251 .. .254
    a, b, c, d = (hand_out(pool, n) for n in "abcd")
    for address in (c, a, d):               # stopped in this order: c seen longest ago
        give_back(pool, address)

    assert hand_out(pool, "e") == c
    assert hand_out(pool, None) == a
    assert list(pool.remembered.items()) == [("b", str(b)), ("d", str(d)), ("e", str(c))]
    assert hand_out(pool, "f") == d
    with pytest.raises(FanError, match="is full"):
        hand_out(pool, "g")


def test_a_name_whose_address_is_taken_gets_a_new_one_and_remembers_that():
    pool = small_pool()
    old = hand_out(pool, "web")
    give_back(pool, old)
    take(pool, old)                          # e.g. `--ip` for another container

    new = hand_out(pool, "web")

    assert new == ip("10.100.28.3")
    assert pool.remembered == {"web": str(new)}


def test_a_requested_address_is_given_exactly_and_remembered_for_the_name():
    pool = small_pool()
    web = hand_out(pool, "web")
    give_back(pool, web)

    assert allocate(pool, ip("10.100.28.2"), "db") == web
    remember(pool, str(web), "db")

    assert pool.remembered == {"db": str(web)}


def test_memory_holds_one_entry_per_name_and_per_address_newest_last():
    pool = small_pool()
    remember(pool, "10.100.28.2", "a")
    remember(pool, "10.100.28.3", "b")
    remember(pool, "10.100.28.4", "a")      # a moved: its old address is no one's
    remember(pool, "10.100.28.3", "c")      # b's address went to c
    remember(pool, "10.100.28.5", None)     # nameless: forgets nothing else

    assert list(pool.remembered.items()) == [("a", "10.100.28.4"), ("c", "10.100.28.3")]
    seen_leaving(pool, "10.100.28.4")
    seen_leaving(pool, "10.100.28.9")       # no one's: nothing moves
    assert list(pool.remembered) == ["c", "a"]


def test_memory_is_bounded_and_forgets_the_least_recently_seen():
    pool = Pool(overlay="10.0.0.0/8", underlay="192.168.1.0/24", underlay_address="192.168.1.28",
                interface="eth0", mtu=1500)   # a /16 slice: more addresses than the bound
    first = pool.host_slice.slice.network_address + 2
    for i in range(MAX_REMEMBERED + 5):
        remember(pool, str(first + i), f"c{i}")

    assert len(pool.remembered) == MAX_REMEMBERED
    assert next(iter(pool.remembered)) == "c5"


@pytest.mark.parametrize("name, expected", [
    (None, None), ("web-1", "web-1"), ("x" * MAX_NAME, "x" * MAX_NAME),
    ("x" * (MAX_NAME + 1), None),       # too long to keep: not remembered
])
def test_kept_name(name, expected):
    assert kept_name(name) == expected


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
def host():
    return Host()


@pytest.fixture
def ipam(ledger, host):
    return IpamDriver(ledger, host.read_facts, UnderlaySpec.parse("default/16"))


def state_bytes(store: Store) -> bytes:
    return (store.directory / STATE_FILE).read_bytes()


async def test_request_pool_with_no_pool_gives_the_default_overlay(ipam, ledger):
    reply = await request_pool(ipam, "", "", {}, False)

    assert reply == {"PoolID": "fan:250.0.0.0/8", "Pool": "250.0.0.0/8", "Data": {}}
    pool = ledger.state.pools["fan:250.0.0.0/8"]
    assert (pool.underlay, pool.underlay_address, pool.interface, pool.mtu) == (
        "172.30.0.0/16", "172.30.0.28", "eth0", 1500)
    assert pool.host_slice.slice == IPv4Network("250.0.28.0/24")


async def test_request_pool_ids_follow_the_overlay(ipam, ledger):
    first = await request_pool(ipam, "250.0.0.0/8", "", None, False)
    second = await request_pool(ipam, "10.100.0.0/16", "", {"underlay": "172.30.0.0/24"}, False)

    assert first["PoolID"] == "fan:250.0.0.0/8"
    assert second["PoolID"] == "fan:10.100.0.0/16"
    assert ledger.state.pools["fan:10.100.0.0/16"].host_slice.slice == IPv4Network(
        "10.100.28.0/24")


async def test_request_pool_is_saved_to_the_store(ipam, store):
    await request_pool(ipam, "250.0.0.0/8", "", {}, False)

    assert list(store.load().pools) == ["fan:250.0.0.0/8"]


async def test_request_pool_with_ipam_opt_underlay_interface(ipam, ledger):
    await request_pool(ipam, "250.0.0.0/8", "", {"underlay": "eth0/24"}, False)

    pool = ledger.state.pools["fan:250.0.0.0/8"]
    assert pool.underlay == "172.30.0.0/24"
    assert pool.host_slice.slice == IPv4Network("250.28.0.0/16")


async def test_overlapping_overlay_is_refused(ipam, ledger):
    await request_pool(ipam, "250.0.0.0/8", "", {}, False)

    with pytest.raises(FanError) as err:
        await request_pool(ipam, "250.0.0.0/7", "", {}, False)

    assert "overlaps 250.0.0.0/8" in str(err.value)
    assert list(ledger.state.pools) == ["fan:250.0.0.0/8"]


async def test_overlapping_overlay_names_the_network_that_holds_it(ipam, ledger):
    await request_pool(ipam, "250.0.0.0/8", "", {}, False)
    async with ledger.change() as state:
        state.networks["0123456789abcdef"] = Network(
            pool_id="fan:250.0.0.0/8", encap="vxlan", mapping="ebpf", mtu=1450, tc_pref=1)

    with pytest.raises(FanError, match="fan network 0123456789ab"):
        await request_pool(ipam, "250.1.0.0/16", "", {"underlay": "172.30.0.0/24"}, False)


@pytest.mark.parametrize("route", ["10.0.0.0/8", "10.100.5.0/24", "0.0.0.0/1"])
async def test_overlay_overlapping_a_host_route_is_refused(ipam, host, route):
    host.facts = host_facts(routes=("172.30.0.0/16", route))

    with pytest.raises(FanError) as err:
        await request_pool(ipam, "10.0.0.0/8", "", {}, False)

    assert f"overlaps route {route}" in str(err.value)


async def test_v6_is_refused(ipam):
    with pytest.raises(FanError, match="IPv4 only"):
        await request_pool(ipam, "", "", {}, True)


async def test_sub_pool_is_refused(ipam):
    with pytest.raises(FanError, match="--ip-range 250.0.28.0/25 is not supported"):
        await request_pool(ipam, "250.0.0.0/8", "250.0.28.0/25", {}, False)


async def test_overlay_too_small_for_the_underlay_is_refused(ipam):
    with pytest.raises(FanError, match="too small"):
        await request_pool(ipam, "10.100.0.0/16", "", {}, False)


async def test_gateway_request_gives_dot_one_of_the_slice(ipam, ledger):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]

    reply = await request_address(ipam, pid, "", GATEWAY)

    assert reply == {"Address": "250.0.28.1/24", "Data": {}}
    assert ledger.state.pools[pid].addresses == {"250.0.28.1": "gateway"}


async def test_gateway_request_naming_dot_one_is_accepted(ipam):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]

    reply = await request_address(ipam, pid, "250.0.28.1", GATEWAY)

    assert reply["Address"] == "250.0.28.1/24"


async def test_gateway_request_naming_another_address_is_refused(ipam):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]

    with pytest.raises(FanError, match="gateway is always 250.0.28.1"):
        await request_address(ipam, pid, "250.0.0.1", GATEWAY)


async def test_gateway_request_with_a_malformed_address_is_a_fan_error(ipam):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]

    # ipam.py parses the gateway with a bare IPv4Address(): ValueError escapes.
    with pytest.raises(FanError):
        await request_address(ipam, pid, "not-an-address", GATEWAY)


async def test_container_requests_get_slice_addresses_with_the_slice_length(ipam, ledger):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    await request_address(ipam, pid, "", GATEWAY)

    first = await request_address(ipam, pid, "", None)
    second = await request_address(ipam, pid, "", {})

    assert first == {"Address": "250.0.28.2/24", "Data": {}}
    assert second == {"Address": "250.0.28.3/24", "Data": {}}
    assert set(ledger.state.pools[pid].addresses) == {"250.0.28.1", "250.0.28.2", "250.0.28.3"}


async def test_container_request_for_a_given_address(ipam):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]

    reply = await request_address(ipam, pid, "250.0.28.77", None)

    assert reply["Address"] == "250.0.28.77/24"


async def test_container_request_outside_the_slice_is_refused(ipam):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]

    with pytest.raises(FanError, match="outside this host's fan slice 250.0.28.0/24"):
        await request_address(ipam, pid, "250.0.29.5", None)


async def test_request_address_from_an_unknown_pool(ipam):
    with pytest.raises(NotFound, match="--ipam-driver fan"):
        await request_address(ipam, "fan:250.0.0.0/8", "", None)


async def test_release_address_frees_it(ipam, ledger):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    await request_address(ipam, pid, "", None)
    await request_address(ipam, pid, "", None)

    assert await release_address(ipam, pid, "250.0.28.2") == {}

    assert "250.0.28.2" not in ledger.state.pools[pid].addresses
    assert (await request_address(ipam, pid, "", None))["Address"] == "250.0.28.2/24"


async def test_release_address_with_prefix_length_or_unknown_pool(ipam, ledger):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    await request_address(ipam, pid, "", None)

    await release_address(ipam, pid, "250.0.28.2/24")
    await release_address(ipam, "fan:251.0.0.0/8", "251.0.28.2")   # nothing to do

    assert ledger.state.pools[pid].addresses == {}


async def test_release_pool_removes_an_unused_pool(ipam, ledger, store):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]

    assert await release_pool(ipam, pid) == {}

    assert ledger.state.pools == {}
    assert store.load().pools == {}
    # and the overlay can be had again
    assert (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"] == pid


async def test_release_pool_keeps_a_pool_a_network_still_uses(ipam, ledger):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    async with ledger.change() as state:
        state.networks["n1"] = Network(pool_id=pid, encap="vxlan", mapping="ebpf",
                                       mtu=1450, tc_pref=1)

    await release_pool(ipam, pid)

    assert pid in ledger.state.pools


@pytest.mark.parametrize("failing_request", [
    lambda ipam, pid: request_pool(ipam, "250.0.0.0/7", "", {}, False),          # overlap
    lambda ipam, pid: request_pool(ipam, "10.0.0.0/8", "", {}, False),           # host route
    lambda ipam, pid: request_pool(ipam, "", "", {}, True),                      # v6
    lambda ipam, pid: request_pool(ipam, "240.0.0.0/8", "", {"underlay": "10.9.0.0/16"},
                                        False),                                 # no address
    lambda ipam, pid: request_pool(ipam, "240.0.0.0/8", "", {"bogus": "1"}, False),
    lambda ipam, pid: request_address(ipam, pid, "250.0.28.2", None),           # taken
    lambda ipam, pid: request_address(ipam, pid, "250.0.29.2", None),           # outside
    lambda ipam, pid: request_address(ipam, pid, "nonsense", None),
    lambda ipam, pid: request_address(ipam, pid, "250.0.28.9", GATEWAY),
    lambda ipam, pid: request_address(ipam, "fan:240.0.0.0/8", "", None),
    lambda ipam, pid: request_address(ipam, pid, "", {ENDPOINT_NAME: 7}),
], ids=["overlap", "route", "v6", "no-address", "unknown-option", "taken", "outside",
        "nonsense", "gateway", "no-pool", "name-not-a-string"])
async def test_failed_request_leaves_the_state_file_unchanged(ipam, ledger, host, store,
                                                              failing_request):
    host.facts = host_facts(routes=("172.30.0.0/16", "10.0.0.0/8"))
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    await request_address(ipam, pid, "", GATEWAY)
    await request_address(ipam, pid, "", None)
    before_file, before_state = state_bytes(store), ledger.state.to_json()

    with pytest.raises(FanError):
        await failing_request(ipam, pid)

    assert state_bytes(store) == before_file
    assert ledger.state.to_json() == before_state


# --- the IPAM as Docker 29 calls it: names, memory in the state file -------------------

async def test_containers_keep_their_addresses_as_docker_29_restarts_them(ipam, ledger):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    await request_address(ipam, pid, "", GATEWAY)
    web = (await request_address(ipam, pid, "", named("web")))["Address"]
    db = (await request_address(ipam, pid, "", named("db")))["Address"]
    for address in (web, db):                              # both stop
        await release_address(ipam, pid, address.split("/")[0])

    newcomer = (await request_address(ipam, pid, "", named("cache")))["Address"]
    again = [(await request_address(ipam, pid, "", named(n)))["Address"] for n in ("db", "web")]

    assert (web, db, newcomer) == ("250.0.28.2/24", "250.0.28.3/24", "250.0.28.4/24")
    assert again == [db, web]
    assert ledger.state.pools[pid].addresses == {
        "250.0.28.1": Owner.GATEWAY, "250.0.28.2": Owner.PENDING, "250.0.28.3": Owner.PENDING,
        "250.0.28.4": Owner.PENDING}


async def test_the_memory_lives_in_the_state_file_across_a_restart(ipam, ledger, store, host):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    web = (await request_address(ipam, pid, "", named("web")))["Address"]
    await release_address(ipam, pid, web)
    store.close()

    again = Store(store.directory)
    try:
        restarted = IpamDriver(Ledger(again, again.open()), host.read_facts,
                               UnderlaySpec.parse("default/16"))
        assert (await request_address(restarted, pid, "", named("other")))["Address"] != web
        assert (await request_address(restarted, pid, "", named("web")))["Address"] == web
    finally:
        again.close()


async def test_the_memory_goes_with_the_pool(ipam, ledger):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    web = (await request_address(ipam, pid, "", named("web")))["Address"]
    await release_address(ipam, pid, web)
    assert ledger.state.pools[pid].remembered == {"web": "250.0.28.2"}

    await release_pool(ipam, pid)
    await request_pool(ipam, "250.0.0.0/8", "", {}, False)

    assert ledger.state.pools[pid].remembered == {}


async def test_without_names_nothing_is_remembered(ipam, ledger):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    first = (await request_address(ipam, pid, "", {}))["Address"]
    await request_address(ipam, pid, "", None)
    await release_address(ipam, pid, first)

    assert (await request_address(ipam, pid, "", {}))["Address"] == first
    assert ledger.state.pools[pid].remembered == {}


# --- a request that changes nothing writes nothing ---------------------------------------

def file_identity(store: Store) -> tuple:
    st = (store.directory / STATE_FILE).stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


@pytest.mark.parametrize("no_op", [
    lambda ipam, pid: release_address(ipam, pid, "250.0.28.250"),     # never handed out
    lambda ipam, pid: release_address(ipam, pid, "250.0.28.2"),       # released already
    lambda ipam, pid: release_address(ipam, "fan:251.0.0.0/8", "251.0.28.2"),
    lambda ipam, pid: release_pool(ipam, "fan:251.0.0.0/8"),
    lambda ipam, pid: request_address(ipam, pid, "", GATEWAY),         # holds it already
], ids=["unknown-address", "released-twice", "unknown-pool", "unknown-pool-release",
        "gateway-again"])
async def test_a_request_that_changes_nothing_does_not_write_the_file(ipam, store, no_op):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    await request_address(ipam, pid, "", GATEWAY)
    await request_address(ipam, pid, "", named("web"))
    await release_address(ipam, pid, "250.0.28.2")
    before = file_identity(store), state_bytes(store)

    await no_op(ipam, pid)
    await no_op(ipam, pid)

    assert (file_identity(store), state_bytes(store)) == before


async def test_a_request_that_changes_something_replaces_the_file(ipam, store):
    pid = (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"]
    before = file_identity(store)

    await request_address(ipam, pid, "", None)

    assert file_identity(store)[0] != before[0]
    assert "250.0.28.2" in store.load().pools[pid].addresses
