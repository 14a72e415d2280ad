"""`fan-driver check` against a live plugin: the kernel as the state says is
clean; a rule and a veth deleted by hand are each named with their fix, and
following the fixes makes it clean again."""
from __future__ import annotations

import json
import shlex

import pytest

from tests.harness import consistency

pytestmark = pytest.mark.e2e

SUBNET = "250.0.0.0/8"
NAME = "drift"


def section(report: str) -> str:
    """The report from its "state vs kernel" heading on, its lines unwrapped."""
    assert "state vs kernel:" in report, report
    return " ".join(report[report.index("state vs kernel:"):].split())


@pytest.fixture
def drift_net(dockerd, plugin, lab_host, busybox):
    dockerd.cli("network", "create", "-d", "fan", "--ipam-driver", "fan", "--subnet", SUBNET,
                "--ipam-opt", "underlay=172.30.0.0/16", NAME)
    dockerd.cli("run", "-d", "--name", NAME, "--net", NAME, busybox, "sleep", "3600")
    try:
        yield NAME
    finally:
        dockerd.cli("rm", "-f", NAME, check=False)
        dockerd.cli("network", "rm", NAME, check=False)


def test_check_names_a_deleted_rule_and_veth_with_their_fixes(dockerd, plugin, lab_host,
                                                              drift_net):
    network_id = dockerd.cli("network", "inspect", "-f", "{{.Id}}", drift_net).stdout.strip()
    endpoint_id = json.loads(dockerd.cli("network", "inspect", drift_net).stdout)[0][
        "Containers"]
    (endpoint_id,) = [c["EndpointID"] for c in endpoint_id.values()]
    veth = f"fve{endpoint_id[:12]}"
    consistency.settled(plugin, dockerd, lab_host)

    clean = plugin.check()
    assert clean.returncode == 0, clean.stdout
    state_vs_kernel = section(clean.stdout)
    assert f"{network_id[:12]}" in state_vs_kernel and "receive=" in state_vs_kernel
    assert "the kernel holds what the state says" in state_vs_kernel

    (table, rule) = next((t, line) for t, line in consistency.kernel_view(lab_host)["rules"]
                         if f'"fan-driver {network_id[:12]}"' in line and "FAN-FORWARD" in line)
    lab_host.run(["iptables", "-t", table, "-D", *shlex.split(rule[3:])])
    lab_host.run(["ip", "link", "del", veth])
    broken = plugin.check()
    assert broken.returncode == 1, broken.stdout
    found = section(broken.stdout)
    assert f"network {network_id[:12]}: 1 of " in found and "iptables rules missing" in found
    assert "fix: restart the plugin (it rebuilds what its state holds)" in found
    assert f"interface {veth} of endpoint {endpoint_id[:12]}" in found
    assert "fix: restart that container (docker restart)" in found
    assert "state and kernel differ: 2 difference(s)" in found

    plugin.restart()   # the rule's fix
    after_restart = plugin.check()
    found = section(after_restart.stdout)
    assert "iptables rules missing" not in found and f"interface {veth}" in found, found

    dockerd.cli("restart", "-t", "1", drift_net)   # the veth's fix
    consistency.settled(plugin, dockerd, lab_host)
    again = plugin.check()
    assert again.returncode == 0, again.stdout
    assert "the kernel holds what the state says" in section(again.stdout)
