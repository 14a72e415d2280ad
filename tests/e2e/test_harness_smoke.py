"""The e2e harness itself: lab underlay, dockerd in a namespace, busybox image,
plugin process, and that teardown leaves nothing behind."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.harness import Dockerd, Lab, ensure_busybox, netns_list, private_prefix
from tests.harness.procs import cgroup_hierarchies
from tests.harness.procs import pid_alive, run_cmd

pytestmark = pytest.mark.e2e

OUTSIDE = "172.30.255.254"
# Small labs of our own, named per process so another test run cannot collide.
SMOKE = private_prefix("smoke")


def host_mounts() -> str:
    return Path("/proc/self/mounts").read_text()


# -- the session lab ---------------------------------------------------------------

def test_host_underlay_and_default_route(lab, lab_host):
    assert lab_host.name == "fanlab-h28"
    assert str(lab_host.address) == "172.30.0.28/16"
    addr = json.loads(lab_host.run(["ip", "-j", "addr", "show", "dev", "eth0"]).stdout)[0]
    assert addr["mtu"] == 1500 and addr["operstate"] in ("UP", "UNKNOWN")
    assert {"local": "172.30.0.28", "prefixlen": 16} in [
        {"local": a["local"], "prefixlen": a["prefixlen"]} for a in addr["addr_info"]]
    route = lab_host.run(["ip", "route", "show", "default"]).stdout
    assert f"default via {OUTSIDE} dev eth0" in route
    lab_host.ping(OUTSIDE)
    # A string is a shell command line.
    assert lab_host.run("ip -o link | grep -c eth0").stdout.strip() == "1"
    assert lab.outside.run(["ip", "route", "show", "default"]).stdout.strip() == ""


# -- the session dockerd -------------------------------------------------------------

def test_docker_run_echo(dockerd, busybox):
    assert dockerd.cli("run", "--rm", busybox, "echo", "hi").stdout == "hi\n"
    assert dockerd.client.containers.run(busybox, ["echo", "sdk"], remove=True) == b"sdk\n"


def test_dockerd_runs_inside_the_host_namespace(dockerd, lab_host):
    assert dockerd.pid in lab_host.pids()
    assert Path(f"/proc/{dockerd.pid}/ns/net").stat().st_ino == \
        Path(f"/run/netns/{lab_host.name}").stat().st_ino
    # docker0 and Docker's rules are in the namespace, not on the real host.
    lab_host.run(["ip", "link", "show", "docker0"])
    assert "MASQUERADE" in lab_host.run(["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout
    # Its mounts (cgroups, /run tmpfs, overlays) stay in its own mount namespace.
    assert str(dockerd.tmpdir) not in host_mounts()
    assert "fanlab-run" not in host_mounts()
    assert os.readlink(f"/proc/{dockerd.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")


def test_container_on_default_bridge_reaches_outside_through_nat(dockerd, busybox, lab_host):
    out = dockerd.cli("run", "--rm", busybox, "ping", "-c", "2", "-W", "2", OUTSIDE).stdout
    assert "2 packets received" in out
    masq = lab_host.run(["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout
    assert "-s 172.17.0.0/16 ! -o docker0 -j MASQUERADE" in masq


def test_busybox_has_the_applets_tests_use(dockerd, busybox):
    script = ("for a in sh ping ip ifconfig route nc wget sleep cat md5sum sha256sum dd head "
              "httpd; do command -v $a >/dev/null || echo missing $a; done; echo done")
    assert dockerd.cli("run", "--rm", busybox, "sh", "-c", script).stdout == "done\n"


# -- the plugin ---------------------------------------------------------------------

def test_plugin_activates_and_is_discoverable(plugin, lab_host):
    status, body = plugin.call("Plugin.Activate", {})
    assert status == 200, body
    assert set(body["Implements"]) >= {"NetworkDriver", "IpamDriver"}
    assert plugin.spec_path == lab_host.etc_dir / "docker" / "plugins" / "fan.spec"
    assert plugin.spec_path.read_text().strip() == f"unix://{plugin.socket_path}"
    # dockerd sees that file as /etc/docker/plugins/fan.spec.
    seen = lab_host.run(["cat", "/etc/docker/plugins/fan.spec"]).stdout
    assert seen.strip() == f"unix://{plugin.socket_path}"
    assert plugin.pid in lab_host.pids()


def test_dockerd_finds_the_plugin_through_the_spec_file(dockerd, plugin):
    result = dockerd.cli("network", "create", "-d", "fan", "--ipam-driver", "fan",
                         "--subnet", "250.0.0.0/8", "fanlab-probe", check=False)
    try:
        # Whatever the plugin thinks of the request, dockerd must have reached it.
        assert "not found" not in result.stderr, result.stderr
        assert "could not resolve" not in result.stderr, result.stderr
        assert "NetworkDriver" in Path(plugin.log_path).read_text(errors="replace")
    finally:
        dockerd.cli("network", "rm", "fanlab-probe", check=False)


def test_plugin_restart_by_pid(plugin):
    old = plugin.pid
    plugin.restart()
    assert plugin.pid != old and not pid_alive(old)
    assert plugin.call("Plugin.Activate", {})[0] == 200


# -- teardown leaves nothing ----------------------------------------------------------

def test_small_lab_jumbo_frames_and_teardown(root_required):
    lab = Lab(prefix=SMOKE)
    try:
        a = lab.add_host("a", "172.31.0.1/16", mtu=9000)
        b = lab.add_host("b", "172.31.0.2/16", mtu=9000)
        out = lab.add_outside("172.31.255.254/16")
        names = lab.namespaces()
        assert set(names) == {SMOKE + n for n in ("sw", "a", "b", "outside")}
        assert set(names) <= set(netns_list())
        # 8972 bytes of ICMP payload + 28 of headers: one 9000-byte frame, which
        # the bridge would drop if any port on the way had a smaller MTU.
        a.ping(b.ip, size=8972)
        b.ping(out.ip)
        assert json.loads(a.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]["mtu"] == 9000
        sw = json.loads(run_cmd(["ip", "-n", lab.switch, "-j", "link", "show", "br0"]).stdout)
        assert sw[0]["mtu"] == 9000
        assert a.run(["ip", "route", "show", "default"]).stdout.startswith(
            "default via 172.31.255.254")
        c = lab.add_host("c", "172.31.0.4/16")
        c_sleeper = c.popen(["sleep", "600"])
        lab.remove_host("c")
        assert c.name not in netns_list() and not c.etc_dir.exists()
        assert c_sleeper.wait(timeout=5) is not None
        sleeper = a.popen(["sleep", "600"])
        assert sleeper.pid in a.pids()
        etc_dirs = [h.etc_dir for h in (a, b, out)]
        assert all(d.is_dir() for d in etc_dirs)
    finally:
        lab.close()
    assert not set(names) & set(netns_list())
    assert not any(d.exists() for d in etc_dirs)
    assert sleeper.wait(timeout=5) is not None
    assert not lab._lock.path.exists()


def test_dockerd_teardown_leaves_nothing(root_required):
    with Lab(prefix=SMOKE) as lab:
        host = lab.add_host("d", "172.31.0.3/16")
        lab.add_outside("172.31.255.254/16")
        daemon = Dockerd(host).start()
        ensure_busybox(daemon)
        cid = daemon.cli("run", "-d", "--name", "sleeper", "busybox", "sleep", "600").stdout.strip()
        daemon.cli("network", "create", "smokenet")
        container_pid = int(daemon.cli("inspect", "-f", "{{.State.Pid}}", cid).stdout)
        assert pid_alive(container_pid)
        cgroups = [Path(h + daemon.cgroup_parent) for h in cgroup_hierarchies()]
        assert any(c.is_dir() for c in cgroups)

        # A crash and a restart: the new daemon works, the old shim is gone.
        daemon.kill()
        assert not pid_alive(container_pid)
        daemon.start()
        assert daemon.cli("run", "--rm", "busybox", "echo", "again").stdout == "again\n"
        assert "smokenet" in daemon.cli("network", "ls").stdout

        daemon.cli("run", "-d", "--name", "sleeper2", "busybox", "sleep", "600")
        pid, tmpdir = daemon.pid, daemon.tmpdir
        daemon.close()
        assert not pid_alive(pid)
        assert not tmpdir.exists()
        assert str(tmpdir) not in host_mounts()
        assert not any(c.exists() for c in cgroups)
        assert host.pids() == []
    assert SMOKE not in " ".join(netns_list())
