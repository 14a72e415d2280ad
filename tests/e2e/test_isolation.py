"""Isolation on one host, as Docker's bridge driver has it, and a tunnel that
only fan hosts can speak into: real containers of a real dockerd, real traffic.

Six networks: two plain fan networks (eBPF and per-peer routes mappings), an
--internal fan network, a Docker bridge network made before the fan networks,
one made after them, and Docker's default bridge. Nothing new passes between any two of them in either
direction; replies, traffic within a network, egress through NAT and published
ports reached through the host's address still work, also after the plugin
restarts and after a simulated reboot (where dockerd starts after the plugin,
so its rules land in FORWARD after the fan's). A rule in DOCKER-USER applies to
a fan container's traffic to outside the overlay. Containers, fan or bridge,
cannot send tunnel traffic to another underlay host or to this host's tunnels;
VXLAN from outside a network's underlay reaches none of its containers, under
either peer mapping.
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest

from fan_driver.dataplane.encap import TUNNEL_UDP_PORTS
from fan_driver.dataplane.encap.vxlan import vtep_mac
from fan_driver.config import ROUTES_VXLAN_PORT, VXLAN_PORT
from fan_driver.dataplane.firewall import TUNNEL_CHAIN
from fan_driver.fanmap import FanMap
from tests.harness import consistency
from tests.harness.nsclient import container_pid, ns_python
from tests.harness.rulecounters import packets_of, rule_packets

pytestmark = pytest.mark.e2e

HOST = "172.30.0.28"
OUTSIDE = "172.30.255.254"
UNDERLAY = "172.30.0.0/16"
FAN = ["network", "create", "-d", "fan", "--ipam-driver", "fan",
       "--ipam-opt", f"underlay={UNDERLAY}"]
# fan-b finds its peers by per-peer routes (a /20 underlay keeps them few),
# over VXLAN even where encap=auto would take IPIP: the tunnel tests speak VXLAN
ROUTES_UNDERLAY = "172.30.0.0/20"
ROUTES_OVERLAY = "241.0.0.0/8"
ROUTES_FAN = ["network", "create", "-d", "fan", "--ipam-driver", "fan",
              "--ipam-opt", f"underlay={ROUTES_UNDERLAY}", "-o", "mapping=routes",
              "-o", "encap=vxlan"]
PORT = 7000
PUBLISHED = 8470          # fan-a's container, published on the host
BRIDGE_PUBLISHED = 8471   # the early bridge's container, published on the host
# network -> (container, how the network is made)
NETWORKS = {
    "iso-early": ("iso-early-c", ["network", "create", "iso-early"]),
    "fan-a": ("iso-fan-a", [*FAN, "--subnet", "250.0.0.0/8", "fan-a"]),
    "fan-b": ("iso-fan-b", [*ROUTES_FAN, "--subnet", ROUTES_OVERLAY, "fan-b"]),
    "fan-int": ("iso-fan-int", [*FAN, "--internal", "--subnet", "242.0.0.0/8", "fan-int"]),
    "iso-late": ("iso-late-c", ["network", "create", "iso-late"]),
    "bridge": ("iso-default-c", None),
}


@dataclass(frozen=True)
class Tunnel:
    """How hand-made VXLAN for a network's containers reaches this host."""
    vni: int                # the overlay's leading 24 bits
    port: int
    underlay: str
    macs: tuple[str, str]   # the inner frame's (destination, source)


# Hand-made VXLAN to a UDP listener in a network's container. fan-b's own
# kernel device takes only frames to its MAC (else they are for another host);
# they come from the peer's VTEP MAC, as a fan host sends them.
FAN_A_TUNNEL = Tunnel(0xFA0000, VXLAN_PORT, UNDERLAY, ("0e:fa:fa:00:1c:02", "0e:fa:fa:00:1c:01"))
# fan-b's fan host for the routes test: an underlay address of fan-b's (the
# outside's 172.30.255.254 is not in its /20), given to the outside for that test
ROUTES_PEER = "172.30.0.99"
FAN_B_TUNNEL = Tunnel(0xF10000, ROUTES_VXLAN_PORT, ROUTES_UNDERLAY,
                      (vtep_mac(IPv4Address(HOST)), vtep_mac(IPv4Address(ROUTES_PEER))))
TUNNEL_LISTENER = 9999
# For fan-a: an inner source in the slice that the outside's underlay address
# owns, 250.255.254.0/24, so the outside may send it; an address outside the
# underlay (TEST-NET-2), given to the outside for one test.
OUTSIDE_SLICE_SOURCE = "250.255.254.7"
FOREIGN = "198.51.100.7"
PUBLISH = {"fan-a": ["-p", f"{PUBLISHED}:{PORT}"], "iso-early": ["-p", f"{BRIDGE_PUBLISHED}:{PORT}"]}

# Answers each TCP connection with the network's name, forever.
SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
print("listening", flush=True)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[2].encode()); c.close()
"""
# Connects to every argv target (label=address:port) at once; prints
# {label: what the server said, or "blocked"} as JSON.
PROBE = r"""
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
def ask(target):
    label, where = target.split("=")
    address, port = where.rsplit(":", 1)
    try:
        with socket.create_connection((address, int(port)), timeout=2) as c:
            c.settimeout(2)
            return label, c.recv(100).decode()
    except OSError:
        return label, "blocked"
with ThreadPoolExecutor(len(sys.argv) - 1) as pool:
    print(json.dumps(dict(pool.map(ask, sys.argv[1:]))))
"""


def address(dockerd, container: str, network: str) -> str:
    settings = json.loads(dockerd.cli("inspect", container).stdout)[0]["NetworkSettings"]
    return settings["Networks"][network]["IPAddress"]


def probe(dockerd, container: str, targets: dict) -> dict:
    """{label: answer} for TCP connections from `container` to label=address:port."""
    out = ns_python(container_pid(dockerd, container), PROBE,
                    *(f"{label}={where}" for label, where in targets.items()))
    return json.loads(out.stdout)


class Bed:
    """The networks, a container on each serving PORT, a second fan-a container."""

    def __init__(self, dockerd, lab_host):
        self.dockerd, self.host = dockerd, lab_host
        self.servers: list = []

    def create(self) -> None:
        for network, (container, create) in NETWORKS.items():
            if create:
                self.dockerd.cli(*create)
            self.dockerd.cli("run", "-d", "--name", container, "--net", network,
                             "--restart", "always", *PUBLISH.get(network, []),
                             "busybox", "sleep", "36000")
        self.dockerd.cli("run", "-d", "--name", "iso-fan-a2", "--net", "fan-a",
                         "--restart", "always", "busybox", "sleep", "36000")

    def serve(self) -> None:
        self.stop_serving()
        for network, (container, _) in NETWORKS.items():
            proc = subprocess.Popen(
                ["nsenter", "-t", str(container_pid(self.dockerd, container)), "-n",
                 sys.executable, "-c", SERVER, str(PORT), network],
                stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "listening"
            self.servers.append(proc)

    def stop_serving(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()
        self.servers = []

    def addresses(self) -> dict:
        return {network: address(self.dockerd, container, network)
                for network, (container, _) in NETWORKS.items()}

    def remove(self) -> None:
        self.stop_serving()
        containers = [c for c, _ in NETWORKS.values()] + ["iso-fan-a2"]
        self.dockerd.cli("rm", "-f", *containers, check=False)
        for network, (_, create) in NETWORKS.items():
            if create:
                self.dockerd.cli("network", "rm", network, check=False)


@pytest.fixture(scope="module")
def bed(dockerd, plugin, lab_host):
    # only the fan's rules: the reboot below has dockerd write its own again
    before = consistency.kernel_snapshot(lab_host, only_fan_rules=True)
    made = Bed(dockerd, lab_host)
    try:
        made.create()
        made.serve()
        yield made
    finally:
        made.remove()
    assert consistency.kernel_snapshot(lab_host, only_fan_rules=True) == before, \
        "the networks left kernel state"


def assert_isolated(bed) -> None:
    """Every container reaches its own network's server and no other network's;
    published ports answer through the host's address from every network."""
    addresses = bed.addresses()
    for network, (container, _) in NETWORKS.items():
        targets = {other: f"{ip}:{PORT}" for other, ip in addresses.items()}
        # an internal network reaches nothing outside itself; fan-a's published
        # container is the server itself (its neighbour asks below)
        if network not in ("fan-int", "fan-a"):
            targets["fan-a published"] = f"{HOST}:{PUBLISHED}"
        if network != "fan-int":
            targets["bridge published"] = f"{HOST}:{BRIDGE_PUBLISHED}"
        answers = probe(bed.dockerd, container, targets)
        crossed = {other: answer for other, answer in answers.items()
                   if other in NETWORKS and other != network and answer != "blocked"}
        assert not crossed, f"from {network}: reached {crossed}"
        assert answers[network] == network, f"{network} cannot reach itself: {answers}"
        if network not in ("fan-int", "fan-a"):
            assert answers["fan-a published"] == "fan-a", (network, answers)
        if network != "fan-int":
            assert answers["bridge published"] == "iso-early", (network, answers)
    # within fan-a, directly and through the published port (hairpin)
    assert probe(bed.dockerd, "iso-fan-a2", {"a": f"{addresses['fan-a']}:{PORT}",
                                             "published": f"{HOST}:{PUBLISHED}"}) == \
        {"a": "fan-a", "published": "fan-a"}


def assert_egress(bed) -> None:
    bed.dockerd.cli("exec", "iso-fan-a", "ping", "-c", "1", "-W", "2", OUTSIDE)
    result = bed.dockerd.cli("exec", "iso-fan-int", "ping", "-c", "1", "-W", "2", OUTSIDE,
                             check=False)
    assert result.returncode != 0, "an internal fan network reached outside the overlay"


def test_networks_are_isolated_from_each_other(bed):
    assert_isolated(bed)
    assert_egress(bed)


def test_docker_user_rules_apply_to_fan_containers(bed, lab_host):
    source = address(bed.dockerd, "iso-fan-a", "fan-a")
    rule = ["DOCKER-USER", "-s", source, "-d", OUTSIDE, "-j", "DROP"]
    lab_host.run(["iptables", "-I", *rule])
    try:
        result = bed.dockerd.cli("exec", "iso-fan-a", "ping", "-c", "1", "-W", "2", OUTSIDE,
                                 check=False)
        assert result.returncode != 0, "DOCKER-USER's DROP did not apply to a fan container"
    finally:
        lab_host.run(["iptables", "-D", *rule])
    assert_egress(bed)


def test_isolation_survives_a_plugin_restart(bed, plugin):
    plugin.restart()
    assert_isolated(bed)


def test_isolation_after_a_reboot_with_dockerd_rules_after_the_fans(bed, dockerd, plugin,
                                                                     lab_host):
    bed.stop_serving()
    dockerd.kill()
    plugin.kill()
    lab_host.wipe_network()
    plugin.start()
    dockerd.start()
    containers = [c for c, _ in NETWORKS.values()] + ["iso-fan-a2"]
    for container in containers:
        dockerd.cli("start", container)   # restart policies may still be on their way
    forward = lab_host.run(["iptables", "-S", "FORWARD"]).stdout.splitlines()
    assert forward.index("-A FORWARD -j DOCKER-USER") < forward.index("-A FORWARD -j FAN-FORWARD")
    bed.serve()
    assert_isolated(bed)
    assert_egress(bed)
    consistency.settled(plugin, dockerd, lab_host)


# --- the tunnel: only this host's own encapsulation reaches it ------------------------------

def vxlan_datagram(tunnel: Tunnel, inner_src: str, inner_dst: str, port: int,
                   payload: bytes) -> bytes:
    """VXLAN (flags: VNI valid) carrying an Ethernet frame with an IPv4/UDP datagram."""
    def ip(text: str) -> bytes:
        return bytes(int(b) for b in text.split("."))
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                         ip(inner_src), ip(inner_dst))
    checksum = sum(struct.unpack("!10H", header))
    while checksum > 0xFFFF:
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
    header = header[:10] + struct.pack("!H", ~checksum & 0xFFFF) + header[12:]
    macs = b"".join(bytes.fromhex(mac.replace(":", "")) for mac in tunnel.macs)
    frame = macs + bytes.fromhex("0800") + header + udp
    return struct.pack("!II", 0x08000000, tunnel.vni << 8) + frame


# Sends argv[1] (hex) to argv[2]:argv[3] over UDP, argv[4] times, from argv[5]
# if given (else the address the route picks).
SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if len(sys.argv) > 5:
    s.bind((sys.argv[5], 0))
for _ in range(int(sys.argv[4])):
    s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], int(sys.argv[3])))
"""
# Takes UDP datagrams to argv[1] for argv[2] seconds; prints them as a JSON
# list (bytes as latin-1, so that any datagram prints).
RECEIVE = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.2); got = []; end = time.monotonic() + float(sys.argv[2])
print("listening", flush=True)
while time.monotonic() < end:
    try:
        got.append(s.recv(2000).decode("latin-1"))
    except OSError:
        pass
print(json.dumps(got), flush=True)
"""


def listening(prefix: list, port: int, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([*prefix, sys.executable, "-c", RECEIVE, str(port), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    return proc


def received(proc: subprocess.Popen) -> list[str]:
    out, _ = proc.communicate(timeout=30)
    return json.loads(out)


def in_container(bed, container: str) -> list[str]:
    return ["nsenter", "-t", str(container_pid(bed.dockerd, container)), "-n"]


def send_vxlan(lab, payload: bytes, inner_source: str, target: str,
               outer_source: str = OUTSIDE, tunnel: Tunnel = FAN_A_TUNNEL) -> None:
    """One VXLAN datagram for `target` from the outside namespace."""
    datagram = vxlan_datagram(tunnel, inner_source, target, TUNNEL_LISTENER, payload)
    lab.outside.run([sys.executable, "-c", SEND, datagram.hex(), HOST, str(tunnel.port), "1",
                     outer_source])


@pytest.mark.parametrize("sender", ["fan-a", "iso-early"])
def test_containers_cannot_send_tunnel_traffic(bed, lab, lab_host, sender):
    """To another underlay host (the outside namespace, listening on the VXLAN
    ports) and to this host's own tunnel, carrying a datagram for a fan-a
    container: nothing arrives. In the same seconds each listener takes what
    may reach it: the lab host's own datagram on each port outside, and the
    outside's VXLAN from its own slice in the fan-a container."""
    container = NETWORKS[sender][0]
    target = address(bed.dockerd, "iso-fan-a", "fan-a")
    datagram = vxlan_datagram(FAN_A_TUNNEL, target.rsplit(".", 1)[0] + ".200", target,
                              TUNNEL_LISTENER, b"from a container")
    pid = str(container_pid(bed.dockerd, container))
    outside = [listening(["ip", "netns", "exec", lab.outside.name], port, 4)
               for port in TUNNEL_UDP_PORTS]
    inside = listening(in_container(bed, "iso-fan-a"), TUNNEL_LISTENER, 4)
    for where in (OUTSIDE, HOST, "250.0.28.1"):
        for port in TUNNEL_UDP_PORTS:
            subprocess.run(["nsenter", "-t", pid, "-n", sys.executable, "-c", SEND,
                            datagram.hex(), where, str(port), "5"], check=True, timeout=30)
    # the host's own datagrams leave through OUTPUT, which the routed-tunnel rule spares
    for port in TUNNEL_UDP_PORTS:
        lab_host.run([sys.executable, "-c", SEND, b"from the lab host".hex(), OUTSIDE,
                      str(port), "1"])
    send_vxlan(lab, b"from the outside", OUTSIDE_SLICE_SOURCE, target)
    assert [received(p) for p in outside] == [["from the lab host"]] * len(TUNNEL_UDP_PORTS), \
        "tunnel traffic left a container, or the lab host's own did not arrive"
    assert received(inside) == ["from the outside"], \
        "a container's VXLAN datagram reached a fan container, or the outside's did not"


def foreign_vxlan_drops(lab_host, tunnel: Tunnel = FAN_A_TUNNEL) -> int:
    """Packets dropped by the raw rule against a network's VXLAN from outside its underlay."""
    rules = rule_packets(lab_host.run(["iptables", "-w", "-t", "raw", "-S", TUNNEL_CHAIN,
                                       "-v"]).stdout)
    packets = packets_of(rules, rf"^-A {TUNNEL_CHAIN} ! -s {re.escape(tunnel.underlay)} ",
                         rf"--dport {tunnel.port} ", rf"={tunnel.vni:#x}\b", r"-j DROP$")
    assert packets is not None, f"no raw rule against VXLAN from outside {tunnel}: {rules}"
    return packets


def test_the_outside_reaches_the_same_container_through_the_tunnel_only_as_a_fan_host(
        bed, lab, lab_host):
    """VXLAN for one fan-a container: (a) from an address outside the underlay
    (its inner source the outside's own slice), dropped by the fan's raw rule;
    (b) from the outside's underlay address 172.30.255.254, which owns
    250.255.254.0/24, speaking for this host's slice; (c) from that address
    and its own slice. Only (c) arrives."""
    target = address(bed.dockerd, "iso-fan-a", "fan-a")
    # The lab host would take (a)'s source on eth0 (its route back goes out
    # there; `ip route get` fails as rp_filter would drop it): only the fan
    # stands in (a)'s way.
    accepted = lab_host.run(["ip", "route", "get", HOST, "from", FOREIGN, "iif", "eth0"])
    assert accepted.stdout.startswith(f"local {HOST} from {FOREIGN} "), accepted.stdout
    lab.outside.run(["ip", "addr", "add", f"{FOREIGN}/32", "dev", "eth0"])
    try:
        inside = listening(in_container(bed, "iso-fan-a"), TUNNEL_LISTENER, 3)
        drops_before = foreign_vxlan_drops(lab_host)
        send_vxlan(lab, b"a", OUTSIDE_SLICE_SOURCE, target, outer_source=FOREIGN)
        send_vxlan(lab, b"b", "250.0.28.200", target)
        send_vxlan(lab, b"c", OUTSIDE_SLICE_SOURCE, target)
        arrived = received(inside)
        dropped = foreign_vxlan_drops(lab_host) - drops_before
    finally:
        lab.outside.run(["ip", "addr", "del", f"{FOREIGN}/32", "dev", "eth0"], check=False)
    assert arrived == ["c"], f"arrived: {arrived} (a: from outside the underlay, " \
        "b: an underlay host speaking for another's slice, c: for its own)"
    assert dropped == 1, f"the raw rule against VXLAN from outside the underlay dropped {dropped}"


def test_the_routes_tunnel_takes_an_underlay_host_and_drops_the_outside(bed, lab, lab_host):
    """VXLAN for fan-b's container, which the kernel's own device of the
    network decapsulates (mapping=routes): (a) from the outside's address
    172.30.255.254, outside fan-b's underlay, dropped by the fan's raw rule;
    (b) from the underlay address 172.30.0.99 speaking for its own slice;
    (c) from that address speaking for another host's slice. (b) and (c)
    arrive: under routes the fan enforces the outer source and the VNI, not
    the slice (README, "The tunnel's trust")."""
    target = address(bed.dockerd, "iso-fan-b", "fan-b")
    fan = FanMap(IPv4Network(ROUTES_OVERLAY), IPv4Network(ROUTES_UNDERLAY))
    own_slice_source = str(fan.slice_for(IPv4Address(ROUTES_PEER))[7])
    other_slice_source = str(fan.slice_for(IPv4Address("172.30.0.5"))[7])
    # The lab host would take (b)'s outer source on eth0: rp_filter does not stand in its way.
    accepted = lab_host.run(["ip", "route", "get", HOST, "from", ROUTES_PEER, "iif", "eth0"])
    assert accepted.stdout.startswith(f"local {HOST} from {ROUTES_PEER} "), accepted.stdout
    lab.outside.run(["ip", "addr", "add", f"{ROUTES_PEER}/32", "dev", "eth0"])
    try:
        inside = listening(in_container(bed, "iso-fan-b"), TUNNEL_LISTENER, 3)
        drops_before = foreign_vxlan_drops(lab_host, FAN_B_TUNNEL)
        send_vxlan(lab, b"a", own_slice_source, target, tunnel=FAN_B_TUNNEL)
        send_vxlan(lab, b"b", own_slice_source, target, outer_source=ROUTES_PEER,
                   tunnel=FAN_B_TUNNEL)
        send_vxlan(lab, b"c", other_slice_source, target, outer_source=ROUTES_PEER,
                   tunnel=FAN_B_TUNNEL)
        arrived = received(inside)
        dropped = foreign_vxlan_drops(lab_host, FAN_B_TUNNEL) - drops_before
    finally:
        lab.outside.run(["ip", "addr", "del", f"{ROUTES_PEER}/32", "dev", "eth0"], check=False)
    assert arrived == ["b", "c"], f"arrived: {arrived} (a: from outside the underlay, " \
        "b: an underlay host for its own slice, c: for another's)"
    assert dropped == 1, f"the raw rule against VXLAN from outside the underlay dropped {dropped}"
