"""Peers found by an eBPF program: the Fan's constant per-host state on stock kernels.

One external-mode (collect_md) tunnel device per encapsulation (and, for
VXLAN, per UDP port in use) is shared by every fan network on the host that
uses it; each network adds one route for its overlay and
one tc filter that computes a packet's outer destination from its inner one
(and one at ingress that admits only peers' packets: see below). No per-peer
routes, neighbour or FDB entries exist.

What each device is and how its packets look is the encapsulation's
(encap/): the VXLAN device, for one, has the same MAC on every host.

Overlay traffic between hosts skips the hosts' IP forwarding: each container's
veth has a program that encapsulates what the container sends as itself (its
address in the network's endpoints map, for its own veth) and sends it
straight out of the underlay device (without the underlay's index, to the
tunnel device). On VXLAN, unless the network receives through the tunnel
device (plan.receive "tunnel"), a program per network on the underlay device's
ingress removes the outer headers of what a peer sent to one of its containers
and hands it straight into the container; with "conntrack" (fan_conntrack.bpf.o)
only for outer flows the host's firewall has let in before, so that its
PREROUTING and INPUT rules hold, with "direct" always. What it leaves goes
through the tunnel device, whose ingress program admits only a peer's packets
(the trust rule, see bpf/fan.bpf.c) and delivers them after the kernel's
decapsulation. So netfilter's FORWARD, DOCKER-USER (and OUTPUT and POSTROUTING
for sent packets) does not see overlay traffic between hosts; traffic to and
from outside the overlay takes the kernel's path and the fan's rules as before.

The underlay device is not the fan's (in the managed plugin it is the host's
eth0): each network's filter there sits at its own pref, above the ones tc
picks by itself, passes on what it does not recognise, never replaces another
tool's filter, and leaves the clsact qdisc in place when it goes (it may have
been there before, and an empty one costs nothing). One filter per network
rather than one per device with a VNI-keyed map: the network's loaded object
already holds its endpoints map and its values, so attach, detach, restore and
the orphan sweep are the same per-network steps as on the tunnel device, and a
packet that is not VXLAN for this host is passed on after a few comparisons by
each.

The map lives as long as the program that uses it; this process keeps an fd to
fill it. After a restart, ensure() makes a new map and program, and the
endpoints are added again as they are re-attached: an address the map does not
hold yet goes through the bridge, never nowhere.
"""
from __future__ import annotations

import logging
import socket
from ipaddress import IPv4Address, IPv4Network
from typing import Dict, List

from ...config import VXLAN_PORT
from ...errors import FanError
from ...fanmap import FanMap
from ...model import Endpoint
from .. import bpf, libbpf
from ..base import PeerMapping
from ..encap import VXLAN
from ..netlink import Links, dumped
from ..plan import MARK, NetworkPlan

PROGRAM_PREFIX = "fan_"
SEND_PREF = 1   # the only filter on a container's veth
# On the underlay device, network n's filter is at DECAP_PREF + n: above tc's own
# choices (49152 and down), so that it neither takes nor shadows another tool's.
DECAP_PREF = 0xF000
DECAP_MODES = ("conntrack", "direct")   # plan.receive values with a filter there
log = logging.getLogger(__name__)


def decap_pref(plan: NetworkPlan) -> int:
    return DECAP_PREF + plan.tc_pref


def takes_decap(plan: NetworkPlan) -> bool:
    """Whether the network has a filter on the underlay device."""
    return plan.encap.receive_shortcut and plan.receive in DECAP_MODES


async def _underlay_filter(links: Links, underlay: int, pref: int) -> str | None:
    """The name of the eBPF filter at `pref` of the underlay's ingress, if any."""
    return (await bpf.filters(links.ipr, underlay, bpf.INGRESS)).get(pref)


def probe_error(conntrack: bool = False) -> str | None:
    """Why libbpf or this kernel's verifier refuses the fan's programs (the
    object, or with `conntrack` fan_conntrack.bpf.o, loaded with a sample
    network's values, then dropped), or None."""
    sample = FanMap(IPv4Network("250.0.0.0/8"), IPv4Network("172.30.0.0/16"))
    config = bpf.Config(sample, IPv4Network("250.0.28.0/24"), 1, VXLAN.bpf_encap,
                        IPv4Address("172.30.0.28"), 1, 1, 1, VXLAN.device_mac,
                        vxlan_port=VXLAN_PORT, decap_conntrack=conntrack)
    try:
        bpf.load(config, "fan_probe").close()
    except (FanError, OSError) as exc:
        return str(exc)
    return None


def supported() -> bool:
    error = probe_error()
    if error:
        log.info("eBPF tunnel mapping unavailable: %s", error)
    return error is None


def conntrack_supported() -> bool:
    """Whether this kernel (6.0+ with nf_conntrack's kfuncs) and this process
    (nf_conntrack's BTF readable: built in, or a module's with CAP_SYS_ADMIN)
    can run the conntrack-checked decap, plan.receive "conntrack"."""
    error = probe_error(conntrack=True)
    if error:
        log.info("eBPF receive with conntrack unavailable: %s", error)
    return error is None


class EbpfMapping(PeerMapping):
    name = "ebpf"

    def __init__(self):
        # network ID -> its loaded object: the send program every veth gets
        # (the verifier's work is most of an attach) and the endpoints map
        self._objects: Dict[str, libbpf.BpfObject] = {}
        self._tunnels: Dict[str, int] = {}   # network ID -> the tunnel index it holds

    async def ensure(self, links: Links, plan: NetworkPlan) -> None:
        """The network's programs on the shared device, always loaded anew: they
        hold ifindexes (new after a reboot) and a map this process has an fd of."""
        index = await self._ensure_device(links, plan)
        name = self._program_name(plan)
        obj = bpf.load(await self._config(links, plan, index), name)
        try:
            await bpf.attach(links.ipr, index, obj.program_fd(bpf.TUNNEL_KEY), name,
                             plan.tc_pref, bpf.EGRESS)
            # on IPIP too: it drops what fails the trust rule, the kernel delivers the rest
            await bpf.attach(links.ipr, index, obj.program_fd(bpf.RECEIVE), name,
                             plan.tc_pref, bpf.INGRESS)
        except BaseException:
            obj.close()
            raise
        self._forget(plan)
        self._objects[plan.network_id], self._tunnels[plan.network_id] = obj, index
        await links.ensure_route(plan.overlay, index, metrics={"mtu": plan.mtu})
        if takes_decap(plan):
            await self._attach_decap(links, plan, obj)
        else:   # left by an earlier run in another mode
            await self._detach_decap(links, plan)

    async def _attach_decap(self, links: Links, plan: NetworkPlan, obj: libbpf.BpfObject) -> None:
        """The receive shortcut on the underlay device: without it (another tool's
        filter at its pref, no such device) packets take the tunnel device."""
        underlay = await links.index(plan.underlay_interface)
        pref, name = decap_pref(plan), self._program_name(plan)
        try:
            if underlay is None:
                raise FanError(f"the underlay interface {plan.underlay_interface} is missing")
            there = await _underlay_filter(links, underlay, pref)
            if there is not None and not there.startswith(PROGRAM_PREFIX):
                raise FanError(f"another tool's eBPF filter {there!r} is at pref {pref} "
                               f"of {plan.underlay_interface}'s ingress")
            await bpf.attach(links.ipr, underlay, obj.program_fd(bpf.DECAP), name, pref,
                             bpf.INGRESS)
        except FanError as exc:
            log.warning("network %s receives through %s, not straight from %s: %s",
                        plan.network_id[:12], self.tunnel_device(plan), plan.underlay_interface,
                        exc)

    @staticmethod
    async def _config(links: Links, plan: NetworkPlan, tunnel: int) -> bpf.Config:
        underlay = await links.index(plan.underlay_interface)
        bridge = await links.index(plan.bridge)
        return bpf.Config(
            plan.host.fan, plan.slice, plan.vni, plan.encap.bpf_encap, plan.underlay_address,
            tunnel_index=tunnel, underlay_index=underlay or 0, bridge_index=bridge or 0,
            tunnel_mac=plan.encap.device_mac, vxlan_port=plan.vxlan_port or 0,
            # without the underlay device's index, send through the tunnel device
            send_encap=underlay is not None,
            decap_conntrack=plan.receive == "conntrack")

    async def attach_endpoint(self, links: Links, plan: NetworkPlan, veth_index: int,
                              endpoint: Endpoint) -> None:
        """The container in the network's map, then the send program on its
        veth: the program sends only what the map says is the container's."""
        tunnel = await links.index(self.tunnel_device(plan))
        if tunnel is None:
            raise FanError(f"tunnel device {self.tunnel_device(plan)} is missing; "
                           "restart fan-driver to restore it")
        if self._tunnels.get(plan.network_id) != tunnel:   # not loaded, or a new device
            await self.ensure(links, plan)
        obj = self._objects[plan.network_id]
        libbpf.map_update(obj.map_fd(bpf.ENDPOINTS),
                          *bpf.endpoint_entry(int(endpoint.ip), veth_index, endpoint.mac))
        await bpf.attach(links.ipr, veth_index, obj.program_fd(bpf.SEND),
                         self._program_name(plan), SEND_PREF, bpf.INGRESS)

    def detach_endpoint(self, plan: NetworkPlan, endpoint: Endpoint) -> None:
        """Out of the map before its veth goes. A failure only costs drops: the
        veth's ifindex is never reused, so a stale entry cannot misdeliver."""
        obj = self._objects.get(plan.network_id)
        if obj is None:
            return
        try:
            libbpf.map_delete(obj.map_fd(bpf.ENDPOINTS), bpf.ENDPOINT_KEY.pack(int(endpoint.ip)))
        except FanError as exc:
            log.warning("endpoint %s stays in the receive map: %s", endpoint.address, exc)

    def _forget(self, plan: NetworkPlan) -> None:
        self._tunnels.pop(plan.network_id, None)
        obj = self._objects.pop(plan.network_id, None)
        if obj is not None:
            obj.close()

    async def remove(self, links: Links, plan: NetworkPlan) -> None:
        self._forget(plan)
        await self._detach_decap(links, plan)
        device = self.tunnel_device(plan)
        index = await links.index(device)
        if index is None:
            return
        await links.remove_route(plan.overlay, index)
        await bpf.detach(links.ipr, index, plan.tc_pref, bpf.INGRESS)
        await bpf.detach(links.ipr, index, plan.tc_pref, bpf.EGRESS)
        if not await bpf.filters(links.ipr, index):   # the last network on its port
            await links.delete(device)

    @staticmethod
    async def _detach_decap(links: Links, plan: NetworkPlan) -> None:
        underlay = await links.index(plan.underlay_interface)
        there = underlay and await _underlay_filter(links, underlay, decap_pref(plan))
        if there and there.startswith(PROGRAM_PREFIX):
            await bpf.detach(links.ipr, underlay, decap_pref(plan), bpf.INGRESS, keep_qdisc=True)

    def tunnel_device(self, plan: NetworkPlan) -> str:
        return plan.encap.external_device(plan.vxlan_port)

    async def remove_orphans(self, links: Links, plans) -> None:
        """On each shared device in use, the filters and overlay routes of
        networks that `plans` (this mapping's networks in the state) do not
        account for: left by a crash between the kernel work and the state
        write. A shared device no plan uses goes as an orphan interface."""
        by_device: Dict[str, List[NetworkPlan]] = {}
        for plan in plans:
            by_device.setdefault(self.tunnel_device(plan), []).append(plan)
        for device, ours in sorted(by_device.items()):
            index = await links.index(device)
            if index is None:
                continue
            prefs = {p.tc_pref for p in ours}
            for parent in (bpf.INGRESS, bpf.EGRESS):
                for pref, name in (await bpf.filters(links.ipr, index, parent)).items():
                    if pref not in prefs and name.startswith(PROGRAM_PREFIX):
                        log.warning("removing orphan eBPF filter %s (pref %d) on %s",
                                    name, pref, device)
                        await bpf.detach(links.ipr, index, pref, parent)
            overlays = {p.overlay for p in ours}
            for dst in await links.routes_on(index):
                if dst not in overlays:
                    log.warning("removing orphan route %s on %s", dst, device)
                    await links.remove_route(dst, index)
        await self._remove_orphan_decaps(links, plans)

    @staticmethod
    async def _remove_orphan_decaps(links: Links, plans) -> None:
        """Our filters on underlay devices (any interface with an IPv4 address:
        a network that left no plan may have used any) that no plan accounts for."""
        wanted = set()
        for p in plans:
            if takes_decap(p):
                wanted.add((await links.index(p.underlay_interface), decap_pref(p)))
        addresses = await dumped("listing IPv4 addresses",
                                 lambda: links.ipr.get_addr(family=socket.AF_INET))
        for index in sorted({a["index"] for a in addresses}):
            for pref, name in (await bpf.filters(links.ipr, index, bpf.INGRESS)).items():
                if (pref >= DECAP_PREF and name.startswith(PROGRAM_PREFIX)
                        and (index, pref) not in wanted):
                    log.warning("removing orphan eBPF filter %s (pref %d) on interface %d",
                                name, pref, index)
                    await bpf.detach(links.ipr, index, pref, bpf.INGRESS, keep_qdisc=True)

    @staticmethod
    def _program_name(plan: NetworkPlan) -> str:
        return f"{PROGRAM_PREFIX}{plan.network_id[:8]}"

    async def _ensure_device(self, links: Links, plan: NetworkPlan) -> int:
        index = await links.claim(self.tunnel_device(plan), plan.encap.name, MARK, mtu=plan.mtu,
                                  **plan.encap.external_spec(plan.vxlan_port))
        mtu = max(plan.mtu, await links.mtu(index))
        await links.set_up(index, mtu=mtu, arp=False)
        return index
