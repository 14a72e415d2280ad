"""The eBPF fan dataplane: pure checks of the program, then two hosts in network
namespaces whose containers talk across an external-mode VXLAN device with no
per-peer route, neighbour or FDB entry."""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import uuid
from ipaddress import IPv4Address, IPv4Network

import pytest

from fan_driver.dataplane import bpf
from fan_driver.errors import FanError
from fan_driver.fanmap import FanMap

N = IPv4Network
FAN250 = FanMap(N("250.0.0.0/8"), N("172.30.0.0/16"))
FAN240 = FanMap(N("240.0.0.0/8"), N("172.30.0.0/16"))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2), netns, tc)")


# --- pure: the instructions ---------------------------------------------------

VALUE_AT = 64   # where a map lookup's value is put in the interpreter's memory


def run_program(insns: bytes, packet: bytes, protocol: int = 0x0800, maps=None):
    """A tiny interpreter for the instructions bpf.py emits (little endian):
    returns (verdict, tunnel key bytes or None, packet as the program left it,
    redirect target as (helper, ifindex) or None). `maps`: fd -> {key: value}."""
    regs, stack, key, packet, target = [0] * 11, bytearray(512), None, bytearray(packet), None
    regs[10] = len(stack)
    pc, prog = 0, [struct.unpack("<BBhi", insns[i:i + 8]) for i in range(0, len(insns), 8)]
    while True:
        code, r, off, imm = prog[pc]
        dst, src = r & 0xF, r >> 4
        cls, op = code & 0x07, code & 0xF0
        pc += 1
        if code == bpf.LD | bpf.DW | bpf.IMM:        # a map's fd, in two slots
            assert src == bpf.PSEUDO_MAP_FD and prog[pc] == (0, 0, 0, 0)
            regs[dst], pc = imm, pc + 1
            continue
        operand = regs[src] if code & 0x08 else imm
        size = {bpf.W: 4, bpf.H: 2, bpf.B: 1, bpf.DW: 8}[code & 0x18]
        if cls in (bpf.ALU, bpf.ALU64):
            m = 0xFFFFFFFF if cls == bpf.ALU else (1 << 64) - 1
            a, b = regs[dst] & m, operand & m
            if op == bpf.END:
                assert imm == 32 and code & 0x08, "only be32 is emitted"
                v = int.from_bytes((a & 0xFFFFFFFF).to_bytes(4, "little"), "big")
            else:
                v = {bpf.MOV: b, bpf.ADD: a + b, bpf.AND: a & b, bpf.OR: a | b,
                     bpf.XOR: a ^ b, bpf.RSH: a >> b}[op]
            regs[dst] = v & m
        elif cls == bpf.LDX and src == 6:            # r6 holds the __sk_buff
            assert off == bpf.SKB_PROTOCOL
            regs[dst] = socket.htons(protocol)
        elif cls == bpf.LDX:
            regs[dst] = int.from_bytes(stack[regs[src] + off:regs[src] + off + size], "little")
        elif cls in (bpf.ST, bpf.STX):
            val = (regs[src] if cls == bpf.STX else imm) & ((1 << 8 * size) - 1)
            stack[regs[dst] + off:regs[dst] + off + size] = val.to_bytes(size, "little")
        elif op == bpf.CALL:
            regs_in = list(regs)       # what the helper is called with
            regs[1:6] = [0xDEAD] * 5   # helpers clobber r1-r5: a program must not reuse them
            if imm == bpf.HELPER_SKB_LOAD_BYTES:
                chunk = packet[regs_in[2]:regs_in[2] + regs_in[4]]
                regs[0] = 0 if len(chunk) == regs_in[4] else -14
                stack[regs_in[3]:regs_in[3] + len(chunk)] = chunk
            elif imm == bpf.HELPER_SKB_STORE_BYTES:
                packet[regs_in[2]:regs_in[2] + regs_in[4]] = stack[regs_in[3]:regs_in[3] + regs_in[4]]
                regs[0] = 0
            elif imm == bpf.HELPER_L3_CSUM_REPLACE:
                assert regs_in[5] == 2
                # RFC 1624: HC' = ~(~HC + ~m + m'), words as the packet stores them
                hc = int.from_bytes(packet[regs_in[2]:regs_in[2] + 2], "little")
                total = (~hc & 0xFFFF) + (~regs_in[3] & 0xFFFF) + (regs_in[4] & 0xFFFF)
                while total >> 16:
                    total = (total & 0xFFFF) + (total >> 16)
                packet[regs_in[2]:regs_in[2] + 2] = (~total & 0xFFFF).to_bytes(2, "little")
                regs[0] = 0
            elif imm == bpf.HELPER_MAP_LOOKUP_ELEM:
                value = maps[regs_in[1]].get(bytes(stack[regs_in[2]:regs_in[2] + 4]))
                regs[0] = 0 if value is None else VALUE_AT
                if value is not None:
                    stack[VALUE_AT:VALUE_AT + len(value)] = value
            elif imm in (bpf.HELPER_REDIRECT, bpf.HELPER_REDIRECT_NEIGH, bpf.HELPER_REDIRECT_PEER):
                target, regs[0] = (imm, regs_in[1]), 7    # TC_ACT_REDIRECT
            else:
                assert imm == bpf.HELPER_SKB_SET_TUNNEL_KEY and regs_in[4] == bpf.BPF_F_ZERO_CSUM_TX
                key, regs[0] = bytes(stack[regs_in[2]:regs_in[2] + regs_in[3]]), 0
        elif op == bpf.EXIT:
            verdict = struct.unpack("<q", struct.pack("<Q", regs[0] & ((1 << 64) - 1)))[0]
            return verdict, key, packet, target
        else:
            assert cls in (bpf.JMP, bpf.JMP32)
            m = 0xFFFFFFFF if cls == bpf.JMP32 else (1 << 64) - 1
            a, b = regs[dst] & m, operand & m
            if {bpf.JNE: a != b, bpf.JEQ: a == b, bpf.JLE: a <= b}[op]:
                pc += off


def ip_checksum_ok(header: bytes) -> bool:
    total = sum(struct.unpack("!10H", header[:20]))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def ipv4_packet(dst: str, l2: bool = True, ttl: int = 64,
                dst_mac: str = "0efa00000001") -> bytes:
    mac = bytes.fromhex("0efa00000001")
    ip = bytes([0x45, 0, 0, 20, 0, 0, 0, 0, ttl, 1, 0, 0]) + IPv4Address("10.0.0.1").packed + IPv4Address(dst).packed
    total = sum(struct.unpack("!10H", ip))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip = ip[:10] + struct.pack("!H", ~total & 0xFFFF) + ip[12:]
    return (bytes.fromhex(dst_mac) + mac + b"\x08\x00" + ip) if l2 else ip


@pytest.mark.parametrize("overlay,underlay,host", [
    ("250.0.0.0/8", "172.30.0.0/16", "172.30.0.28"),
    ("250.0.0.0/8", "172.30.0.0/24", "172.30.0.28"),
    ("10.100.0.0/16", "192.168.1.0/24", "192.168.1.28"),
    ("99.0.0.0/8", "10.99.224.0/20", "10.99.238.5"),
    ("100.64.0.0/10", "10.224.220.0/24", "10.224.220.10"),
])
@pytest.mark.parametrize("offset", [14, 0])
def test_program_computes_the_fan_rule(overlay, underlay, host, offset):
    fan = FanMap(N(overlay), N(underlay))
    insns = bpf.fan_program(fan, 4242, offset)
    inner = fan.slice_for(IPv4Address(host)).network_address + 2
    packet = ipv4_packet(str(inner), l2=offset == 14)
    verdict, key, out, _ = run_program(insns, packet)
    assert verdict == bpf.TC_ACT_OK
    tunnel_id, remote = struct.unpack_from("<II", key)
    assert tunnel_id == 4242 and key[21] == 64 and len(key) == 44
    assert IPv4Address(remote) == IPv4Address(host) == fan.underlay_for(inner)
    if offset == 14:   # the source MAC no longer equals the (shared) device MAC, nothing else moved
        assert out[6:12] == bytes.fromhex("0efa00000000") and out[:6] + out[12:] == packet[:6] + packet[12:]
    else:
        assert out == packet
    # what is not ours is left to the next filter, never dropped
    assert run_program(insns, ipv4_packet("8.8.8.8", l2=offset == 14))[0] == bpf.TC_ACT_UNSPEC
    assert run_program(insns, ipv4_packet(str(inner), l2=offset == 14), protocol=0x86DD)[0] == -1
    assert run_program(insns, b"\0" * 10)[0] == bpf.TC_ACT_UNSPEC


SLICE28 = N("250.0.28.0/24")   # host 172.30.0.28's slice of FAN250
TUNNEL_INDEX, BRIDGE_INDEX = 17, 23


@pytest.mark.parametrize("tunnel_mac", ["0efa00000001", None])
def test_send_shortcut_takes_other_hosts_slices_to_the_tunnel(tunnel_mac):
    mac = tunnel_mac and ":".join(tunnel_mac[i:i + 2] for i in range(0, 12, 2))
    insns = bpf.send_shortcut(FAN250, SLICE28, TUNNEL_INDEX, mac)
    packet = ipv4_packet("250.5.9.2", dst_mac="0efafa001c01")   # to the gateway's MAC
    verdict, key, out, target = run_program(insns, packet)
    assert (verdict, key, target) == (7, None, (bpf.HELPER_REDIRECT, TUNNEL_INDEX))
    assert out[14 + 8] == 63 and ip_checksum_ok(out[14:])        # routed: TTL - 1
    assert out[:6] == (bytes.fromhex(tunnel_mac) if tunnel_mac else packet[:6])
    assert out[6:22] + out[23:24] + out[26:] == packet[6:22] + packet[23:24] + packet[26:]
    # the kernel's path: this host's slice, outside the overlay, broadcasts, TTL
    # running out (it answers with ICMP), not IPv4, too short
    for other in (ipv4_packet("250.0.28.9"), ipv4_packet("8.8.8.8"),
                  ipv4_packet("250.5.9.2", dst_mac="ffffffffffff"),
                  ipv4_packet("250.5.9.2", ttl=1), b"\0" * 20):
        verdict, _, out, target = run_program(insns, other)
        assert (verdict, target, out) == (bpf.TC_ACT_OK, None, bytearray(other))
    assert run_program(insns, packet, protocol=0x0806)[0] == bpf.TC_ACT_OK


def test_receive_shortcut_hands_this_slice_to_the_container():
    map_fd, veth_index = 5, 31
    insns = bpf.receive_shortcut(SLICE28, BRIDGE_INDEX, map_fd)
    maps = {map_fd: dict([bpf.endpoint_entry(int(IPv4Address("250.0.28.9")), veth_index,
                                             "0e:fa:fa:00:1c:09")])}
    # a container in the map: into its namespace, readdressed to its MAC
    verdict, key, out, target = run_program(insns, ipv4_packet("250.0.28.9", ttl=63), maps=maps)
    assert (verdict, target) == (7, (bpf.HELPER_REDIRECT_PEER, veth_index))
    assert out[:6] == bytes.fromhex("0efafa001c09")
    assert out[14 + 8] == 62 and ip_checksum_ok(out[14:])
    # one the map does not hold (yet): out of the bridge, by the neighbour table
    verdict, key, out, target = run_program(insns, ipv4_packet("250.0.28.10"), maps=maps)
    assert (verdict, target) == (7, (bpf.HELPER_REDIRECT_NEIGH, BRIDGE_INDEX))
    assert out[14 + 8] == 63 and ip_checksum_ok(out[14:])
    # the gateway (this host), the slice's broadcast, another network's slice, an
    # expiring TTL: the next filter or the kernel's path
    for other in ("250.0.28.1", "250.0.28.255", "240.0.28.9", "250.5.9.2"):
        assert run_program(insns, ipv4_packet(other), maps=maps)[0] == bpf.TC_ACT_UNSPEC
    assert run_program(insns, ipv4_packet("250.0.28.9", ttl=1), maps=maps)[0] == -1


@needs_root
def test_kernel_accepts_shortcuts():
    bpf.close(bpf.load_program(bpf.send_shortcut(FAN250, SLICE28, 1, "0e:fa:00:00:00:01"), "s"))
    bpf.close(bpf.load_program(bpf.send_shortcut(FAN250, SLICE28, 1, None), "s"))
    endpoints = bpf.create_hash_map(4, 12, 256, "test_map")
    try:
        bpf.map_update(endpoints, *bpf.endpoint_entry(1, 2, "0e:fa:00:00:00:02"))
        bpf.map_delete(endpoints, bpf.ENDPOINT_KEY.pack(1))
        bpf.map_delete(endpoints, bpf.ENDPOINT_KEY.pack(1))   # already gone: fine
        bpf.close(bpf.load_program(bpf.receive_shortcut(SLICE28, 1, endpoints), "r"))
    finally:
        bpf.close(endpoints)


def test_program_is_deterministic_and_small():
    a = bpf.fan_program(FAN250, 1, 14)
    assert a == bpf.fan_program(FAN250, 1, 14)
    assert len(a) % 8 == 0 and 20 <= len(a) // 8 <= 64
    assert a != bpf.fan_program(FAN240, 1, 14) != bpf.fan_program(FAN250, 2, 14)
    assert a != bpf.fan_program(FAN250, 1, 0)
    with pytest.raises(FanError):
        bpf.fan_program(FAN250, 1 << 24, 14)


@needs_root
def test_kernel_accepts_program():
    for offset in (14, 0):
        bpf.close(bpf.load_program(bpf.fan_program(FAN250, 7, offset), "fan-250"))


@needs_root
def test_bad_program_carries_verifier_log():
    # r0 = 0 with no exit: the verifier rejects it and says why
    with pytest.raises(FanError) as err:
        bpf.load_program(struct.pack("<BBhi", 0xB7, 0, 0, 0), "bad")
    assert "verifier log" in str(err.value) and "exit" in str(err.value)


# --- two hosts in namespaces ----------------------------------------------------

def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and res.returncode:
        raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}: {res.stdout}{res.stderr}")
    return res


# `ping` is not installed everywhere (it is not here): a raw-socket ICMP echo instead.
PING = r"""
import os, socket, struct, sys, time
dst, count, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
sock, ident, ok = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), os.getpid() & 0xFFFF, 0
for seq in range(count):
    body = b"fantest-bpf".ljust(32, b"-")
    sock.sendto(struct.pack("!BBHHH", 8, 0, csum(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + body), ident, seq) + body, (dst, 0))
    end = time.monotonic() + wait
    while end > time.monotonic():
        sock.settimeout(end - time.monotonic())
        try:
            pkt, (src, _) = sock.recvfrom(2048)
        except socket.timeout:
            break
        kind, _, _, i, q = struct.unpack_from("!BBHHH", pkt, (pkt[0] & 15) * 4)
        if (src, kind, i, q) == (dst, 0, ident, seq):
            ok += 1
            break
sys.exit(0 if ok else 1)
"""


def ping(src_ns: str, dst: str, count: int = 2) -> bool:
    """Like `ping -c COUNT -W 2`: true if any echo reply came back."""
    return sh("ip", "netns", "exec", src_ns, sys.executable, "-c", PING, dst, str(count), "2",
              check=False).returncode == 0


async def _with_ipr(ns, fn):
    from pyroute2 import AsyncIPRoute
    async with AsyncIPRoute(netns=ns) as ipr:
        index = (await ipr.link_lookup(ifname="fan-vxlan"))[0]
        return await fn(ipr, index)


def attach(ns: str, fan: FanMap, pref: int, name: str) -> None:
    """Load and attach in this process, then close the fd: tc keeps the program."""
    fd = bpf.load_program(bpf.fan_program(fan, pref, 14), name)
    try:
        asyncio.run(_with_ipr(ns, lambda ipr, i: bpf.attach(ipr, i, fd, name, pref, bpf.EGRESS)))
    finally:
        bpf.close(fd)


def attach_in_subprocess(ns: str, overlay: str, pref: int, name: str) -> None:
    """Load and attach from a process that then exits, like a restarted plugin."""
    code = f"""
import asyncio
from ipaddress import IPv4Network as N
from pyroute2 import AsyncIPRoute
from fan_driver.dataplane import bpf
from fan_driver.fanmap import FanMap
async def main():
    fd = bpf.load_program(bpf.fan_program(FanMap(N({overlay!r}), N("172.30.0.0/16")), {pref}, 14), {name!r})
    async with AsyncIPRoute(netns={ns!r}) as ipr:
        await bpf.attach(ipr, (await ipr.link_lookup(ifname="fan-vxlan"))[0], fd, {name!r}, {pref}, bpf.EGRESS)
asyncio.run(main())
"""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr


def filters(ns: str) -> dict:
    return asyncio.run(_with_ipr(ns, bpf.filters))


def detach(ns: str, pref: int) -> None:
    asyncio.run(_with_ipr(ns, lambda ipr, i: bpf.detach(ipr, i, pref)))


def add_container(host: str, ns: str, fan: FanMap, underlay: str, tag: str) -> str:
    """A bridge holding the host's slice .1 and a container namespace at .2."""
    slice_ = fan.slice_for(IPv4Address(underlay))
    br, gw, addr = f"fan-{tag}", slice_.network_address + 1, slice_.network_address + 2
    sh("ip", "-n", host, "link", "add", br, "type", "bridge")
    sh("ip", "-n", host, "addr", "add", f"{gw}/{slice_.prefixlen}", "dev", br)
    sh("ip", "-n", host, "link", "set", br, "up")
    sh("ip", "netns", "add", ns)
    sh("ip", "-n", host, "link", "add", f"v{tag}", "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "-n", host, "link", "set", f"v{tag}", "master", br, "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "link", "set", "eth0", "mtu", "1450", "up")
    sh("ip", "-n", ns, "addr", "add", f"{addr}/{slice_.prefixlen}", "dev", "eth0")
    sh("ip", "-n", ns, "route", "add", "default", "via", str(gw))
    return str(addr)


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces, tc filters and eBPF programs")
    prefix = f"fantest-bpf-{uuid.uuid4().hex[:6]}"
    created = []

    def netns(role):
        created.append(f"{prefix}-{role}")
        return created[-1]

    try:
        ha, hb = netns("ha"), netns("hb")
        for h in (ha, hb):
            sh("ip", "netns", "add", h)
        sh("ip", "-n", ha, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", hb)
        world = {"ha": ha, "hb": hb}
        for key, h, under in (("a", ha, "172.30.0.27"), ("b", hb, "172.30.5.9")):
            sh("ip", "-n", h, "link", "set", "lo", "up")
            sh("ip", "-n", h, "addr", "add", f"{under}/16", "dev", "eth0")
            sh("ip", "-n", h, "link", "set", "eth0", "up")
            # same MAC everywhere + NOARP: the next-hop MAC is the device's own,
            # which every peer's device accepts as its own, so no neigh/FDB entries
            sh("ip", "-n", h, "link", "add", "fan-vxlan", "address", "0e:fa:00:00:00:01",
               "type", "vxlan", "external", "dstport", "4789")
            sh("ip", "-n", h, "link", "set", "fan-vxlan", "arp", "off", "mtu", "1450", "up")
            sh("ip", "netns", "exec", h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            for fan, tag in ((FAN250, "250"), (FAN240, "240")):
                sh("ip", "-n", h, "route", "add", str(fan.overlay), "dev", "fan-vxlan")
                world[f"c{tag}{key}"] = netns(f"c{tag}{key}")
                world[f"ip{tag}{key}"] = add_container(h, world[f"c{tag}{key}"], fan, under, tag)
        # host A attaches in this process and closes its fd; host B from a process that exits
        attach(ha, FAN250, 10, "fan-250")
        attach_in_subprocess(hb, "250.0.0.0/8", 10, "fan-250")
        yield world
    finally:
        for ns in reversed(created):
            sh("ip", "netns", "del", ns, check=False)
        left = sh("ip", "netns", "list").stdout
        assert prefix not in left, left


def test_containers_talk_through_the_program(hosts):
    assert hosts["ip250a"] == "250.0.27.2" and hosts["ip250b"] == "250.5.9.2"
    assert ping(hosts["c250a"], hosts["ip250b"])
    assert ping(hosts["c250b"], hosts["ip250a"])
    assert filters(hosts["ha"]) == {10: "fan-250"} == filters(hosts["hb"])


def test_no_per_peer_state(hosts):
    assert ping(hosts["c250a"], hosts["ip250b"])      # traffic has flowed before we look
    for h, peer_slice in ((hosts["ha"], "250.5.9"), (hosts["hb"], "250.0.27")):
        neigh = sh("ip", "-n", h, "neigh", "show").stdout
        assert "PERMANENT" not in neigh, neigh
        fdb = sh("bridge", "-n", h, "fdb", "show", "dev", "fan-vxlan").stdout
        assert "permanent" not in fdb and " dst " not in fdb, fdb
        routes = sh("ip", "-n", h, "-4", "route", "show").stdout
        assert peer_slice not in routes and " via " not in routes, routes
        assert len(routes.strip().splitlines()) == 5, routes   # underlay, 2 overlays, 2 slices


def test_second_fan_shares_the_device_and_detach(hosts):
    ha, hb = hosts["ha"], hosts["hb"]
    # without its filter, packets for 240/8 fall through the 250 filter (UNSPEC)
    # and leave without tunnel metadata: the VXLAN device drops them
    assert not ping(hosts["c240a"], hosts["ip240b"], count=1)
    attach(ha, FAN240, 20, "fan-240")
    attach(hb, FAN240, 20, "fan-240")
    assert filters(ha) == {10: "fan-250", 20: "fan-240"} == filters(hb)
    assert ping(hosts["c240a"], hosts["ip240b"]) and ping(hosts["c240b"], hosts["ip240a"])
    assert ping(hosts["c250a"], hosts["ip250b"])

    # re-attaching at the same pref replaces, it does not stack a second filter
    attach(ha, FAN240, 20, "fan-240b")
    assert filters(ha) == {10: "fan-250", 20: "fan-240b"}
    shown = sh("tc", "-n", ha, "filter", "show", "dev", "fan-vxlan", "egress").stdout
    assert shown.count("handle 0x1") == 2, shown
    assert ping(hosts["c240a"], hosts["ip240b"])

    detach(ha, 20)
    detach(ha, 20)                                    # already gone: tolerated
    assert filters(ha) == {10: "fan-250"}
    assert not ping(hosts["c240a"], hosts["ip240b"], count=1)
    assert ping(hosts["c250a"], hosts["ip250b"])

    detach(ha, 10)
    assert filters(ha) == {}
    assert "clsact" not in sh("tc", "-n", ha, "qdisc", "show", "dev", "fan-vxlan").stdout
    assert not ping(hosts["c250a"], hosts["ip250b"], count=1)
    detach(ha, 10)                                    # no qdisc at all: tolerated

    # another tool's filter on the same device: never replaced, never deleted
    sh("tc", "-n", hb, "filter", "add", "dev", "fan-vxlan", "egress", "pref", "30", "u32", "match", "u32", "0", "0")
    with pytest.raises(FanError):
        attach(hb, FAN240, 30, "fan-240")
    for pref in (30, 10, 20):
        detach(hb, pref)
    assert filters(hb) == {}
    assert "u32" in sh("tc", "-n", hb, "filter", "show", "dev", "fan-vxlan", "egress").stdout
    assert "clsact" in sh("tc", "-n", hb, "qdisc", "show", "dev", "fan-vxlan").stdout
