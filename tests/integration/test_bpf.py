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
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from fan_driver.dataplane import bpf, libbpf
from fan_driver.dataplane.encap import IPIP, VXLAN, Encapsulation
from fan_driver.config import VXLAN_PORT
from fan_driver.dataplane.encap.vxlan import SHARED_MAC as SHARED_VXLAN_MAC
from fan_driver.dataplane.mapping.ebpf import conntrack_supported, probe_error
from fan_driver.dataplane.plan import OUTER_TTL
from fan_driver.errors import FanError
from fan_driver.fanmap import FanMap, HostSlice

N, A = IPv4Network, IPv4Address
FAN250 = FanMap(N("250.0.0.0/8"), N("172.30.0.0/16"))
FAN240 = FanMap(N("240.0.0.0/8"), N("172.30.0.0/16"))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BPF_DIR = os.path.join(REPO, "fan_driver", "dataplane", "bpf")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bpf(2), netns, tc)")
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT, TC_ACT_UNSPEC = 0, 2, 7, 0xFFFFFFFF   # retval is a u32
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
UNDERLAY_MAC = "0200000000fe"
CONTAINER_MAC, GATEWAY_MAC = "0efafa001c02", "0efafa001c01"


# --- the committed object and its source ------------------------------------------

OBJECTS = (bpf.OBJECT, bpf.CONNTRACK_OBJECT)


SOURCE_SECTION = ".fan.source"   # where build.sh records the SHA-256 of the source


def source_digest() -> str:
    """SHA-256 of the source as build.sh hashes it: fan.bpf.c then fan.h."""
    return hashlib.sha256(b"".join(open(os.path.join(BPF_DIR, name), "rb").read()
                                   for name in ("fan.bpf.c", "fan.h"))).hexdigest()


def elf_section(elf: bytes, wanted: str) -> bytes | None:
    """One section's bytes of a little-endian ELF64 file (as BPF objects are)."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * entsize)
        return name, offset, size

    _, names_at, _ = header(names_index)
    for i in range(count):
        name, offset, size = header(i)
        if elf[names_at + name:elf.index(b"\0", names_at + name)].decode() == wanted:
            return elf[offset:offset + size]
    return None


def committed_object(name: str = bpf.OBJECT) -> bytes:
    with open(os.path.join(BPF_DIR, name), "rb") as f:
        return f.read()


@pytest.mark.parametrize("name", OBJECTS)
def test_committed_object_was_built_from_the_committed_source(name):
    embedded = elf_section(committed_object(name), SOURCE_SECTION)
    assert embedded is not None, f"{name} has no {SOURCE_SECTION} section"
    assert embedded.decode() == source_digest(), (
        f"{name} is stale: run fan_driver/dataplane/bpf/build.sh and commit it")


@pytest.mark.parametrize("name", OBJECTS)
def test_loader_packs_what_the_object_reads(name):
    # struct fan_config is the whole .rodata: its size is in the object's BTF too
    assert len(elf_section(committed_object(name), ".rodata")) == bpf.Config.LAYOUT.size


def test_only_the_conntrack_object_calls_kfuncs():
    """libbpf resolves every kfunc an object names, and one in a module's BTF
    only with CAP_SYS_ADMIN: the plain object must name none."""
    for kfunc in (b"bpf_skb_ct_lookup", b"bpf_ct_release"):
        assert kfunc not in committed_object()
        assert kfunc in committed_object(bpf.CONNTRACK_OBJECT)


@pytest.fixture(scope="module", params=["committed", "rebuilt"])
def elf(request, tmp_path_factory) -> dict:
    """Every in-kernel test runs on the committed objects and, where clang is
    installed, on ones built now from the source: object name -> its bytes."""
    if request.param == "committed":
        return {name: committed_object(name) for name in OBJECTS}
    missing = [t for t in ("clang", "llvm-objcopy") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"cannot rebuild the object: {', '.join(missing)} not installed "
                    "(Debian: clang llvm libbpf-dev)")
    out = tmp_path_factory.mktemp("bpf")
    res = subprocess.run([os.path.join(BPF_DIR, "build.sh"), str(out)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rebuilt = {name: (out / name).read_bytes() for name in OBJECTS}
    for data in rebuilt.values():
        assert elf_section(data, SOURCE_SECTION).decode() == source_digest()
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


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes:
    lib = libbpf.library()
    lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    value = ctypes.create_string_buffer(value_size)
    err = lib.bpf_map_lookup_elem(map_fd, key, value)
    assert err == 0, os.strerror(-err)
    return value.raw


def recorded_key(obj: libbpf.BpfObject) -> tuple[int, A, int]:
    """tunnel_id, remote_ipv4 and tunnel_ttl of the key the program set last."""
    key = map_lookup(obj.map_fd(".bss"), struct.pack("=I", 0), 44)
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


# Worked examples of the fan rule: overlay, underlay, host, the host's slice
EXAMPLES = [
    ("250.0.0.0/8", "172.30.0.0/16", "172.30.0.28", "250.0.28.0/24"),
    ("250.0.0.0/8", "172.30.0.0/24", "172.30.0.28", "250.28.0.0/16"),
    ("10.100.0.0/16", "192.168.1.0/24", "192.168.1.28", "10.100.28.0/24"),
    ("99.0.0.0/8", "10.99.224.0/20", "10.99.238.5", "99.224.80.0/20"),
    ("100.64.0.0/10", "10.224.220.0/24", "10.224.220.10", "100.66.128.0/18"),
]


def loaded(elf: dict, fan: FanMap, local: str, encap: Encapsulation = VXLAN,
           underlay_index: int = 0, **kw) -> libbpf.BpfObject:
    """The object (of `elf`, the one the config names) for a network of `fan`
    on the host at `local` (on the default VXLAN port unless `vxlan_port`)."""
    kw.setdefault("vxlan_port", VXLAN_PORT)
    config = bpf.Config(fan, HostSlice(fan, A(local)).slice, 4242, encap.bpf_encap, A(local),
                        tunnel_index=17, underlay_index=underlay_index, bridge_index=23,
                        tunnel_mac=SHARED_VXLAN_MAC, **kw)
    return bpf.load(config, "fan_test", elf[config.object])


# A test run's packet comes from the loopback device of the namespace it runs in.
TEST_RUN_IFINDEX = 1


def own(fan: FanMap, local: str) -> str:
    """The address of the host's container that sends in test runs: its slice's .2."""
    return str(HostSlice(fan, A(local)).slice.network_address + 2)


@contextmanager
def loaded_in(ns, elf, fan, local, *args, **kw):
    """The object, run in `ns`, with the host's sending container (own()) in its
    endpoints map as the test run's device: the send program sends only what
    carries the address of the endpoint whose veth it came from."""
    obj = loaded(elf, fan, local, *args, **kw)
    try:
        libbpf.map_update(obj.map_fd(bpf.ENDPOINTS), *bpf.endpoint_entry(
            int(A(own(fan, local))), TEST_RUN_IFINDEX, CONTAINER_MAC))
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
@pytest.mark.parametrize("encap", [VXLAN, IPIP], ids=["vxlan-l2-at-14", "ipip-l3-at-0"])
def test_tunnel_key_is_the_fan_rule(elf, encap):
    for overlay, underlay, host, slice_ in EXAMPLES:
        fan = FanMap(N(overlay), N(underlay))
        inner = str(N(slice_).network_address + 2)
        obj = loaded(elf, fan, local_for(underlay), encap=encap, test_record_key=True)
        try:
            if encap.l2:
                packet = frame(inner, dst_mac=SHARED_VXLAN_MAC.replace(":", ""))
            else:
                # Test runs parse an Ethernet header whatever the program: from a
                # bare IPv4 header, bytes 12-13 (the source's first two) become the
                # protocol. A source of 8.0.x.x makes that ETH_P_IP.
                packet = ipv4(inner, src="8.0.0.1")
            verdict, out = run_in_kernel(obj, bpf.TUNNEL_KEY, packet)
            assert verdict == TC_ACT_OK
            assert recorded_key(obj) == (4242, A(host), 64), (overlay, underlay)
            if encap.l2:   # the source MAC flipped from the shared device MAC, nothing else
                assert out[6:12] == bytes.fromhex(CONTAINER_MAC[:-1] + "3")
                assert out[:6] + out[12:] == packet[:6] + packet[12:]
            else:
                assert out == packet
            # outside the overlay: left to the next filter, untouched
            other = frame("8.8.8.8") if encap.l2 else ipv4("9.9.9.9", src="8.0.0.1")
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


def check_vxlan(out: bytes, packet: bytes, local: str, remote: str, dst_mac: bytes,
                port: int = VXLAN_PORT) -> None:
    """`out` is `packet` routed once and encapsulated to `remote` as VXLAN VNI 4242
    on UDP `port`."""
    assert len(out) == len(packet) + 50
    assert out[:14] == dst_mac + bytes.fromhex(UNDERLAY_MAC) + b"\x08\x00"
    ip = out[14:34]
    assert checksum(ip) == 0
    version, _, length, _, frag, ttl, proto, _, src, dst = struct.unpack("!BBHHHBBH4s4s", ip)
    assert (version, length, frag, ttl, proto) == (0x45, len(out) - 14, 0x4000, OUTER_TTL, 17)
    assert (A(src), A(dst)) == (A(local), A(remote))
    sport, dport, udp_len, udp_check = struct.unpack_from("!HHHH", out, 34)
    assert 32768 <= sport < 61000 and (dport, udp_len, udp_check) == (port, len(out) - 34, 0)
    assert out[42:50] == struct.pack("!II", 0x08000000, 4242 << 8)
    assert out[50:64] == bytes.fromhex(SHARED_VXLAN_MAC.replace(":", "")) + packet[6:14]
    routed(packet[14:], out[64:], 0)


@needs_root
def test_send_encapsulates_to_the_fan_rule_address(elf, underlay_ns):
    ns, under0 = underlay_ns
    for overlay, underlay, host, slice_ in EXAMPLES:
        fan = FanMap(N(overlay), N(underlay))
        local = local_for(underlay)
        packet = frame(str(N(slice_).network_address + 2), src=own(fan, local))
        with loaded_in(ns, elf, fan, local, underlay_index=under0) as obj:
            verdict, out = run_in_kernel(obj, bpf.SEND, packet)
        assert verdict == TC_ACT_REDIRECT, (overlay, underlay)
        check_vxlan(out, packet, local, host, neighbour_mac(host))


@needs_root
def test_send_encapsulates_to_the_networks_own_port(elf, underlay_ns):
    ns, under0 = underlay_ns
    local = local_for("172.30.0.0/16")
    packet = frame("250.0.28.2", src=own(FAN250, local))
    with loaded_in(ns, elf, FAN250, local, underlay_index=under0, vxlan_port=4790) as obj:
        verdict, out = run_in_kernel(obj, bpf.SEND, packet)
    assert verdict == TC_ACT_REDIRECT
    check_vxlan(out, packet, local, "172.30.0.28", neighbour_mac("172.30.0.28"), port=4790)


@needs_root
@pytest.mark.parametrize("df", [True, False], ids=["df", "no-df"])
def test_send_encapsulates_ipip_to_the_fan_rule_address(elf, underlay_ns, df):
    ns, under0 = underlay_ns
    for overlay, underlay, host, slice_ in EXAMPLES:
        fan = FanMap(N(overlay), N(underlay))
        local = local_for(underlay)
        packet = frame(str(N(slice_).network_address + 2), src=own(fan, local))
        if df:   # the inner DF bit, with the checksum kept valid
            packet = packet[:20] + b"\x40" + packet[21:24] + bytes(2) + packet[26:]
            packet = packet[:24] + struct.pack("!H", checksum(packet[14:34])) + packet[26:]
        with loaded_in(ns, elf, fan, local, encap=IPIP, underlay_index=under0) as obj:
            verdict, out = run_in_kernel(obj, bpf.SEND, packet)
        assert verdict == TC_ACT_REDIRECT, (overlay, underlay)
        assert len(out) == len(packet) + 20
        assert out[:14] == neighbour_mac(host) + bytes.fromhex(UNDERLAY_MAC) + b"\x08\x00"
        ip = out[14:34]
        assert checksum(ip) == 0
        version, _, length, _, frag, ttl, proto, _, src, dst = struct.unpack("!BBHHHBBH4s4s", ip)
        # RFC 2003: the outer DF is the inner one
        assert (version, length, frag, ttl, proto) == (0x45, len(out) - 14, 0x4000 * df, OUTER_TTL, 4)
        assert (A(src), A(dst)) == (A(local), A(host))
        routed(packet[14:], out[34:], 0)


@needs_root
def test_send_without_neighbour_leaves_the_next_hop_to_the_kernel(elf, underlay_ns):
    ns, under0 = underlay_ns
    # host 172.30.0.99 has no neighbour entry
    packet = frame("250.0.99.2", src=own(FAN250, "172.30.0.1"))
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
    packet = frame("250.5.9.2", src=own(fan, "172.31.0.1"))
    with loaded_in(ns, elf, fan, "172.31.0.1", underlay_index=under0) as obj:
        assert run_in_kernel(obj, bpf.SEND, packet) == (TC_ACT_OK, packet)


@needs_root
@pytest.mark.parametrize("encap", [VXLAN, IPIP], ids=["vxlan-via-device", "ipip"])
def test_send_through_the_tunnel_device(elf, underlay_ns, encap):
    """IPIP (and VXLAN without the underlay's index): routed, then to the
    tunnel device, readdressed to the shared MAC on VXLAN."""
    ns, _ = underlay_ns
    packet = frame("250.5.9.2", src=own(FAN250, "172.30.0.1"))
    with loaded_in(ns, elf, FAN250, "172.30.0.1", encap=encap, send_encap=False) as obj:
        verdict, out = run_in_kernel(obj, bpf.SEND, packet)
    assert verdict == TC_ACT_REDIRECT
    assert out[:6] == (bytes.fromhex(SHARED_VXLAN_MAC.replace(":", "")) if encap.l2 else packet[:6])
    assert out[6:14] == packet[6:14]
    routed(packet, out)


@needs_root
@pytest.mark.parametrize("encap", [VXLAN, IPIP], ids=["vxlan", "ipip"])
def test_send_drops_what_is_not_the_endpoints_own(elf, underlay_ns, encap):
    """To another host goes only what carries the address of the endpoint whose
    veth it came from: the peer's trust rule would take the rest as ours."""
    ns, under0 = underlay_ns
    local = "172.30.0.1"
    with loaded_in(ns, elf, FAN250, local, encap=encap, underlay_index=under0) as obj:
        # 250.0.1.3 is this host's other container, on another veth
        libbpf.map_update(obj.map_fd(bpf.ENDPOINTS),
                          *bpf.endpoint_entry(int(A("250.0.1.3")), 31, "0efafa000103"))
        foreign = {"another container's address": "250.0.1.3",
                   "an address of the slice no endpoint holds": "250.0.1.9",
                   "another host's container": "250.5.9.2",
                   "outside the overlay": "10.0.0.1"}
        for what, src in foreign.items():
            packet = frame("250.5.9.2", src=src)
            assert run_in_kernel(obj, bpf.SEND, packet) == (TC_ACT_SHOT, packet), what
        verdict, _ = run_in_kernel(obj, bpf.SEND, frame("250.5.9.2", src=own(FAN250, local)))
        assert verdict == TC_ACT_REDIRECT


@needs_root
@pytest.mark.parametrize("encap", [VXLAN, IPIP], ids=["vxlan", "ipip"])
def test_receive_without_tunnel_key_drops_what_is_for_the_overlay(elf, underlay_ns, encap):
    """A test run carries no tunnel metadata, as no packet that came out of the
    tunnel does: whatever is for the network's overlay, even this host's own
    container, gateway or broadcast, is untrusted and dropped. The rest is the
    next filter's. (Real packets: test_receive_admits_only_peers.)"""
    ns, _ = underlay_ns

    def packet(dst):
        # IPIP's packets are bare IPv4: a source of 8.0.x.x makes a test run's
        # Ethernet parse of its first bytes say ETH_P_IP (see test_tunnel_key_is_the_fan_rule)
        return frame(dst, src="250.5.9.2") if encap.l2 else ipv4(dst, src="8.0.0.1")

    with loaded_in(ns, elf, FAN250, "172.30.0.28", encap=encap) as obj:
        libbpf.map_update(obj.map_fd(bpf.ENDPOINTS),
                          *bpf.endpoint_entry(int(A("250.0.28.9")), 31, "0e:fa:fa:00:1c:09"))
        for dst in ("250.0.28.9", "250.0.28.10", "250.0.28.1", "250.0.28.255", "250.5.9.2"):
            assert run_in_kernel(obj, bpf.RECEIVE, packet(dst)) == (TC_ACT_SHOT, packet(dst)), dst
        others = [packet("240.0.28.9"), packet("8.8.8.8")]
        if encap.l2:
            others.append(frame("250.0.28.9", ethertype=ETH_P_ARP))
        for other in others:
            assert run_in_kernel(obj, bpf.RECEIVE, other) == (TC_ACT_UNSPEC, other)


REMOTE_HOST = "172.30.5.9"


REMOTE_CONTAINER = "250.5.9.2"   # in the slice of REMOTE_HOST
REMOTE_SPORT = 40000


def vxlan_header(inner: bytes, vni: int = 4242, flags: int = 0x08000000) -> bytes:
    return struct.pack("!II", flags, vni << 8) + inner


def vxlan(inner: bytes, local: str = "172.30.0.28", vni: int = 4242, dport: int = VXLAN_PORT,
          proto: int = 17, frag: int = 0x4000, ethertype: int = ETH_P_IP,
          dst_mac: str = "000000000000", flags: int = 0x08000000, remote: str = REMOTE_HOST,
          sport: int = REMOTE_SPORT) -> bytes:
    """`inner` as a peer's send program sends it to `local`. The outer destination
    MAC is the test run's device's (loopback: zeros), as the underlay NIC's would be."""
    udp_len = 16 + len(inner)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, frag, 64, proto, 0,
                     A(remote).packed, A(local).packed)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return (bytes.fromhex(dst_mac) + bytes.fromhex(UNDERLAY_MAC) + struct.pack("!H", ethertype)
            + ip + struct.pack("!HHHH", sport, dport, udp_len, 0) + vxlan_header(inner, vni, flags))


def sent_frame(dst: str, ttl: int = 63, ethertype: int = ETH_P_IP,
               src: str = REMOTE_CONTAINER) -> bytes:
    """The inner frame of a peer's send program: to the shared MAC, from its container."""
    return frame(dst, ttl, dst_mac=SHARED_VXLAN_MAC.replace(":", ""), ethertype=ethertype,
                 src=src)


@contextmanager
def with_container(elf: dict, **kw):
    """Host 172.30.0.28's object, its container 250.0.28.9 (veth 31) in the map."""
    obj = loaded(elf, FAN250, "172.30.0.28", **kw)
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
def test_decap_takes_the_networks_own_port_and_no_other(elf):
    with with_container(elf, vxlan_port=4790) as obj:
        inner = sent_frame("250.0.28.9")
        verdict, out = run_in_kernel(obj, bpf.DECAP, vxlan(inner, dport=4790))
        assert verdict == TC_ACT_REDIRECT
        assert len(out) == len(inner)
        routed(inner[14:], out[14:], 0)
        # the default port is another network's (or nobody's): left to the kernel
        default = vxlan(inner)
        assert run_in_kernel(obj, bpf.DECAP, default) == (TC_ACT_UNSPEC, default)


@needs_root
@pytest.mark.parametrize("conntrack", [False, True], ids=["direct", "conntrack"])
def test_decap_leaves_what_fails_the_trust_rule_untouched(elf, conntrack):
    """Untouched, not dropped: the kernel's path (the host's firewall, then
    fan_receive, which drops it) judges it again."""
    if conntrack and not conntrack_supported():
        pytest.skip("LOUD: this kernel cannot load the conntrack-checked decap "
                    f"(kernel 6.0+ with nf_conntrack's kfuncs): {probe_error(conntrack=True)}")
    with with_container(elf, decap_conntrack=conntrack) as obj:
        known = sent_frame("250.0.28.9")
        others = {
            "an outer source outside the underlay": vxlan(known, remote="10.9.0.5"),
            "this host's own address as outer source": vxlan(known, remote="172.30.0.28"),
            "another host's slice as inner source": vxlan(sent_frame("250.0.28.9", src="250.0.77.2")),
            "an inner source outside the overlay": vxlan(sent_frame("250.0.28.9", src="10.0.0.1")),
        }
        for what, packet in others.items():
            assert run_in_kernel(obj, bpf.DECAP, packet) == (TC_ACT_UNSPEC, packet), what


def udp_from(ns: str, src: str) -> socket.socket:
    """A UDP socket of namespace `ns` bound to `src` (it stays there after setns back)."""
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((src, REMOTE_SPORT))
    return sock


@needs_root
def test_decap_with_conntrack_takes_only_flows_the_firewall_let_in(elf):
    """Conntrack mode: a peer's frame is decapsulated only once its outer flow
    has a confirmed conntrack entry, made here for real: a datagram from the
    peer through the namespace's INPUT, with a conntrack-using rule loaded
    there. Direct mode takes it from the start."""
    if not conntrack_supported():
        pytest.skip("LOUD: this kernel cannot load the conntrack-checked decap "
                    f"(kernel 6.0+ with nf_conntrack's kfuncs): {probe_error(conntrack=True)}")
    if shutil.which("iptables") is None:
        pytest.skip("LOUD: iptables is not installed: cannot load a conntrack rule")
    tag = uuid.uuid4().hex[:6]
    host, peer = f"fantest-ct-{tag}", f"fantest-ctpeer-{tag}"
    try:
        for ns in (host, peer):
            sh("ip", "netns", "add", ns)
        sh("ip", "-n", host, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", peer)
        for ns, address in ((host, "172.30.0.28"), (peer, REMOTE_HOST)):
            sh("ip", "-n", ns, "addr", "add", f"{address}/16", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        # a stateful firewall: conntrack runs in a namespace only for rules that use it
        sh("ip", "netns", "exec", host, "iptables", "-A", "INPUT", "-p", "udp", "--dport",
           str(VXLAN_PORT), "-m", "conntrack", "--ctstate", "NEW,ESTABLISHED", "-j", "ACCEPT")
        packet = vxlan(sent_frame("250.0.28.9"))
        with with_container(elf, decap_conntrack=True) as checked, \
                with_container(elf) as direct, inside(host):
            assert run_in_kernel(checked, bpf.DECAP, packet) == (TC_ACT_UNSPEC, packet)
            assert run_in_kernel(direct, bpf.DECAP, packet)[0] == TC_ACT_REDIRECT
            with contextlib.closing(udp_from(peer, REMOTE_HOST)) as sock:
                sock.sendto(b"first packet of the flow", ("172.30.0.28", VXLAN_PORT))
            deadline = time.monotonic() + 2
            while (run_in_kernel(checked, bpf.DECAP, packet)[0] != TC_ACT_REDIRECT
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            verdict, out = run_in_kernel(checked, bpf.DECAP, packet)
            assert verdict == TC_ACT_REDIRECT, sh("ip", "netns", "exec", host, "iptables", "-vnL").stdout
            assert out[:6] == bytes.fromhex("0efafa001c09") and len(out) == len(packet) - 50
            # another outer flow of the same peer (another source port) has no entry
            other = vxlan(sent_frame("250.0.28.9"), sport=REMOTE_SPORT + 1)
            assert run_in_kernel(checked, bpf.DECAP, other) == (TC_ACT_UNSPEC, other)
    finally:
        for ns in (host, peer):
            sh("ip", "netns", "del", ns, check=False)


@needs_root
def test_receive_filter_on_a_device_the_fan_does_not_own(elf):
    """On the underlay device: attach at the network's pref, never over another
    tool's filter; removal and the orphan sweep take only ours and leave the
    clsact qdisc and the other filters as they were."""
    from pyroute2 import AsyncIPRoute
    from fan_driver.dataplane.mapping.ebpf import DECAP_PREF, EbpfMapping
    from fan_driver.dataplane.netlink import Links
    from fan_driver.dataplane.plan import NetworkPlan

    ns = f"fantest-decap-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "netns", "exec", ns, "sh", "-c", SH.format(mac="02:00:00:00:00:fe")
           + "ip addr add 172.30.0.28/16 dev under0\n")
        sh("tc", "-n", ns, "qdisc", "add", "dev", "under0", "clsact")
        sh("tc", "-n", ns, "filter", "add", "dev", "under0", "ingress", "pref", "10", "u32",
           "match", "u32", "0", "0", "classid", "1:1")
        plans = [NetworkPlan(f"{n:02x}" * 32, HostSlice(FAN250, A("172.30.0.28")), "under0", 1450,
                             VXLAN, "ebpf", n, vxlan_port=VXLAN_PORT) for n in (1, 2)]
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
                # network 1 now receives through the tunnel device: its filter is an orphan
                await mapping.remove_orphans(links, [replace(plans[0], receive="tunnel"), plans[1]])
                swept_by_mode = await bpf.filters(ipr, index, bpf.INGRESS)
                await mapping._attach_decap(links, plans[0], obj)
                await mapping.remove(links, plans[0])
                await mapping.remove(links, plans[1])
                return attached, swept, swept_by_mode, await bpf.filters(ipr, index, bpf.INGRESS)
        try:
            attached, swept, swept_by_mode, left = asyncio.run(scenario())
        finally:
            obj.close()
        assert attached == {DECAP_PREF + 1: "fan_01010101", DECAP_PREF + 2: "cil_from_netdev"}
        assert swept == swept_by_mode == left == {DECAP_PREF + 2: "cil_from_netdev"}
        shown = sh("tc", "-n", ns, "filter", "show", "dev", "under0", "ingress").stdout
        assert "u32" in shown and "cil_from_netdev" in shown, shown
        assert "clsact" in sh("tc", "-n", ns, "qdisc", "show", "dev", "under0").stdout
    finally:
        sh("ip", "netns", "del", ns, check=False)


@needs_root
def test_verifier_rejection_carries_its_log():
    elf = committed_object()
    code = elf_section(elf, "tc")
    at = elf.index(code)
    assert code[:8] == bytes.fromhex("bf16000000000000")   # r6 = r1: keep the context
    bad = elf[:at] + bytes.fromhex("bf96000000000000") + elf[at + 8:]   # r6 = r9, unset
    with pytest.raises(FanError) as err:
        loaded({bpf.OBJECT: bad}, FAN250, "172.30.0.28")
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
    # the conntrack object's kfunc calls need CAP_BPF (bpf_capable()): where
    # this process (all capabilities) can load it, the plugin must too
    probe = ("from fan_driver.dataplane.mapping import ebpf; "
             "print(ebpf.probe_error() or 'LOADED', ebpf.probe_error(conntrack=True) or 'LOADED')")
    res = subprocess.run([setpriv, f"--bounding-set=-all,{keep}", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    expected = "LOADED " + ("LOADED" if conntrack_supported() else "")
    assert res.stdout.startswith(expected), res.stdout[-3000:] + res.stderr[-2000:]


def test_vni_out_of_range_is_refused():
    with pytest.raises(FanError, match="VNI"):
        bpf.Config(FAN250, N("250.0.28.0/24"), 1 << 24, VXLAN.bpf_encap, A("172.30.0.28")).pack()


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
    return bpf.load(bpf.Config(fan, fan.slice_for(A("172.30.0.1")), vni, VXLAN.bpf_encap,
                               A("172.30.0.1"), tunnel_mac=SHARED_VXLAN_MAC), name)


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
               "type", "vxlan", "external", "dstport", str(VXLAN_PORT))
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


@needs_root
def test_receive_admits_only_peers(elf):
    """Hand-made VXLAN datagrams into a host's external-mode VXLAN device: the
    kernel's own path delivers all of them (it checks no source), fan_receive
    on the device's ingress only the one from a peer, with the network's VNI,
    its inner source in the slice of the outer one."""
    tag = uuid.uuid4().hex[:6]
    host, container, sender = (f"fantest-rx{role}-{tag}" for role in ("host", "ctr", "snd"))
    namespaces = [host, container, sender]
    try:
        for ns in (host, sender):   # add_container makes the container's
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # the sender holds a peer's underlay address and one outside the underlay
        sh("ip", "-n", host, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", sender)
        for ns, addresses in ((host, ("172.30.0.27/16", "10.9.0.1/24")),
                              (sender, (f"{REMOTE_HOST}/16", "10.9.0.5/24"))):
            for address in addresses:
                sh("ip", "-n", ns, "addr", "add", address, "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", host, "link", "add", "fan-vxlan", "address", SHARED_VXLAN_MAC,
           "type", "vxlan", "external", "dstport", str(VXLAN_PORT))
        sh("ip", "-n", host, "link", "set", "fan-vxlan", "arp", "off", "mtu", "1450", "up")
        sh("ip", "-n", host, "route", "add", "250.0.0.0/8", "dev", "fan-vxlan")
        sh("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        address = A(add_container(host, container, FAN250, "172.30.0.27", "250"))
        index = {name: int(sh("ip", "-n", host, "-o", "link", "show", name).stdout.split(":")[0])
                 for name in ("fan-vxlan", "fan-250", "v250")}
        mac = sh("ip", "-n", container, "-o", "link", "show", "eth0").stdout.split("link/ether ")[1][:17]

        with inside(container):
            listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.closing(listener), \
                contextlib.closing(udp_from(sender, REMOTE_HOST)) as peer, \
                contextlib.closing(udp_from(sender, "10.9.0.5")) as stranger:
            listener.bind(("0.0.0.0", 5555))

            def datagram(what: bytes, src: str, vni: int = 4242) -> bytes:
                """A peer's container's UDP datagram to ours, as VXLAN carries it."""
                inner = ipv4(str(address), src=src, payload=struct.pack("!HHHH", 5555, 5555,
                                                                        8 + len(what), 0) + what)
                return vxlan_header(bytes.fromhex(SHARED_VXLAN_MAC.replace(":", ""))
                                    + bytes.fromhex("0efafa050902") + b"\x08\x00" + inner, vni)

            def arrived() -> set:
                for sock, what, src, vni in (
                        (stranger, b"outside the underlay", REMOTE_CONTAINER, 4242),
                        (peer, b"another host's slice", "250.0.77.2", 4242),
                        (peer, b"another network's VNI", REMOTE_CONTAINER, 4243),
                        (peer, b"a peer", REMOTE_CONTAINER, 4242)):
                    sock.sendto(datagram(what, src, vni), ("172.30.0.27", VXLAN_PORT))
                got = set()
                listener.settimeout(1)
                with contextlib.suppress(socket.timeout):
                    while True:
                        got.add(listener.recv(2048))
                        listener.settimeout(0.3)
                return got

            assert arrived() == {b"outside the underlay", b"another host's slice",
                                 b"another network's VNI", b"a peer"}
            config = bpf.Config(FAN250, N("250.0.27.0/24"), 4242, VXLAN.bpf_encap,
                                A("172.30.0.27"), tunnel_index=index["fan-vxlan"], bridge_index=index["fan-250"],
                                tunnel_mac=SHARED_VXLAN_MAC, vxlan_port=VXLAN_PORT)
            obj = bpf.load(config, "fan_rx", elf[config.object])
            try:
                libbpf.map_update(obj.map_fd(bpf.ENDPOINTS),
                                  *bpf.endpoint_entry(int(address), index["v250"], mac))

                async def attach_receive():
                    from pyroute2 import AsyncIPRoute
                    async with AsyncIPRoute(netns=host) as ipr:
                        await bpf.attach(ipr, index["fan-vxlan"], obj.program_fd(bpf.RECEIVE),
                                         "fan_rx", 10, bpf.INGRESS)
                asyncio.run(attach_receive())
            finally:
                obj.close()   # tc holds the program and its map
            assert arrived() == {b"a peer"}
    finally:
        for ns in namespaces:
            sh("ip", "netns", "del", ns, check=False)
