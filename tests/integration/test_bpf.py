"""The eBPF fan dataplane: the committed object against its source, each program
run in the kernel with BPF_PROG_TEST_RUN on crafted packets, then two hosts in
network namespaces whose containers talk across an external-mode VXLAN device
with no per-peer route, neighbour or FDB entry.

BPF_PROG_TEST_RUN returns the verdict and the packet as the program left it,
but not the tunnel key the program set (test runs have no device to carry it).
So the object has a switch, cfg.test_record_key, that copies the key into its
.bss, where the test reads it; off (as the plugin loads it) the verifier sees a
constant and removes the copy. The send program's encapsulation needs no such
switch: its outer headers are in the packet that comes back. The programs run
in a namespace of the test's, whose underlay routes their FIB lookups find.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network

import pytest

from fan_driver.dataplane import bpf, libbpf
from fan_driver.dataplane.ebpf import SHARED_VXLAN_MAC
from fan_driver.errors import FanError
from fan_driver.fanmap import FanMap, HostSlice

N, A = IPv4Network, IPv4Address
FAN250 = FanMap(N("250.0.0.0/8"), N("172.30.0.0/16"))
FAN240 = FanMap(N("240.0.0.0/8"), N("172.30.0.0/16"))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BPF_DIR = os.path.join(REPO, "fan_driver", "dataplane", "bpf")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2), netns, tc)")
TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_UNSPEC = 0, 7, 0xFFFFFFFF   # retval is a u32
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
UNDERLAY_MAC = "0200000000fe"
CONTAINER_MAC, GATEWAY_MAC = "0efafa001c02", "0efafa001c01"


# --- the committed object and its source ------------------------------------------

def committed_object() -> bytes:
    with open(os.path.join(BPF_DIR, bpf.OBJECT), "rb") as f:
        return f.read()


def test_committed_object_was_built_from_the_committed_source():
    embedded = bpf.elf_section(committed_object(), bpf.SOURCE_SECTION)
    assert embedded is not None, f"{bpf.OBJECT} has no {bpf.SOURCE_SECTION} section"
    assert embedded.decode() == bpf.source_digest(), (
        f"{bpf.OBJECT} is stale: run fan_driver/dataplane/bpf/build.sh and commit it")


def test_loader_packs_what_the_object_reads():
    # struct fan_config is the whole .rodata: its size is in the object's BTF too
    assert len(bpf.elf_section(committed_object(), ".rodata")) == bpf.Config.LAYOUT.size


@pytest.fixture(scope="module", params=["committed", "rebuilt"])
def elf(request, tmp_path_factory) -> bytes:
    """Every in-kernel test runs on the committed object and, where clang is
    installed, on one built now from the source."""
    if request.param == "committed":
        return committed_object()
    missing = [t for t in ("clang", "llvm-objcopy") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"cannot rebuild the object: {', '.join(missing)} not installed "
                    "(Debian: clang llvm libbpf-dev)")
    out = tmp_path_factory.mktemp("bpf") / bpf.OBJECT
    res = subprocess.run([os.path.join(BPF_DIR, "build.sh"), str(out)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rebuilt = out.read_bytes()
    assert bpf.elf_section(rebuilt, bpf.SOURCE_SECTION).decode() == bpf.source_digest()
    return rebuilt


# --- packets --------------------------------------------------------------------

def checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(dst: str, src: str = "10.0.0.1", ttl: int = 64, payload: bytes = b"fan" * 10) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, 0, ttl, 17, 0,
                         A(src).packed, A(dst).packed)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def frame(dst: str, ttl: int = 64, dst_mac: str = GATEWAY_MAC, ethertype: int = ETH_P_IP,
          src: str = "10.0.0.1") -> bytes:
    return (bytes.fromhex(dst_mac) + bytes.fromhex(CONTAINER_MAC) + struct.pack("!H", ethertype)
            + ipv4(dst, src, ttl))


def routed(before: bytes, after: bytes, ip_at: int = 14) -> None:
    """`after` is `before` routed once: TTL - 1, a valid checksum, nothing else moved."""
    assert after[ip_at + 8] == before[ip_at + 8] - 1
    assert checksum(after[ip_at:ip_at + 20]) == 0
    assert after[ip_at:ip_at + 8] + after[ip_at + 12:] == before[ip_at:ip_at + 8] + before[ip_at + 12:]


# --- running programs in the kernel -------------------------------------------------

class RunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.x)."""
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p),
                ("data_out", ctypes.c_void_p), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_void_p),
                ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


def run_in_kernel(obj: libbpf.BpfObject, program: str, packet: bytes) -> tuple[int, bytes]:
    """BPF_PROG_TEST_RUN: the program's verdict and the packet it leaves."""
    lib = libbpf.library()
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.c_void_p]
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    opts = RunOpts(sz=ctypes.sizeof(RunOpts), data_in=ctypes.addressof(data_in),
                       data_out=ctypes.addressof(data_out), data_size_in=len(packet),
                       data_size_out=len(data_out), repeat=1)
    err = lib.bpf_prog_test_run_opts(obj.program_fd(program), ctypes.byref(opts))
    assert err == 0, os.strerror(-err)
    return opts.retval, data_out.raw[:opts.data_size_out]


def recorded_key(obj: libbpf.BpfObject) -> tuple[int, A, int]:
    """tunnel_id, remote_ipv4 and tunnel_ttl of the key the program set last."""
    key = libbpf.map_lookup(obj.map_fd(".bss"), struct.pack("=I", 0), 44)
    tunnel_id, remote = struct.unpack_from("=II", key)
    return tunnel_id, A(remote), key[21]


SH = """
set -e
ip link add under0 address {mac} type veth peer name under1
ip link set under1 up
ip link set lo up
ip link set under0 up
sysctl -qw net.ipv4.ip_forward=1
"""


@pytest.fixture(scope="module")
def underlay_ns():
    """A namespace with one underlay device holding an address in every example's
    underlay, and a neighbour for each example's host: the FIB the send program's
    lookups see (forwarding on, as the fan has it: bpf_fib_lookup wants it). The
    programs run in it (setns of this process, undone after)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF_PROG_TEST_RUN, network namespaces")
    name = f"fantest-bpfrun-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", name)
    try:
        script = SH.format(mac=bytes.fromhex(UNDERLAY_MAC).hex(":")) + "".join(
            f"ip addr add {N(u).network_address + 1}/{N(u).prefixlen} dev under0\n"
            f"ip neigh replace {h} lladdr {neighbour_mac(h).hex(':')} dev under0 nud permanent\n"
            for _, u, h, _ in EXAMPLES)
        sh("ip", "netns", "exec", name, "sh", "-c", script)
        yield name, int(sh("ip", "-n", name, "-o", "link", "show", "under0").stdout.split(":")[0])
    finally:
        sh("ip", "netns", "del", name, check=False)


def neighbour_mac(host: str) -> bytes:
    return b"\x02\x00" + A(host).packed


@contextmanager
def inside(netns: str):
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNET = 0x40000000
    with open("/proc/self/ns/net") as home, open(f"/run/netns/{netns}") as target:
        assert libc.setns(target.fileno(), CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
        try:
            yield
        finally:
            assert libc.setns(home.fileno(), CLONE_NEWNET) == 0


# REFERENCE §1's worked examples: overlay, underlay, host, the host's slice
EXAMPLES = [
    ("250.0.0.0/8", "172.30.0.0/16", "172.30.0.28", "250.0.28.0/24"),
    ("250.0.0.0/8", "172.30.0.0/24", "172.30.0.28", "250.28.0.0/16"),
    ("10.100.0.0/16", "192.168.1.0/24", "192.168.1.28", "10.100.28.0/24"),
    ("99.0.0.0/8", "10.99.224.0/20", "10.99.238.5", "99.224.80.0/20"),
    ("100.64.0.0/10", "10.224.220.0/24", "10.224.220.10", "100.66.128.0/18"),
]


def loaded(elf: bytes, fan: FanMap, local: str, l2: bool = True, underlay_index: int = 0,
           **kw) -> libbpf.BpfObject:
    """The object for a network of `fan` on the host at `local`."""
    config = bpf.Config(fan, HostSlice(fan, A(local)).slice, 4242, l2, A(local),
                        tunnel_index=17, underlay_index=underlay_index, bridge_index=23,
                        tunnel_mac=SHARED_VXLAN_MAC, **kw)
    return bpf.load(config, "fan_test", elf)


@contextmanager
def loaded_in(ns, *args, **kw):
    obj = loaded(*args, **kw)
    try:
        with inside(ns):
            yield obj
    finally:
        obj.close()


def local_for(underlay: str) -> str:
    """The address of the host running the program: the first of the underlay."""
    return str(N(underlay).network_address + 1)


@pytest.mark.parametrize("overlay,underlay,host,slice_", EXAMPLES)
def test_examples_slices_match_reference(overlay, underlay, host, slice_):
    assert HostSlice(FanMap(N(overlay), N(underlay)), A(host)).slice == N(slice_)


@needs_root
@pytest.mark.parametrize("l2", [True, False], ids=["vxlan-l2-at-14", "ipip-l3-at-0"])
def test_tunnel_key_is_the_fan_rule(elf, l2):
    for overlay, underlay, host, slice_ in EXAMPLES:
        fan = FanMap(N(overlay), N(underlay))
        inner = str(N(slice_).network_address + 2)
        obj = loaded(elf, fan, local_for(underlay), l2=l2, test_record_key=True)
        try:
            if l2:
                packet = frame(inner, dst_mac=SHARED_VXLAN_MAC.replace(":", ""))
            else:
                # Test runs parse an Ethernet header whatever the program: from a
                # bare IPv4 header, bytes 12-13 (the source's first two) become the
                # protocol. A source of 8.0.x.x makes that ETH_P_IP.
                packet = ipv4(inner, src="8.0.0.1")
            verdict, out = run_in_kernel(obj, bpf.TUNNEL_KEY, packet)
            assert verdict == TC_ACT_OK
            assert recorded_key(obj) == (4242, A(host), 64), (overlay, underlay)
            if l2:   # the source MAC flipped from the shared device MAC, nothing else
                assert out[6:12] == bytes.fromhex(CONTAINER_MAC[:-1] + "3")
                assert out[:6] + out[12:] == packet[:6] + packet[12:]
            else:
                assert out == packet
            # outside the overlay: left to the next filter, untouched
            other = frame("8.8.8.8") if l2 else ipv4("9.9.9.9", src="8.0.0.1")
            assert run_in_kernel(obj, bpf.TUNNEL_KEY, other) == (TC_ACT_UNSPEC, other)
        finally:
            obj.close()


@needs_root
def test_tunnel_key_leaves_what_is_not_ipv4(elf):
    obj = loaded(elf, FAN250, "172.30.0.28")
    try:
        for packet in (frame("250.5.9.2", ethertype=ETH_P_IPV6), frame("250.5.9.2", ethertype=ETH_P_ARP),
                       bytes(20)):
            assert run_in_kernel(obj, bpf.TUNNEL_KEY, packet) == (TC_ACT_UNSPEC, packet)
    finally:
        obj.close()


def check_vxlan(out: bytes, packet: bytes, local: str, remote: str, dst_mac: bytes) -> None:
    """`out` is `packet` routed once and encapsulated to `remote` as VXLAN VNI 4242."""
    assert len(out) == len(packet) + 50
    assert out[:14] == dst_mac + bytes.fromhex(UNDERLAY_MAC) + b"\x08\x00"
    ip = out[14:34]
    assert checksum(ip) == 0
    version, _, length, _, frag, ttl, proto, _, src, dst = struct.unpack("!BBHHHBBH4s4s", ip)
    assert (version, length, frag, ttl, proto) == (0x45, len(out) - 14, 0x4000, 64, 17)
    assert (A(src), A(dst)) == (A(local), A(remote))
    sport, dport, udp_len, udp_check = struct.unpack_from("!HHHH", out, 34)
    assert 32768 <= sport < 61000 and (dport, udp_len, udp_check) == (4789, len(out) - 34, 0)
    assert out[42:50] == struct.pack("!II", 0x08000000, 4242 << 8)
    assert out[50:64] == bytes.fromhex(SHARED_VXLAN_MAC.replace(":", "")) + packet[6:14]
    routed(packet[14:], out[64:], 0)


@needs_root
def test_send_encapsulates_to_the_fan_rule_address(elf, underlay_ns):
    ns, under0 = underlay_ns
    for overlay, underlay, host, slice_ in EXAMPLES:
        fan = FanMap(N(overlay), N(underlay))
        local = local_for(underlay)
        packet = frame(str(N(slice_).network_address + 2))
        with loaded_in(ns, elf, fan, local, underlay_index=under0) as obj:
            verdict, out = run_in_kernel(obj, bpf.SEND, packet)
        assert verdict == TC_ACT_REDIRECT, (overlay, underlay)
        check_vxlan(out, packet, local, host, neighbour_mac(host))


@needs_root
@pytest.mark.parametrize("df", [True, False], ids=["df", "no-df"])
def test_send_encapsulates_ipip_to_the_fan_rule_address(elf, underlay_ns, df):
    ns, under0 = underlay_ns
    for overlay, underlay, host, slice_ in EXAMPLES:
        fan = FanMap(N(overlay), N(underlay))
        local = local_for(underlay)
        packet = frame(str(N(slice_).network_address + 2))
        if df:   # the inner DF bit, with the checksum kept valid
            packet = packet[:20] + b"\x40" + packet[21:24] + bytes(2) + packet[26:]
            packet = packet[:24] + struct.pack("!H", checksum(packet[14:34])) + packet[26:]
        with loaded_in(ns, elf, fan, local, l2=False, underlay_index=under0) as obj:
            verdict, out = run_in_kernel(obj, bpf.SEND, packet)
        assert verdict == TC_ACT_REDIRECT, (overlay, underlay)
        assert len(out) == len(packet) + 20
        assert out[:14] == neighbour_mac(host) + bytes.fromhex(UNDERLAY_MAC) + b"\x08\x00"
        ip = out[14:34]
        assert checksum(ip) == 0
        version, _, length, _, frag, ttl, proto, _, src, dst = struct.unpack("!BBHHHBBH4s4s", ip)
        # RFC 2003: the outer DF is the inner one
        assert (version, length, frag, ttl, proto) == (0x45, len(out) - 14, 0x4000 * df, 64, 4)
        assert (A(src), A(dst)) == (A(local), A(host))
        routed(packet[14:], out[34:], 0)


@needs_root
def test_send_without_neighbour_leaves_the_next_hop_to_the_kernel(elf, underlay_ns):
    ns, under0 = underlay_ns
    packet = frame("250.0.99.2")   # host 172.30.0.99 has no neighbour entry
    with loaded_in(ns, elf, FAN250, "172.30.0.1", underlay_index=under0) as obj:
        verdict, out = run_in_kernel(obj, bpf.SEND, packet)
    assert verdict == TC_ACT_REDIRECT   # bpf_redirect_neigh resolves and writes the MAC
    assert out[14 + 16:14 + 20] == A("172.30.0.99").packed and len(out) == len(packet) + 50
    routed(packet[14:], out[64:], 0)


@needs_root
def test_send_leaves_the_rest_to_the_kernel(elf, underlay_ns):
    ns, under0 = underlay_ns
    # this host's slice, outside the overlay, broadcasts, a TTL running out (the
    # kernel answers it), not IPv4, too short
    others = [frame("250.0.1.9"), frame("8.8.8.8"), frame("250.5.9.2", dst_mac="ffffffffffff"),
              frame("250.5.9.2", ttl=1), frame("250.5.9.2", ethertype=ETH_P_ARP), bytes(20)]
    with loaded_in(ns, elf, FAN250, "172.30.0.1", underlay_index=under0) as obj:
        for packet in others:
            assert run_in_kernel(obj, bpf.SEND, packet) == (TC_ACT_OK, packet)
    # no route to the peer's underlay (here: none at all): the kernel's path too
    fan = FanMap(N("250.0.0.0/8"), N("172.31.0.0/16"))
    packet = frame("250.5.9.2")
    with loaded_in(ns, elf, fan, "172.31.0.1", underlay_index=under0) as obj:
        assert run_in_kernel(obj, bpf.SEND, packet) == (TC_ACT_OK, packet)


@needs_root
@pytest.mark.parametrize("l2", [True, False], ids=["vxlan-via-device", "ipip"])
def test_send_through_the_tunnel_device(elf, underlay_ns, l2):
    """IPIP (and VXLAN without the underlay's index): routed, then to the
    tunnel device, readdressed to the shared MAC on VXLAN."""
    ns, _ = underlay_ns
    packet = frame("250.5.9.2")
    with loaded_in(ns, elf, FAN250, "172.30.0.1", l2=l2, send_encap=False) as obj:
        verdict, out = run_in_kernel(obj, bpf.SEND, packet)
    assert verdict == TC_ACT_REDIRECT
    assert out[:6] == (bytes.fromhex(SHARED_VXLAN_MAC.replace(":", "")) if l2 else packet[:6])
    assert out[6:14] == packet[6:14]
    routed(packet, out)


@needs_root
def test_receive_hands_this_slice_to_the_container(elf, underlay_ns):
    ns, _ = underlay_ns
    with loaded_in(ns, elf, FAN250, "172.30.0.28") as obj:
        libbpf.map_update(obj.map_fd(bpf.ENDPOINTS),
                          *bpf.endpoint_entry(int(A("250.0.28.9")), 31, "0e:fa:fa:00:1c:09"))
        # a container in the map: into its namespace, readdressed to its MAC
        packet = frame("250.0.28.9", ttl=63, dst_mac=SHARED_VXLAN_MAC.replace(":", ""))
        verdict, out = run_in_kernel(obj, bpf.RECEIVE, packet)
        assert verdict == TC_ACT_REDIRECT and out[:6] == bytes.fromhex("0efafa001c09")
        routed(packet, out)
        # one the map does not hold (yet): out of the bridge, by the neighbour table
        packet = frame("250.0.28.10")
        verdict, out = run_in_kernel(obj, bpf.RECEIVE, packet)
        assert verdict == TC_ACT_REDIRECT and out[:6] == packet[:6]
        routed(packet, out)
        # the gateway (this host), the slice's broadcast, another network's slice,
        # an expiring TTL, not IPv4: the next filter or the kernel's path
        for packet in (frame("250.0.28.1"), frame("250.0.28.255"), frame("240.0.28.9"),
                       frame("250.5.9.2"), frame("250.0.28.9", ttl=1),
                       frame("250.0.28.9", ethertype=ETH_P_ARP)):
            assert run_in_kernel(obj, bpf.RECEIVE, packet) == (TC_ACT_UNSPEC, packet)
        libbpf.map_delete(obj.map_fd(bpf.ENDPOINTS), bpf.ENDPOINT_KEY.pack(int(A("250.0.28.9"))))
        libbpf.map_delete(obj.map_fd(bpf.ENDPOINTS), bpf.ENDPOINT_KEY.pack(int(A("250.0.28.9"))))


REMOTE_HOST = "172.30.5.9"


def vxlan(inner: bytes, local: str = "172.30.0.28", vni: int = 4242, dport: int = 4789,
          proto: int = 17, frag: int = 0x4000, ethertype: int = ETH_P_IP,
          dst_mac: str = "000000000000", flags: int = 0x08000000) -> bytes:
    """`inner` as a peer's send program sends it to `local`. The outer destination
    MAC is the test run's device's (loopback: zeros), as the underlay NIC's would be."""
    udp_len = 16 + len(inner)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, frag, 64, proto, 0,
                     A(REMOTE_HOST).packed, A(local).packed)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return (bytes.fromhex(dst_mac) + bytes.fromhex(UNDERLAY_MAC) + struct.pack("!H", ethertype)
            + ip + struct.pack("!HHHH", 40000, dport, udp_len, 0)
            + struct.pack("!II", flags, vni << 8) + inner)


def sent_frame(dst: str, ttl: int = 63, ethertype: int = ETH_P_IP) -> bytes:
    """The inner frame of a peer's send program: to the shared MAC, from its container."""
    return frame(dst, ttl, dst_mac=SHARED_VXLAN_MAC.replace(":", ""), ethertype=ethertype)


@contextmanager
def with_container(elf: bytes):
    """Host 172.30.0.28's object, its container 250.0.28.9 (veth 31) in the map."""
    obj = loaded(elf, FAN250, "172.30.0.28")
    try:
        libbpf.map_update(obj.map_fd(bpf.ENDPOINTS),
                          *bpf.endpoint_entry(int(A("250.0.28.9")), 31, "0e:fa:fa:00:1c:09"))
        yield obj
    finally:
        obj.close()


@needs_root
def test_decap_hands_this_hosts_vxlan_to_the_container(elf):
    with with_container(elf) as obj:
        inner = sent_frame("250.0.28.9")
        verdict, out = run_in_kernel(obj, bpf.DECAP, vxlan(inner))
        assert verdict == TC_ACT_REDIRECT
        # outer headers gone; to the container's MAC, from the sending container's
        assert len(out) == len(inner)
        assert out[:14] == bytes.fromhex("0efafa001c09" + CONTAINER_MAC) + b"\x08\x00"
        routed(inner[14:], out[14:], 0)   # TTL 63 -> 62, as two routers would leave it


@needs_root
def test_decap_leaves_what_it_does_not_recognise_untouched(elf):
    with with_container(elf) as obj:
        known = sent_frame("250.0.28.9")
        others = {
            "another network's VNI": vxlan(known, vni=4243),
            "another host's address": vxlan(known, local="172.30.0.29"),
            "another UDP port": vxlan(known, dport=4790),
            "not UDP": vxlan(known, proto=6),
            "VXLAN flags other than the VNI's": vxlan(known, flags=0x88000000),
            "for another host's MAC": vxlan(known, dst_mac="0200000000aa"),
            "a broadcast": vxlan(known, dst_mac="ffffffffffff"),
            "outer IPv6": vxlan(known, ethertype=ETH_P_IPV6),
            "a first fragment": vxlan(known, frag=0x2000),
            "a later fragment": vxlan(known, frag=0x0001),
            "a container not in the map": vxlan(sent_frame("250.0.28.10")),
            "the gateway": vxlan(sent_frame("250.0.28.1")),
            "an expiring TTL": vxlan(sent_frame("250.0.28.9", ttl=1)),
            "inner ARP": vxlan(sent_frame("250.0.28.9", ethertype=ETH_P_ARP)),
            "plain IPv4 to this host": frame("172.30.0.28", dst_mac="000000000000"),
            "too short": vxlan(known)[:60],
        }
        for what, packet in others.items():
            assert run_in_kernel(obj, bpf.DECAP, packet) == (TC_ACT_UNSPEC, packet), what


@needs_root
def test_receive_filter_on_a_device_the_fan_does_not_own(elf):
    """On the underlay device: attach at the network's pref, never over another
    tool's filter; removal and the orphan sweep take only ours and leave the
    clsact qdisc and the other filters as they were."""
    from pyroute2 import AsyncIPRoute
    from fan_driver.dataplane.ebpf import DECAP_PREF, EbpfMapping
    from fan_driver.dataplane.netlink import Links
    from fan_driver.dataplane.plan import VXLAN, NetworkPlan

    ns = f"fantest-decap-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "netns", "exec", ns, "sh", "-c", SH.format(mac="02:00:00:00:00:fe")
           + "ip addr add 172.30.0.28/16 dev under0\n")
        sh("tc", "-n", ns, "qdisc", "add", "dev", "under0", "clsact")
        sh("tc", "-n", ns, "filter", "add", "dev", "under0", "ingress", "pref", "10", "u32",
           "match", "u32", "0", "0", "classid", "1:1")
        plans = [NetworkPlan(f"{n:02x}" * 32, HostSlice(FAN250, A("172.30.0.28")), "under0", 1450,
                             VXLAN, "ebpf", n) for n in (1, 2)]
        obj = loaded(elf, FAN250, "172.30.0.28")

        async def scenario():
            async with AsyncIPRoute(netns=ns) as ipr:
                links, mapping = Links(ipr), EbpfMapping()
                index = await links.index("under0")
                # another tool's bpf filter where network 2's would go
                await bpf.attach(ipr, index, obj.program_fd(bpf.DECAP), "cil_from_netdev",
                                 DECAP_PREF + 2, bpf.INGRESS)
                for plan in plans:
                    await mapping._attach_decap(links, plan, obj)
                attached = await bpf.filters(ipr, index, bpf.INGRESS)
                await mapping.remove_orphans(links, plans[1:])   # network 1 is not in the state
                swept = await bpf.filters(ipr, index, bpf.INGRESS)
                await mapping._attach_decap(links, plans[0], obj)
                await mapping.remove(links, plans[0])
                await mapping.remove(links, plans[1])
                return attached, swept, await bpf.filters(ipr, index, bpf.INGRESS)
        try:
            attached, swept, left = asyncio.run(scenario())
        finally:
            obj.close()
        assert attached == {DECAP_PREF + 1: "fan_01010101", DECAP_PREF + 2: "cil_from_netdev"}
        assert swept == left == {DECAP_PREF + 2: "cil_from_netdev"}
        shown = sh("tc", "-n", ns, "filter", "show", "dev", "under0", "ingress").stdout
        assert "u32" in shown and "cil_from_netdev" in shown, shown
        assert "clsact" in sh("tc", "-n", ns, "qdisc", "show", "dev", "under0").stdout
    finally:
        sh("ip", "netns", "del", ns, check=False)


@needs_root
def test_verifier_rejection_carries_its_log():
    elf = committed_object()
    code = bpf.elf_section(elf, "tc")
    at = elf.index(code)
    assert code[:8] == bytes.fromhex("bf16000000000000")   # r6 = r1: keep the context
    bad = elf[:at] + bytes.fromhex("bf96000000000000") + elf[at + 8:]   # r6 = r9, unset
    with pytest.raises(FanError) as err:
        loaded(bad, FAN250, "172.30.0.28")
    assert "R9 !read_ok" in str(err.value) and "verifier" in str(err.value), str(err.value)


@needs_root
def test_object_loads_with_only_the_plugins_capabilities():
    """The managed plugin has CAP_BPF and CAP_NET_ADMIN but not CAP_PERFMON or
    CAP_SYS_ADMIN, so the verifier holds it to stricter rules (no variable
    offsets on packet pointers, no unset stack passed to helpers)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop capabilities")
    with open(os.path.join(REPO, "plugin", "config.json")) as f:
        caps = json.load(f)["linux"]["capabilities"]
    keep = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    probe = "from fan_driver.dataplane import ebpf; print(ebpf.probe_error() or 'LOADED')"
    res = subprocess.run([setpriv, f"--bounding-set=-all,{keep}", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert res.stdout.strip() == "LOADED", res.stdout[-3000:] + res.stderr[-2000:]


def test_vni_out_of_range_is_refused():
    with pytest.raises(FanError, match="VNI"):
        bpf.Config(FAN250, N("250.0.28.0/24"), 1 << 24, True, A("172.30.0.28")).pack()


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


def tunnel_key_object(fan: FanMap, vni: int, name: str) -> libbpf.BpfObject:
    return bpf.load(bpf.Config(fan, fan.slice_for(A("172.30.0.1")), vni, True, A("172.30.0.1"),
                               tunnel_mac=SHARED_VXLAN_MAC), name)


def attach(ns: str, fan: FanMap, pref: int, name: str) -> None:
    """Load and attach in this process, then close the object: tc keeps the program."""
    obj = tunnel_key_object(fan, pref, name)
    try:
        asyncio.run(_with_ipr(ns, lambda ipr, i: bpf.attach(
            ipr, i, obj.program_fd(bpf.TUNNEL_KEY), name, pref, bpf.EGRESS)))
    finally:
        obj.close()


def attach_in_subprocess(ns: str, overlay: str, pref: int, name: str) -> None:
    """Load and attach from a process that then exits, like a restarted plugin."""
    code = f"""
import asyncio
from ipaddress import IPv4Network as N
from pyroute2 import AsyncIPRoute
from fan_driver.dataplane import bpf
from fan_driver.fanmap import FanMap
from tests.integration.test_bpf import tunnel_key_object
async def main():
    obj = tunnel_key_object(FanMap(N({overlay!r}), N("172.30.0.0/16")), {pref}, {name!r})
    async with AsyncIPRoute(netns={ns!r}) as ipr:
        await bpf.attach(ipr, (await ipr.link_lookup(ifname="fan-vxlan"))[0],
                         obj.program_fd(bpf.TUNNEL_KEY), {name!r}, {pref}, bpf.EGRESS)
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
