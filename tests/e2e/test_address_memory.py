"""A container keeps its address, when Docker 29 or later names it.

Docker 29 sends the container's name with every RequestAddress
(`com.docker.network.endpoint.name`, moby PR 50586). No Docker 29 runs here,
so these tests make the calls it makes, in its order, against the real plugin
process in a lab host of its own (fanlab-h31) with real kernel objects:

    docker run / start   RequestAddress (with the name), CreateEndpoint, Join,
                         ProgramExternalConnectivity
                         (daemon/libnetwork/network.go createEndpoint, endpoint.go
                         sbJoin; drivers/remote and ipams/remote for the bodies)
    docker stop          RevokeExternalConnectivity, Leave, DeleteEndpoint,
                         ReleaseAddress
    dockerd's start after a crash or a reboot, for containers that were running:
                         DeleteEndpoint, ReleaseAddress (sandbox delete, forced:
                         no Leave)

Docker 20.10 and 28 send no name: the last test shows addresses handed out as
before, the lowest free one first.
"""
from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from fan_driver.protocol import ENDPOINT_NAME, GATEWAY_REQUEST
from tests.harness import PluginProcess
from tests.harness.consistency import kernel_view

pytestmark = pytest.mark.e2e

HOST = ("h31", "172.30.0.31/16")
SUBNET, UNDERLAY = "250.0.0.0/8", "172.30.0.0/16"
SLICE = "250.0.31."
BRIDGE = "fan-250-0-31"
NO_PORTS = {"com.docker.network.endpoint.exposedports": [], "com.docker.network.portmap": []}


class Docker29:
    """The plugin calls dockerd 29 makes for one fan network and its containers."""

    def __init__(self, plugin: PluginProcess, send_names: bool = True):
        self.plugin = plugin
        self.send_names = send_names
        self.network_id = secrets.token_hex(32)
        self.pool_id = ""
        self.running: dict = {}      # container name -> (endpoint ID, address/len)

    def call(self, method: str, body: dict) -> dict:
        status, reply = self.plugin.call(method, body)
        assert status == 200, f"{method} {body}: HTTP {status} {reply}"
        return reply

    def create_network(self) -> None:
        self.call("Plugin.Activate", {})
        self.call("IpamDriver.GetCapabilities", {})
        self.call("IpamDriver.GetDefaultAddressSpaces", {})
        self.pool_id = self.call("IpamDriver.RequestPool", {
            "AddressSpace": "fan", "Pool": SUBNET, "SubPool": "",
            "Options": {"underlay": UNDERLAY}, "V6": False})["PoolID"]
        gateway = self.call("IpamDriver.RequestAddress", {
            "PoolID": self.pool_id, "Address": "",
            "Options": {"underlay": UNDERLAY, "RequestAddressType": GATEWAY_REQUEST}})["Address"]
        self.call("NetworkDriver.GetCapabilities", {})
        self.call("NetworkDriver.CreateNetwork", {
            "NetworkID": self.network_id,
            "Options": {"com.docker.network.enable_ipv4": True,
                        "com.docker.network.enable_ipv6": False,
                        "com.docker.network.generic": {}},
            "IPv4Data": [{"AddressSpace": "fan", "Pool": SUBNET, "Gateway": gateway,
                          "AuxAddresses": None}],
            "IPv6Data": []})

    def start(self, name: str) -> str:
        """`docker start NAME` (or run); returns the container's address."""
        options = {ENDPOINT_NAME: name} if self.send_names else {}
        address = self.call("IpamDriver.RequestAddress", {
            "PoolID": self.pool_id, "Address": "", "Options": options})["Address"]
        eid = secrets.token_hex(32)
        ids = {"NetworkID": self.network_id, "EndpointID": eid}
        self.call("NetworkDriver.CreateEndpoint", {
            **ids, "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": ""},
            "Options": NO_PORTS})
        self.call("NetworkDriver.Join", {**ids, "SandboxKey": f"/var/run/docker/netns/{eid[:12]}",
                                         "Options": NO_PORTS})
        self.call("NetworkDriver.ProgramExternalConnectivity", {**ids, "Options": NO_PORTS})
        self.running[name] = (eid, address)
        return address.split("/")[0]

    def stop(self, name: str) -> None:
        eid, address = self.running.pop(name)
        ids = {"NetworkID": self.network_id, "EndpointID": eid}
        self.call("NetworkDriver.RevokeExternalConnectivity", ids)
        self.call("NetworkDriver.Leave", ids)
        self.call("NetworkDriver.DeleteEndpoint", ids)
        self.call("IpamDriver.ReleaseAddress", {"PoolID": self.pool_id,
                                                "Address": address.split("/")[0]})

    def clean_up_after_crash(self, name: str) -> None:
        """What dockerd does at its start for a container that was running."""
        eid, address = self.running.pop(name)
        self.call("NetworkDriver.DeleteEndpoint", {"NetworkID": self.network_id,
                                                   "EndpointID": eid})
        self.call("IpamDriver.ReleaseAddress", {"PoolID": self.pool_id,
                                                "Address": address.split("/")[0]})

    def remove_network(self) -> None:
        for name in list(self.running):
            self.stop(name)
        self.call("IpamDriver.ReleaseAddress", {"PoolID": self.pool_id,
                                                "Address": SLICE + "1"})
        self.call("IpamDriver.ReleasePool", {"PoolID": self.pool_id})
        self.call("NetworkDriver.DeleteNetwork", {"NetworkID": self.network_id})


@pytest.fixture(scope="module")
def plugin31(lab):
    """A plugin process of its own in its own lab host: restarts and a reboot
    here disturb nothing of the session's."""
    host = lab.add_host(*HOST)
    work = Path(tempfile.mkdtemp(prefix="fanlab-h31-"))
    plugin = PluginProcess(host, socket_path=work / "fan.sock", state_dir=work / "state",
                           log_path=work / "plugin.log")
    try:
        plugin.start()
        yield plugin
    finally:
        lab.remove_host(HOST[0])       # stops the plugin, removes the namespace
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def docker(plugin31, request):
    docker = Docker29(plugin31, send_names=getattr(request, "param", True))
    docker.create_network()
    yield docker
    plugin31.start()
    docker.remove_network()
    assert state(plugin31)["pools"] == {}, "the memory stays after its pool went"


def state(plugin) -> dict:
    return json.loads((plugin.state_dir / "state.json").read_text())


def bridge_ports(plugin) -> set:
    """The ports of the fan's bridge, which must be there, marked as ours."""
    kernel = kernel_view(plugin.host)
    assert BRIDGE in kernel["marked"], kernel["marked"]
    return kernel["ports"].get(BRIDGE, set())


def assert_attached(plugin, docker) -> None:
    """A veth on the bridge per running container, and the plugin reports each
    container's address."""
    ports = bridge_ports(plugin)
    for name, (eid, address) in docker.running.items():
        assert f"fve{eid[:12]}" in ports, (name, ports)
        info = docker.call("NetworkDriver.EndpointOperInfo",
                           {"NetworkID": docker.network_id, "EndpointID": eid})
        assert info["Value"]["Address"] == address, (name, info)


def test_docker_29_containers_keep_their_addresses_through_every_kind_of_restart(
        plugin31, docker):
    first = {name: docker.start(name) for name in ("web", "db", "cache")}
    assert first == {"web": SLICE + "2", "db": SLICE + "3", "cache": SLICE + "4"}

    # docker restart web; docker stop db; a new container; docker start db
    docker.stop("web")
    assert docker.start("web") == first["web"]
    docker.stop("db")
    assert docker.start("newcomer") == SLICE + "5"     # not db's free address
    assert docker.start("db") == first["db"]

    # the plugin restarts while they run; later, web restarts
    plugin31.restart()
    docker.stop("web")
    assert docker.start("late") == SLICE + "6"
    assert docker.start("web") == first["web"]
    assert_attached(plugin31, docker)

    # dockerd restarts: it stops every container, then starts them in its own order
    order = list(docker.running)
    addresses = {name: docker.running[name][1].split("/")[0] for name in order}
    for name in order:
        docker.stop(name)
    assert {name: docker.start(name) for name in reversed(order)} == addresses

    # a reboot: plugin and dockerd die, the kernel forgets everything; at boot the
    # plugin restores the fan, dockerd drops the dead endpoints, then starts a
    # container of a new name first and the restart-policy ones after it
    plugin31.kill()
    plugin31.host.wipe_network()
    plugin31.start()
    assert bridge_ports(plugin31) == set()     # the fan is back; dead containers' veths not
    for name in order:
        docker.clean_up_after_crash(name)
    assert docker.start("after-boot") == SLICE + "7"
    assert {name: docker.start(name) for name in order} == addresses
    assert_attached(plugin31, docker)


def test_a_request_that_changes_nothing_leaves_the_state_file_alone(plugin31, docker):
    docker.start("web")
    docker.stop("web")
    path = plugin31.state_dir / "state.json"
    before = path.stat()

    for _ in range(2):
        for address in (SLICE + "2", SLICE + "250"):    # released already, never handed out
            docker.call("IpamDriver.ReleaseAddress", {"PoolID": docker.pool_id,
                                                      "Address": address})
        docker.call("NetworkDriver.DeleteEndpoint", {"NetworkID": docker.network_id,
                                                     "EndpointID": secrets.token_hex(32)})

    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert state(plugin31)["pools"][docker.pool_id]["remembered"] == [["web", SLICE + "2"]]


@pytest.mark.parametrize("docker", [False], indirect=True, ids=["docker-28-no-names"])
def test_without_names_the_lowest_free_address_goes_first_as_before(plugin31, docker):
    assert [docker.start(name) for name in ("a", "b")] == [SLICE + "2", SLICE + "3"]
    docker.stop("a")

    assert docker.start("c") == SLICE + "2"
    assert docker.start("a") == SLICE + "4"
    assert state(plugin31)["pools"][docker.pool_id]["remembered"] == []
