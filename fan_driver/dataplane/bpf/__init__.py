"""The Fan's tc programs (fan.bpf.c beside this file) and how they are put on
devices: the committed object, its per-network globals, tc attach and detach.

Canonical's Fan needs an Ubuntu-only kernel patch that computes a tunnel
packet's outer destination from its inner one. Upstream kernels do the same
with a tunnel device in external (collect_md) mode and a tc program that sets
the tunnel key; fan.bpf.c says what each of its programs does.

The objects are built by build.sh (clang) and committed, so installing needs no
compiler; each carries the SHA-256 of the source it was built from, which the
tests compare with the source beside it. fan_conntrack.bpf.o holds the same
programs, its fan_decap taking only flows the host's conntrack has confirmed; it
loads only where the conntrack kfuncs do (kernel 6.0+, nf_conntrack's BTF
readable by the loader), so the plain object carries no kfunc at all.
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from importlib import resources
from ipaddress import IPv4Address, IPv4Network
from typing import Dict, Optional, Tuple

from ...errors import FanError, KernelError
from ...fanmap import FanMap
from .. import libbpf
from ..netlink import GONE, dumped, kernel

OBJECT, CONNTRACK_OBJECT = "fan.bpf.o", "fan_conntrack.bpf.o"
TUNNEL_KEY, SEND, RECEIVE, DECAP = "fan_tunnel_key", "fan_send", "fan_receive", "fan_decap"
ENDPOINTS = "endpoints"
VNI_LIMIT = 1 << 24


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


@dataclass(frozen=True)
class Config:
    """struct fan_config of fan.h: one network's values, read-only to the programs."""
    fan: FanMap
    slice: IPv4Network
    vni: int
    encap: int                 # enum fan_encap: the encapsulation's bpf_encap
    local: IPv4Address         # this host's underlay address
    tunnel_index: int = 0
    underlay_index: int = 0
    bridge_index: int = 0
    tunnel_mac: Optional[str] = None   # the shared device's (encapsulations with Ethernet)
    vxlan_port: int = 0        # the network's VXLAN UDP port (0: not VXLAN)
    send_encap: bool = True    # the send program encapsulates itself
    test_record_key: bool = False
    decap_conntrack: bool = False   # not packed: picks fan_conntrack.bpf.o

    LAYOUT = struct.Struct("=13I6sBBB3x")

    @property
    def object(self) -> str:
        return CONNTRACK_OBJECT if self.decap_conntrack else OBJECT

    def pack(self) -> bytes:
        if not 0 <= self.vni < VNI_LIMIT:
            raise FanError(f"VNI {self.vni} is out of range 0..{VNI_LIMIT - 1}")
        fan = self.fan
        return self.LAYOUT.pack(
            int(fan.overlay.network_address), int(fan.overlay.netmask),
            int(fan.underlay.network_address), int(fan.underlay.netmask), fan.shift,
            int(self.slice.network_address), int(self.slice.netmask), self.vni,
            int(self.local), self.tunnel_index, self.underlay_index, self.bridge_index,
            self.vxlan_port,
            bytes.fromhex((self.tunnel_mac or "00:00:00:00:00:00").replace(":", "")),
            self.encap, self.send_encap, self.test_record_key)


def load(config: Config, name: str, elf: bytes | None = None) -> libbpf.BpfObject:
    """The object loaded for one network (its endpoints map sized to the slice);
    `elf` in place of the committed object the config names."""
    return libbpf.BpfObject(elf if elf is not None else _read(config.object), name, config.pack(),
                            {ENDPOINTS: config.slice.num_addresses})


# The receive program's map: struct fan_endpoint, keyed by the address in host order.
ENDPOINT_KEY = struct.Struct("=I")
ENDPOINT_VALUE = struct.Struct("=I6s2x")


def endpoint_entry(address: int, veth_index: int, mac: str) -> Tuple[bytes, bytes]:
    return (ENDPOINT_KEY.pack(address),
            ENDPOINT_VALUE.pack(veth_index, bytes.fromhex(mac.replace(":", ""))))


# --- attaching: tc clsact through pyroute2 ------------------------------------
EGRESS = 0xFFFFFFF3   # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS): "ffff:fff3"
INGRESS = 0xFFFFFFF2
FILTER_HANDLE = 1     # fixed, so "replace" swaps the program instead of adding a second one


async def attach(ipr, ifindex: int, prog_fd: int, name: str, pref: int, parent: int) -> None:
    """Put the program on the device's egress or ingress at `pref`, replacing what is there."""
    with kernel(f"adding a clsact qdisc to interface {ifindex}", tolerate=(errno.EEXIST,)):
        await ipr.tc("add", "clsact", ifindex)
    with kernel(f"attaching eBPF filter {name!r} at pref {pref} to interface {ifindex}"):
        # pyroute2's "bpf" plugin packs prio and protocol (ETH_P_ALL) into tcm_info
        await ipr.tc("replace-filter", "bpf", ifindex, FILTER_HANDLE, parent=parent,
                     prio=pref, fd=prog_fd, name=name, direct_action=True)


async def _filters(ipr, ifindex: int, parent: int) -> list:
    side = "ingress" if parent == INGRESS else "egress"
    return await dumped(f"listing tc filters at {side} of interface {ifindex}",
                        lambda: ipr.get_filters(index=ifindex, parent=parent))


async def filters(ipr, ifindex: int, parent: int = EGRESS) -> Dict[int, str]:
    """pref -> name of the bpf filters at egress (or ingress): what a restarted plugin finds."""
    found: Dict[int, str] = {}
    for msg in await _filters(ipr, ifindex, parent):
        opts = msg.get_attr("TCA_OPTIONS")
        # the kernel also sends one header message per pref, without options
        if msg.get_attr("TCA_KIND") == "bpf" and opts is not None:
            found[msg["info"] >> 16] = opts.get_attr("TCA_BPF_NAME") or ""
    return found


async def detach(ipr, ifindex: int, pref: int, parent: int = EGRESS,
                 keep_qdisc: bool = False) -> None:
    """Remove our filter at `pref`, then the clsact qdisc if nothing else uses it
    (unless `keep_qdisc`: on a device the fan does not own, whose clsact may be
    another tool's). What is already gone is fine."""
    try:
        present = pref in await filters(ipr, ifindex, parent)
        if present:
            with kernel(f"detaching the eBPF filter at pref {pref} of interface {ifindex}",
                        tolerate=GONE):
                # kind "bpf" makes the kernel refuse to delete another tool's filter at
                # this pref; protocol 0 in tcm_info matches the one it was added with
                await ipr.tc("del-filter", "bpf", ifindex, parent=parent, info=pref << 16)
        if keep_qdisc or await _filters(ipr, ifindex, EGRESS) or await _filters(ipr, ifindex, INGRESS):
            return              # some filter remains (ours or another tool's): keep the qdisc
        with kernel(f"removing the clsact qdisc of interface {ifindex}", tolerate=GONE):
            # deleting a clsact that is not there gives EINVAL, too vague to ignore: look first
            if "clsact" in [q.get_attr("TCA_KIND") async for q in await ipr.get_qdiscs(ifindex)]:
                await ipr.tc("del", "clsact", ifindex)
    except KernelError as e:   # a listing's, naming what it listed
        if e.code not in GONE:
            raise
