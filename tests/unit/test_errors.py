"""The kernel's refusals as the plugin words them to Docker."""
from __future__ import annotations

import errno

from fan_driver.errors import OTHER_FIX, KernelError


def test_a_tunnel_port_in_use_points_to_swarms_data_path_port():
    message = str(KernelError("bringing up interface 7", errno.EADDRINUSE))
    assert message.startswith("bringing up interface 7: Address already in use (errno 98): ")
    assert "VXLAN 4789" in message and "Docker swarm's overlay" in message
    assert "docker swarm init --data-path-port 4790" in message
    assert "-o vxlan_port=<a free port, the same on every host>" in message
    assert OTHER_FIX not in message
