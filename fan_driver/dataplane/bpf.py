"""The Fan's outer-address rule as tc eBPF programs, for stock kernels.

Canonical's Fan needs an Ubuntu-only kernel patch that computes a tunnel
packet's outer destination from its inner one. Upstream kernels can do the same
with a tunnel device in "external" (collect_md) mode plus a tc egress program
that calls bpf_skb_set_tunnel_key: constant per-host state instead of one
route/neighbour/FDB entry per peer.

Two more programs are shortcuts past the host's IP forwarding (and so past
netfilter) for overlay traffic, which is most of the per-packet cost: one on
each container's veth sends packets for other hosts' slices straight to the
tunnel device, one on the tunnel's ingress hands packets for this host's slice
straight into the container (or, for an address it does not know, to the
bridge). Both decrement the TTL as the router they replace
would, and leave everything else (ARP, broadcasts, local and outside traffic,
expiring TTLs) to the kernel's own path.

The programs are assembled here from raw instructions so that no compiler
(clang) is needed at run time.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import resource
import socket
import struct
import sys
from ipaddress import IPv4Network
from typing import Dict, List, Tuple, Union

from pyroute2.netlink.exceptions import NetlinkError

from ..errors import FanError
from ..fanmap import FanMap

# --- instruction encoding (include/uapi/linux/bpf.h, bpf_common.h) ----------
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM = 0x00, 0x60
PSEUDO_MAP_FD = 1   # src_reg of a 64-bit load: the immediate is a map's fd
K, X = 0x00, 0x08
ADD, OR, AND, RSH, XOR, MOV, END = 0x00, 0x40, 0x50, 0x70, 0xA0, 0xB0, 0xD0
TO_BE = 0x08
JEQ, JNE, JLE, CALL, EXIT = 0x10, 0x50, 0xB0, 0x80, 0x90
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, FP = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10

HELPER_MAP_LOOKUP_ELEM = 1
HELPER_SKB_STORE_BYTES = 9
HELPER_L3_CSUM_REPLACE = 10
HELPER_SKB_SET_TUNNEL_KEY = 21
HELPER_REDIRECT = 23
HELPER_SKB_LOAD_BYTES = 26
HELPER_REDIRECT_NEIGH = 152   # Linux 5.10
HELPER_REDIRECT_PEER = 155    # Linux 5.10
TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT = -1, 0, 2
SKB_PROTOCOL = 16        # offsetof(struct __sk_buff, protocol)
ETH_LEN = 14
IP_TTL, IP_CHECK, IP_DADDR = 8, 10, 16   # offsets in an IPv4 header
ETH_SRC_LAST = 11        # last byte of the inner Ethernet source MAC
KEY_SIZE = 44            # sizeof(struct bpf_tunnel_key) with local_ipv6
KEY_OFF, BUF_OFF = -48, -56  # stack slots: the key (48 bytes zeroed), 8-byte buffer
KEY_ID, KEY_REMOTE, KEY_TTL = 0, 4, 21  # offsets of tunnel_id, remote_ipv4, tunnel_ttl
# No outer UDP checksum, as RFC 7348 advises for VXLAN over IPv4 and as the kernel's
# own VXLAN devices default to: the inner packet carries its own.
BPF_F_ZERO_CSUM_TX = 1 << 1

Insn = Tuple[int, int, int, int, Union[int, str]]  # code, dst, src, off|label, imm


def _s32(value: int) -> int:
    """Immediates are signed 32-bit: 250.0.0.0 must be passed as a negative."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _encode(insns: List[Insn]) -> bytes:
    """Resolve jump labels and pack each instruction into its 8 bytes."""
    labels, real = {}, []
    for insn in insns:
        if insn[0] is None:                 # a label marks the next real instruction
            labels[insn[4]] = len(real)
        else:
            real.append(insn)
    out = []
    for pc, (code, dst, src, off, imm) in enumerate(real):
        if isinstance(off, str):            # a jump: the offset counts from the next insn
            off = labels[off] - pc - 1
        # the dst/src nibbles are a C bitfield, whose order follows the byte order
        regs = (src << 4 | dst) if sys.byteorder == "little" else (dst << 4 | src)
        out.append(struct.pack("=BBhi", code, regs, off, _s32(imm)))
    return b"".join(out)


def _bytes_call(helper: int, offset: int, size: int, slot: int = BUF_OFF) -> List[Insn]:
    """helper(skb, offset, fp + slot, size[, flags 0]): bpf_skb_load/store_bytes.

    The helpers bounds-check for us, so the verifier needs no packet-pointer proofs."""
    return [(ALU64 | MOV | X, R1, R6, 0, 0), (ALU64 | MOV | K, R2, 0, 0, offset),
            (ALU64 | MOV | X, R3, FP, 0, 0), (ALU64 | ADD | K, R3, 0, 0, slot),
            (ALU64 | MOV | K, R4, 0, 0, size), (ALU64 | MOV | K, R5, 0, 0, 0),
            (JMP | CALL, 0, 0, 0, helper)]


def _ipv4_destination(ip_offset: int, miss: str) -> List[Insn]:
    """r6 = skb; r7 = the IPv4 destination in host byte order, or jump to `miss`."""
    return [
        (ALU64 | MOV | X, R6, R1, 0, 0),                       # r6 = skb (r1 is clobbered by calls)
        (LDX | W | MEM, R0, R6, SKB_PROTOCOL, 0),              # skb->protocol, a __be16 as loaded
        (JMP32 | JNE | K, R0, 0, miss, socket.htons(0x0800)),
        *_bytes_call(HELPER_SKB_LOAD_BYTES, ip_offset + IP_DADDR, 4),
        (JMP | JNE | K, R0, 0, miss, 0),                       # too short to be IPv4: not ours
        (LDX | W | MEM, R7, FP, BUF_OFF, 0),
        # the packet holds network byte order; the arithmetic (and the helpers) want host order
        (ALU | END | TO_BE, R7, 0, 0, 32),
    ]


def _unless_in(net: IPv4Network, miss: str) -> List[Insn]:
    """Jump to `miss` unless r7 is in `net` (r8 is scratch)."""
    # JMP32 compares the low 32 bits: a 64-bit compare would sign-extend 250.0.0.0
    return [(ALU | MOV | X, R8, R7, 0, 0), (ALU | AND | K, R8, 0, 0, int(net.netmask)),
            (JMP32 | JNE | K, R8, 0, miss, int(net.network_address))]


def _decrement_ttl(ip_offset: int, miss: str) -> List[Insn]:
    """What a router does: TTL - 1 and the header checksum to match. A packet
    whose TTL runs out goes to `miss`, the kernel's path, which answers it."""
    return [
        *_bytes_call(HELPER_SKB_LOAD_BYTES, ip_offset + IP_TTL, 2),   # TTL, protocol
        (JMP | JNE | K, R0, 0, miss, 0),
        (LDX | H | MEM, R8, FP, BUF_OFF, 0),                   # the old 16 bits as stored
        (LDX | B | MEM, R0, FP, BUF_OFF, 0),
        (JMP | JLE | K, R0, 0, miss, 1),
        (ALU | ADD | K, R0, 0, 0, -1),
        (STX | B | MEM, FP, R0, BUF_OFF, 0),
        (LDX | H | MEM, R9, FP, BUF_OFF, 0),                   # the new 16 bits as stored
        *_bytes_call(HELPER_SKB_STORE_BYTES, ip_offset + IP_TTL, 2),
        (JMP | JNE | K, R0, 0, "shot", 0),
        (ALU64 | MOV | X, R1, R6, 0, 0), (ALU64 | MOV | K, R2, 0, 0, ip_offset + IP_CHECK),
        (ALU64 | MOV | X, R3, R8, 0, 0), (ALU64 | MOV | X, R4, R9, 0, 0),
        (ALU64 | MOV | K, R5, 0, 0, 2),
        (JMP | CALL, 0, 0, 0, HELPER_L3_CSUM_REPLACE),
        (JMP | JNE | K, R0, 0, "shot", 0),
    ]


def _endings(miss: int) -> List[Insn]:
    return [(None, 0, 0, 0, "shot"), (ALU64 | MOV | K, R0, 0, 0, TC_ACT_SHOT),
            (JMP | EXIT, 0, 0, 0, 0),
            (None, 0, 0, 0, "miss"), (ALU64 | MOV | K, R0, 0, 0, miss),
            (JMP | EXIT, 0, 0, 0, 0)]


def fan_program(fan: FanMap, vni: int, inner_ip_offset: int) -> bytes:
    """The instructions that set each packet's tunnel key by the fan rule.

    Packets that are not IPv4 or not in fan.overlay get TC_ACT_UNSPEC, not a
    drop: several fan networks share one tunnel device, each with its own
    filter, and UNSPEC lets tc hand the packet to the next one. On an L2
    tunnel (inner_ip_offset 14) the inner source MAC is also changed: see below.
    """
    if not 0 <= vni < 1 << 24:
        raise FanError(f"VNI {vni} is out of range 0..16777215")
    prog = [*_ipv4_destination(inner_ip_offset, "miss"), *_unless_in(fan.overlay, "miss"),
            (ALU | AND | K, R7, 0, 0, ~int(fan.overlay.netmask) & 0xFFFFFFFF)]
    if fan.shift:
        prog.append((ALU | RSH | K, R7, 0, 0, fan.shift))
    prog += [(ALU | OR | K, R7, 0, 0, int(fan.underlay.network_address))]
    if inner_ip_offset >= ETH_LEN:
        # Every host's fan device has the same MAC and NOARP, so frames go out
        # addressed to that MAC and every peer accepts them as its own. But the
        # frame's source is that MAC too, and vxlan_rcv drops frames whose source
        # is the receiving device's own MAC (loop protection): flip one bit of it.
        prog += _bytes_call(HELPER_SKB_LOAD_BYTES, ETH_SRC_LAST, 1)
        prog += [(JMP | JNE | K, R0, 0, "miss", 0),
                 (LDX | B | MEM, R0, FP, BUF_OFF, 0),
                 (ALU | XOR | K, R0, 0, 0, 1),
                 (STX | B | MEM, FP, R0, BUF_OFF, 0)]
        prog += _bytes_call(HELPER_SKB_STORE_BYTES, ETH_SRC_LAST, 1)
        prog += [(JMP | JNE | K, R0, 0, "shot", 0)]
    # a zeroed struct bpf_tunnel_key: unused fields (tos, flags, label, local) must be 0
    prog += [(ALU64 | MOV | K, R1, 0, 0, 0)]
    prog += [(STX | DW | MEM, FP, R1, KEY_OFF + 8 * i, 0) for i in range(-KEY_OFF // 8)]
    prog += [
        (ST | W | MEM, FP, 0, KEY_OFF + KEY_ID, vni),
        # remote_ipv4 is in host byte order: the helper does the htonl itself
        (STX | W | MEM, FP, R7, KEY_OFF + KEY_REMOTE, 0),
        (ST | B | MEM, FP, 0, KEY_OFF + KEY_TTL, 64),
        (ALU64 | MOV | X, R1, R6, 0, 0),
        (ALU64 | MOV | X, R2, FP, 0, 0),
        (ALU64 | ADD | K, R2, 0, 0, KEY_OFF),
        (ALU64 | MOV | K, R3, 0, 0, KEY_SIZE),
        (ALU64 | MOV | K, R4, 0, 0, BPF_F_ZERO_CSUM_TX),
        (JMP | CALL, 0, 0, 0, HELPER_SKB_SET_TUNNEL_KEY),
        # without a key the device would drop it anyway; SHOT says so in the stats
        (JMP | JNE | K, R0, 0, "shot", 0),
        (ALU64 | MOV | K, R0, 0, 0, TC_ACT_OK),
        (JMP | EXIT, 0, 0, 0, 0),
        *_endings(TC_ACT_UNSPEC),
    ]
    return _encode(prog)


def send_shortcut(fan: FanMap, slice_: IPv4Network, tunnel_index: int,
                  tunnel_mac: str | None) -> bytes:
    """For a container's veth (ingress, Ethernet frames): unicast IPv4 for another
    host's slice goes straight to the tunnel device, whose egress program sets the
    outer address; the rest continues to the bridge (TC_ACT_OK). On an L2 tunnel
    the frame is readdressed to `tunnel_mac`, the MAC every host's tunnel shares;
    an L3 tunnel drops the Ethernet header itself."""
    prog = [*_ipv4_destination(ETH_LEN, "miss"), *_unless_in(fan.overlay, "miss"),
            (ALU | MOV | X, R8, R7, 0, 0), (ALU | AND | K, R8, 0, 0, int(slice_.netmask)),
            (JMP32 | JEQ | K, R8, 0, "miss", int(slice_.network_address)),
            # unicast frames only (a container's only router is the gateway):
            # broadcasts and multicasts stay on the bridge
            *_bytes_call(HELPER_SKB_LOAD_BYTES, 0, 1),
            (JMP | JNE | K, R0, 0, "miss", 0),
            (LDX | B | MEM, R0, FP, BUF_OFF, 0),
            (ALU | AND | K, R0, 0, 0, 1),                      # the group bit
            (JMP | JNE | K, R0, 0, "miss", 0),
            *_decrement_ttl(ETH_LEN, "miss")]
    if tunnel_mac is not None:
        mac = bytes.fromhex(tunnel_mac.replace(":", ""))
        prog += [(ST | W | MEM, FP, 0, BUF_OFF, struct.unpack("=i", mac[:4])[0]),
                 (ST | H | MEM, FP, 0, BUF_OFF + 4, struct.unpack("=h", mac[4:])[0]),
                 *_bytes_call(HELPER_SKB_STORE_BYTES, 0, 6),
                 (JMP | JNE | K, R0, 0, "shot", 0)]
    prog += [(ALU64 | MOV | K, R1, 0, 0, tunnel_index), (ALU64 | MOV | K, R2, 0, 0, 0),
             (JMP | CALL, 0, 0, 0, HELPER_REDIRECT),           # returns TC_ACT_REDIRECT
             (JMP | EXIT, 0, 0, 0, 0),
             *_endings(TC_ACT_OK)]
    return _encode(prog)


# The receive shortcut's map: a container's address (u32, host byte order) ->
# its veth's host-side ifindex (u32) and its MAC.
ENDPOINT_KEY = struct.Struct("=I")
ENDPOINT_VALUE = struct.Struct("=I6s2x")


def endpoint_entry(address: int, veth_index: int, mac: str) -> Tuple[bytes, bytes]:
    return (ENDPOINT_KEY.pack(address),
            ENDPOINT_VALUE.pack(veth_index, bytes.fromhex(mac.replace(":", ""))))


def receive_shortcut(slice_: IPv4Network, bridge_index: int, endpoints_map: int) -> bytes:
    """For an L2 tunnel's ingress: IPv4 for a container in this host's slice goes
    straight into the container's namespace (bpf_redirect_peer on its veth, found
    in `endpoints_map`, readdressed to its MAC), or, for an address the map does
    not hold, out of the bridge as the neighbour table says. The rest (another
    network's slice, the gateway itself) gets TC_ACT_UNSPEC: the next network's
    filter, or the kernel's path."""
    gateway = int(slice_.network_address) + 1
    mac_slot = KEY_OFF   # 6 bytes of the MAC, copied out of the map's value
    prog = [*_ipv4_destination(ETH_LEN, "miss"), *_unless_in(slice_, "miss"),
            (JMP32 | JEQ | K, R7, 0, "miss", gateway),
            (JMP32 | JEQ | K, R7, 0, "miss", int(slice_.broadcast_address)),
            *_decrement_ttl(ETH_LEN, "miss"),
            (STX | W | MEM, FP, R7, BUF_OFF, 0),
            (LD | DW | IMM, R1, PSEUDO_MAP_FD, 0, endpoints_map), (0, 0, 0, 0, 0),
            (ALU64 | MOV | X, R2, FP, 0, 0), (ALU64 | ADD | K, R2, 0, 0, BUF_OFF),
            (JMP | CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
            (JMP | JEQ | K, R0, 0, "neighbour", 0),
            (LDX | W | MEM, R7, R0, 0, 0),                     # the veth's ifindex
            (LDX | W | MEM, R1, R0, 4, 0), (STX | W | MEM, FP, R1, mac_slot, 0),
            (LDX | H | MEM, R1, R0, 8, 0), (STX | H | MEM, FP, R1, mac_slot + 4, 0),
            *_bytes_call(HELPER_SKB_STORE_BYTES, 0, 6, mac_slot),
            (JMP | JNE | K, R0, 0, "shot", 0),
            (ALU64 | MOV | X, R1, R7, 0, 0), (ALU64 | MOV | K, R2, 0, 0, 0),
            (JMP | CALL, 0, 0, 0, HELPER_REDIRECT_PEER),      # returns TC_ACT_REDIRECT
            (JMP | EXIT, 0, 0, 0, 0),
            (None, 0, 0, 0, "neighbour"),
            (ALU64 | MOV | K, R1, 0, 0, bridge_index), (ALU64 | MOV | K, R2, 0, 0, 0),
            (ALU64 | MOV | K, R3, 0, 0, 0), (ALU64 | MOV | K, R4, 0, 0, 0),
            (JMP | CALL, 0, 0, 0, HELPER_REDIRECT_NEIGH),     # returns TC_ACT_REDIRECT
            (JMP | EXIT, 0, 0, 0, 0),
            *_endings(TC_ACT_UNSPEC)]
    return _encode(prog)


# --- loading: bpf(2) through ctypes ------------------------------------------
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _prog_load(insns: bytes, name: str, log: ctypes.Array | None) -> Tuple[int, int]:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")  # bpf_skb_set_tunnel_key is GPL-only
    # union bpf_attr, BPF_PROG_LOAD part, up to and including prog_name[16]
    attr = ctypes.create_string_buffer(struct.pack(
        "=IIQQIIQII16s", BPF_PROG_TYPE_SCHED_CLS, len(insns) // 8,
        ctypes.addressof(code), ctypes.addressof(lic),
        1 if log is not None else 0, len(log) if log is not None else 0,
        ctypes.addressof(log) if log is not None else 0, 0, 0,
        re.sub(r"[^A-Za-z0-9_.]", "_", name)[:15].encode()), 64)
    fd = _libc.syscall(_NR_BPF[platform.machine()], BPF_PROG_LOAD, attr, 64)
    return fd, ctypes.get_errno()


def load_program(insns: bytes, name: str) -> int:
    """Load a SCHED_CLS program and return its fd; FanError with the verifier log."""
    if platform.machine() not in _NR_BPF:
        raise FanError(f"eBPF dataplane: unknown bpf(2) syscall number on {platform.machine()}")
    fd, err = _prog_load(insns, name, None)
    if fd >= 0:
        return fd
    # Retry with a log only on failure, as libbpf does: a log that overflows its
    # buffer fails the load on recent kernels even for a valid program.
    log = ctypes.create_string_buffer(1 << 20)
    fd, err = _prog_load(insns, name, log)
    if fd >= 0:
        return fd
    text = log.value.decode(errors="replace").strip()
    raise FanError(f"loading eBPF program {name!r} failed: {os.strerror(err)} "
                   f"(errno {err}); verifier log:\n{text or '(empty)'}")


def close(fd: int) -> None:
    """Drop our reference; an attached tc filter keeps the program (and the
    maps it uses) alive."""
    os.close(fd)


BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 2, 3
BPF_MAP_TYPE_HASH = 1
BPF_F_NO_PREALLOC = 1   # memory per entry in use, not per entry possible


def _bpf(cmd: int, attr: bytes) -> Tuple[int, int]:
    buf = ctypes.create_string_buffer(attr, len(attr))
    result = _libc.syscall(_NR_BPF[platform.machine()], cmd, buf, len(attr))
    return result, ctypes.get_errno()


def create_hash_map(key_size: int, value_size: int, max_entries: int, name: str) -> int:
    # union bpf_attr, BPF_MAP_CREATE part, up to and including map_name[16]
    attr = struct.pack("=IIIIIII16s", BPF_MAP_TYPE_HASH, key_size, value_size, max_entries,
                       BPF_F_NO_PREALLOC, 0, 0,
                       re.sub(r"[^A-Za-z0-9_.]", "_", name)[:15].encode())
    fd, err = _bpf(BPF_MAP_CREATE, attr)
    if fd < 0 and err == errno.EPERM:
        # Before Linux 5.11 a map's whole size counts against RLIMIT_MEMLOCK
        # (64 KiB by default): lift it, as libbpf does, and try again.
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK,
                               (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except (ValueError, OSError):
            pass
        else:
            fd, err = _bpf(BPF_MAP_CREATE, attr)
    if fd < 0:
        raise FanError(f"cannot create eBPF map {name!r}: {os.strerror(err)} (errno {err})")
    return fd


def _elem_attr(map_fd: int, key: bytes, value: bytes = b"") -> Tuple[bytes, list]:
    keep = [ctypes.create_string_buffer(key, len(key)),
            ctypes.create_string_buffer(value, max(len(value), 1))]
    return struct.pack("=IIQQQ", map_fd, 0, ctypes.addressof(keep[0]),
                       ctypes.addressof(keep[1]) if value else 0, 0), keep


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    attr, _keep = _elem_attr(map_fd, key, value)
    result, err = _bpf(BPF_MAP_UPDATE_ELEM, attr)
    if result < 0:
        raise FanError(f"cannot update eBPF map: {os.strerror(err)} (errno {err})")


def map_delete(map_fd: int, key: bytes) -> None:
    """Delete a key; one that is not there is already deleted."""
    attr, _keep = _elem_attr(map_fd, key)
    result, err = _bpf(BPF_MAP_DELETE_ELEM, attr)
    if result < 0 and err != errno.ENOENT:
        raise FanError(f"cannot delete from eBPF map: {os.strerror(err)} (errno {err})")


# --- attaching: tc clsact through pyroute2 ------------------------------------
EGRESS = 0xFFFFFFF3   # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS): "ffff:fff3"
INGRESS = 0xFFFFFFF2
FILTER_HANDLE = 1     # fixed, so "replace" swaps the program instead of adding a second one


async def attach(ipr, ifindex: int, prog_fd: int, name: str, pref: int, parent: int) -> None:
    """Put the program on the device's egress or ingress at `pref`, replacing what is there."""
    try:
        await ipr.tc("add", "clsact", ifindex)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise FanError(f"cannot add clsact qdisc on ifindex {ifindex}: {e}") from e
    try:
        # pyroute2's "bpf" plugin packs prio and protocol (ETH_P_ALL) into tcm_info
        await ipr.tc("replace-filter", "bpf", ifindex, FILTER_HANDLE, parent=parent,
                     prio=pref, fd=prog_fd, name=name, direct_action=True)
    except NetlinkError as e:
        raise FanError(f"cannot attach eBPF filter {name!r} at pref {pref} "
                       f"on ifindex {ifindex}: {e}") from e


async def attach_program(ipr, ifindex: int, insns: bytes, name: str, pref: int,
                         parent: int) -> None:
    """Load and attach; the filter then holds the program."""
    fd = load_program(insns, name)
    try:
        await attach(ipr, ifindex, fd, name, pref, parent)
    finally:
        close(fd)


async def _filters(ipr, ifindex: int, parent: int) -> list:
    # read dumps to the end: a half-read dump would be left on the caller's socket
    return [msg async for msg in await ipr.get_filters(index=ifindex, parent=parent)]


async def filters(ipr, ifindex: int, parent: int = EGRESS) -> Dict[int, str]:
    """pref -> name of the bpf filters at egress (or ingress): what a restarted plugin finds."""
    found: Dict[int, str] = {}
    for msg in await _filters(ipr, ifindex, parent):
        opts = msg.get_attr("TCA_OPTIONS")
        # the kernel also sends one header message per pref, without options
        if msg.get_attr("TCA_KIND") == "bpf" and opts is not None:
            found[msg["info"] >> 16] = opts.get_attr("TCA_BPF_NAME") or ""
    return found


async def detach(ipr, ifindex: int, pref: int, parent: int = EGRESS) -> None:
    """Remove our filter at `pref`, then the clsact qdisc if nothing else uses it."""
    try:
        if pref in await filters(ipr, ifindex, parent):
            # kind "bpf" makes the kernel refuse to delete another tool's filter at
            # this pref; protocol 0 in tcm_info matches the one it was added with
            await ipr.tc("del-filter", "bpf", ifindex, parent=parent, info=pref << 16)
        if await _filters(ipr, ifindex, EGRESS) or await _filters(ipr, ifindex, INGRESS):
            return              # some filter remains (ours or another tool's): keep the qdisc
        # deleting a clsact that is not there gives EINVAL, too vague to ignore: look first
        if "clsact" in [q.get_attr("TCA_KIND") async for q in await ipr.get_qdiscs(ifindex)]:
            await ipr.tc("del", "clsact", ifindex)
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.ENODEV):   # already gone: fine
            raise FanError(f"cannot detach eBPF filter at pref {pref} "
                           f"on ifindex {ifindex}: {e}") from e
