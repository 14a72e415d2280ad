"""Containers on different hosts reach each other over the fan.

Hosts are network namespaces on one underlay switch, each with its own dockerd
(all of the session daemon's flavour, so the module runs once per Docker
version) and its own plugin process, and every host runs the same `docker
network create`. Nothing on a host is told about any other host.
"""
from __future__ import annotations

import itertools
import time
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fan_driver.config import ROUTES_VXLAN_PORT, VXLAN_PORT
from tests.harness.consistency import kernel_snapshot
from tests.harness.fanhosts import CREATE, FanHost, start_host

pytestmark = pytest.mark.e2e

EXTRA_HOSTS = {"h27": "172.30.0.27/16", "h59": "172.30.5.9/16"}
LATE_HOST = ("h7200", "172.30.7.200/16")
SLICES = {"h27": "250.0.27.", "h28": "250.0.28.", "h59": "250.5.9.", "h7200": "250.7.200."}
# Container -> its host (routed: -1) -> the peer host (routed: -1) -> container.
TTL_ACROSS = 62
PEERS_IN_20 = 4094 - 1   # usable hosts of a /20 underlay, less this one


@pytest.fixture(scope="module")
def fan_hosts(lab, lab_host, dockerd, plugin):
    workdirs = []
    hosts = [FanHost("h28", lab_host, dockerd)]
    try:
        hosts += [start_host(lab, n, a, workdirs, dockerd.flavour) for n, a in EXTRA_HOSTS.items()]
        for h in hosts:
            h.dockerd.cli(*CREATE, "fan")
        yield hosts, (lambda n, a: start_host(lab, n, a, workdirs, dockerd.flavour))
    finally:
        dockerd.cli("rm", "-f", "fan-on-h28", check=False)
        dockerd.cli("network", "rm", "fan", check=False)
        # The hosts go with their dockerd and plugin (the lab's cleanups for
        # them): the module runs again for the next dockerd flavour.
        for name in [n for n, h in lab.hosts.items() if h is not lab_host]:
            lab.remove_host(name)
        # h28 would keep sending to the removed hosts' MAC addresses (its
        # neighbour entries) when hosts with their addresses come back
        lab_host.run(["ip", "neigh", "flush", "dev", "eth0"])
        for work in workdirs:
            shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def containers(fan_hosts):
    hosts, _ = fan_hosts
    return {h.name: h.run_container() for h in hosts}


def test_each_host_has_its_own_slice(fan_hosts, containers):
    for name, address in containers.items():
        assert address.startswith(SLICES[name])


@pytest.mark.parametrize("src,dst", list(itertools.permutations(["h27", "h28", "h59"], 2)))
def test_ping_between_hosts_is_routed(fan_hosts, containers, src, dst):
    hosts = {h.name: h for h in fan_hosts[0]}
    out = hosts[src].exec("ping", "-c", "2", "-W", "3", containers[dst]).stdout
    assert f"ttl={TTL_ACROSS}" in out, out


def transfer(sender: FanHost, receiver: FanHost, sender_address: str, megabytes: int = 10):
    """Random bytes over TCP from one container to another (busybox httpd serves,
    wget fetches); checksums compared."""
    sender.exec("sh", "-c", "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/data "
                f"bs=1M count={megabytes} 2>/dev/null")
    sender.dockerd.cli("exec", "-d", sender.container, "httpd", "-f", "-p", "8080",
                       "-h", "/tmp/www")
    try:
        sent = sender.exec("md5sum", "/tmp/www/data").stdout.split()[0]
        for _ in range(20):   # httpd needs a moment to listen
            got = receiver.exec("wget", "-q", "-O", "/tmp/in",
                                f"http://{sender_address}:8080/data", check=False)
            if got.returncode == 0:
                break
            receiver.exec("sleep", "0.2")
        assert got.returncode == 0, got.stderr
        size = int(receiver.exec("sh", "-c", "wc -c < /tmp/in").stdout)
        received = receiver.exec("md5sum", "/tmp/in").stdout.split()[0]
    finally:
        sender.exec("pkill", "httpd", check=False)   # inside the container only
    assert (size, received) == (megabytes << 20, sent)


@pytest.mark.parametrize("src,dst", list(itertools.permutations(["h27", "h28", "h59"], 2)))
def test_10mb_transfer_between_hosts_arrives_intact(fan_hosts, containers, src, dst):
    hosts = {h.name: h for h in fan_hosts[0]}
    transfer(hosts[src], hosts[dst], containers[src])


def forwarded_datagrams(h: FanHost) -> int:
    """IP datagrams this host has routed from one interface to another."""
    lines = [line.split() for line in h.host.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Ip:")]
    return int(lines[1][lines[0].index("ForwDatagrams")])


def packets(h: FanHost, device: str, direction: str) -> int:
    out = h.host.run(["ip", "-s", "-j", "link", "show", device]).stdout
    return json.loads(out)[0]["stats64"][direction]["packets"]


def counters(h: FanHost) -> tuple:
    """Routed datagrams, packets the bridge sent, packets fan-vxlan received."""
    bridge = "fan-" + SLICES[h.name].rstrip(".").replace(".", "-")
    return forwarded_datagrams(h), packets(h, bridge, "tx"), packets(h, "fan-vxlan", "rx")


def test_overlay_traffic_takes_the_ebpf_shortcut_past_ip_forwarding(fan_hosts, containers):
    hosts = {h.name: h for h in fan_hosts[0]}
    if hosts["h59"].host.run(["ip", "link", "show", "fan-vxlan"], check=False).returncode:
        pytest.skip("the fan here is not VXLAN with the eBPF mapping: the receive "
                    "shortcut is VXLAN's only")
    names = ("h27", "h59")
    before = {n: counters(hosts[n]) for n in names}
    transfer(hosts["h27"], hosts["h59"], containers["h27"])
    after = {n: counters(hosts[n]) for n in names}
    # 10 MiB is thousands of packets each way: the kernel's path would route them
    # all, and going through the bridge it would send them all; straight into the
    # container neither happens (a few ARP exchanges may). Taken off the underlay
    # device's ingress, they never reach fan-vxlan either.
    assert all(after[n][i] - before[n][i] <= 5 for n in names for i in (0, 1, 2)), (before, after)
    # and what the shortcut leaves to the kernel still works: the gateway of another host
    gateway = SLICES["h59"] + "1"
    out = hosts["h27"].exec("ping", "-c", "1", "-W", "3", gateway).stdout
    assert "1 packets received" in out, out


UDP_TIMEOUT = "net.netfilter.nf_conntrack_udp_timeout"
FORGET_CONNTRACK = "from pyroute2 import Conntrack; Conntrack().flush()"
# The receiver's INPUT rule against h27's VXLAN
DROP_H27_VXLAN = ["INPUT", "-s", EXTRA_HOSTS["h27"].split("/")[0], "-p", "udp",
                  "--dport", str(VXLAN_PORT), "-j", "DROP"]


def test_a_host_firewall_rule_keeps_a_sender_from_every_container(fan_hosts, containers):
    """A rule in the receiver's INPUT against a sender's VXLAN, added while that
    sender's flow is live: once conntrack forgets the flow (UDP's timeout, made
    3 s here) nothing of the sender reaches a container, whichever path the
    network receives on; another sender still does, and the sender again once
    the rule goes."""
    hosts = {h.name: h for h in fan_hosts[0]}
    receiver, sender, other = hosts["h59"], hosts["h27"], hosts["h28"]
    timeout = receiver.host.run(["sysctl", "-n", UDP_TIMEOUT]).stdout.strip()
    receiver.host.run(["sysctl", "-qw", f"{UDP_TIMEOUT}=3"])
    receiver.host.run([sys.executable, "-c", FORGET_CONNTRACK])   # entries made with 30 s
    try:
        sender.exec("ping", "-c", "2", "-W", "2", containers["h59"])
        receiver.host.run(["iptables", "-I", *DROP_H27_VXLAN])
        time.sleep(4)
        out = sender.exec("ping", "-c", "3", "-W", "2", containers["h59"], check=False).stdout
        assert " 0 packets received" in out, out
        other.exec("ping", "-c", "1", "-W", "2", containers["h59"])
    finally:
        receiver.host.run(["iptables", "-D", *DROP_H27_VXLAN], check=False)
        receiver.host.run(["sysctl", "-qw", f"{UDP_TIMEOUT}={timeout}"])
    sender.exec("ping", "-c", "1", "-W", "2", containers["h59"])


def test_a_host_firewall_rule_older_than_the_network_keeps_a_sender_out(fan_hosts, containers):
    """A rule in the receiver's INPUT against a sender's VXLAN, there before a
    network is created: nothing of that sender reaches the new network's
    container, another sender does, and the sender too once the rule goes.
    Removed, the network leaves nothing behind."""
    hosts = {h.name: h for h in fan_hosts[0]}
    receiver, sender, other = hosts["h59"], hosts["h27"], hosts["h28"]
    network, subnet = "fanfw", "243.0.0.0/8"
    before = {h.name: fan_left(h) for h in hosts.values()}
    receiver.host.run(["iptables", "-I", *DROP_H27_VXLAN])
    # earlier tests' flows between the same hosts left conntrack entries; one
    # whose source port the new flow repeated would admit it past INPUT
    receiver.host.run([sys.executable, "-c", FORGET_CONNTRACK])
    try:
        addresses = {}
        for h in hosts.values():
            h.cli("network", "create", "-d", "fan", "--ipam-driver", "fan", "--subnet", subnet,
                  network)
            addresses[h.name] = h.start_container(f"{network}-{h.name}", network)[1]
        target = addresses[receiver.name]

        def ping(h: FanHost, count: int = 1) -> subprocess.CompletedProcess:
            return h.cli("exec", f"{network}-{h.name}", "ping", "-c", str(count), "-W", "3",
                         target, check=False)

        try:
            blocked = ping(sender, count=3)
            assert " 0 packets received" in blocked.stdout, blocked.stdout
            assert ping(other).returncode == 0, "another sender did not reach the container"
        finally:
            receiver.host.run(["iptables", "-D", *DROP_H27_VXLAN], check=False)
        assert ping(sender).returncode == 0, "the sender did not reach it once the rule went"
    finally:
        for h in hosts.values():
            h.cli("rm", "-f", f"{network}-{h.name}", check=False)
            h.cli("network", "rm", network, check=False)
    # Only what was added counts: removing a network also drops the fan's chains
    # left empty (FAN-INPUT and FAN-PORTS hold nothing for the module's network),
    # which that network's creation had made.
    left = {h.name: fan_added(h, before[h.name]) for h in hosts.values()}
    assert not any(left.values()), left


def test_large_packets_do_not_vanish(fan_hosts, containers):
    h27 = fan_hosts[0][0 if fan_hosts[0][0].name == "h27" else 1]
    # Larger than the fan MTU (1450): fragmented by the sender, never dropped.
    out = h27.exec("ping", "-c", "2", "-W", "3", "-s", "4000", containers["h59"]).stdout
    assert "2 packets received" in out


def test_no_per_peer_state(fan_hosts, containers):
    for h in fan_hosts[0]:
        objects = h.kernel_objects()
        assert objects["permanent neighbours"] == 0 and objects["fdb entries on fan-vxlan"] == 0
        routes = h.host.run(["ip", "route", "show", "root", "250.0.0.0/8"]).stdout
        assert len(routes.splitlines()) == 2, routes   # the overlay and this host's slice
        print(h.name, objects)


def test_host_added_later_is_reachable_without_touching_the_others(fan_hosts, containers):
    hosts, add_host = fan_hosts
    before = {h.name: h.host.run(["ip", "-4", "route", "show", "table", "all"]).stdout for h in hosts}
    late = add_host(*LATE_HOST)
    late.dockerd.cli(*CREATE, "fan")
    late_address = late.run_container()
    assert late_address.startswith(SLICES[late.name])
    for h in hosts:
        h.exec("ping", "-c", "1", "-W", "3", late_address)
        late.exec("ping", "-c", "1", "-W", "3", containers[h.name])
        assert h.host.run(["ip", "-4", "route", "show", "table", "all"]).stdout == before[h.name]
    late.dockerd.cli("rm", "-f", late.container)
    late.dockerd.cli("network", "rm", "fan")


def test_two_fan_networks_side_by_side_and_removing_one(fan_hosts, containers):
    hosts = fan_hosts[0]
    for h in hosts:
        h.dockerd.cli("network", "create", "-d", "fan", "--ipam-driver", "fan",
                      "--subnet", "240.0.0.0/8", "fan240")
    try:
        second = {}
        for h in hosts:
            h.dockerd.cli("run", "-d", "--name", f"f240-{h.name}", "--net", "fan240",
                          "busybox", "sleep", "3600")
            out = h.dockerd.cli("inspect", f"f240-{h.name}").stdout
            second[h.name] = json.loads(out)[0]["NetworkSettings"]["Networks"]["fan240"]["IPAddress"]
        a, b = hosts[0], hosts[1]
        a.dockerd.cli("exec", f"f240-{a.name}", "ping", "-c", "1", "-W", "3", second[b.name])
        a.exec("ping", "-c", "1", "-W", "3", containers[b.name])
    finally:
        for h in hosts:
            h.dockerd.cli("rm", "-f", f"f240-{h.name}", check=False)
            h.dockerd.cli("network", "rm", "fan240", check=False)
    for h in hosts:
        assert "240.0.0.0/8" not in h.host.run(["ip", "route"]).stdout
    hosts[0].exec("ping", "-c", "1", "-W", "3", containers[hosts[1].name])
    hosts[1].exec("ping", "-c", "1", "-W", "3", containers[hosts[2].name])


def ping_until(host: FanHost, container: str, address: str, seconds: float = 60) -> str:
    """Per-peer state is programmed in the background: wait for it, boundedly."""
    deadline = time.monotonic() + seconds
    while True:
        result = host.dockerd.cli("exec", container, "ping", "-c", "1", "-W", "1", address,
                                  check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            assert result.returncode == 0, f"{address} unreachable after {seconds} s"
            return result.stdout


def test_per_peer_routes_mapping_over_vxlan(fan_hosts, containers):
    """mapping=routes: flannel's per-peer route, neighbour and FDB entries (a /20
    underlay keeps the peer count, 4,094, quick to program)."""
    hosts = fan_hosts[0]
    create = ["network", "create", "-d", "fan", "--ipam-driver", "fan", "--subnet", "240.0.0.0/8",
              "--ipam-opt", "underlay=172.30.0.0/20", "-o", "mapping=routes", "-o", "encap=vxlan",
              "fanr"]
    addresses = {}
    try:
        for h in hosts:
            started = time.monotonic()
            h.dockerd.cli(*create)
            print(h.name, f"network create {time.monotonic() - started:.2f} s")
            h.dockerd.cli("run", "-d", "--name", f"fr-{h.name}", "--net", "fanr",
                          "busybox", "sleep", "3600")
            out = h.dockerd.cli("inspect", f"fr-{h.name}").stdout
            addresses[h.name] = json.loads(out)[0]["NetworkSettings"]["Networks"]["fanr"]["IPAddress"]
        for src, dst in itertools.permutations(hosts, 2):
            out = ping_until(src, f"fr-{src.name}", addresses[dst.name])
            assert f"ttl={TTL_ACROSS}" in out
        device = f"fanr-{0xf00000:06x}"
        for h in hosts:
            deadline = time.monotonic() + 180
            while True:   # programming goes on in the background
                counts = {what: len(h.host.run(cmd).stdout.splitlines()) for what, cmd in {
                    "routes": ["ip", "route", "show", "dev", device],
                    "neighbours": ["ip", "neigh", "show", "dev", device, "nud", "permanent"],
                    "fdb": ["bridge", "fdb", "show", "dev", device]}.items()}
                if counts["routes"] >= PEERS_IN_20 or time.monotonic() > deadline:
                    break
                time.sleep(2)
            print(h.name, counts)
            assert counts == {"routes": PEERS_IN_20, "neighbours": PEERS_IN_20, "fdb": PEERS_IN_20}
    finally:
        for h in hosts:
            h.dockerd.cli("rm", "-f", f"fr-{h.name}", check=False)
            h.dockerd.cli("network", "rm", "fanr", check=False)
    for h in hosts:
        assert "fanr-" not in h.host.run(["ip", "-o", "link"]).stdout


# Two VXLAN networks per mapping: one on the mapping's default port, one on its own.
OWN_PORT = 4790
SIDE_BY_SIDE = {"fanpa": ("241.0.0.0/8", []), "fanpb": ("242.0.0.0/8", [f"vxlan_port={OWN_PORT}"])}
DEVICES = {"ebpf": {"fanpa": "fan-vxlan", "fanpb": f"fan-vxlan-{OWN_PORT}"},
           "routes": {"fanpa": "fanr-f10000", "fanpb": "fanr-f20000"}}
PORTS = {"ebpf": {"fanpa": VXLAN_PORT, "fanpb": OWN_PORT},
         "routes": {"fanpa": ROUTES_VXLAN_PORT, "fanpb": OWN_PORT}}


def vxlan_port_of(h: FanHost, device: str) -> int:
    link = json.loads(h.host.run(["ip", "-d", "-j", "link", "show", "dev", device]).stdout)[0]
    return link["linkinfo"]["info_data"]["port"]


def fan_left(h: FanHost) -> dict:
    return kernel_snapshot(h.host, only_fan_rules=True)


def fan_added(h: FanHost, before: dict) -> dict:
    """{key: lines} the fan's kernel state on `h` has that `before` had not;
    waited for, boundedly (veths go after dockerd's answer, peers in bulk)."""
    deadline = time.monotonic() + 60
    while True:
        after = fan_left(h)
        added = {key: sorted(set(after[key]) - set(before[key])) for key in after
                 if set(after[key]) - set(before[key])}
        if not added or time.monotonic() > deadline:
            return added
        time.sleep(0.5)


@pytest.mark.parametrize("mapping", ["ebpf", "routes"])
def test_vxlan_networks_on_two_ports_side_by_side(fan_hosts, containers, mapping):
    """A network on the mapping's default port and one on -o vxlan_port, each
    the same on every host, carry traffic between hosts at once (beside the
    module's network on 4789); removed, they leave nothing, the module's
    network untouched."""
    hosts = fan_hosts[0]
    before = {h.name: fan_left(h) for h in hosts}
    # mapping=routes: a /20 underlay keeps the peers (4,094 per network) quick to program
    underlay = ["--ipam-opt", "underlay=172.30.0.0/20"] if mapping == "routes" else []
    addresses = {}
    try:
        for h in hosts:
            for net, (subnet, options) in SIDE_BY_SIDE.items():
                h.dockerd.cli("network", "create", "-d", "fan", "--ipam-driver", "fan",
                              "--subnet", subnet, *underlay, "-o", "encap=vxlan",
                              "-o", f"mapping={mapping}",
                              *itertools.chain.from_iterable(("-o", o) for o in options), net)
                h.dockerd.cli("run", "-d", "--name", f"{net}-{h.name}", "--net", net,
                              "busybox", "sleep", "3600")
                out = h.dockerd.cli("inspect", f"{net}-{h.name}").stdout
                addresses[net, h.name] = json.loads(out)[0]["NetworkSettings"]["Networks"][net][
                    "IPAddress"]
        for h in hosts:
            assert {net: vxlan_port_of(h, device) for net, device in DEVICES[mapping].items()} \
                == PORTS[mapping], h.name
        for src, dst in itertools.permutations(hosts, 2):
            for net in SIDE_BY_SIDE:
                out = ping_until(src, f"{net}-{src.name}", addresses[net, dst.name])
                assert f"ttl={TTL_ACROSS}" in out, (net, src.name, dst.name, out)
            src.exec("ping", "-c", "1", "-W", "3", containers[dst.name])
    finally:
        for h in hosts:
            for net in SIDE_BY_SIDE:
                h.dockerd.cli("rm", "-f", f"{net}-{h.name}", check=False)
                h.dockerd.cli("network", "rm", net, check=False)
    for h in hosts:
        deadline = time.monotonic() + 60   # veths go after the answer, peers in bulk
        while fan_left(h) != before[h.name] and time.monotonic() < deadline:
            time.sleep(0.5)
        after = fan_left(h)
        assert after == before[h.name], {key: (sorted(set(after[key]) - set(before[h.name][key])),
                                               sorted(set(before[h.name][key]) - set(after[key])))
                                         for key in after if after[key] != before[h.name][key]}
    hosts[0].exec("ping", "-c", "1", "-W", "3", containers[hosts[1].name])


def set_underlay_mtu(lab, hosts, mtu: int) -> None:
    for h in hosts:
        h.host.run(["ip", "link", "set", "eth0", "mtu", str(mtu)])
        subprocess.run(["ip", "-n", lab.switch, "link", "set", h.host.port, "mtu", str(mtu)],
                       check=True)
    lab._fit_bridge_mtu()


def test_jumbo_underlay_fan_mtu_follows(lab, fan_hosts, containers):
    """MTU 9000 underlay: the fan MTU is read from it (9000 - 50), and full-size
    packets and a 10 MB transfer cross between hosts."""
    hosts = fan_hosts[0][:3]
    set_underlay_mtu(lab, hosts, 9000)
    names = {h.name: f"fj-{h.name}" for h in hosts}
    try:
        addresses = {}
        for h in hosts:
            h.dockerd.cli("network", "create", "-d", "fan", "--ipam-driver", "fan",
                          "--subnet", "245.0.0.0/8", "fanj")
            h.dockerd.cli("run", "-d", "--name", names[h.name], "--net", "fanj",
                          "busybox", "sleep", "3600")
            out = h.dockerd.cli("inspect", names[h.name]).stdout
            addresses[h.name] = json.loads(out)[0]["NetworkSettings"]["Networks"]["fanj"]["IPAddress"]
            mtu = h.dockerd.cli("exec", names[h.name], "cat", "/sys/class/net/eth0/mtu").stdout
            assert mtu.strip() == "8950"
        a, b = hosts[0], hosts[1]
        # 8922 bytes of payload + 28 of headers: exactly the fan MTU, unfragmented.
        out = a.dockerd.cli("exec", names[a.name], "ping", "-c", "2", "-W", "3", "-s", "8922",
                            addresses[b.name]).stdout
        assert "2 packets received" in out
        transfer(_renamed(a, names[a.name]), _renamed(b, names[b.name]), addresses[a.name])
    finally:
        for h in hosts:
            h.dockerd.cli("rm", "-f", names[h.name], check=False)
            h.dockerd.cli("network", "rm", "fanj", check=False)
        set_underlay_mtu(lab, hosts, 1500)


def _renamed(h: FanHost, container: str) -> FanHost:
    class Jumbo(FanHost):
        @property
        def container(self) -> str:
            return container
    return Jumbo(h.name, h.host, h.dockerd)


@pytest.mark.skipif(not Path("/proc/sys/net/fan/version").exists(),
                    reason="this kernel has no Ubuntu Fan patch (/proc/sys/net/fan/version "
                           "missing): mapping=kernel is NOT exercised here; its netlink "
                           "encoding is checked in tests/unit/test_kernel_fanmap.py")
def test_kernel_fan_map(fan_hosts):
    hosts = fan_hosts[0][:2]
    try:
        addresses = {}
        for h in hosts:
            h.dockerd.cli("network", "create", "-d", "fan", "--ipam-driver", "fan", "--subnet",
                          "246.0.0.0/8", "-o", "mapping=kernel", "fank")
            h.dockerd.cli("run", "-d", "--name", f"fk-{h.name}", "--net", "fank",
                          "busybox", "sleep", "3600")
            out = h.dockerd.cli("inspect", f"fk-{h.name}").stdout
            addresses[h.name] = json.loads(out)[0]["NetworkSettings"]["Networks"]["fank"]["IPAddress"]
        a, b = hosts
        a.dockerd.cli("exec", f"fk-{a.name}", "ping", "-c", "1", "-W", "3", addresses[b.name])
    finally:
        for h in hosts:
            h.dockerd.cli("rm", "-f", f"fk-{h.name}", check=False)
            h.dockerd.cli("network", "rm", "fank", check=False)
