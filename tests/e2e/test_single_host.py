"""A fan network on one host, driven by a real dockerd through the docker CLI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Interface

import pytest

from fan_driver.dataplane.mapping import ebpf
from tests.harness import consistency
from tests.harness.consistency import kernel_snapshot
from tests.harness.nsclient import container_pid, dns_query

pytestmark = pytest.mark.e2e

SUBNET = "250.0.0.0/8"
SLICE = "250.0.28.0/24"
BRIDGE = "fan-250-0-28"
OUTSIDE = "172.30.255.254"
UNDERLAY_ADDR = "172.30.0.28"


def run_container(dockerd, name, *args, net="fan", check=True):
    return dockerd.cli("run", "-d", "--name", name, "--net", net, *args,
                       "busybox", "sleep", "3600", check=check)


def inspect_net(dockerd, container, net="fan") -> dict:
    out = dockerd.cli("inspect", container).stdout
    return json.loads(out)[0]["NetworkSettings"]["Networks"][net]


def exec_(dockerd, container, *cmd, check=True):
    return dockerd.cli("exec", container, *cmd, check=check)


def remove_containers(dockerd, *names):
    dockerd.cli("rm", "-f", *names, check=False)


@pytest.fixture(scope="module")
def fan_net(dockerd, lab_host):
    before = kernel_snapshot(lab_host)
    dockerd.cli("network", "create", "-d", "fan", "--ipam-driver", "fan", "--subnet", SUBNET,
                "-o", "underlay=172.30.0.0/16", "--ipam-opt", "underlay=172.30.0.0/16", "fan")
    yield "fan"
    dockerd.cli("network", "rm", "fan", check=False)
    assert kernel_snapshot(lab_host) == before, "network rm left kernel state behind"


@pytest.fixture(scope="module")
def trio(dockerd, fan_net):
    names = ["fan-a", "fan-b", "fan-c"]
    for name in names:
        # --init: its PID 1 passes dockerd's SIGTERM on (busybox sleep as PID 1
        # ignores it), so a dockerd restart does not wait 10 s for them.
        run_container(dockerd, name, "--init")
    yield names
    remove_containers(dockerd, *names)


def test_network_create_builds_bridge_tunnel_and_route(fan_net, lab_host, plugin):
    link = lab_host.run(["ip", "-d", "-j", "addr", "show", "dev", BRIDGE]).stdout
    bridge = json.loads(link)[0]
    assert bridge["mtu"] == 1450   # 1500 underlay - 50 VXLAN
    assert bridge["linkinfo"]["info_kind"] == "bridge"
    assert {"local": "250.0.28.1", "prefixlen": 24} in [
        {"local": a["local"], "prefixlen": a["prefixlen"]} for a in bridge["addr_info"]]
    tunnel = json.loads(lab_host.run(["ip", "-d", "-j", "link", "show", "dev", "fan-vxlan"]).stdout)[0]
    assert tunnel["linkinfo"]["info_data"].get("external") is True
    routes = lab_host.run(["ip", "route", "show", "250.0.0.0/8"]).stdout
    assert "dev fan-vxlan" in routes
    show = plugin.show()
    receive = "conntrack" if ebpf.conntrack_supported() else "tunnel"
    assert re.search(rf"{BRIDGE}\s+{re.escape(SUBNET)}\s+172\.30\.0\.28/16\s+{re.escape(SLICE)}"
                     rf"\s+vxlan/ebpf\s+4789\s+{receive}\s+1450\s+0", show), show


def test_containers_get_slice_addresses_and_reach_each_other(dockerd, trio):
    addresses = []
    for name in trio:
        net = inspect_net(dockerd, name)
        assert net["IPPrefixLen"] == 24 and net["Gateway"] == "250.0.28.1"
        assert IPv4Address(net["IPAddress"]) in IPv4Interface(f"{SLICE}").network
        assert exec_(dockerd, name, "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450"
        route = exec_(dockerd, name, "ip", "route").stdout
        assert "default via 250.0.28.1 dev eth0" in route
        addresses.append(net["IPAddress"])
    assert len(set(addresses)) == 3
    for name in trio:
        for target in addresses + ["250.0.28.1"]:
            exec_(dockerd, name, "ping", "-c", "1", "-W", "2", target)


def test_embedded_dns_answers_container_names_as_on_a_bridge(dockerd, trio):
    """Docker's embedded DNS server (127.0.0.11 in the container, asked
    directly: a container's resolv.conf may name another server in this bed)
    answers the names of containers on the fan network, as it does on a
    user-defined bridge network of the same daemon."""
    asker = container_pid(dockerd, trio[0])
    for other in trio[1:]:
        assert dns_query(asker, other) == [inspect_net(dockerd, other)["IPAddress"]]
    dockerd.cli("network", "create", "dnsbridge")
    try:
        for name in ("dns-a", "dns-b"):
            run_container(dockerd, name, net="dnsbridge")
        assert dns_query(container_pid(dockerd, "dns-a"), "dns-b") == \
            [inspect_net(dockerd, "dns-b", "dnsbridge")["IPAddress"]]
    finally:
        remove_containers(dockerd, "dns-a", "dns-b")
        dockerd.cli("network", "rm", "dnsbridge", check=False)


def _nat_counter(host) -> int:
    out = host.run(["iptables", "-t", "nat", "-L", "FAN-POSTROUTING", "-v", "-x", "-n"]).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if "MASQUERADE" in line)


def test_egress_is_nated_to_underlay_address_and_overlay_is_not(dockerd, trio, lab, lab_host):
    listener = lab.outside.popen(
        [sys.executable, "-c",
         "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
         "s.bind(('0.0.0.0',5555));s.listen(1);s.settimeout(20);"
         "c,a=s.accept();print(a[0],flush=True)"],
        stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        exec_(dockerd, trio[0], "sh", "-c", f"echo hi | nc -w 2 {OUTSIDE} 5555")
        out, _ = listener.communicate(timeout=20)
    finally:
        listener.kill()
    assert out.strip() == UNDERLAY_ADDR

    before = _nat_counter(lab_host)
    # An overlay address on another (absent) host: tunnelled, never NATed.
    exec_(dockerd, trio[0], "ping", "-c", "1", "-W", "1", "250.0.5.9", check=False)
    assert _nat_counter(lab_host) == before
    exec_(dockerd, trio[0], "ping", "-c", "1", "-W", "2", OUTSIDE)
    assert _nat_counter(lab_host) == before + 1


def bridge_ports(host) -> set:
    out = host.run(["ip", "-o", "link", "show", "master", BRIDGE]).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_fixed_ip_in_slice_outside_slice_and_taken(dockerd, fan_net, lab_host):
    ports = bridge_ports(lab_host)
    try:
        run_container(dockerd, "fan-fixed", "--ip", "250.0.28.77")
        assert inspect_net(dockerd, "fan-fixed")["IPAddress"] == "250.0.28.77"
        taken = run_container(dockerd, "fan-taken", "--ip", "250.0.28.77", check=False)
        assert taken.returncode != 0 and "already in use" in taken.stderr
        outside = run_container(dockerd, "fan-outside", "--ip", "250.0.99.5", check=False)
        assert outside.returncode != 0 and "outside this host's fan slice" in outside.stderr

        assert len(bridge_ports(lab_host) - ports) == 1
        remove_containers(dockerd, "fan-fixed")
        assert bridge_ports(lab_host) == ports
        # The address went back to the pool.
        run_container(dockerd, "fan-fixed2", "--ip", "250.0.28.77")
    finally:
        remove_containers(dockerd, "fan-fixed", "fan-taken", "fan-outside", "fan-fixed2")


def test_default_ipam_is_refused_with_the_command_to_use(dockerd, lab_host):
    before = kernel_snapshot(lab_host)
    result = dockerd.cli("network", "create", "-d", "fan", "--subnet", "240.0.0.0/8", "nofan",
                         check=False)
    assert result.returncode != 0
    assert "--ipam-driver fan" in result.stderr
    assert kernel_snapshot(lab_host) == before
    assert "nofan" not in dockerd.cli("network", "ls").stdout


BAD_CREATES = [
    (["--subnet", "240.0.0.0/16"], "too small"),
    (["--subnet", "240.0.0.0/8", "--ipam-opt", "underlay=10.99.0.0/16"], "matches no address"),
    (["--subnet", "240.0.0.0/8", "--ipam-opt", "underlay=eth9/16"], "unknown interface 'eth9'"),
    (["--subnet", "172.0.0.0/8"], "overlaps underlay"),
    (["--subnet", "241.0.0.0/8"], "overlaps route 241.1.0.0/16"),
    (["--subnet", "240.0.0.0/8", "--ipam-opt", "underlay=172.30.0/16x"], "underlay"),
    (["--subnet", "240.0.0.0/8", "-o", "underlay=garbage"], "malformed"),
    (["--subnet", "240.0.0.0/8", "-o", "colour=blue"], "unknown network option 'colour'"),
    (["--subnet", "240.0.0.0/8", "-o", "encap=gre"], "encap 'gre' is not one of"),
    (["--subnet", "240.0.0.0/8", "-o", "underlay=eth0/24"], "give the same value there"),
    (["--subnet", "240.0.0.0/8", "-o", "com.docker.network.driver.mtu=9000"], "too large"),
    (["--subnet", "240.0.0.0/8", "--ipam-opt", "underlay=eth0/16;reboot"], "underlay"),
]


@pytest.mark.parametrize("args,message", BAD_CREATES, ids=[m for _, m in BAD_CREATES])
def test_bad_options_fail_and_leave_nothing(dockerd, lab_host, args, message):
    lab_host.run(["ip", "route", "replace", "241.1.0.0/16", "via", OUTSIDE])
    try:
        before = kernel_snapshot(lab_host)
        result = dockerd.cli("network", "create", "-d", "fan", "--ipam-driver", "fan", *args,
                             "badfan", check=False)
        assert result.returncode != 0, result.stdout
        assert message in result.stderr
        assert kernel_snapshot(lab_host) == before
        assert "badfan" not in dockerd.cli("network", "ls").stdout
    finally:
        lab_host.run(["ip", "route", "del", "241.1.0.0/16"], check=False)


def test_second_network_with_the_same_overlay_is_refused(dockerd, fan_net, lab_host):
    before = kernel_snapshot(lab_host)
    result = dockerd.cli("network", "create", "-d", "fan", "--ipam-driver", "fan",
                         "--subnet", SUBNET, "fan2", check=False)
    assert result.returncode != 0 and "overlaps" in result.stderr
    assert kernel_snapshot(lab_host) == before


def test_rules_are_marked_and_survive_dockerd_restart(dockerd, trio, lab_host, plugin):
    # dockerd sets this when it starts; a simulated reboot in another module
    # resets the firewall, so set it here: the fan must work under it.
    lab_host.run(["iptables", "-P", "FORWARD", "DROP"])
    saved = lab_host.run(["iptables-save"]).stdout
    assert ":FORWARD DROP" in saved
    ours = [line for line in saved.splitlines() if "fan-driver" in line]
    state = consistency.read_state(plugin.state_dir)
    (network_id,) = state["networks"]
    assert len(ours) == consistency.network_rule_count(state, network_id)
    assert all('--comment "fan-driver ' in line for line in ours)
    dockerd.restart()
    for name in trio:
        dockerd.cli("start", name)
    after = lab_host.run(["iptables-save"]).stdout
    assert sorted(l for l in after.splitlines() if "fan-driver" in l) == sorted(ours)
    a, b = (inspect_net(dockerd, n)["IPAddress"] for n in trio[:2])
    exec_(dockerd, trio[0], "ping", "-c", "1", "-W", "2", b)
    exec_(dockerd, trio[1], "ping", "-c", "1", "-W", "2", a)
    exec_(dockerd, trio[0], "ping", "-c", "1", "-W", "2", OUTSIDE)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_plugin_restart_keeps_networks_and_addresses(dockerd, trio, plugin, lab_host, how):
    addresses = {inspect_net(dockerd, n)["IPAddress"] for n in trio}
    getattr(plugin, how)()
    # The data path is the kernel's: traffic flows while the plugin is down.
    exec_(dockerd, trio[0], "ping", "-c", "1", "-W", "2", inspect_net(dockerd, trio[1])["IPAddress"])
    plugin.start()
    try:
        run_container(dockerd, "fan-new")
        new = inspect_net(dockerd, "fan-new")["IPAddress"]
        assert new not in addresses
        exec_(dockerd, "fan-new", "ping", "-c", "1", "-W", "2", sorted(addresses)[0])
    finally:
        remove_containers(dockerd, "fan-new")
    assert len(bridge_ports(lab_host)) == len(trio)
