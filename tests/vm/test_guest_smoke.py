"""The guest harness itself: it boots, loads modules, has IPIP (classic and
external mode), network namespaces and the project's Python. No skips: a
guest that cannot be built or booted is a failure with the reason."""
from __future__ import annotations

import dataclasses
import time

import pytest

from .guest import build_guest


@pytest.fixture(scope="module")
def guest():
    # Installs packages and builds the kernel/initramfs on first use; raises
    # (fails loudly) when that is impossible.
    return build_guest()


# Two namespaces joined by a veth pair, an IPIP tunnel across it, ping through
# the tunnel. busybox's ping: the host root has no iputils.
SCRIPT = r"""
set -ex
modprobe ipip
ip netns add a
ip netns add b
ip link add va netns a type veth peer name vb netns b
ip -n a addr add 10.0.0.1/24 dev va
ip -n b addr add 10.0.0.2/24 dev vb
ip -n a link set va up
ip -n b link set vb up
ip -n a link add ipip0 type ipip local 10.0.0.1 remote 10.0.0.2
ip -n b link add ipip0 type ipip local 10.0.0.2 remote 10.0.0.1
ip -n a addr add 192.168.77.1/30 dev ipip0
ip -n b addr add 192.168.77.2/30 dev ipip0
ip -n a link set ipip0 up
ip -n b link set ipip0 up
ip netns exec a busybox ping -c 2 -W 5 192.168.77.2
echo PING-ACROSS-IPIP-OK
ip link add fanx type ipip external
ip -d link show fanx
echo IPIP-EXTERNAL-OK
{python} -c 'import sys, pyroute2, fan_driver
from pyroute2 import IPRoute
with IPRoute() as ipr:
    assert ipr.link_lookup(ifname="fanx")
print("PYTHON-OK", sys.executable, fan_driver.__file__)'
"""


def test_guest_has_ipip_netns_and_project_python(guest):
    start = time.monotonic()
    code, output = guest.run(SCRIPT.format(python=guest.python), timeout=300)
    t = guest.last_timings
    print(f"\nguest kernel {guest.kver}, python {guest.python}\n"
          f"boot+run {time.monotonic() - start:.1f} s (boot {t['boot']:.1f} s, "
          f"guest uptime at command start {t['boot_to_command']:.1f} s, command {t['command']:.1f} s)")
    assert code == 0, output
    assert "PING-ACROSS-IPIP-OK" in output
    assert "IPIP-EXTERNAL-OK" in output and "external" in output
    assert f"PYTHON-OK {guest.python} {guest.project_dir}/fan_driver/__init__.py" in output, output


def test_a_project_under_tmp_is_seen_in_the_guest(guest, tmp_path):
    """The guest mounts a fresh /tmp: a checkout under /tmp must still be there."""
    project = tmp_path / "checkout"
    project.mkdir()
    (project / "marker").write_text("from the host\n")
    assert str(project).startswith("/tmp/"), project
    under_tmp = dataclasses.replace(guest, project_dir=project)
    code, output = under_tmp.run("pwd; cat marker; echo from the guest > written", timeout=300)
    assert code == 0, output
    assert output.splitlines()[:2] == [str(project), "from the host"], output
    assert (project / "written").read_text() == "from the guest\n"
