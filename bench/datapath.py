"""Data path: TCP throughput (iperf3) and ping latency between two hosts, for the
underlay itself, the fan (each encapsulation and mapping this kernel supports)
and Docker's own overlay driver (swarm mode across the same namespaces).

iperf3 is not in the busybox image: it runs from this machine's filesystem in
the container's network namespace only (`nsenter --net=/proc/PID/ns/net`), or
in a lab host's namespace for the underlay. Runs are interleaved, in a rotated
order each round; values are medians over the rounds, ratios the medians of
each round's ratios.

Two regimes, every path measured in both:
- CPU-bound: the lab's underlay is veth pairs with no line rate, and both
  "hosts" share this machine's CPUs, so a run measures the CPU cost of both
  ends of a path together (the sender's CPU also runs the receiver's softirq
  work). This is where encapsulations and datapaths differ in efficiency.
- line rate: each host's underlay interface is limited to LINE_RATE (tbf),
  as a NIC is, so that throughput is set by the bytes on the wire, the
  regime where the encapsulation's limit 1 - overhead/MTU applies.
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import AsyncIPRoute

from fan_driver.dataplane import bpf, libbpf
from fan_driver.dataplane.encap import ENCAPS, VXLAN
from fan_driver.dataplane.mapping.ebpf import SEND_PREF
from fan_driver.fanmap import FanMap, HostSlice
from tests.harness.netlab import busybox_path
from tests.harness.procs import env_with_sbin, run_cmd, stop_popen

from tests.harness.fanhosts import FanHost, in_netns

from .lab import KERNEL_FAN, BenchLab, wait_programmed
from .results import Report, Row, error_row, median, percentile

SECTION = "data path"
UNDERLAY = "172.30.0.0/24"     # both hosts are in it: 253 peers for mapping=routes
CREATE = ["network", "create", "-d", "fan", "--ipam-driver", "fan",
          "--ipam-opt", f"underlay={UNDERLAY}"]
# (encapsulation, mapping) -> overlay; what this kernel lacks is reported, not measured.
FANS = {("vxlan", "ebpf"): "250.0.0.0/8", ("vxlan", "routes"): "240.0.0.0/8",
        ("ipip", "ebpf"): "245.0.0.0/8", ("ipip", "routes"): "246.0.0.0/8",
        ("vxlan", "kernel"): "247.0.0.0/8", ("ipip", "kernel"): "248.0.0.0/8"}
# The A/B variants, each a second vxlan+ebpf network with one shortcut of the
# default undone or one check of it skipped: name -> (overlay, its options,
# what the A/B row compares).
# - send via fan-vxlan: the send program only routes and hands packets to the
#   external-mode device (whose egress program sets the tunnel key, the device
#   encapsulating), against the default that encapsulates itself;
# - receive=tunnel: packets go through the host's PREROUTING and INPUT, the
#   kernel's UDP socket and vxlan_rcv to the VXLAN device's ingress program,
#   against the default (receive=conntrack where the kernel can) that
#   decapsulates on the underlay what conntrack has seen pass the firewall;
# - receive=direct: decapsulating on the underlay without asking conntrack
#   (the opt-in that skips the host's PREROUTING and INPUT): what the check costs.
VIA_DEVICE = "fan vxlan+ebpf, send via fan-vxlan"
RX_VIA_DEVICE = "fan vxlan+ebpf, receive=tunnel"
RX_DIRECT = "fan vxlan+ebpf, receive=direct"
VARIANTS = {
    VIA_DEVICE: ("249.0.0.0/8", [], "the send program encapsulating and redirecting to the "
                                    "underlay device, against handing packets to fan-vxlan"),
    RX_VIA_DEVICE: ("251.0.0.0/8", ["-o", "receive=tunnel"],
                    "the default receive path, against receiving through the host's "
                    "firewall and fan-vxlan"),
    RX_DIRECT: ("252.0.0.0/8", ["-o", "receive=direct"],
                "the default receive path, against decapsulating without the conntrack "
                "check (skipping the host's INPUT)"),
}
SWARM_NET, SWARM_SUBNET = "bench-ov", "10.77.0.0/24"
OVERLAY = "docker overlay (swarm)"
# Swarm's VXLAN must not take UDP 4789, which the fan's external-mode device holds.
SWARM_DATA_PORT = 4790
UNDERLAY_MTU = 1500
IPERF_PORT = 5201
LINE_RATE_GBIT = 1    # a common NIC speed, well under every path's CPU-bound rate here
LINE_RATE = f"{LINE_RATE_GBIT}gbit"
REGIMES = ("CPU-bound", f"line rate {LINE_RATE_GBIT} Gbit/s")


@dataclass
class DataPath:
    name: str
    client_ns: str
    server_ns: str
    server_ip: str
    overhead: int

    @property
    def limit(self) -> float:
        """The encapsulation's theoretical share of the underlay: 1 - overhead/MTU."""
        return 1 - self.overhead / UNDERLAY_MTU


def fan_path_name(encap: str, mapping: str) -> str:
    return f"fan {encap}+{mapping}"


def fan_network(encap: str, mapping: str) -> tuple[str, list]:
    """The network's name and the arguments that create it."""
    return (f"bench-{encap}-{mapping}",
            [*CREATE, "--subnet", FANS[encap, mapping], "-o", f"encap={encap}",
             "-o", f"mapping={mapping}"])


def unavailable(h: FanHost, encap: str, mapping: str) -> str | None:
    """Why this kernel cannot carry the fan this way, or None."""
    if mapping == "kernel" and not KERNEL_FAN.exists():
        return f"needs Ubuntu's Fan kernel patch ({KERNEL_FAN} is missing)"
    if encap == "ipip":
        made = run_cmd(["ip", "-n", h.host.name, "link", "add", "benchprobe", "type", "ipip"],
                       check=False)
        if made.returncode != 0:
            return f"this kernel cannot create ipip devices ({made.stderr.strip()})"
        run_cmd(["ip", "-n", h.host.name, "link", "del", "benchprobe"], check=False)
    return None


def build(bl: BenchLab, report: Report, log) -> tuple[list[DataPath], dict]:
    """Networks, swarm and containers on both hosts: the paths that work, and
    {why: [names]} of the fans this kernel cannot carry."""
    a, b = bl.hosts["h28"], bl.hosts["h59"]
    paths = [DataPath("underlay", a.netns, b.netns, b.ip, 0)]
    missing = {}
    for encap, mapping in FANS:
        name = fan_path_name(encap, mapping)
        why = unavailable(a, encap, mapping)
        if why:
            missing.setdefault(why, []).append(name)
            continue
        try:
            net, args = fan_network(encap, mapping)
            for h in (a, b):
                h.cli(*args, net)
            if mapping == "routes":
                for h in (a, b):
                    wait_programmed(h, UNDERLAY, FANS[encap, mapping], timeout=300)
            paths.append(_container_path(name, a, b, net, ENCAPS[encap].overhead))
        except Exception as exc:   # report it, measure the others
            report.add(error_row(SECTION, f"{name}: setup", f"{type(exc).__name__}: {exc}"))
    if fan_path_name("vxlan", "ebpf") in [p.name for p in paths]:
        for variant in VARIANTS:
            try:
                paths.append(_variant_path(a, b, variant))
            except Exception as exc:
                report.add(error_row(SECTION, f"{variant}: setup", f"{type(exc).__name__}: {exc}"))
    try:
        setup_swarm(a, b, log)
        paths.append(_container_path(OVERLAY, a, b, SWARM_NET,
                                     ENCAPS["vxlan"].overhead))
    except Exception as exc:
        why = f"Docker's overlay driver (swarm mode) could not be set up here: {exc}"
        log("!!! " + why)
        report.add(error_row(SECTION, "docker overlay (swarm): setup", why))
    for p in list(paths[1:]):
        try:
            check_reachable(p)
        except RuntimeError as exc:
            report.add(error_row(SECTION, f"{p.name}: setup", str(exc)))
            paths.remove(p)
    return paths, missing


def _container_path(name: str, a: FanHost, b: FanHost, net: str, overhead: int) -> DataPath:
    for h in (a, b):
        h.start_container(net, net)
    return DataPath(name, a.container_netns(net), b.container_netns(net), b.containers[net][1],
                overhead)


def _variant_path(a: FanHost, b: FanHost, variant: str) -> DataPath:
    """A second vxlan+ebpf network with one of the default's shortcuts undone on
    both hosts: the rest of the fan stays as it is."""
    overlay, options, _ = VARIANTS[variant]
    net, args = fan_network("vxlan", "ebpf")
    net = f"{net}-{list(VARIANTS).index(variant)}"
    args[args.index(FANS["vxlan", "ebpf"])] = overlay
    for h in (a, b):
        h.cli(*args, *options, net)
    path = _container_path(variant, a, b, net, VXLAN.overhead)
    if variant == VIA_DEVICE:
        for h in (a, b):
            _swap_send_program(h, net, IPv4Network(overlay), send_encap=False)
    return path


def _swap_send_program(h: FanHost, container: str, overlay: IPv4Network, **changes) -> None:
    """Replace the send program on `container`'s veth by one with `changes` to
    the values the plugin loads it with."""
    out = run_cmd(in_netns(h.container_netns(container), ["ip", "-o", "link", "show", "eth0"]))
    veth = int(re.search(r"eth0@if(\d+)", out.stdout).group(1))
    mac = re.search(r"link/ether ([0-9a-f:]{17})", out.stdout).group(1)
    address = IPv4Address(h.containers[container][1])

    async def swap():
        async with AsyncIPRoute(netns=h.host.name) as ipr:
            tunnel = (await ipr.link_lookup(ifname=VXLAN.device))[0]
            underlay = (await ipr.link_lookup(ifname="eth0"))[0]
            fan, local = FanMap(overlay, IPv4Network(UNDERLAY)), IPv4Address(h.ip)
            config = bpf.Config(fan, HostSlice(fan, local).slice,
                                (int(overlay.network_address) >> 8) & 0xFFFFFF,
                                VXLAN.bpf_encap, local, tunnel_index=tunnel,
                                underlay_index=underlay, tunnel_mac=VXLAN.device_mac)
            obj = bpf.load(replace(config, **changes), "fan_bench")
            try:
                # the program sends only what its map says is the container's
                libbpf.map_update(obj.map_fd(bpf.ENDPOINTS),
                                  *bpf.endpoint_entry(int(address), veth, mac))
                await bpf.attach(ipr, veth, obj.program_fd(bpf.SEND), "fan_bench", SEND_PREF,
                                 bpf.INGRESS)
            finally:
                obj.close()
    asyncio.run(swap())


def setup_swarm(a: FanHost, b: FanHost, log) -> None:
    started = time.monotonic()
    a.cli("swarm", "init", "--advertise-addr", a.ip, "--listen-addr", f"{a.ip}:2377",
          "--data-path-port", str(SWARM_DATA_PORT), timeout=120)
    token = a.cli("swarm", "join-token", "-q", "worker").stdout.strip()
    b.cli("swarm", "join", "--token", token, "--advertise-addr", b.ip, f"{a.ip}:2377",
          timeout=120)
    a.cli("network", "create", "-d", "overlay", "--attachable", "--subnet", SWARM_SUBNET,
          SWARM_NET, timeout=120)
    log(f"swarm: manager {a.name}, worker {b.name}, data port {SWARM_DATA_PORT} "
        f"({time.monotonic() - started:.1f} s)")


def leave_swarm(bl: BenchLab) -> None:
    for h in bl.hosts.values():
        for name in list(h.containers):
            if name == SWARM_NET:
                h.cli("rm", "-f", name, check=False)
                h.containers.pop(name)
    for h in reversed(list(bl.hosts.values())):
        h.cli("swarm", "leave", "--force", check=False, timeout=120)


def check_reachable(p: DataPath, attempts: int = 20) -> None:
    for _ in range(attempts):
        if run_cmd(in_netns(p.client_ns, [busybox_path(), "ping", "-c", "1", "-W", "1",
                                          p.server_ip]), check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{p.name}: {p.server_ip} unreachable")


def iperf3(p: DataPath, seconds: float, omit: int) -> float:
    """One TCP run, client to server: received bits per second (after `omit`
    seconds of slow start, which are not counted)."""
    server = subprocess.Popen(in_netns(p.server_ns, ["iperf3", "-s", "-1", "-p", IPERF_PORT]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env_with_sbin())
    try:
        for _ in range(50):   # until the server listens
            result = run_cmd(in_netns(p.client_ns, [
                "iperf3", "-c", p.server_ip, "-p", IPERF_PORT, "-t", seconds, "-O", omit, "-J"]),
                check=False, timeout=seconds + omit + 60)
            try:
                data = json.loads(result.stdout)
            except ValueError:
                data = {"error": result.stderr or result.stdout}
            if "error" not in data:
                return data["end"]["sum_received"]["bits_per_second"]
            if "connect" not in data["error"] or server.poll() is not None:
                raise RuntimeError(f"iperf3 {p.name}: {data['error']}")
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 {p.name}: server never listened")
    finally:
        stop_popen(server, timeout=5)   # by PID; it exits by itself after one test


PING_TIME = re.compile(r"time=([0-9.]+) ms")


def ping_rtts(p: DataPath, count: int, interval: float = 0.01) -> list[float]:
    out = run_cmd(in_netns(p.client_ns, [busybox_path(), "ping", "-c", count, "-i", interval,
                                         "-W", "5", p.server_ip]),
                  check=False, timeout=count * interval + 60).stdout
    rtts = [float(t) for t in PING_TIME.findall(out)]
    if len(rtts) < count * 0.9:
        raise RuntimeError(f"ping {p.name}: {len(rtts)} of {count} replies")
    return rtts


def measure(paths: list[DataPath], rounds: int, seconds: float, omit: int, pings: int,
            log) -> dict:
    """Round after round, every path once, in a rotated order: a load that comes
    and goes on this shared machine hits all paths alike, and each round's
    ratios compare runs made seconds apart."""
    tput = {p.name: [] for p in paths}
    rtt = {p.name: [] for p in paths}
    for r in range(rounds):
        order = paths[r % len(paths):] + paths[:r % len(paths)]
        for p in order:
            tput[p.name].append(iperf3(p, seconds, omit) / 1e9)
            rtt[p.name] += ping_rtts(p, pings)
        log(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {v[-1]:.2f}" for name, v in tput.items()) + " Gbit/s")
    return {"throughput_gbits": tput, "rtt_ms": rtt}


def round_ratio(samples: dict, name: str, baseline: str) -> float:
    """The median over rounds of each round's ratio."""
    return median(a / b for a, b in zip(samples[name], samples[baseline]))


class line_rate:
    """Context manager: every lab host's underlay interface sends at most LINE_RATE."""

    def __init__(self, bl: BenchLab):
        self.hosts = [h.host for h in bl.hosts.values()]

    def __enter__(self):
        for host in self.hosts:
            # burst above a 64 KiB GSO packet, so that tbf never splits one in software
            host.run(["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", LINE_RATE,
                      "burst", "256kb", "latency", "50ms"])
        return self

    def __exit__(self, *exc):
        for host in self.hosts:
            host.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)


# Targets: CPU-bound every fan keeps 85 % of the underlay and the eBPF
# mapping beats Docker's overlay by 10 %; at line rate, 95 % of the underlay.
TARGETS = {REGIMES[0]: {"underlay": 0.85, "overlay": 1.10},
           REGIMES[1]: {"underlay": 0.95, "overlay": None}}
def rows(paths: list[DataPath], samples: dict, report: Report, regime: str) -> None:
    runs = samples["throughput_gbits"]
    tput = {k: median(v) for k, v in runs.items()}
    under = tput["underlay"]
    spread = {k: f"{min(v):.2f}-{max(v):.2f} Gbit/s over {len(v)} runs"
              for k, v in runs.items()}
    report.add(Row(SECTION, f"{regime}: TCP throughput, underlay host to host (the baseline)",
                   under, under, "Gbit/s", note=spread["underlay"] +
                   "; value and baseline are medians, ratio the median of per-round ratios"))
    targets = TARGETS[regime]
    for p in paths[1:]:
        # the targets are the default path's; the A/B variants are there to compare
        is_fan = p.name.startswith("fan") and p.name not in VARIANTS
        share = round_ratio(runs, p.name, "underlay")
        report.add(Row(SECTION, f"{regime}: TCP throughput, {p.name} vs underlay", tput[p.name],
                       under, "Gbit/s", target=(">=", targets["underlay"]) if is_fan else None,
                       ratio=share, note=spread[p.name]))
        report.add(Row(SECTION, f"  {p.name} vs its limit 1-{p.overhead}/{UNDERLAY_MTU}",
                       share, p.limit, "",
                       note="its share of the underlay against the encapsulation's "
                            "theoretical share"))
        if p.name.startswith("fan") and OVERLAY in tput:
            # At line rate two VXLAN paths with the same MTU carry the same bytes:
            # equal by construction, so "above" is a question for the CPU-bound regime.
            target = targets["overlay"] if is_fan and p.name.endswith("+ebpf") else None
            report.add(Row(SECTION, f"  {p.name} vs docker overlay", tput[p.name],
                           tput[OVERLAY], "Gbit/s", target=target and (">=", target),
                           ratio=round_ratio(runs, p.name, OVERLAY),
                           note="" if regime == REGIMES[0] or p.overhead != VXLAN.overhead else
                           "both VXLAN with the same MTU: the same bytes on the wire"))
    default = fan_path_name("vxlan", "ebpf")
    for variant, (_, _, compared) in VARIANTS.items():
        if variant in tput:
            report.add(Row(SECTION, f"{regime}: TCP throughput, {default} vs {variant}",
                           tput[default], tput[variant], "Gbit/s",
                           ratio=round_ratio(runs, default, variant), note=f"A/B: {compared}"))
    if OVERLAY not in tput:
        report.add(error_row(SECTION, f"{regime}: TCP throughput, fan vs docker overlay",
                             "no docker overlay (swarm) path: see its setup row"))
    rtt_rows(paths, samples["rtt_ms"], report, regime)


def rtt_rows(paths: list[DataPath], rtt: dict, report: Report, regime: str) -> None:
    under_rtt = median(rtt["underlay"])
    report.add(Row(SECTION, f"{regime}: ping RTT median, underlay (the baseline)", under_rtt,
                   under_rtt, "ms", note=f"p99 {percentile(rtt['underlay'], 99):.3f} ms over "
                                         f"{len(rtt['underlay'])} pings"))
    for p in paths[1:]:
        report.add(Row(SECTION, f"{regime}: ping RTT median, {p.name} vs underlay",
                       median(rtt[p.name]), under_rtt, "ms",
                       note=f"p99 {percentile(rtt[p.name], 99):.3f} ms"))
        if p.name.startswith("fan") and OVERLAY in rtt:
            report.add(Row(SECTION, f"  {p.name} vs docker overlay", median(rtt[p.name]),
                           median(rtt[OVERLAY]), "ms",
                           target=("<=", 1.0) if p.name == fan_path_name("vxlan", "ebpf")
                           and regime == REGIMES[0] else None))


def run(bl: BenchLab, report: Report, short: bool, log) -> None:
    paths, missing = build(bl, report, log)
    rounds, seconds, omit, pings = (1, 1, 0, 20) if short else (8, 3, 1, 100)
    report.raw["datapath"] = {}
    for regime in REGIMES:
        log(f"data path, {regime}")
        if regime == REGIMES[0]:
            samples = measure(paths, rounds, seconds, omit, pings, log)
        else:
            with line_rate(bl):
                samples = measure(paths, rounds, seconds, omit, pings, log)
        report.raw["datapath"][regime] = samples
        rows(paths, samples, report, regime)
    for why, names in missing.items():
        report.add(Row(SECTION, ", ".join(names), None, None, unavailable=why))
