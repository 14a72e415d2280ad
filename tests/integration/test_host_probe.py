"""Reading the host and probing its kernel, in a namespace the test made: the
facts come out typed, and a probe the kernel refuses for lack of permission
says so as the plugin's own error instead of reporting features absent."""
from __future__ import annotations

import os

import pytest

from .netns_run import Underlay, run_in

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, rtnetlink)")
SETUP = """
from fan_driver import host
from fan_driver.errors import KernelError
"""


@pytest.fixture
def underlay():
    u = Underlay()
    yield u
    u.close()


def test_facts_and_features_of_a_namespace(underlay):
    found = run_in(underlay.ns, """
    facts = await host.read_facts(links.ipr)
    features = await host.probe_kernel(links.ipr, lambda: False)
    return [[i.name, [str(a) for a in i.addresses]] for i in facts.interfaces], \\
        [str(r) for r in facts.routes], vars(features)""", SETUP)
    interfaces, routes, features = found

    assert ["eth0", ["172.30.0.28/16"]] in interfaces
    assert "172.30.0.0/16" in routes
    assert features["vxlan"] is True and features["ebpf"] is False
    assert underlay.count("-o", "link", "show") == len(interfaces) + 1   # lo; no probe left


def test_a_probe_without_cap_net_admin_names_the_capability(underlay):
    message = run_in(underlay.ns, """
    try:
        await host.probe_kernel(links.ipr, lambda: False)
    except KernelError as exc:
        return str(exc)""", SETUP, without_cap="net_admin")
    print(message)

    assert message.startswith("creating probe device fanprobe")
    assert "Operation not permitted (errno 1): fan-driver needs CAP_NET_ADMIN" in message
