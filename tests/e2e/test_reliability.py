"""Reliability: crashes, restarts, reboots, load and exhaustion lose nothing.

Everything runs against the session's real dockerd and plugin process in the
lab host fanlab-h28 (see conftest.py), with real kernel objects. After each
disturbance one check (harness/consistency.py) compares the plugin's state,
Docker's view and the kernel: same networks and endpoints, no address held
twice or by nobody, no interface, route, filter or rule that no network owns.

Figures (timings, counts) are printed at the end of the module.
"""
from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network

import pytest

from fan_driver import faults
from fan_driver.model import Owner
from fan_driver.store import LAST_GOOD_FILE, STATE_FILE
from tests.harness import PluginError, consistency
from tests.harness.dockerd import docker_bg
from tests.harness.netlab import busybox_path

pytestmark = pytest.mark.e2e

SUBNET = "250.0.0.0/8"
SLICE = IPv4Network("250.0.28.0/24")
GATEWAY = "250.0.28.1"
UNDERLAY = "172.30.0.0/16"
OUTSIDE = "172.30.255.254"
CRASH_NET, CRASH_SUBNET = "crashnet", "251.0.0.0/8"
CRASH_ENV = faults.ENV
# The plugin's --unclaimed-grace here: the tests wait it out (30 s by default);
# dockerd's retries after the plugin's restarts arrive well within it.
GRACE = 10.0
LOAD = 100            # concurrent `docker run`s
BURST = 100           # concurrent raw RequestAddress calls, then as many releases

FIGURES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _print_figures(request):
    yield
    if not FIGURES:
        return
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_sep("-", "reliability figures")
        for what, value in FIGURES.items():
            reporter.write_line(f"{what:58s} {value}")


def create_network(dockerd, name, subnet=SUBNET, *opts, check=True):
    return dockerd.cli("network", "create", "-d", "fan", "--ipam-driver", "fan",
                       "--subnet", subnet, "--ipam-opt", f"underlay={UNDERLAY}", *opts, name,
                       check=check)


def run(dockerd, name, net="fan", *args, check=True):
    return dockerd.cli("run", "-d", "--name", name, "--net", net, *args,
                       "busybox", "sleep", "3600", check=check)


def ip_of(dockerd, name, net="fan") -> str:
    out = dockerd.cli("inspect", name).stdout
    return json.loads(out)[0]["NetworkSettings"]["Networks"][net]["IPAddress"]


def ping(dockerd, container, target, count=1):
    return dockerd.cli("exec", container, "ping", "-c", str(count), "-W", "2", target)


def containers_on(dockerd, net) -> list:
    out = dockerd.cli("ps", "-aq", "--filter", f"network={net}").stdout
    return out.split()


@pytest.fixture(scope="module", autouse=True)
def _short_grace(plugin):
    usual = plugin.extra_args
    plugin.extra_args = (*usual, "--unclaimed-grace", str(GRACE))
    plugin.restart()
    yield
    plugin.extra_args = usual
    plugin.restart()


@pytest.fixture(scope="module")
def fan(dockerd, plugin, lab_host):
    create_network(dockerd, "fan")
    run(dockerd, "anchor")      # a container that lives through everything here
    yield "fan"
    plugin.start()
    for net in ("fan", CRASH_NET, "tiny"):
        ids = containers_on(dockerd, net)
        if ids:
            dockerd.cli("rm", "-f", *ids, check=False, timeout=300)
        dockerd.cli("network", "rm", net, check=net == "fan")
    consistency.check(plugin, dockerd, lab_host)


# --- 1. SIGKILL while containers exchange traffic --------------------------------------

def test_sigkill_during_traffic_loses_nothing(dockerd, plugin, lab_host, fan):
    for name in ("talk-a", "talk-b"):
        run(dockerd, name)
    try:
        before = consistency.settled(plugin, dockerd, lab_host)
        target = ip_of(dockerd, "talk-b")
        pings = 60
        flow = docker_bg(dockerd, "exec", "talk-a", "ping", "-c", str(pings), "-i", "0.1",
                         "-W", "2", target)
        time.sleep(1.5)
        plugin.kill()
        killed = time.monotonic()
        time.sleep(2)
        plugin.start()
        down = time.monotonic() - killed
        out, err = flow.communicate(timeout=60)
        received = int(out.split(" packets received")[0].rsplit(",", 1)[1])
        FIGURES["SIGKILL: plugin down (s)"] = f"{down:.2f}"
        FIGURES["SIGKILL: restart to ready (s)"] = f"{plugin.start_seconds:.2f}"
        FIGURES["SIGKILL: pings at 10/s answered across kill+restart"] = f"{received}/{pings}"
        assert received == pings, out + err

        after = consistency.settled(plugin, dockerd, lab_host)
        assert after == before
        # Containers started afterwards work, with new addresses, both ways.
        run(dockerd, "talk-c")
        new = ip_of(dockerd, "talk-c")
        assert new not in {target, ip_of(dockerd, "talk-a"), ip_of(dockerd, "anchor")}
        ping(dockerd, "talk-c", target)
        ping(dockerd, "talk-a", new)
        ping(dockerd, "talk-c", OUTSIDE)
        consistency.settled(plugin, dockerd, lab_host)
    finally:
        dockerd.cli("rm", "-f", "talk-a", "talk-b", "talk-c", check=False)
    consistency.settled(plugin, dockerd, lab_host)


# --- 2. A crash at every step ----------------------------------------------------------

# point, what exists before, what runs into the crash
CRASHES = [
    ("request_pool:after_state", "", "create"),
    ("request_address:after_state", "", "create"),          # the gateway's
    ("create_network:after_kernel", "", "create"),
    ("create_network:after_state", "", "create"),
    ("request_address:after_state", "", "run"),             # a container's
    ("create_endpoint:after_kernel", "", "run"),
    ("create_endpoint:after_state", "", "run"),
    ("join:after_kernel", "", "run"),
    ("leave:before_reply", "victim", "rm"),
    ("delete_endpoint:after_state", "victim", "rm"),
    ("delete_endpoint:after_kernel", "victim", "rm"),
    ("release_address:after_state", "victim", "rm"),
    ("release_address:after_state", "crashnet", "network rm"),   # the gateway's
    ("release_pool:after_state", "crashnet", "network rm"),
    ("delete_network:after_state", "crashnet", "network rm"),
    ("delete_network:after_kernel", "crashnet", "network rm"),
    ("restore:after_orphans", "victim", "start"),
    ("restore:after_network", "victim", "start"),
]


def _crash_id(case):
    point, _, trigger = case
    return f"{point}-{trigger.replace(' ', '_')}"


def _action(dockerd, trigger):
    return {
        "create": lambda: docker_bg(dockerd, "network", "create", "-d", "fan", "--ipam-driver",
                                    "fan", "--subnet", CRASH_SUBNET, "--ipam-opt",
                                    f"underlay={UNDERLAY}", CRASH_NET),
        "run": lambda: docker_bg(dockerd, "run", "-d", "--name", "victim", "--net", "fan",
                                 "busybox", "sleep", "3600"),
        "rm": lambda: docker_bg(dockerd, "rm", "-f", "victim"),
        "network rm": lambda: docker_bg(dockerd, "network", "rm", CRASH_NET),
    }[trigger]


def _plant_orphans(host):
    """What a crash elsewhere could leave: a marked bridge and a marked rule of a
    network no state knows."""
    host.run(["ip", "link", "add", "fan-orphan", "type", "bridge"])
    host.run(["ip", "link", "set", "fan-orphan", "alias", "fan-driver 0123456789ab"])
    host.run(["iptables", "-A", "FAN-FORWARD", "-i", "fan-orphan", "-m", "comment",
              "--comment", "fan-driver 0123456789ab", "-j", "ACCEPT"])


@pytest.mark.parametrize("case", CRASHES, ids=[_crash_id(c) for c in CRASHES])
def test_crash_at_every_step_leaves_nothing_behind(dockerd, plugin, lab_host, fan, case):
    point, setup, trigger = case
    if setup == "victim":
        run(dockerd, "victim")
    elif setup == "crashnet":
        create_network(dockerd, CRASH_NET, CRASH_SUBNET)
    consistency.settled(plugin, dockerd, lab_host)
    plugin.stop()
    plugin.env[CRASH_ENV] = point
    try:
        if trigger == "start":
            _plant_orphans(lab_host)
            with pytest.raises(Exception, match="exited"):
                plugin.start()
            result = None
        else:
            plugin.start()
            proc = _action(dockerd, trigger)()
            assert plugin.proc.wait(timeout=60) == 137, f"never reached {point}"
            plugin.kill()          # reaps it, closes its log
            result = proc
    finally:
        del plugin.env[CRASH_ENV]
    plugin.start()
    FIGURES.setdefault("crash: restart to ready, per restart (s)", [])
    FIGURES["crash: restart to ready, per restart (s)"].append(round(plugin.start_seconds, 2))
    outcome = "n/a"
    if result is not None:
        out, err = result.communicate(timeout=120)
        outcome = "ok" if result.returncode == 0 else "failed: " + err.strip()[-160:]
    FIGURES[f"crash {_crash_id(case)}: docker says"] = outcome

    grace = point == "request_address:after_state" and trigger == "run"
    consistency.settled(plugin, dockerd, lab_host, allow_unclaimed=True)
    try:
        # Whatever Docker made of it, the same command works now.
        if trigger == "create" and result.returncode != 0:
            create_network(dockerd, CRASH_NET, CRASH_SUBNET)
        elif trigger == "run" and result.returncode != 0:
            dockerd.cli("rm", "-f", "victim")
            run(dockerd, "victim")
        elif trigger == "rm" and result.returncode != 0:
            dockerd.cli("rm", "-f", "victim")
        elif trigger == "network rm" and result.returncode != 0:
            dockerd.cli("network", "rm", CRASH_NET)
        if trigger == "create":
            run(dockerd, "victim", CRASH_NET)
            ping(dockerd, "victim", ip_of(dockerd, "victim", CRASH_NET).rsplit(".", 1)[0] + ".1")
        else:
            run(dockerd, "after")
            ping(dockerd, "after", ip_of(dockerd, "anchor"))
            ping(dockerd, "anchor", ip_of(dockerd, "after"))
            if trigger in ("run", "start"):
                ping(dockerd, "after", ip_of(dockerd, "victim"))
        consistency.settled(plugin, dockerd, lab_host, allow_unclaimed=grace)
        if grace:
            # The address whose reply the crash swallowed: Docker never learns
            # of it, so the plugin releases it after the grace period.
            started = time.monotonic()
            consistency.settled(plugin, dockerd, lab_host, timeout=GRACE + 20)
            FIGURES["crash: unclaimed address released after (s)"] = \
                f"{time.monotonic() - started:.1f}"
        if trigger == "start":
            assert "fan-orphan" not in lab_host.run(["ip", "-o", "link"]).stdout
    finally:
        dockerd.cli("rm", "-f", "victim", "after", check=False)
        dockerd.cli("network", "rm", CRASH_NET, check=False)
        lab_host.run(["ip", "link", "del", "fan-orphan"], check=False)
    consistency.settled(plugin, dockerd, lab_host)


def test_crash_in_the_middle_of_concurrent_runs(dockerd, plugin, lab_host, fan):
    """SIGKILL while 20 `docker run`s are under way: those that Docker reports
    started work, the others left nothing behind."""
    names = [f"busy-{i:02d}" for i in range(20)]
    procs = [docker_bg(dockerd, "run", "-d", "--name", n, "--net", "fan", "busybox",
                       "sleep", "3600") for n in names]
    try:
        time.sleep(2)
        plugin.kill()
        plugin.start()
        codes = [p.wait(timeout=300) for p in procs]
        running = [n for n, c in zip(names, codes) if c == 0]
        FIGURES["crash during 20 concurrent runs: started / failed"] = \
            f"{len(running)} / {len(names) - len(running)}"
        consistency.settled(plugin, dockerd, lab_host, allow_unclaimed=True)
        for name in running:
            ping(dockerd, "anchor", ip_of(dockerd, name))
        dockerd.cli("rm", "-f", *names, check=False)
        consistency.settled(plugin, dockerd, lab_host, timeout=GRACE + 20)
    finally:
        dockerd.cli("rm", "-f", *names, check=False)


# --- 3. Host reboot --------------------------------------------------------------------

def test_reboot_restores_the_fan_and_restarted_containers_work(dockerd, plugin, lab_host, fan):
    names = ["boot-a", "boot-b", "boot-c"]
    for name in names:
        run(dockerd, name, "fan", "--restart", "always")
    try:
        consistency.settled(plugin, dockerd, lab_host)
        dockerd.kill()
        plugin.kill()
        lab_host.wipe_network()
        left = consistency.kernel_view(lab_host)
        assert not left["marked"] and not left["rules"] and not left["routes"]

        plugin.start()
        FIGURES["reboot: plugin start to ready, restoring everything (s)"] = \
            f"{plugin.start_seconds:.2f}"
        kernel = consistency.kernel_view(lab_host)
        assert {"fan-250-0-28", "fan-vxlan"} <= set(kernel["marked"])
        bridge = json.loads(lab_host.run(["ip", "-j", "addr", "show", "fan-250-0-28"]).stdout)[0]
        assert "UP" in bridge["flags"]
        assert {(a["local"], a["prefixlen"]) for a in bridge["addr_info"]} >= {(GATEWAY, 24)}
        assert kernel["routes"]["fan-vxlan"] == [SUBNET]
        assert len(kernel["filters"]["fan-vxlan"]) == 1
        state = consistency.read_state(plugin.state_dir)
        assert len(kernel["rules"]) == sum(consistency.network_rule_count(state, n)
                                           for n in state["networks"])
        assert lab_host.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"

        started = time.monotonic()
        dockerd.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = [json.loads(dockerd.cli("inspect", n).stdout)[0]["State"]["Running"]
                      for n in names + ["anchor"]]
            if all(states[:-1]):
                break
            time.sleep(0.5)
        FIGURES["reboot: dockerd start until restart-policy containers run (s)"] = \
            f"{time.monotonic() - started:.1f}"
        assert all(states[:-1]), dockerd.log_tail(40)
        addresses = [ip_of(dockerd, n) for n in names]
        assert len(set(addresses)) == len(names)
        for name in names:
            for address in addresses + [GATEWAY]:
                ping(dockerd, name, address)
        ping(dockerd, names[0], OUTSIDE)
        dockerd.cli("start", "anchor")     # no restart policy: started by hand
        ping(dockerd, "anchor", addresses[0])
        consistency.settled(plugin, dockerd, lab_host)
    finally:
        dockerd.cli("rm", "-f", *names, check=False)
    consistency.settled(plugin, dockerd, lab_host)


def test_a_fixed_address_whose_release_was_lost_comes_back_with_its_container(
        dockerd, plugin, lab_host, fan):
    """dockerd releases a stopping container's address after its
    DeleteEndpoint. When the plugin is gone before that release arrives (a
    dockerd restart stops a managed plugin with it; here the plugin dies on
    it, and dockerd's retry reaches the restarted plugin without the body)
    the plugin still holds the address; the container, started again, asks
    for its --ip and gets it."""
    pinned = str(SLICE.network_address + 77)
    run(dockerd, "keeper", "fan", "--ip", pinned, "--init")
    try:
        plugin.stop()
        plugin.env[CRASH_ENV] = "release_address:before_state"
        try:
            plugin.start()
            stopping = docker_bg(dockerd, "stop", "keeper")   # Leave, DeleteEndpoint, ...
            assert plugin.proc.wait(timeout=60) == 137, "no ReleaseAddress came"
            plugin.kill()
        finally:
            del plugin.env[CRASH_ENV]
        plugin.start()
        stopping.communicate(timeout=120)
        owners = consistency.read_state(plugin.state_dir)["pools"][f"fan:{SUBNET}"]["addresses"]
        assert owners.get(pinned) == Owner.UNCLAIMED, owners     # ... and the release is lost
        dockerd.cli("start", "keeper")
        assert ip_of(dockerd, "keeper") == pinned
        ping(dockerd, "keeper", ip_of(dockerd, "anchor"))
        ping(dockerd, "anchor", pinned)
        consistency.settled(plugin, dockerd, lab_host)
    finally:
        dockerd.cli("rm", "-f", "keeper", check=False)
    consistency.settled(plugin, dockerd, lab_host)


# --- 4. Load -------------------------------------------------------------------------

def _call_timed(plugin, method, body):
    started = time.monotonic()
    status, reply = plugin.call(method, body, timeout=60)
    return time.monotonic() - started, status, reply


def _latency(samples) -> str:
    ms = sorted(s * 1000 for s in samples)
    return (f"n={len(ms)} median {statistics.median(ms):.0f} ms, "
            f"p95 {ms[int(len(ms) * 0.95) - 1]:.0f} ms, max {ms[-1]:.0f} ms")


def test_100_concurrent_runs_and_an_api_burst(dockerd, plugin, lab_host, fan):
    names = [f"load-{i:03d}" for i in range(LOAD)]
    pid = f"fan:{SUBNET}"
    raw_addresses, latencies = [], {"RequestAddress": [], "ReleaseAddress": [], "reads": []}
    try:
        started = time.monotonic()
        procs = [docker_bg(dockerd, "run", "-d", "--name", n, "--net", "fan", "busybox",
                           "sleep", "3600") for n in names]

        def burst():
            with ThreadPoolExecutor(max_workers=BURST) as pool:
                for took, status, reply in pool.map(
                        lambda _: _call_timed(plugin, "IpamDriver.RequestAddress",
                                              {"PoolID": pid, "Address": "", "Options": None}),
                        range(BURST)):
                    assert status == 200, reply
                    latencies["RequestAddress"].append(took)
                    raw_addresses.append(reply["Address"].split("/")[0])

        time.sleep(1)
        burster = threading.Thread(target=burst)
        burster.start()
        failed = [(n, p.communicate()[1]) for n, p in zip(names, procs) if p.wait(timeout=600)]
        took = time.monotonic() - started
        burster.join(timeout=300)
        assert not failed, failed[:3]
        FIGURES[f"load: {LOAD} concurrent docker run, wall time (s)"] = f"{took:.1f}"
        FIGURES["load: per container (s)"] = f"{took / LOAD:.2f}"
        FIGURES[f"load: API burst during the runs, {BURST} x RequestAddress"] = \
            _latency(latencies["RequestAddress"])

        ips = {n: ip_of(dockerd, n) for n in names}
        everything = list(ips.values()) + raw_addresses + [ip_of(dockerd, "anchor")]
        assert len(set(everything)) == len(everything), "an address was handed out twice"
        assert all(IPv4Address(a) in SLICE for a in everything)

        # Reads while the pool is full: what dockerd asks on every container start.
        nid = json.loads(dockerd.cli("network", "inspect", "fan").stdout)[0]["Id"]
        state = consistency.read_state(plugin.state_dir)
        eids = list(state["networks"][nid]["endpoints"])[:50]
        with ThreadPoolExecutor(max_workers=100) as pool:
            reads = [("NetworkDriver.EndpointOperInfo", {"NetworkID": nid, "EndpointID": e})
                     for e in eids]
            reads += [("Plugin.Activate", {}), ("NetworkDriver.GetCapabilities", {}),
                      ("IpamDriver.GetCapabilities", {})] * 50
            for took_, status, reply in pool.map(lambda c: _call_timed(plugin, *c), reads):
                assert status == 200, reply
                latencies["reads"].append(took_)
            releases = list(pool.map(lambda a: _call_timed(
                plugin, "IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": a}),
                raw_addresses))
        assert all(status == 200 for _, status, _ in releases)
        latencies["ReleaseAddress"] = [t for t, _, _ in releases]
        FIGURES[f"load: {len(reads)} concurrent reads (OperInfo, Activate, caps)"] = \
            _latency(latencies["reads"])
        FIGURES[f"load: {BURST} concurrent ReleaseAddress"] = _latency(latencies["ReleaseAddress"])
        counts = consistency.settled(plugin, dockerd, lab_host)
        assert counts["endpoints"] == LOAD + 1

        # Every container reaches every other (from one of them) and the host reaches all.
        targets = " ".join(sorted(ips.values()))
        out = dockerd.cli("exec", names[0], "sh", "-c",
                          f"for ip in {targets}; do ping -c 1 -W 2 $ip >/dev/null 2>&1 "
                          "|| echo unreachable $ip; done", timeout=600).stdout
        assert "unreachable" not in out, out
        out = lab_host.run(["sh", "-c", f"for ip in {targets}; do {busybox_path()} ping -c 1 "
                            "-W 2 $ip >/dev/null 2>&1 || echo unreachable $ip; done"],
                           timeout=600).stdout
        assert "unreachable" not in out, out
        FIGURES["load: containers reachable (from a container, from the host)"] = \
            f"{LOAD}/{LOAD}, {LOAD}/{LOAD}"

        started = time.monotonic()
        removers = [docker_bg(dockerd, "rm", "-f", *names[i:i + 10]) for i in range(0, LOAD, 10)]
        assert all(p.wait(timeout=600) == 0 for p in removers)
        FIGURES[f"load: removing {LOAD} (10 concurrent docker rm -f), wall time (s)"] = \
            f"{time.monotonic() - started:.1f}"
        counts = consistency.settled(plugin, dockerd, lab_host)
        assert counts["endpoints"] == 1 and counts["addresses"] == 2   # anchor + gateway
        FIGURES["load: left after removal (endpoints, addresses, interfaces, rules)"] = \
            f"{counts['endpoints']} (anchor), {counts['addresses']} (anchor, gateway), " \
            f"{counts['interfaces']} (bridge, tunnel, anchor), {counts['rules']}"
    finally:
        dockerd.cli("rm", "-f", *names, check=False, timeout=600)
        for a in raw_addresses:
            plugin.call("IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": a})


# --- 5. Exhaustion ---------------------------------------------------------------------

def test_full_slice_names_itself_and_addresses_are_reused(dockerd, plugin, lab_host, fan):
    # host_reserve=250 leaves 4 container addresses in 252.0.28.0/24: .252 to .254... less
    # the broadcast address: .251, .252, .253, .254.
    create_network(dockerd, "tiny", "252.0.0.0/8", "-o", "host_reserve=250")
    names = [f"tiny-{i}" for i in range(4)]
    try:
        for name in names:
            run(dockerd, name, "tiny")
        taken = {n: ip_of(dockerd, n, "tiny") for n in names}
        assert sorted(taken.values()) == [f"252.0.28.{i}" for i in range(251, 255)]
        before = consistency.settled(plugin, dockerd, lab_host)
        full = run(dockerd, "tiny-x", "tiny", check=False)
        assert full.returncode != 0
        assert "252.0.28.0/24" in full.stderr and "all 4 container addresses" in full.stderr, \
            full.stderr
        FIGURES["exhaustion: what the 5th container is told"] = \
            full.stderr.strip().splitlines()[-1][:160]
        dockerd.cli("rm", "-f", "tiny-x")
        assert consistency.settled(plugin, dockerd, lab_host) == before

        dockerd.cli("rm", "-f", names[1], names[2])
        for name in ("tiny-y", "tiny-z"):
            run(dockerd, name, "tiny")
        reused = {ip_of(dockerd, n, "tiny") for n in ("tiny-y", "tiny-z")}
        assert reused == {taken[names[1]], taken[names[2]]}
        ping(dockerd, "tiny-y", taken[names[0]])
        consistency.settled(plugin, dockerd, lab_host)
    finally:
        dockerd.cli("rm", "-f", *names, "tiny-x", "tiny-y", "tiny-z", check=False)
        dockerd.cli("network", "rm", "tiny", check=False)
    consistency.settled(plugin, dockerd, lab_host)


# --- 7. Security: only our own objects; nothing the host already uses -----------------

def test_only_marked_interfaces_and_rules_are_ever_removed(dockerd, plugin, lab_host, fan):
    """Foreign objects with names like ours survive restarts (orphan sweeps) and
    network removal; a foreign interface where ours would go is refused."""
    host = lab_host
    host.run(["ip", "link", "add", "fan-251-0-28", "type", "bridge"])     # a stranger's
    host.run(["ip", "link", "add", "fve0123456789a", "type", "bridge"])
    host.run(["ip", "link", "add", "fan-stranger", "type", "bridge"])
    host.run(["ip", "link", "set", "fan-stranger", "alias", "fan-driverX"])  # not our mark
    foreign_rule = ["FAN-FORWARD", "-i", "fan-stranger", "-j", "ACCEPT"]
    host.run(["iptables", "-A", *foreign_rule])
    try:
        plugin.kill()
        plugin.start()               # restore() sweeps orphans
        refused = create_network(dockerd, CRASH_NET, CRASH_SUBNET, check=False)
        assert refused.returncode != 0
        assert "fan-251-0-28 already exists and was not made by fan-driver" in refused.stderr
        run(dockerd, "mine")
        dockerd.cli("rm", "-f", "mine")
        plugin.stop()
        plugin.start()
        links = host.run(["ip", "-o", "link"]).stdout
        for name in ("fan-251-0-28", "fve0123456789a", "fan-stranger"):
            assert f" {name}:" in links, name
        assert host.run(["iptables", "-C", *foreign_rule], check=False).returncode == 0
    finally:
        dockerd.cli("rm", "-f", "mine", check=False)
        dockerd.cli("network", "rm", CRASH_NET, check=False)
        host.run(["iptables", "-D", *foreign_rule], check=False)
        for name in ("fan-251-0-28", "fve0123456789a", "fan-stranger"):
            host.run(["ip", "link", "del", name], check=False)
    consistency.settled(plugin, dockerd, lab_host)


def test_a_damaged_state_file_stops_the_plugin_before_it_touches_the_kernel(
        dockerd, plugin, lab_host, fan):
    """A state file cut short (a full disk, a hand edit): the plugin refuses to
    start, naming the file and the last good copy beside it, and removes
    nothing (a plugin that read it as empty would sweep every fan object);
    with the copy put back it carries on where it stopped."""
    anchor = ip_of(dockerd, "anchor")
    before = consistency.kernel_snapshot(lab_host)
    path, last_good = plugin.state_dir / STATE_FILE, plugin.state_dir / LAST_GOOD_FILE
    good = path.read_text()
    plugin.stop()
    path.write_text(good[: len(good) // 2])
    try:
        with pytest.raises(PluginError) as refused:
            plugin.start(timeout=20)
        assert plugin.returncode == 1
        assert f"state file {path} is corrupt" in str(refused.value)
        assert f"copy {last_good}" in str(refused.value)
        assert consistency.kernel_snapshot(lab_host) == before
        ping(dockerd, "anchor", GATEWAY)
        assert last_good.read_text() == good
        path.write_text(last_good.read_text())   # the fix the message names
        plugin.start()
    finally:
        if not plugin.running:
            path.write_text(good)
            plugin.start()
    assert ip_of(dockerd, "anchor") == anchor
    run(dockerd, "after-repair")
    ping(dockerd, "after-repair", anchor)
    dockerd.cli("rm", "-f", "after-repair")
    consistency.settled(plugin, dockerd, lab_host)


@pytest.mark.parametrize("setup, subnet, message", [
    (["ip", "route", "add", "253.7.0.0/16", "via", OUTSIDE], "253.0.0.0/8",
     "overlaps route 253.7.0.0/16"),
    (["ip", "addr", "add", "253.0.28.9/32", "dev", "eth0"], "253.0.0.0/8",
     "holds address 253.0.28.9 of eth0"),
    (None, "172.0.0.0/8", "overlaps underlay"),
], ids=["route", "address", "underlay"])
def test_overlays_the_host_already_uses_are_refused(dockerd, plugin, lab_host, fan, setup,
                                                    subnet, message):
    undo = None
    if setup:
        lab_host.run(setup)
        undo = [*setup[:2], "del", *setup[3:]]
    try:
        before = consistency.kernel_view(lab_host)["marked"]
        result = create_network(dockerd, "takeover", subnet, check=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert consistency.kernel_view(lab_host)["marked"] == before
    finally:
        dockerd.cli("network", "rm", "takeover", check=False)
        if undo:
            lab_host.run(undo, check=False)
    consistency.settled(plugin, dockerd, lab_host)
