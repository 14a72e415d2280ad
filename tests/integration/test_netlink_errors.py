"""Kernel refusals reach the user as the plugin's errors, naming the object,
the kernel's reason and the fix; dumps interrupted by changes are read again.
Each failure is a real one, in a namespace the test made."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fan_driver.config import ROUTES_VXLAN_PORT as VXLAN_ROUTES_PORT

from .netns_run import Underlay, run_in

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, rtnetlink)")
SETUP = """
from fan_driver import host
from fan_driver.errors import KernelError
from fan_driver.dataplane.netlink import Rtnl, ipv4_nexthops, nexthop_request
from fan_driver.config import ROUTES_VXLAN_PORT as VXLAN_ROUTES_PORT
"""


@pytest.fixture
def underlay():
    u = Underlay()
    yield u
    u.close()


def refusal(ns: str, body: str, without_cap: str = "") -> str:
    """The message of the KernelError that `body` (indented by 4) raises."""
    return run_in(ns, "try:\n" + body.strip("\n") + "\nexcept KernelError as exc:\n"
                  "    return str(exc)\n", SETUP, without_cap)


def test_vni_taken_by_a_stranger_names_the_device(underlay):
    underlay.ip("link", "add", "squatter", "type", "vxlan", "id", "42", "dstport", str(VXLAN_ROUTES_PORT),
                "local", "172.30.0.28")
    message = refusal(underlay.ns, """
    await links.claim("fanr-00002a", "vxlan", "fan-driver", vxlan_id=42, vxlan_port=VXLAN_ROUTES_PORT,
                      vxlan_local="172.30.0.28", vxlan_link=await links.index("eth0"))""")
    print(message)
    assert message.startswith("creating vxlan device fanr-00002a: File exists (errno 17)")
    assert "remove it or choose another overlay" in message
    assert underlay.count("link", "show", "fanr-00002a") == 0


def test_vxlan_port_held_by_another_device_names_the_swarm_fix(underlay):
    """What a swarm initialised with the default data path port does to the
    fan's external-mode device: its overlay VXLAN holds UDP 4789."""
    underlay.ip("link", "add", "swarmvx", "type", "vxlan", "id", "4097", "dstport", "4789")
    underlay.ip("link", "set", "swarmvx", "up")
    message = refusal(underlay.ns, """
    index = await links.claim("fan-vxlan", "vxlan", "fan-driver", vxlan_collect_metadata=1,
                              vxlan_learning=0, vxlan_port=4789)
    await links.set_up(index)""")
    print(message)
    assert message.startswith("bringing up interface ")
    assert "Address already in use (errno 98)" in message
    assert "docker swarm init --data-path-port 4790" in message


def test_without_cap_net_admin_says_so(underlay):
    message = refusal(underlay.ns, """
    await links.claim("fan-250-0-28", "bridge", "fan-driver")""", without_cap="net_admin")
    print(message)
    assert message == ("creating bridge device fan-250-0-28: Operation not permitted (errno 1): "
                       "fan-driver needs CAP_NET_ADMIN in the host's network namespace; run it "
                       "as root or grant the capability")


def test_probing_the_kernel_without_cap_net_admin_says_so(underlay):
    """Not "no ipip, no vxlan": the probe names the capability it lacks."""
    message = refusal(underlay.ns, """
    await host.probe_kernel(links.ipr, lambda: False, lambda: False)""", without_cap="net_admin")
    print(message)
    assert message.startswith("creating probe device fanprobe")
    assert "Operation not permitted (errno 1): fan-driver needs CAP_NET_ADMIN" in message


def test_reading_and_probing_the_host_leave_nothing_behind(underlay):
    interfaces, routes, features = run_in(underlay.ns, """
    facts = await host.read_facts(links.ipr)
    features = await host.probe_kernel(links.ipr, lambda: False, lambda: False)
    return [[i.name, [str(a) for a in i.addresses]] for i in facts.interfaces], \\
        [str(r) for r in facts.routes], vars(features)""", SETUP)
    assert ["eth0", ["172.30.0.28/16"]] in interfaces
    assert "172.30.0.0/16" in routes
    assert features["vxlan"] is True and features["ebpf"] is False
    assert underlay.count("-o", "link", "show") == len(interfaces) + 1   # lo; no probe left


def test_route_through_a_missing_device(underlay):
    message = refusal(underlay.ns, """
    await links.ensure_route(IPv4Network("250.0.0.0/8"), 4242)""")
    print(message)
    assert message.startswith("adding route 250.0.0.0/8 via interface 4242: No such device "
                              "(errno 19)")


def test_bulk_refusal_carries_the_kernels_explanation(underlay):
    underlay.skip_without_nexthops()
    underlay.ip("link", "set", "eth1", "down")    # eth0's carrier goes with it
    message = refusal(underlay.ns, """
    eth0 = await links.index("eth0")
    await links.ipr.link("set", index=eth0, state="down")
    with Rtnl() as rtnl:
        rtnl.apply([nexthop_request(n, IPv4Address("172.30.0.1"), eth0, 250)
                    for n in range(1, 2000)], "programming 1,999 test nexthops")""")
    print(message)
    assert message.startswith("programming 1,999 test nexthops (and 1998 more refused): Network "
                              "is down (errno 100), Nexthop device is not up: a device it "
                              "needs is down")


CHURN = """
import subprocess, sys, time
ns = sys.argv[1]
while True:   # five changes a second: a busy host, not a storm
    time.sleep(0.2)
    subprocess.run(["ip", "-n", ns, "nexthop", "replace", "id", "1", "via", "172.30.0.1",
                    "dev", "eth0"], check=True)
    subprocess.run(["ip", "-n", ns, "nexthop", "del", "id", "1"], check=True)
"""


def test_dump_interrupted_by_changes_is_read_again_and_complete(underlay):
    underlay.skip_without_nexthops()
    with open(os.devnull, "w") as quiet:
        batch = "".join(f"nexthop add id {n} via 172.30.0.1 dev eth0\n" for n in range(2, 5002))
        subprocess.run(["ip", "-n", underlay.ns, "-batch", "-"], input=batch, text=True,
                       check=True, stdout=quiet)
    churn = subprocess.Popen([sys.executable, "-c", CHURN, underlay.ns],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = run_in(underlay.ns, """
        seen, interrupted = [], []
        for _ in range(20):
            with Rtnl() as rtnl:
                dump_once = rtnl._dump_once

                def counted(kind, body, dump_once=dump_once):   # counts dumps read again
                    messages, again = dump_once(kind, body)
                    interrupted.append(again)
                    return messages, again
                rtnl._dump_once = counted
                ids = {n.id for n in ipv4_nexthops(rtnl)}
            seen.append(len(ids - {1}))
        return {"seen": seen, "interrupted": sum(interrupted)}""", SETUP)
    finally:
        churn.kill()
        churn.wait()
    print(result)
    assert result["seen"] == [5000] * 20   # never a partial table
