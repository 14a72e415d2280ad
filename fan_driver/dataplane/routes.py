"""Peers found by per-peer kernel state: flannel's way, for kernels without eBPF.

IPIP: a dedicated ipip device (never `tunl0`, which other tools share) with
our underlay address as `local` and no remote, and one route per remote slice:
`250.5.9.0/24 via 172.30.5.9 dev fanr-ipip onlink`.

VXLAN: a device per network, and per remote host one route to its slice via
its VTEP address, one permanent neighbour entry and one permanent FDB entry.
Every VTEP's MAC is derived from its underlay address, so all of it is
computed locally from the peer's address alone.

A /16 underlay means 65,534 peers, about a minute of kernel work, longer than
Docker waits for a plugin call; peers are therefore programmed in the
background after the network is up, and local containers work at once.
"""
from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address, IPv4Network
from typing import Dict, Set

from ..model import Endpoint, short_id
from .base import PeerMapping
from .netlink import Links
from .plan import MARK, NetworkPlan

log = logging.getLogger(__name__)

RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
NTF_SELF = 0x02   # the entry belongs to the VXLAN device itself, not to a bridge
IPIP_DEVICE = "fanr-ipip"
# The kernel's (and flannel's) VXLAN port: 4789 belongs to the eBPF mapping's
# external-mode device, whose socket a plain VXLAN device cannot share.
VXLAN_ROUTES_PORT = 8472
# Peers programmed between two yields to the event loop, so requests still get answers.
BATCH = 256


def vtep_mac(underlay: IPv4Address) -> str:
    return "0e:fb:" + ":".join(f"{b:02x}" for b in underlay.packed)


def vtep_address(slice_: IPv4Network) -> IPv4Address:
    """The VXLAN next hop for a slice: its network address, as flannel uses."""
    return slice_.network_address


class RoutesMapping(PeerMapping):
    name = "routes"

    async def attach_endpoint(self, links: Links, plan: NetworkPlan, veth_index: int,
                              endpoint: Endpoint) -> None:
        """Nothing per container: packets take the kernel's path."""

    def detach_endpoint(self, plan: NetworkPlan, endpoint: Endpoint) -> None:
        """Nothing per container."""

    def __init__(self):
        self._programming: Dict[str, asyncio.Task] = {}
        # Networks on the shared IPIP device: restore() ensures every network at
        # start-up, so this is complete without reading tens of thousands of routes.
        self._ipip_networks: Set[str] = set()

    def tunnel_device(self, plan: NetworkPlan) -> str:
        return IPIP_DEVICE if plan.encap.name == "ipip" else f"fanr-{plan.vni:06x}"

    async def ensure(self, links: Links, plan: NetworkPlan) -> None:
        index = await self._ensure_device(links, plan)
        if plan.encap.name == "ipip":
            self._ipip_networks.add(plan.network_id)
        task = self._programming.get(plan.network_id)
        if task is None or task.done():
            self._programming[plan.network_id] = asyncio.create_task(
                self._program_peers(links, plan, index))

    async def remove(self, links: Links, plan: NetworkPlan) -> None:
        task = self._programming.pop(plan.network_id, None)
        if task is not None:
            task.cancel()
        device = self.tunnel_device(plan)
        index = await links.index(device)
        if index is None:
            return
        if plan.encap.name == "vxlan":
            await links.delete(device)   # takes its routes, neighbours and FDB entries along
            return
        self._ipip_networks.discard(plan.network_id)
        if not self._ipip_networks:
            await links.delete(device)   # fast: the kernel drops all its routes at once
            return
        for dst in await links.routes_on(index):   # the device is shared: only our routes go
            if dst.subnet_of(plan.overlay):
                await links.remove_route(dst, index)

    async def remove_orphans(self, links: Links, plans) -> None:
        """The IPIP device is shared: remove peer routes of overlays that no
        network in `plans` (this mapping's, from the state) holds. A VXLAN
        network has a device of its own, removed as an orphan interface."""
        index = await links.index(IPIP_DEVICE)
        if index is None:
            return
        overlays = [p.overlay for p in plans if p.encap.name == "ipip"]
        for dst in await links.routes_on(index):
            if not any(dst.subnet_of(overlay) for overlay in overlays):
                await links.remove_route(dst, index)

    async def _ensure_device(self, links: Links, plan: NetworkPlan) -> int:
        underlay = await links.index(plan.underlay_interface)
        local = str(plan.underlay_address)
        if plan.encap.name == "ipip":
            index = await links.claim(IPIP_DEVICE, "ipip", MARK, ipip_local=local,
                                      ipip_link=underlay, ipip_ttl=64, mtu=plan.mtu)
        else:
            index = await links.claim(
                self.tunnel_device(plan), "vxlan", plan.mark, vxlan_id=plan.vni,
                vxlan_local=local, vxlan_link=underlay, vxlan_port=VXLAN_ROUTES_PORT,
                vxlan_learning=0, address=vtep_mac(plan.underlay_address), mtu=plan.mtu)
        await links.set_up(index, mtu=plan.mtu)
        return index

    async def _program_peers(self, links: Links, plan: NetworkPlan, index: int) -> None:
        loop = asyncio.get_running_loop()
        started, count = loop.time(), 0
        try:
            for peer, slice_ in plan.host.fan.peers(plan.underlay_address):
                await self._program_peer(links, plan, index, peer, slice_)
                count += 1
                if count % BATCH == 0:
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("network %s: programming peers failed after %d",
                          short_id(plan.network_id), count)
            raise
        log.info("network %s: %d peers programmed in %.1f s", short_id(plan.network_id),
                 count, loop.time() - started)

    @staticmethod
    async def _program_peer(links: Links, plan: NetworkPlan, index: int, peer: IPv4Address,
                            slice_: IPv4Network) -> None:
        ipr = links.ipr
        if plan.encap.name == "ipip":
            await ipr.route("replace", dst=str(slice_), gateway=str(peer), oif=index,
                            flags=RTNH_F_ONLINK)
            return
        vtep, mac = vtep_address(slice_), vtep_mac(peer)
        await ipr.neigh("replace", ifindex=index, dst=str(vtep), lladdr=mac, state=NUD_PERMANENT)
        await ipr.fdb("replace", ifindex=index, lladdr=mac, dst=str(peer), state=NUD_PERMANENT,
                      flags=NTF_SELF)
        await ipr.route("replace", dst=str(slice_), gateway=str(vtep), oif=index,
                        flags=RTNH_F_ONLINK)
