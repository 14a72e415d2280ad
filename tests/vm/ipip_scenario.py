"""The IPIP fan, end to end, INSIDE the QEMU guest (run by test_ipip_fan.py).

Refuses to run anywhere but in the guest (init.sh sets FAN_VM=1): it loads
modules, creates network namespaces and starts plugin processes.

Lab, all inside the guest:

    switch   bridge br0; every underlay veth plugs into it
    h27      eth0 172.30.0.27/16   plugin /tmp/h27/fan.sock    container c27a, c27b
    h28      eth0 172.30.0.28/16   plugin /tmp/h28/fan.sock    container c28
    h509     eth0 172.30.5.9/16    plugin /tmp/h509/fan.sock   container c509
    outside  eth0 172.30.255.254/16, every host's default route (so the
             plugin's default underlay `default/16` resolves to eth0)

No dockerd: each plugin is driven over its unix socket with the calls and
bodies dockerd 20.10 sends, and what dockerd does with
the answers (moving SrcName into the container's namespace as eth0, address,
MAC, default route) is done here with `ip`.

Per mapping mode (ebpf: /16 underlay, shared external-mode `fan-ipip` device
with a tc program; routes: a smaller underlay given with the IPAM option,
dedicated `fanr-ipip` device and one onlink route per peer) the checks are:

    slices, addresses   gateways and container addresses follow the fan rule
                        (computed here independently of the plugin)
    lab-peer-routes     (routes) the peers are programmed in the background
                        after CreateNetwork: wait, bounded, for the lab hosts'
                        routes; the other ~4,000 keep coming while we test
    ping                every ordered pair of containers pings; TTL 62 across
                        hosts (two routed hops), 64 on the same host
    transfer            10 MiB over TCP (busybox httpd + wget) across hosts,
                        sha256 compared
    tunnel-firewall     the raw FAN-TUNNEL rules (the u32 match on IPIP's inner
                        destination; xt_u32 loaded on demand) and mangle
                        FAN-ISOLATION are in place; (ebpf) fan_receive sits on
                        fan-ipip's ingress
    ipip-trust          hand-made IPIP to h28 for a UDP listener in c28: (a) from
                        outside the underlay is dropped by the raw rule, (c) a
                        genuine peer's arrives; (ebpf) (b) from h27 with an inner
                        source of h509's slice is decapsulated, then dropped by
                        fan_receive; (routes) (b) is reported only
    container-ipip-dropped  IPIP a container sends to another host's underlay
                        address is dropped on its own host (raw, routed)
    host-input-rule     a rule in h28's INPUT dropping IPIP from h27 keeps h27's
                        containers from c28, h509's still reach it, h27's again
                        once the rule goes
    routes-programmed,  (routes) all peers programmed, and every route is
    routes-match-fan-rule  `<peer slice> via <peer> onlink`, one per other host
    device              `ip -d link show` of the fan device is what the mode
                        promises; it carried the traffic and tunl0 carried
                        nothing; per-host kernel object counts (COUNT lines)
    auto-chooses-ipip   (ebpf) encap=auto picks ipip: log line and
                        `fan_driver show`, on a second network sharing fan-ipip
    shared-device-survives  (ebpf) removing that network leaves the first intact
    teardown            dockerd's removal order; devices, routes, veths,
                        firewall rules (filter, nat, raw, mangle) and the
                        plugin's state are gone
    plugin-logs-clean   (all) no ERROR or traceback in any plugin log

Output: `CHECK <mode> <name> PASS|FAIL <detail>`, `TIMING <what> <seconds>`,
`COUNT <mode> <host> ...` lines, then `SCENARIO OK` (exit 0) or
`SCENARIO FAILED` (exit 1).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from tests.harness import unixhttp
from tests.harness.procs import run_cmd, stop_popen, wait_answering
from tests.harness.rulecounters import packets_of, rule_packets

HOSTS = {"h27": "172.30.0.27", "h28": "172.30.0.28", "h509": "172.30.5.9"}
OUTSIDE = "172.30.255.254"
LAB_PREFIXLEN = 16
# container -> host; two on h27 so that one pair is local (TTL 64).
CONTAINERS = {"c27a": "h27", "c28": "h28", "c509": "h509", "c27b": "h27"}
OVERLAY = IPv4Network("250.0.0.0/8")
AUTO_OVERLAY = IPv4Network("251.0.0.0/8")
GATEWAY_REQUEST = {"RequestAddressType": "com.docker.network.gateway"}
BLOB_SIZE = 10 * 1024 * 1024
HTTP_PORT = 8080
# Hand-made IPIP datagrams: the inner UDP port a container listens on, and an
# address outside every underlay of the lab (TEST-NET-2) given to `outside`.
TRUST_PORT = 7777
FOREIGN = "198.51.100.7"
TRUST_WAIT = 3.0            # bound on waiting for the one datagram that must arrive
ROUTES_WAIT = 420          # bound on the background peer programming, seconds
PLUGIN_START_WAIT = 180

FAILURES: list[str] = []
T0 = time.monotonic()


# --- output ------------------------------------------------------------------

def say(line: str) -> None:
    print(line, flush=True)


def check(mode: str, name: str, ok: bool, detail: str = "") -> bool:
    detail = " ".join(str(detail).split()) if "\n" not in str(detail) else str(detail)
    say(f"CHECK {mode} {name} {'PASS' if ok else 'FAIL'} {detail}".rstrip())
    if not ok:
        FAILURES.append(f"{mode} {name}")
    return ok


def timing(what: str, seconds: float) -> None:
    say(f"TIMING {what} {seconds:.1f}")


class Timer:
    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc):
        timing(self.what, time.monotonic() - self.start)


# --- commands ------------------------------------------------------------------

def sh(cmd: list[str] | str, check_rc: bool = True, timeout: float = 120) -> str:
    """Run a command (argv list, or a string for /bin/sh -c); return stdout+stderr."""
    argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else cmd
    result = run_cmd(argv, check=check_rc, timeout=timeout)
    return result.stdout + result.stderr


def ns(name: str, *argv: str, check_rc: bool = True, timeout: float = 120) -> str:
    return sh(["ip", "netns", "exec", name, *argv], check_rc=check_rc, timeout=timeout)


def ipn(name: str, *argv: str, check_rc: bool = True) -> str:
    return sh(["ip", "-n", name, *argv], check_rc=check_rc)


def link_exists(netns: str, name: str) -> bool:
    return subprocess.run(["ip", "-n", netns, "link", "show", "dev", name],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # os.setns is 3.12+; the guest runs the host's interpreter, which may be older
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str):
    """This thread in namespace `name`: sockets made meanwhile stay in it. No
    process to start per sender or listener (seconds each under emulation)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_packet(src: str, dst: str, protocol: int, payload: bytes, ttl: int = 64) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, ttl, protocol, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header[:10] + struct.pack("!H", ipv4_checksum(header)) + header[12:] + payload


def ipip_datagram(outer_src: str, outer_dst: str, inner_src: str, inner_dst: str,
                  port: int, data: bytes) -> bytes:
    """Outer IPv4 (protocol 4) around inner IPv4/UDP, as a tunnel would send it.
    The inner checksum must be right (the receiver checks it after decapsulation);
    UDP's may be 0 (none)."""
    udp = struct.pack("!HHHH", port, port, 8 + len(data), 0) + data
    return ipv4_packet(outer_src, outer_dst, socket.IPPROTO_IPIP,
                       ipv4_packet(inner_src, inner_dst, socket.IPPROTO_UDP, udp))


def send_raw(netns: str, packet: bytes) -> None:
    """`packet` (from its IPv4 header on, any source) out of namespace `netns`."""
    dst = socket.inet_ntoa(packet[16:20])
    with in_netns(netns):
        # IPPROTO_RAW: the header is ours (IP_HDRINCL); the kernel routes by its destination
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with sock:
        sock.sendto(packet, (dst, 0))


def forget_tunnel_flows(netns: str, a: str, b: str) -> int:
    """Delete `netns`'s conntrack entries of protocol 4 between `a` and `b`, both
    ways; how many there were. (pyroute2's own netns=: a socket made after setns
    here would not be in `netns`.)"""
    from pyroute2 import Conntrack
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    deleted = 0
    ct = Conntrack(netns=netns)
    try:
        for src, dst in ((a, b), (b, a)):
            try:
                ct.entry("del", tuple_orig=NFCTAttrTuple(saddr=src, daddr=dst,
                                                         proto=socket.IPPROTO_IPIP))
                deleted += 1
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:
                    raise
    finally:
        ct.close()
    return deleted


def raw_rules(host: str) -> list[tuple[str, int]]:
    """The raw table's rules of `host` with their packet counters."""
    return rule_packets(ns(host, "iptables", "-w", "-t", "raw", "-S", "-v"))


# --- the plugin protocol -------------------------------------------------------

class PluginCallError(RuntimeError):
    pass


def socket_path(host: str) -> str:
    return f"/tmp/{host}/fan.sock"


CALL_TIMES: dict[str, list[float]] = {}
CALL_TIMES_LOCK = threading.Lock()


def call(host: str, method: str, body, timeout: float = 120, expect_ok: bool = True):
    """POST like dockerd's plugin client; returns (status, decoded JSON)."""
    start = time.monotonic()
    try:
        # dockerd's plugin client sends no body at all for nil arguments
        status, raw = unixhttp.request(
            socket_path(host), "POST", f"/{method}",
            body=b"" if body is None else json.dumps(body).encode(), timeout=timeout,
            headers={"Content-Type": unixhttp.PLUGIN_CONTENT_TYPE,
                     "Accept": unixhttp.PLUGIN_CONTENT_TYPE})
    finally:
        with CALL_TIMES_LOCK:
            CALL_TIMES.setdefault(method, []).append(time.monotonic() - start)
    data = unixhttp.decoded(raw)
    if expect_ok and status != 200:
        raise PluginCallError(f"{host} {method} {json.dumps(body)} -> HTTP {status} {data}")
    return status, data


def ok(host: str, method: str, body, timeout: float = 120):
    return call(host, method, body, timeout)[1]


# --- the fan rule, computed here independently of the plugin -------------------

def host_slice(overlay: IPv4Network, underlay: IPv4Network, addr: str) -> IPv4Network:
    host_bits = 32 - underlay.prefixlen
    plen = overlay.prefixlen + host_bits
    number = int(IPv4Address(addr)) & int(underlay.hostmask)
    return IPv4Network((int(overlay.network_address) | (number << (32 - plen)), plen))


# --- lab -----------------------------------------------------------------------

def make_namespaces() -> None:
    """Modules and the host namespaces: all a plugin needs to start."""
    sh("modprobe -a ipip veth bridge")
    sh("set -e\n" + "\n".join(f"ip netns add {name}\nmkdir -p /tmp/{name}"
                               for name in ["switch", "outside", *HOSTS]))


def wire_lab() -> None:
    """The underlay, while the plugins start (they read the host's links per
    request, not at startup)."""
    lines = ["set -e", "ip -n switch link add br0 type bridge", "ip -n switch link set br0 up"]
    for name, addr in [*HOSTS.items(), ("outside", OUTSIDE)]:
        lines += [
            f"ip link add eth0 netns {name} mtu 1500 type veth peer name p-{name} netns switch",
            f"ip -n switch link set p-{name} master br0 up",
            f"ip -n {name} addr add {addr}/{LAB_PREFIXLEN} dev eth0",
            f"ip -n {name} link set eth0 up",
            f"ip -n {name} link set lo up",
        ]
        if name != "outside":
            lines += [f"ip -n {name} route add default via {OUTSIDE}",
                      f"ip netns exec {name} sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'"]
    sh("\n".join(lines))


class Plugins:
    def __init__(self, python: str):
        self.python = python
        self.procs: dict[str, subprocess.Popen] = {}

    def log_path(self, host: str) -> str:
        return f"/tmp/{host}/plugin.log"

    def start(self) -> None:
        for host in HOSTS:
            log = open(self.log_path(host), "wb")
            self.procs[host] = subprocess.Popen(
                ["ip", "netns", "exec", host, self.python, "-m", "fan_driver", "serve",
                 "--socket", socket_path(host), "--state-dir", f"/tmp/{host}/state",
                 "--log-level", "debug"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()

    def wait_ready(self) -> None:
        """Each plugin answers Activate, then what dockerd asks next when it loads one."""
        deadline = time.monotonic() + PLUGIN_START_WAIT
        for host in HOSTS:
            def activate(host=host):
                return call(host, "Plugin.Activate", None, timeout=30, expect_ok=False)

            why = wait_answering(self.procs[host], activate,
                                 max(deadline - time.monotonic(), 1), interval=0.5)
            if why:
                raise RuntimeError(f"plugin {host} {why}:\n{self.log(host)}")
            implements = ok(host, "Plugin.Activate", None)
            if implements != {"Implements": ["NetworkDriver", "IpamDriver"]}:
                raise RuntimeError(f"plugin {host} implements {implements}")
            ok(host, "NetworkDriver.GetCapabilities", None)
            ok(host, "IpamDriver.GetCapabilities", None)
            say(f"plugin {host} ready after {time.monotonic() - T0:.1f} s")

    def log(self, host: str) -> str:
        try:
            with open(self.log_path(host), errors="replace") as f:
                return f.read()
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_popen(proc, timeout=30)


# --- one mode --------------------------------------------------------------------

def parallel(fn, items):
    items = list(items)
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return dict(zip(items, pool.map(fn, items)))


class Run:
    def __init__(self, mode: str, underlay: str | None, plugins: Plugins):
        self.mode = mode
        self.underlay_opt = underlay      # None: the plugin's default (default/16)
        self.underlay = IPv4Network(underlay) if underlay else IPv4Network(f"172.30.0.0/{LAB_PREFIXLEN}")
        self.plugins = plugins
        self.device = "fan-ipip" if mode == "ebpf" else "fanr-ipip"
        self.network_id = hashlib.sha256(f"fan-ipip-{mode}".encode()).hexdigest()
        self.pools: dict[str, str] = {}
        self.gateways: dict[str, str] = {}
        self.containers: dict[str, dict] = {}
        self.log_offsets = {h: len(plugins.log(h)) for h in HOSTS}

    def new_log(self, host: str) -> str:
        return self.plugins.log(host)[self.log_offsets[host]:]

    # dockerd: docker network create -d fan --ipam-driver fan --subnet 250.0.0.0/8 [...]
    def create_network(self, host: str) -> None:
        ipam_opts = {"underlay": self.underlay_opt} if self.underlay_opt else {}
        spaces = ok(host, "IpamDriver.GetDefaultAddressSpaces", None)
        space = spaces["LocalDefaultAddressSpace"]
        pool = ok(host, "IpamDriver.RequestPool", {
            "AddressSpace": space, "Pool": str(OVERLAY), "SubPool": "", "Options": ipam_opts,
            "V6": False})
        self.pools[host] = pool["PoolID"]
        gw = ok(host, "IpamDriver.RequestAddress", {
            "PoolID": pool["PoolID"], "Address": "", "Options": GATEWAY_REQUEST})["Address"]
        self.gateways[host] = gw
        generic = {"encap": "ipip", "mapping": self.mode}
        if self.underlay_opt:
            generic["underlay"] = self.underlay_opt
        start = time.monotonic()
        ok(host, "NetworkDriver.CreateNetwork", {
            "NetworkID": self.network_id,
            "Options": {"com.docker.network.enable_ipv6": False,
                        "com.docker.network.generic": generic},
            "IPv4Data": [{"AddressSpace": space, "Pool": str(OVERLAY), "Gateway": gw}],
            "IPv6Data": []})
        timing(f"{self.mode} CreateNetwork {host}", time.monotonic() - start)

    # dockerd: docker run --network NAME ...
    def start_container(self, cname: str) -> None:
        host = CONTAINERS[cname]
        eid = hashlib.sha256(f"{self.mode}-{cname}".encode()).hexdigest()
        addr = ok(host, "IpamDriver.RequestAddress",
                  {"PoolID": self.pools[host], "Address": "", "Options": None})["Address"]
        created = ok(host, "NetworkDriver.CreateEndpoint", {
            "NetworkID": self.network_id, "EndpointID": eid,
            "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""},
            "Options": {"com.docker.network.endpoint.exposedports": [],
                        "com.docker.network.portmap": []}})
        mac = (created or {}).get("Interface", {}).get("MacAddress", "")
        sandbox = f"/var/run/netns/{cname}"
        sh(["ip", "netns", "add", cname])
        joined = ok(host, "NetworkDriver.Join", {
            "NetworkID": self.network_id, "EndpointID": eid, "SandboxKey": sandbox,
            "Options": {"com.docker.network.endpoint.exposedports": [],
                        "com.docker.network.portmap": []}})
        src = joined["InterfaceName"]["SrcName"]
        gateway = joined.get("Gateway", "")
        # what libnetwork's sandbox does with the interface
        cmds = [f"ip -n {host} link set {src} netns {cname}",
                f"ip -n {cname} link set {src} name eth0",
                f"ip -n {cname} addr add {addr} dev eth0",
                f"ip -n {cname} link set eth0 up",
                f"ip -n {cname} link set lo up"]
        if mac:
            cmds.insert(2, f"ip -n {cname} link set eth0 address {mac}")
        if gateway:
            cmds.append(f"ip -n {cname} route add default via {gateway}")
        sh("set -e\n" + "\n".join(cmds))
        ok(host, "NetworkDriver.ProgramExternalConnectivity", {
            "NetworkID": self.network_id, "EndpointID": eid, "Options": {}})
        info = ok(host, "NetworkDriver.EndpointOperInfo",
                  {"NetworkID": self.network_id, "EndpointID": eid})
        self.containers[cname] = {"host": host, "eid": eid, "addr": addr, "mac": mac,
                                  "src": src, "gateway": gateway, "info": info}

    # dockerd: docker rm -f
    def remove_container(self, cname: str) -> None:
        c = self.containers[cname]
        host, eid = c["host"], c["eid"]
        ok(host, "NetworkDriver.RevokeExternalConnectivity",
           {"NetworkID": self.network_id, "EndpointID": eid})
        ok(host, "NetworkDriver.Leave", {"NetworkID": self.network_id, "EndpointID": eid})
        # libnetwork moves the interface back, under its original name
        sh(f"set -e\nip -n {cname} link set eth0 down\n"
           f"ip -n {cname} link set eth0 name {c['src']}\n"
           f"ip -n {cname} link set {c['src']} netns {host}")
        ok(host, "NetworkDriver.DeleteEndpoint", {"NetworkID": self.network_id, "EndpointID": eid})
        ok(host, "IpamDriver.ReleaseAddress",
           {"PoolID": self.pools[host], "Address": c["addr"].split("/")[0]})
        sh(["ip", "netns", "del", cname])

    # dockerd: docker network rm (the plugin may do the work in ReleasePool
    # or in DeleteNetwork; the per-call times at the end say which)
    def delete_network(self, host: str) -> None:
        start = time.monotonic()
        ok(host, "IpamDriver.ReleaseAddress",
           {"PoolID": self.pools[host], "Address": self.gateways[host].split("/")[0]})
        ok(host, "IpamDriver.ReleasePool", {"PoolID": self.pools[host]})
        ok(host, "NetworkDriver.DeleteNetwork", {"NetworkID": self.network_id})
        timing(f"{self.mode} network rm {host}", time.monotonic() - start)

    # --- the run ---
    def run(self) -> None:
        m = self.mode
        say(f"=== mode {m}: overlay {OVERLAY}, underlay {self.underlay} "
            f"({'IPAM option' if self.underlay_opt else 'plugin default default/16'})")
        with Timer(f"{m} create networks"):
            parallel(self.create_network, HOSTS)
        self.created_at = time.monotonic()
        expected = {h: host_slice(OVERLAY, self.underlay, a) for h, a in HOSTS.items()}
        got = {h: IPv4Interface(g) for h, g in self.gateways.items()}
        check(m, "slices", all(got[h].network == expected[h] and got[h].ip == expected[h][1]
                               for h in HOSTS),
              " ".join(f"{h}:{got[h]}(want {expected[h][1]}/{expected[h].prefixlen})"
                       for h in HOSTS))
        with Timer(f"{m} start containers"):
            # one container per host at a time; the hosts in parallel
            for batch in (["c27a", "c28", "c509"], ["c27b"]):
                parallel(self.start_container, batch)
        for cname, c in self.containers.items():
            say(f"container {cname} on {c['host']}: {c['addr']} mac {c['mac']} "
                f"gw {c['gateway']} if {c['src']}")
        check(m, "addresses", all(
            IPv4Interface(c["addr"]).ip in expected[c["host"]] and c["mac"]
            and c["gateway"] == str(got[c["host"]].ip) for c in self.containers.values()),
            " ".join(f"{n}={c['addr']}" for n, c in self.containers.items()))

        if m == "routes":
            self.wait_lab_peer_routes(expected)
        self.check_ping()
        self.check_transfer()
        with Timer(f"{m} tunnel firewall and trust checks"):
            self.check_tunnel_firewall()
            self.check_ipip_trust()
            self.check_host_input_rule()
        if m == "routes":
            self.wait_all_routes(expected)
        self.check_device(expected)
        if m == "ebpf":
            self.check_auto()
        self.teardown()

    def route_count(self, host: str) -> int:
        out = ipn(host, "route", "show", "dev", self.device, check_rc=False)
        return sum(1 for line in out.splitlines() if line.strip())

    def wait_lab_peer_routes(self, expected) -> None:
        """mapping=routes programs peers in the background after CreateNetwork:
        wait (bounded) until each host has the routes to the other lab hosts'
        slices; the rest of the 4,093 keep coming while containers talk."""
        deadline = self.created_at + ROUTES_WAIT
        missing = {(h, p) for h in HOSTS for p in HOSTS if p != h}
        seen = {}
        while missing and time.monotonic() < deadline:
            for host, peer in sorted(missing):
                route = ipn(host, "route", "show", str(expected[peer]), check_rc=False)
                if f"via {HOSTS[peer]} dev {self.device}" in route:
                    missing.discard((host, peer))
                    seen[f"{host}->{peer}"] = round(time.monotonic() - self.created_at, 1)
            if missing:
                time.sleep(1)
        timing("routes lab peer routes present", time.monotonic() - self.created_at)
        check(self.mode, "lab-peer-routes", not missing,
              f"seconds after CreateNetwork until each lab peer's route existed: {seen}; "
              f"missing after {ROUTES_WAIT} s: {sorted(missing)}")

    def wait_all_routes(self, expected) -> None:
        want = 2 ** (32 - self.underlay.prefixlen) - 3    # usable hosts minus ourselves
        deadline = self.created_at + ROUTES_WAIT
        pending = set(HOSTS)
        while pending and time.monotonic() < deadline:
            for host in sorted(pending):
                if "peers programmed" in self.new_log(host):
                    pending.discard(host)
                    timing(f"routes all peers programmed {host} (after CreateNetwork)",
                           time.monotonic() - self.created_at)
            if pending:
                time.sleep(2)
        counts = {h: self.route_count(h) for h in HOSTS}
        lines = {h: re.findall(r"network \w+: \d+ peers programmed in [\d.]+ s", self.new_log(h))
                 for h in HOSTS}
        wrong = {h: self.verify_peer_routes(h) for h in HOSTS}
        check(self.mode, "routes-match-fan-rule", not any(wrong.values()),
              "every route on each host's device is `<peer slice> via <peer> onlink` for "
              f"exactly the {want} other hosts of {self.underlay}; mismatches: "
              + "; ".join(f"{h}: {w or 'none'}" for h, w in wrong.items()))
        check(self.mode, "routes-programmed",
              not pending and all(c == want for c in counts.values()),
              f"want {want} routes per host on {self.device}; got {counts}; "
              f"log {lines}; still pending after {ROUTES_WAIT} s: {sorted(pending)}")

    def verify_peer_routes(self, host: str) -> str:
        """'' when the device's routes are exactly one per other host of the
        underlay, to its slice via its address, onlink; else what differs."""
        u, o = self.underlay, OVERLAY
        plen = o.prefixlen + 32 - u.prefixlen
        base_u, base_o, me = int(u.network_address), int(o.network_address), int(IPv4Address(HOSTS[host]))
        ntoa = lambda n: socket.inet_ntoa(n.to_bytes(4, "big"))   # noqa: E731
        want = {(f"{ntoa(base_o | n << (32 - plen))}/{plen}", ntoa(base_u | n))
                for n in range(1, u.num_addresses - 1) if base_u | n != me}
        got, odd = set(), []
        for line in ipn(host, "route", "show", "dev", self.device).splitlines():
            found = re.match(r"^(\S+) (?:nhid \d+ )?via (\S+) .*\bonlink\b", line)
            if found:
                got.add(found.groups())
            elif line.strip():
                odd.append(line.strip())
        if got == want and not odd:
            return ""
        return (f"missing {len(want - got)} {sorted(want - got)[:3]}, unexpected "
                f"{len(got - want)} {sorted(got - want)[:3]}, other lines {odd[:3]}")

    def check_ping(self) -> None:
        m = self.mode
        results, good = [], True
        start = time.monotonic()
        for src in self.containers:
            for dst in self.containers:
                if src == dst:
                    continue
                same = CONTAINERS[src] == CONTAINERS[dst]
                want_ttl = 64 if same else 62
                target = self.containers[dst]["addr"].split("/")[0]
                ttl, tries = None, 0
                for tries in range(1, 4):
                    out = ns(src, "busybox", "ping", "-c", "1", "-W", "3", target, check_rc=False)
                    found = re.search(r"ttl=(\d+)", out)
                    if found:
                        ttl = int(found.group(1))
                        break
                fine = ttl == want_ttl
                good &= fine
                results.append(f"{src}->{dst}({target}) ttl={ttl}"
                               f"{'' if tries == 1 else f' tries={tries}'}"
                               f"{'' if fine else f' WANT {want_ttl}'}")
        timing(f"{m} pings", time.monotonic() - start)
        check(m, "ping", good, f"{len(results)} ordered pairs: " + "; ".join(results))

    def check_transfer(self) -> None:
        m = self.mode
        www = f"/tmp/www-{m}"
        os.makedirs(www, exist_ok=True)
        blob = os.urandom(BLOB_SIZE)
        want = hashlib.sha256(blob).hexdigest()
        with open(f"{www}/blob", "wb") as f:
            f.write(blob)
        server = "c509"
        srv_addr = self.containers[server]["addr"].split("/")[0]
        httpd_log = open(f"/tmp/httpd-{m}.log", "wb")
        httpd = subprocess.Popen(["ip", "netns", "exec", server, "busybox", "httpd", "-f", "-v",
                                  "-p", str(HTTP_PORT), "-h", www],
                                 stdout=httpd_log, stderr=subprocess.STDOUT)
        httpd_log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and httpd.poll() is None and f":{HTTP_PORT} " not in \
                ns(server, "busybox", "netstat", "-ltn", check_rc=False):
            time.sleep(0.3)
        details, good = [], True
        try:
            for client in ("c27a", "c28"):
                out_path = f"/tmp/got-{m}-{client}"
                took, attempts, out = None, 0, ""
                for attempts in range(1, 6):
                    start = time.monotonic()
                    r = subprocess.run(
                        # no -T: Debian's busybox 1.35 wget segfaults with it
                        ["ip", "netns", "exec", client, "busybox", "wget", "-O", out_path, f"http://{srv_addr}:{HTTP_PORT}/blob"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
                    took, out = time.monotonic() - start, f"rc={r.returncode} {r.stdout}"
                    if r.returncode == 0:
                        break
                    time.sleep(1)   # httpd may not listen yet
                try:
                    with open(out_path, "rb") as f:
                        data = f.read()
                    os.unlink(out_path)
                except OSError:
                    data = b""
                got = hashlib.sha256(data).hexdigest()
                fine = got == want and len(data) == BLOB_SIZE
                good &= fine
                details.append(
                    f"{client}({CONTAINERS[client]})<-{server}({CONTAINERS[server]}) "
                    f"{len(data)} bytes in {took:.1f} s "
                    f"({len(data) * 8 / max(took, 1e-6) / 1e6:.0f} Mbit/s) "
                    f"sha256 {'equal' if got == want else f'DIFFERS ({got[:12]} != {want[:12]})'}"
                    f"{'' if attempts == 1 else f' attempts={attempts}'}"
                    f"{'' if fine else f' wget: {out.strip()[-300:]}'}")
        finally:
            httpd.terminate()
            httpd.wait()
            if not good:
                with open(f"/tmp/httpd-{m}.log", errors="replace") as f:
                    details.append("httpd: " + f.read()[-500:])
            os.unlink(f"{www}/blob")
        check(m, "transfer", good, "; ".join(details))

    def check_tunnel_firewall(self) -> None:
        """The firewall's raw and mangle chains as this kernel took them (xt_u32
        is a module here, loaded on demand by the u32 match); in ebpf mode
        fan_receive on the shared device's ingress, where it judges IPIP too."""
        m = self.mode
        # the inner destination (after the outer header) in 250.0.0.0/8
        u32 = '-m u32 --u32 "0x0>>0x16&0x3c@0x10&0xff000000=0xfa000000"'
        with open("/proc/modules") as f:
            u32_loaded = any(line.startswith("xt_u32 ") for line in f)
        good, details = u32_loaded, [f"xt_u32 loaded={u32_loaded}"]
        for host in HOSTS:
            raw = ns(host, "iptables", "-w", "-t", "raw", "-S", "FAN-TUNNEL", check_rc=False)
            mangle = ns(host, "iptables", "-w", "-t", "mangle", "-S", "FAN-ISOLATION",
                        check_rc=False)
            lines = [line for line in raw.splitlines() if line.startswith("-A FAN-TUNNEL ")]
            foreign = [line for line in lines if line.startswith("-A FAN-TUNNEL ! -s ")
                       and re.search(r" -p (ipencap|4) ", line) and u32 in line]
            routed = [line for line in lines if line.startswith("-A FAN-TUNNEL -d ")
                      and "! --dst-type LOCAL" in line]
            isolation = [line for line in mangle.splitlines() if line.startswith("-A FAN-ISOLATION ")]
            fine = (len(foreign) == 1 and len(routed) == 2 and len(lines) == 3
                    and all(line.endswith("-j DROP") for line in lines) and bool(isolation))
            receive = ""
            if m == "ebpf":
                filters = ns(host, "tc", "filter", "show", "dev", self.device, "ingress",
                             check_rc=False)
                programs = re.findall(r"\bbpf\b.*\bname (\w+)", filters)
                fine = fine and programs == ["fan_receive"]
                receive = f" ingress programs on {self.device}: {programs}"
            good &= fine
            details.append(f"{host}: FAN-TUNNEL {lines} FAN-ISOLATION rules={len(isolation)}"
                           f"{receive}{'' if fine else ' <-- WRONG'}")
        check(m, "tunnel-firewall", good, "; ".join(details))

    def check_ipip_trust(self) -> None:
        """Hand-made IPIP datagrams to h28's underlay address, for a UDP listener in
        c28; only a genuine peer's reaches it. Each drop is placed by counters:
        h28's raw rule against tunnel traffic from outside the underlay, h28's
        tunnel device (it decapsulated) against what then reached netfilter (a
        counting rule on the inner UDP), h27's raw rule against routed IPIP."""
        m, dev = self.mode, self.device
        addr = {c: self.containers[c]["addr"].split("/")[0] for c in ("c27a", "c28", "c509")}
        me, peer = HOSTS["h28"], HOSTS["h27"]

        def datagram(outer_src, inner_src, tag):
            return ipip_datagram(outer_src, me, inner_src, addr["c28"], TRUST_PORT, tag.encode())

        sends = [
            # (a) from outside the underlay, with an inner source h27 could send from
            ("a", "outside", datagram(FOREIGN, addr["c27a"], "a")),
            # (d) a container's own IPIP to another host, its own address inside:
            # masqueraded on h27 it would pass as h27's tunnel traffic. Before h27's
            # own datagrams, whose conntrack entry it would clash with (below)
            ("d", "c27a", datagram(addr["c27a"], addr["c27a"], "d")),
            # (b) from a host of the underlay, an inner source of a third host's slice
            ("b", "h27", datagram(peer, addr["c509"], "b")),
            # (c) a genuine peer: its own slice's source. Last: once it arrived,
            # the others had been handled
            ("c", "h27", datagram(peer, addr["c27a"], "c")),
        ]
        count_rule = ["PREROUTING", "-i", dev, "-p", "udp", "-m", "udp",
                      "--dport", str(TRUST_PORT)]
        foreign_rule = (r"^-A FAN-TUNNEL ! -s ", r" -m u32 ")
        routed_rule = (r"^-A FAN-TUNNEL -d ", r" -p (ipencap|4) ", r"! --dst-type LOCAL")
        counted_rule = (rf"^-A PREROUTING -i {re.escape(dev)} -p udp .*--dport {TRUST_PORT}\b",)

        def rx() -> int:
            return (self.link_json("h28", dev) or {}).get("stats64", {}).get("rx", {}).get(
                "packets", 0)

        def delta(before, after):
            return None if before is None or after is None else after - before

        got: list[tuple[str, str]] = []
        unsent: dict[str, str] = {}
        # h27's conntrack holds the portless protocol-4 entry of its tunnel traffic
        # with h28: (d), masqueraded, would clash with it and be dropped by conntrack
        # whatever the firewall says. Forgotten, as on a host that has not heard
        # from the target lately, so that only the raw rule stands in (d)'s way.
        forgotten = forget_tunnel_flows("h27", peer, me)
        sh(f"ip -n outside addr add {FOREIGN}/32 dev eth0")
        # no -j: a rule that only counts what got past decapsulation into netfilter
        ns("h28", "iptables", "-w", "-t", "raw", "-A", *count_rule)
        with in_netns("c28"):
            listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            listener.bind(("0.0.0.0", TRUST_PORT))
            h28_before, h27_before, rx_before = raw_rules("h28"), raw_rules("h27"), rx()
            for tag, source, packet in sends:
                try:
                    send_raw(source, packet)
                except OSError as exc:   # EPERM: netfilter dropped it on the sender
                    unsent[tag] = exc.strerror
            deadline = time.monotonic() + TRUST_WAIT
            while time.monotonic() < deadline:
                listener.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    data, (sender, _) = listener.recvfrom(2048)
                except socket.timeout:
                    break
                got.append((data.decode(errors="replace"), sender))
                if data == b"c":   # a little longer for any stragglers
                    deadline = min(deadline, time.monotonic() + 0.3)
            h28_after, h27_after, rx_after = raw_rules("h28"), raw_rules("h27"), rx()
        finally:
            listener.close()
            ns("h28", "iptables", "-w", "-t", "raw", "-D", *count_rule, check_rc=False)
            sh(f"ip -n outside addr del {FOREIGN}/32 dev eth0", check_rc=False)
        tags = [tag for tag, _ in got]
        foreign = delta(packets_of(h28_before, *foreign_rule), packets_of(h28_after, *foreign_rule))
        counted = delta(packets_of(h28_before, *counted_rule), packets_of(h28_after, *counted_rule))
        routed = delta(packets_of(h27_before, *routed_rule), packets_of(h27_after, *routed_rule))
        decapsulated = rx_after - rx_before
        detail = (f"arrived in c28 (tag, inner source): {got}; not sent: {unsent}; "
                  f"h28 raw drops of tunnel traffic "
                  f"from outside the underlay +{foreign}; h28 {dev} decapsulated +{decapsulated}, "
                  f"of which reached netfilter +{counted}; h27 raw drops of routed IPIP +{routed}")
        if m == "ebpf":
            # (b) reached the tunnel device but never netfilter: fan_receive dropped it
            ok_trust = ([t for t in tags if t != "d"] == ["c"] and foreign == 1
                        and decapsulated >= 2 and counted == 1)
        else:
            # fanr-ipip takes IPIP from any address to this host, and nothing ties a
            # packet's inner source to its outer one there (rp_filter sees only that
            # the inner source's route is the tunnel): (b) is not enforceable in this
            # mode, so it is reported above, not asserted
            ok_trust = "a" not in tags and "c" in tags and foreign == 1
        check(m, "ipip-trust", ok_trust, detail)
        check(m, "container-ipip-dropped",
              "d" not in tags and "d" not in unsent and "c" in tags and routed == 1,
              f"c27a's IPIP to {me} arrived: {'d' in tags}; h27 raw drops of routed IPIP "
              f"+{routed}; the genuine peer's arrived: {'c' in tags}; not sent: {unsent}; "
              f"h27's protocol-4 "
              f"conntrack entries with {me} forgotten before: {forgotten}")

    def check_host_input_rule(self) -> None:
        """A rule in h28's INPUT dropping IPIP from h27 keeps h27's containers from
        c28 while h509's still reach it; once the rule goes, h27's reach it again.
        The flows are live (the pings and transfer above): IPIP to this host has no
        receive shortcut, every packet passes INPUT, and a DROP inserted first
        matches ESTABLISHED packets too, so the rule applies at once without
        forgetting the portless protocol-4 conntrack entries."""
        m = self.mode
        target = self.containers["c28"]["addr"].split("/")[0]
        rule = ["INPUT", "-s", HOSTS["h27"], "-p", str(socket.IPPROTO_IPIP), "-j", "DROP"]

        def reaches(cname: str, tries: int = 3) -> bool:
            for _ in range(tries):
                if "ttl=" in ns(cname, "busybox", "ping", "-c", "1", "-W", "2", target,
                                check_rc=False):
                    return True
            return False

        h27s = [c for c, host in CONTAINERS.items() if host == "h27"]
        ns("h28", "iptables", "-w", "-I", *rule)
        try:
            blocked = {c: reaches(c, tries=2) for c in h27s}
            third = reaches("c509")
            dropped = packets_of(rule_packets(ns("h28", "iptables", "-w", "-S", "INPUT", "-v")),
                                 rf"^-A INPUT -s {re.escape(HOSTS['h27'])}/32 ", r"-j DROP$")
        finally:
            ns("h28", "iptables", "-w", "-D", *rule, check_rc=False)
        again = {c: reaches(c) for c in h27s}
        check(m, "host-input-rule",
              not any(blocked.values()) and third and all(again.values()) and bool(dropped),
              f"with h28's INPUT dropping protocol 4 from h27, reached c28: {blocked}, "
              f"c509: {third}; the rule dropped {dropped}; once it went, reached c28: {again}")

    def link_json(self, host: str, name: str) -> dict | None:
        out = ipn(host, "-d", "-s", "-j", "link", "show", "dev", name, check_rc=False)
        try:
            return json.loads(out)[0]
        except (ValueError, IndexError):
            return None

    def check_device(self, expected) -> None:
        m = self.mode
        good, details = True, []
        for host, addr in HOSTS.items():
            text = ipn(host, "-d", "link", "show", "dev", self.device, check_rc=False)
            say(f"--- {host}: ip -d link show {self.device}\n{text.rstrip()}")
            info = self.link_json(host, self.device) or {}
            kind = info.get("linkinfo", {}).get("info_kind")
            data = info.get("linkinfo", {}).get("info_data", {}) or {}
            if m == "ebpf":
                fine = kind == "ipip" and data.get("external") is True and " external " in f" {text} "
            else:
                fine = (kind == "ipip" and data.get("local") == addr
                        and data.get("remote") in ("any", None) and "external" not in text
                        and re.search(rf"remote any local {re.escape(addr)}\b", text) is not None)
            tx = info.get("stats64", {}).get("tx", {}).get("packets", 0)
            rx = info.get("stats64", {}).get("rx", {}).get("packets", 0)
            # with eBPF the containers' send program encapsulates and hands packets
            # straight to the underlay device: only received ones pass the device
            fine = fine and rx > 0 and (tx <= 5 if m == "ebpf" else tx > 0)
            # tunl0 (ipip's fallback device, in every namespace) must stay out of it
            tunl = self.link_json(host, "tunl0")
            tunl_pkts = (None if tunl is None else
                         tunl.get("stats64", {}).get("tx", {}).get("packets", 0)
                         + tunl.get("stats64", {}).get("rx", {}).get("packets", 0))
            tunl_up = tunl is not None and "UP" in tunl.get("flags", [])
            fine = fine and not tunl_pkts and not tunl_up
            # kernel objects for this network on this host
            routes_dev = self.route_count(host)
            routes_all = len([line for line in ipn(host, "route", "show", "table", "all")
                              .splitlines() if line.strip()])
            neigh_dev = len([line for line in ipn(host, "neigh", "show", "dev", self.device,
                                                  check_rc=False).splitlines() if line.strip()])
            neigh_all = len([line for line in ipn(host, "neigh", "show").splitlines()
                             if line.strip()])
            filters = ns(host, "tc", "filter", "show", "dev", self.device, "egress",
                         check_rc=False)
            bpf_filters = len(re.findall(r"\bbpf\b.*\bname\b", filters))
            links = len([line for line in ipn(host, "-o", "link", "show").splitlines()
                         if line.strip()])
            say(f"COUNT {m} {host} dev={self.device} routes_on_dev={routes_dev} "
                f"routes_all_tables={routes_all} neigh_on_dev={neigh_dev} neigh_all={neigh_all} "
                f"tc_bpf_filters={bpf_filters} links={links}")
            if m == "ebpf":
                # constant per-host state: one overlay route, one program, no neighbours
                objects_ok = routes_dev == 1 and neigh_dev == 0 and bpf_filters == 1
                route = ipn(host, "route", "show", str(OVERLAY))
                objects_ok = objects_ok and f"dev {self.device}" in route
            else:
                peer = "h509" if host != "h509" else "h28"
                route = ipn(host, "route", "show", str(expected[peer]))
                objects_ok = (neigh_dev == 0 and bpf_filters == 0 and
                              re.search(rf"via {re.escape(HOSTS[peer])} dev {self.device} .*onlink",
                                        route) is not None)
            say(f"    {host}: {route.strip()}")
            fine = fine and objects_ok
            good &= fine
            details.append(f"{host}: kind={kind} local={data.get('local')} "
                           f"remote={data.get('remote')} external={data.get('external')} "
                           f"tx={tx} rx={rx} tunl0_pkts={tunl_pkts} tunl0_up={tunl_up} "
                           f"routes_on_dev={routes_dev} neigh_on_dev={neigh_dev} "
                           f"bpf_filters={bpf_filters}{'' if fine else ' <-- WRONG'}")
        check(m, "device", good, "; ".join(details))

    def check_auto(self) -> None:
        """encap=auto (and mapping=auto) on this kernel: ipip. A second network on
        h27 that shares the fan-ipip device; removing it leaves the first intact."""
        m, host = self.mode, "h27"
        nid = hashlib.sha256(b"fan-ipip-auto").hexdigest()
        pool = ok(host, "IpamDriver.RequestPool", {
            "AddressSpace": "fan", "Pool": str(AUTO_OVERLAY), "SubPool": "", "Options": {},
            "V6": False})["PoolID"]
        gw = ok(host, "IpamDriver.RequestAddress",
                {"PoolID": pool, "Address": "", "Options": GATEWAY_REQUEST})["Address"]
        ok(host, "NetworkDriver.CreateNetwork", {
            "NetworkID": nid,
            "Options": {"com.docker.network.enable_ipv6": False,
                        "com.docker.network.generic": {"encap": "auto"}},
            "IPv4Data": [{"AddressSpace": "fan", "Pool": str(AUTO_OVERLAY), "Gateway": gw}],
            "IPv6Data": []})
        log_lines = [line for line in self.new_log(host).splitlines()
                     if f"network {nid[:12]}:" in line]
        kernel_line = [line for line in self.plugins.log(host).splitlines() if "kernel:" in line]
        show = sh([sys.executable, "-m", "fan_driver", "show", "--state-dir", f"/tmp/{host}/state"])
        say(f"--- fan_driver show ({host})\n{show.rstrip()}")
        row = [line for line in show.splitlines() if line.startswith(nid[:12])]
        filters = ns(host, "tc", "filter", "show", "dev", "fan-ipip", "egress")
        two = len(re.findall(r"\bbpf\b.*\bname\b", filters))
        check(m, "auto-chooses-ipip",
              any("via ipip/" in line for line in log_lines) and bool(row)
              and " ipip/ebpf " in f" {row[0]} " and two == 2,
              f"log: {log_lines} kernel: {kernel_line[:1]} show: {row} "
              f"bpf filters on fan-ipip with two networks: {two}")
        ok(host, "IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": gw.split("/")[0]})
        ok(host, "IpamDriver.ReleasePool", {"PoolID": pool})
        ok(host, "NetworkDriver.DeleteNetwork", {"NetworkID": nid})
        left = ipn(host, "route", "show", "dev", "fan-ipip", check_rc=False)
        filters = ns(host, "tc", "filter", "show", "dev", "fan-ipip", "egress", check_rc=False)
        still = ns("c27a", "busybox", "ping", "-c", "1", "-W", "3",
                   self.containers["c509"]["addr"].split("/")[0], check_rc=False)
        check(m, "shared-device-survives",
              str(AUTO_OVERLAY) not in left and str(OVERLAY) in left
              and len(re.findall(r"\bbpf\b.*\bname\b", filters)) == 1
              and "ttl=62" in still and not link_exists(host, "fan-251-0-27"),
              f"routes on fan-ipip after deleting the auto network: {left.strip()!r}; "
              f"ping c27a->c509 after: {'ok' if 'ttl=62' in still else still.strip()[-200:]}")

    def teardown(self) -> None:
        m = self.mode
        with Timer(f"{m} remove containers"):
            for batch in (["c27a", "c28", "c509"], ["c27b"]):
                parallel(self.remove_container, batch)
        with Timer(f"{m} delete networks"):
            parallel(self.delete_network, HOSTS)
        good, details = True, []
        for host in HOSTS:
            links = ipn(host, "-o", "link", "show")
            names = re.findall(r"^\d+: ([^:@]+)", links, re.M)
            ours = [n for n in names if n.startswith(("fan", "fve", "fvc"))]
            overlay_routes = [line for line in ipn(host, "route", "show", "table", "all")
                              .splitlines() if line.startswith(("250.", "251."))]
            chains = [line for table in ("filter", "nat", "raw", "mangle")
                      for line in ns(host, "iptables", "-w", "-t", table, "-S",
                                     check_rc=False).splitlines()
                      if "FAN" in line or "fan-driver" in line]
            try:
                with open(f"/tmp/{host}/state/state.json") as f:
                    state = json.load(f)
            except (OSError, ValueError) as exc:
                state = {"error": repr(exc)}
            leftover_state = state.get("networks") or state.get("pools") or "error" in state
            fine = not ours and not overlay_routes and not chains and not leftover_state
            good &= fine
            details.append(f"{host}: links={names} ours={ours} overlay_routes={overlay_routes} "
                           f"fw={chains} state={'clean' if not leftover_state else state}")
        check(m, "teardown", good, "; ".join(details))


def plugin_log_problems(plugins: Plugins) -> None:
    bad = {}
    for host in HOSTS:
        lines = [line for line in plugins.log(host).splitlines()
                 if line.startswith(("ERROR", "CRITICAL", "Traceback"))
                 or "internal error" in line]
        if lines:
            bad[host] = lines[:5]
    check("all", "plugin-logs-clean", not bad, f"errors: {bad}" if bad else "no ERROR/Traceback")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="ebpf,routes")
    parser.add_argument("--routes-underlay", default="172.30.0.0/20")
    args = parser.parse_args()
    if os.environ.get("FAN_VM") != "1":
        print("ipip_scenario.py runs only inside the QEMU guest (FAN_VM=1); "
              "run tests/vm/test_ipip_fan.py instead", file=sys.stderr)
        return 2
    say(f"kernel {os.uname().release}, python {sys.executable}, startup {time.monotonic() - T0:.1f} s")
    plugins = Plugins(sys.executable)
    crashed = False
    try:
        with Timer("plugins start (lab wired meanwhile)"):
            make_namespaces()
            plugins.start()
            with Timer("lab wiring"):
                wire_lab()
            plugins.wait_ready()
        for mode in args.modes.split(","):
            start = time.monotonic()
            underlay = args.routes_underlay if mode == "routes" else None
            Run(mode, underlay, plugins).run()
            timing(f"mode {mode} total", time.monotonic() - start)
        plugin_log_problems(plugins)
    except Exception:
        crashed = True
        say("SCENARIO CRASHED\n" + traceback.format_exc())
    finally:
        plugins.stop()
    if crashed or FAILURES:
        for host in HOSTS:
            log = plugins.log(host)
            # the debug log holds every request; the tail is what matters
            say(f"--- plugin log {host} (last 150 lines) ---\n"
                + "\n".join(log.splitlines()[-150:]))
    else:
        for host in HOSTS:
            say(f"--- plugin log {host} (INFO and above) ---\n" + "\n".join(
                line for line in plugins.log(host).splitlines()
                if not line.startswith("DEBUG")))
    for method, times in sorted(CALL_TIMES.items()):
        say(f"TIMING call {method} n={len(times)} mean={sum(times) / len(times):.2f} "
            f"max={max(times):.2f}")
    timing("scenario total", time.monotonic() - T0)
    if crashed or FAILURES:
        say(f"SCENARIO FAILED: {FAILURES}{' (crashed)' if crashed else ''}")
        return 1
    say("SCENARIO OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
