"""What keeps the plugin's state right across crashes, without a kernel: crash
points, the ledger's commit and rollback, Docker's rollback calls (ReleasePool,
ReleaseAddress) removing what Docker gave up on, and the grace period for
what was handed out when the plugin stopped. The end-to-end side is
tests/e2e/test_reliability.py."""
import asyncio
import json
import re
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from fan_driver import faults as faults_mod
from fan_driver.config import UnderlaySpec
from fan_driver.errors import FanError
from fan_driver.faults import ENV, POINTS, Faults
from fan_driver.hostfacts import HostFacts, Interface, KernelFeatures
from fan_driver.ipam import IpamDriver
from fan_driver.model import Endpoint, Network, Owner, Pool, State
from fan_driver.network import NetworkDriver
from fan_driver.protocol import GATEWAY_REQUEST
from fan_driver.cli import parse_args
from fan_driver.reconcile import UNCLAIMED_GRACE, Reconciler
from fan_driver.store import STATE_FILE, Store

from tests.unit.docker_calls import (create_endpoint, create_network, delete_endpoint,
                                     delete_network, release_address, release_pool,
                                     request_address, request_pool)

from tests.unit.fakes import FakeDataplane

PACKAGE = Path(__file__).resolve().parents[2] / "fan_driver"
NID, EID, EID2 = "a" * 64, "b" * 64, "c" * 64
PID = "fan:250.0.0.0/8"


# --- crash points ------------------------------------------------------------------------

def test_faults_are_a_no_op_when_unset():
    faults = Faults.from_env({})
    assert faults.point is None
    for point in POINTS:
        faults.check(point)


@pytest.mark.parametrize("text", ["nowhere", "create_network", "create_network:after_kernel@0",
                                  "create_network:after_kernel@x"])
def test_an_unknown_crash_point_is_refused_at_start(text):
    with pytest.raises(FanError, match=ENV):
        Faults(text)


def test_crash_on_the_nth_time(monkeypatch):
    exits = []
    monkeypatch.setattr(faults_mod.os, "_exit", exits.append)
    faults = Faults.from_env({ENV: "join:after_kernel@3"})
    for _ in range(2):
        faults.check("join:after_kernel")
        faults.check("leave:before_reply")
    assert exits == []
    faults.check("join:after_kernel")
    assert exits == [137]


def test_every_checkpoint_in_the_code_is_a_known_point_and_every_point_is_used():
    used = set()
    for path in PACKAGE.rglob("*.py"):
        used |= set(re.findall(r'faults\.check\("([^"]+)"\)', path.read_text()))
    assert used == set(POINTS)


# --- the ledger ----------------------------------------------------------------------------


def saved(ledger) -> dict:
    return json.loads((ledger.store.directory / STATE_FILE).read_text())


async def test_a_failed_change_leaves_memory_and_file_as_they_were(ledger):
    async with ledger.change() as state:
        state.pools[PID] = pool()
    with pytest.raises(FanError):
        async with ledger.change() as state:
            state.pools[PID].addresses["250.0.28.9"] = ""
            del state.pools[PID]
            raise FanError("no")
    assert ledger.state.pools == {PID: pool()}
    assert saved(ledger)["pools"][PID]["addresses"] == {}


async def test_commit_saves_at_once_and_a_later_failure_keeps_it(ledger):
    async with ledger.change() as state:
        state.pools[PID] = pool()
    with pytest.raises(FanError):
        async with ledger.change() as state:
            del state.pools[PID]
            ledger.commit()
            assert saved(ledger)["pools"] == {}
            raise FanError("the kernel part failed")
    assert ledger.state.pools == {}


def test_state_json_round_trip_shares_nothing():
    state = State(pools={PID: pool(addresses={"250.0.28.2": EID})},
                  networks={NID: Network(pool_id=PID, encap="vxlan", mapping="ebpf", mtu=1450,
                                         tc_pref=1, endpoints={EID: endpoint()})})
    data = state.to_json()
    again = State.from_json(data)
    assert again == state
    again.pools[PID].addresses.clear()
    again.networks[NID].endpoints.clear()
    assert State.from_json(data) == state


def test_state_files_without_the_unclaimed_flag_still_load(tmp_path):
    old = {"version": 1, "networks": {}, "pools": {PID: {
        "overlay": "250.0.0.0/8", "underlay": "172.30.0.0/16", "underlay_address": "172.30.0.28",
        "interface": "eth0", "mtu": 1500, "host_reserve": 1, "addresses": {}}}}
    (tmp_path / STATE_FILE).write_text(json.dumps(old, indent=1))
    assert Store(tmp_path).load().pools[PID].unclaimed is False


# --- drivers over a fake dataplane ------------------------------------------------------

def pool(addresses=None) -> Pool:
    return Pool(overlay="250.0.0.0/8", underlay="172.30.0.0/16", underlay_address="172.30.0.28",
                interface="eth0", mtu=1500, addresses=dict(addresses or {}))


def endpoint(last=2) -> Endpoint:
    return Endpoint(address=f"250.0.28.{last}/24", mac=f"0e:fa:fa:00:1c:{last:02x}")


async def read_facts() -> HostFacts:
    return HostFacts(
        interfaces=(Interface("eth0", 1500, (IPv4Interface("172.30.0.28/16"),)),
                    Interface("eth1", 1500, (IPv4Interface("253.0.28.9/32"),))),
        default_interface="eth0", routes=(IPv4Network("172.30.0.0/16"),))


@pytest.fixture
def drivers(ledger):
    dataplane = FakeDataplane()
    features = KernelFeatures(fan_map=False, ipip=False, vxlan=True, ebpf=True)
    network = NetworkDriver(ledger, dataplane, features, read_facts)
    ipam = IpamDriver(ledger, read_facts, UnderlaySpec.parse("default/16"), network=network)
    return network, ipam, dataplane


async def create(network, ipam, with_endpoint=True):
    await request_pool(ipam, "250.0.0.0/8", "", {}, False)
    await request_address(ipam, PID, "", {"RequestAddressType": GATEWAY_REQUEST})
    await create_network(network, NID, {}, [{"AddressSpace": "fan", "Pool": "250.0.0.0/8"}], [])
    if with_endpoint:
        address = (await request_address(ipam, PID, "", None))["Address"]
        await create_endpoint(network, NID, EID, {"Address": address})
        return address


async def test_release_pool_of_a_live_network_removes_the_network(drivers, ledger):
    """Docker releases the pool before DeleteNetwork, or instead of it when it
    gave up creating the network: either way the network is done with."""
    network, ipam, dataplane = drivers
    await create(network, ipam, with_endpoint=False)
    await release_address(ipam, PID, "250.0.28.1")
    await release_pool(ipam, PID)
    assert ledger.state == State() and saved(ledger)["networks"] == {}
    assert [c[0] for c in dataplane.calls][-1] == "remove_network"
    assert await delete_network(network, NID) == {}     # then DeleteNetwork: nothing left


async def test_release_address_an_endpoint_still_holds_removes_the_endpoint(drivers, ledger):
    """Docker's rollback after a CreateEndpoint it believes failed."""
    network, ipam, dataplane = drivers
    address = await create(network, ipam)
    await release_address(ipam, PID, address)
    assert ledger.state.networks[NID].endpoints == {}
    assert ledger.state.pools[PID].addresses == {"250.0.28.1": "gateway"}
    await asyncio.sleep(0)   # the veth goes after the answer
    assert [c[0] for c in dataplane.calls][-2:] == ["forget", "detach"]
    assert dataplane.calls[-1][1] == (EID,)


async def test_the_normal_order_delete_endpoint_then_release(drivers, ledger):
    network, ipam, dataplane = drivers
    address = await create(network, ipam)
    await delete_endpoint(network, NID, EID)
    assert ledger.state.pools[PID].addresses[address.split("/")[0]] == ""
    await release_address(ipam, PID, address)
    assert ledger.state.pools[PID].addresses == {"250.0.28.1": "gateway"}


async def test_an_address_held_by_another_endpoint_is_refused(drivers, ledger):
    network, ipam, _ = drivers
    address = await create(network, ipam)
    with pytest.raises(FanError, match="already used by endpoint bbbbbbbbbbbb"):
        await create_endpoint(network, NID, EID2, {"Address": address})
    with pytest.raises(FanError, match="already used by gateway"):
        await create_endpoint(network, NID, EID2, {"Address": "250.0.28.1/24"})


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "0e:fa:fa:00:1c", "zz:fa:fa:00:1c:02", 5,
                                 ["0e:fa:fa:00:1c:02"]])
async def test_bad_mac_addresses_are_refused(drivers, mac):
    network, ipam, dataplane = drivers
    await create(network, ipam, with_endpoint=False)
    with pytest.raises(FanError, match="MAC"):
        await create_endpoint(network, NID, EID, {"Address": "250.0.28.9/24", "MacAddress": mac})
    assert "attach" not in [c[0] for c in dataplane.calls]


async def test_an_address_that_is_not_a_string_is_refused(drivers):
    network, ipam, _ = drivers
    await create(network, ipam, with_endpoint=False)
    with pytest.raises(FanError, match="not an IPv4 address"):
        await create_endpoint(network, NID, EID, {"Address": 4194311170})   # 250.0.28.2


async def test_aux_addresses_are_refused(drivers, ledger):
    network, ipam, _ = drivers
    await request_pool(ipam, "250.0.0.0/8", "", {}, False)
    with pytest.raises(FanError, match="aux-address"):
        await create_network(network, NID, {}, [{"AddressSpace": "fan", "Pool": "250.0.0.0/8",
                                               "AuxAddresses": {"r": "250.0.28.9"}}], [])
    assert ledger.state.networks == {}


async def test_an_overlay_holding_a_host_address_is_refused(drivers):
    _, ipam, _ = drivers
    with pytest.raises(FanError, match="holds address 253.0.28.9 of eth1"):
        await request_pool(ipam, "253.0.0.0/8", "", {}, False)


# --- restart: what was in flight ----------------------------------------------------------

async def test_restore_marks_what_was_in_flight_and_the_sweep_releases_it(drivers, ledger):
    network, ipam, dataplane = drivers
    address = await create(network, ipam)
    pending = (await request_address(ipam, PID, "", None))["Address"].split("/")[0]
    await request_pool(ipam, "240.0.0.0/8", "", {}, False)      # no network will come
    reconciler = Reconciler(ledger, dataplane, grace=0.05)
    await reconciler.restore()
    addresses = ledger.state.pools[PID].addresses
    assert addresses[pending] == Owner.UNCLAIMED and addresses[address.split("/")[0]] == EID
    assert ledger.state.pools["fan:240.0.0.0/8"].unclaimed
    assert not ledger.state.pools[PID].unclaimed
    assert saved(ledger)["pools"][PID]["addresses"][pending] == Owner.UNCLAIMED
    await asyncio.wait_for(reconciler._sweep, 5)
    assert pending not in ledger.state.pools[PID].addresses
    assert "fan:240.0.0.0/8" not in ledger.state.pools
    assert ledger.state.pools[PID].addresses[address.split("/")[0]] == EID


async def test_what_docker_claims_in_the_grace_period_stays(drivers, ledger):
    network, ipam, dataplane = drivers
    await create(network, ipam, with_endpoint=False)
    pending = (await request_address(ipam, PID, "", None))["Address"]
    other = (await request_address(ipam, PID, "", None))["Address"].split("/")[0]
    reconciler = Reconciler(ledger, dataplane, grace=0.05)
    await reconciler.restore()
    # The CreateEndpoint dockerd was retrying arrives after the restart...
    await create_endpoint(network, NID, EID, {"Address": pending})
    # ... and an address Docker released, then handed out again, is a new one.
    await release_address(ipam, PID, other)
    await request_address(ipam, PID, other, None)
    await asyncio.wait_for(reconciler._sweep, 5)
    addresses = ledger.state.pools[PID].addresses
    assert addresses[pending.split("/")[0]] == EID and addresses[other] == ""


async def test_an_address_whose_release_was_lost_is_had_again_by_its_container(drivers,
                                                                               ledger):
    """A dockerd restart can stop the plugin between DeleteEndpoint and
    ReleaseAddress: the container that comes back asks for its --ip again."""
    network, ipam, dataplane = drivers
    pinned = (await create(network, ipam)).split("/")[0]
    await delete_endpoint(network, NID, EID)              # ... and no ReleaseAddress
    in_flight = (await request_address(ipam, PID, "", None))["Address"].split("/")[0]
    reconciler = Reconciler(ledger, dataplane, grace=0.05)
    await reconciler.restore()
    assert (await request_address(ipam, PID, pinned, None))["Address"].startswith(pinned + "/")
    await create_endpoint(network, NID, EID2, {"Address": f"{pinned}/24"})
    with pytest.raises(FanError, match=f"address {pinned} is already in use"):
        await request_address(ipam, PID, pinned, None)
    # A new container is not given one that is still unclaimed.
    fresh = (await request_address(ipam, PID, "", None))["Address"].split("/")[0]
    assert fresh not in (pinned, in_flight)
    await asyncio.wait_for(reconciler._sweep, 5)
    addresses = ledger.state.pools[PID].addresses
    assert addresses[pinned] == EID2 and in_flight not in addresses


def test_the_grace_period_is_a_serve_flag():
    assert parse_args(["serve"]).unclaimed_grace == UNCLAIMED_GRACE
    assert parse_args(["serve", "--unclaimed-grace", "2.5"]).unclaimed_grace == 2.5
    with pytest.raises(SystemExit):
        parse_args(["serve", "--unclaimed-grace", "-1"])


async def test_a_pool_left_by_a_crash_does_not_block_the_next_create(drivers, ledger):
    _, ipam, dataplane = drivers
    await request_pool(ipam, "250.0.0.0/8", "", {}, False)     # its reply was lost
    reconciler = Reconciler(ledger, dataplane, grace=60)
    await reconciler.restore()
    reconciler._sweep.cancel()
    assert (await request_pool(ipam, "250.0.0.0/8", "", {}, False))["PoolID"] == PID
    assert not ledger.state.pools[PID].unclaimed


# --- the HTTP layer: dockerd's empty retries and hostile bodies ----------------------------

@pytest.fixture
async def client(drivers):
    from aiohttp.test_utils import TestClient, TestServer

    from fan_driver.server import make_app
    network, ipam, _ = drivers
    async with TestClient(TestServer(make_app(network, ipam))) as client:
        yield client


async def post(client, method, raw: bytes):
    resp = await client.post(f"/{method}", data=raw)
    return resp.status, json.loads(await resp.text())


@pytest.mark.parametrize("method", ["IpamDriver.RequestPool", "IpamDriver.RequestAddress",
                                    "NetworkDriver.CreateNetwork", "NetworkDriver.Leave",
                                    "NetworkDriver.ProgramExternalConnectivity"])
async def test_an_empty_body_is_dockerds_retry_and_fails(client, ledger, method):
    """dockerd re-sends a call that got no answer with an empty body: it must
    not be taken as a call with every field left out (RequestPool would then
    hand out the default overlay)."""
    status, reply = await post(client, method, b"")
    assert status == 500 and "body is empty" in reply["Err"]
    assert ledger.state == State()


@pytest.mark.parametrize("method", ["Plugin.Activate", "NetworkDriver.GetCapabilities",
                                    "IpamDriver.GetCapabilities",
                                    "IpamDriver.GetDefaultAddressSpaces"])
async def test_calls_dockerd_makes_without_a_body(client, method):
    assert (await post(client, method, b""))[0] == 200


@pytest.mark.parametrize("value", ["x" * 64, "A" * 64, "a" * 63, "a" * 65, "$(reboot)",
                                   "a" * 60 + ";rm"])
async def test_ids_must_be_docker_ids(client, value):
    status, reply = await post(client, "NetworkDriver.DeleteNetwork",
                               json.dumps({"NetworkID": value}).encode())
    assert status == 500 and "must be a Docker ID" in reply["Err"]


async def test_errors_quoting_huge_values_are_cut(client):
    status, reply = await post(client, "IpamDriver.RequestPool",
                               json.dumps({"Pool": "x" * 500_000}).encode())
    assert status == 500 and len(reply["Err"]) < 1100 and reply["Err"].endswith("(cut)")


async def test_deeply_nested_json_is_not_json(client):
    status, reply = await post(client, "IpamDriver.ReleasePool", b"[" * 100_000)
    assert status == 500 and "not JSON" in reply["Err"]
