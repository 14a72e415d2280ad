"""docker compose with a fan network: Debian unstable's docker-compose 2.x
(from harness.sidroot's root) against the session dockerd of each flavour.

The compose file names the fan as network driver and IPAM driver, a subnet,
driver options, and a service with a fixed `ipv4_address`. The tests run in
order: `up` -> traffic between the services (by address and by name through
Docker's embedded DNS) -> `up` again recreates nothing -> `down` removes the
network and every kernel object and rule; then what compose does with
`ipam.options`.
"""
from __future__ import annotations

import json
import re

import pytest

from tests.harness import consistency
from tests.harness.consistency import kernel_snapshot
from tests.harness.nsclient import container_pid, dns_query, tcp_fetch, tcp_server
from tests.harness.sidroot import SidRootUnavailable, sid_root

pytestmark = pytest.mark.e2e

PROJECT = "fanc"
WEB_IP = "250.0.28.50"
SLICE_PREFIX = "250.0.28."
COMPOSE_FILE = f"""\
name: {PROJECT}
services:
  web:
    image: busybox
    command: ["sleep", "3600"]
    networks:
      fan:
        ipv4_address: {WEB_IP}
  client:
    image: busybox
    command: ["sleep", "3600"]
    networks: [fan]
networks:
  fan:
    driver: fan
    driver_opts:
      encap: vxlan
      host_reserve: "5"
    ipam:
      driver: fan
      config:
        - subnet: 250.0.0.0/8
"""
# An underlay no address of this host is in: a network created with it fails
# ("matches no address"), so whether compose hands it on shows.
IPAM_OPTIONS_FILE = """\
name: fanopts
services:
  one:
    image: busybox
    command: ["sleep", "3600"]
    networks: [fan]
networks:
  fan:
    driver: fan
    ipam:
      driver: fan
      config:
        - subnet: 240.0.0.0/8
      options:
        underlay: 10.99.0.0/16
"""


@pytest.fixture(scope="module")
def project(dockerd, busybox, plugin, lab_host, tmp_path_factory):
    try:
        compose = sid_root().compose
    except SidRootUnavailable as exc:
        pytest.skip(f"no docker-compose 2.x here (it comes from Debian unstable's root): {exc}")
    workdir = tmp_path_factory.mktemp(f"compose-{dockerd.flavour}")
    (workdir / "compose.yaml").write_text(COMPOSE_FILE)
    before = kernel_snapshot(lab_host)
    version = dockerd.compose(workdir, "version", "--short").stdout.strip()
    print(f"{compose} {version} against {dockerd.label}")
    yield {"dir": workdir, "before": before}
    dockerd.compose(workdir, "down", "--timeout", "1", check=False)


def up(dockerd, project):
    return dockerd.compose(project["dir"], "up", "-d", "--wait", "--timeout", "1")


def containers(dockerd) -> dict:
    """{service: docker inspect of its container} for the project."""
    ids = dockerd.cli("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"
                      ).stdout.split()
    found = json.loads(dockerd.cli("inspect", *ids).stdout) if ids else []
    return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in found}


def address(container: dict) -> str:
    return container["NetworkSettings"]["Networks"][f"{PROJECT}_fan"]["IPAddress"]


def test_up_creates_the_fan_network_and_services(dockerd, project, plugin, lab_host):
    up(dockerd, project)
    net = json.loads(dockerd.cli("network", "inspect", f"{PROJECT}_fan").stdout)[0]
    assert net["Driver"] == "fan" and net["IPAM"]["Driver"] == "fan"
    assert net["IPAM"]["Config"][0]["Subnet"] == "250.0.0.0/8"
    assert net["Options"] == {"encap": "vxlan", "host_reserve": "5"}
    found = containers(dockerd)
    assert set(found) == {"web", "client"}
    assert all(c["State"]["Running"] for c in found.values())
    assert address(found["web"]) == WEB_IP
    # host_reserve=5 reached the driver: .1-.5 stay the host's
    client = address(found["client"])
    assert client.startswith(SLICE_PREFIX) and int(client.rsplit(".", 1)[1]) > 5, client
    bridge = json.loads(lab_host.run(["ip", "-j", "link", "show", "fan-250-0-28"]).stdout)[0]
    assert bridge["mtu"] == 1450          # vxlan, from driver_opts
    assert consistency.check(plugin, dockerd, lab_host)["endpoints"] == 2


def test_traffic_between_services_by_address_and_by_name(dockerd, project):
    found = containers(dockerd)
    web, client = (container_pid(dockerd, found[s]["Id"]) for s in ("web", "client"))
    # Docker's embedded DNS answers service names on the project network
    assert dns_query(client, "web") == [WEB_IP]
    assert dns_query(web, "client") == [address(found["client"])]
    server = tcp_server(web, 8080, "fan-compose", connections=2)
    try:
        assert tcp_fetch(client, WEB_IP, 8080) == "fan-compose"
        assert tcp_fetch(client, dns_query(client, "web")[0], 8080) == "fan-compose"
        server.wait(timeout=10)
    finally:
        server.kill()
    dockerd.cli("exec", found["web"]["Id"], "ping", "-c", "1", "-W", "2", address(found["client"]))


def test_up_again_recreates_nothing(dockerd, project):
    before = {s: (c["Id"], c["State"]["StartedAt"]) for s, c in containers(dockerd).items()}
    network = dockerd.cli("network", "inspect", "-f", "{{.Id}}", f"{PROJECT}_fan").stdout
    result = up(dockerd, project)
    said = result.stdout + result.stderr
    assert not re.search(r"Recreat|Creat|Start", said), said
    after = {s: (c["Id"], c["State"]["StartedAt"]) for s, c in containers(dockerd).items()}
    assert after == before
    assert dockerd.cli("network", "inspect", "-f", "{{.Id}}", f"{PROJECT}_fan").stdout == network


def test_down_removes_the_network_and_every_kernel_object(dockerd, project, plugin,
                                                           lab_host):
    dockerd.compose(project["dir"], "down", "--timeout", "1")
    assert containers(dockerd) == {}
    names = dockerd.cli("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert f"{PROJECT}_fan" not in names
    assert kernel_snapshot(lab_host) == project["before"]
    assert consistency.check(plugin, dockerd, lab_host)["networks"] == 0


def test_what_compose_does_with_ipam_options(dockerd, project, plugin, lab_host):
    """Compose 2.x drops `ipam.options`: the network is created without them
    (an underlay that matches no address of this host would fail otherwise),
    the IPAM sees no options and takes its default underlay. Give the underlay
    as the plugin's FAN_UNDERLAY (or --default-underlay) when using compose."""
    workdir = project["dir"] / "ipam-options"
    workdir.mkdir()
    (workdir / "compose.yaml").write_text(IPAM_OPTIONS_FILE)
    before = kernel_snapshot(lab_host)
    log_start = len(plugin.log_path.read_bytes())
    try:
        result = dockerd.compose(workdir, "up", "-d", "--wait", check=False)
        assert result.returncode == 0, result.stderr
        net = json.loads(dockerd.cli("network", "inspect", "fanopts_fan").stdout)[0]
        assert not net["IPAM"]["Options"], net["IPAM"]
        requests = [line for line in plugin.log_path.read_bytes()[log_start:].decode(
            errors="replace").splitlines() if "/IpamDriver.RequestPool" in line]
        assert requests and all('"underlay"' not in line for line in requests), requests
        one = json.loads(dockerd.cli("inspect", "fanopts-one-1").stdout)[0]
        # the default underlay (this host's eth0 /16): this host's slice of 240/8
        assert one["NetworkSettings"]["Networks"]["fanopts_fan"]["IPAddress"].startswith(
            "240.0.28.")
    finally:
        dockerd.compose(workdir, "down", "--timeout", "1", check=False)
    assert kernel_snapshot(lab_host) == before
