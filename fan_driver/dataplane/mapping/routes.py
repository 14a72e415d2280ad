"""Peers found by per-peer kernel state: flannel's way, for kernels without eBPF.

A tunnel device with our underlay address as `local` and no remote (one
shared by every network, or one per network: the encapsulation's choice), and
per remote host what the encapsulation needs on it (VXLAN: a neighbour and an
FDB entry for the peer's VTEP), a nexthop object and one route to its slice
through it: over IPIP `nexthop id <peer> via 172.30.5.9 dev fanr-ipip onlink`
and `250.5.9.0/24 nhid <peer>`.

Why nexthop objects (Linux 5.3+): routes that each name their own gateway
are each a fib_info of their own, which the kernel compares linearly, so
adding N of them is quadratic (a /16 underlay, 65,534 peers: 438 s); a route
through a nexthop object is found by the object's id. Without them (detected
once) each route names its gateway as before. Nexthop ids are the peer's (or
VTEP's) address as a number, and ours carry protocol RTPROT_FAN: only those
are deleted. Everything goes to the kernel in bulk (Rtnl.send_all), after
the network is up, so local containers work at once.
"""
from __future__ import annotations

import asyncio
import errno
import logging
from ipaddress import IPv4Address, IPv4Network
from typing import Dict, Iterable, List, Optional, Set, Tuple

from ...errors import FanError
from ...model import Endpoint, short_id
from ..base import PeerMapping
from ..encap.base import ROUTES_DEVICE_PREFIX
from ..netlink import (GONE, MAIN_TABLE, Links, Route, Rtnl, del_nexthop_request,
                       del_route_request, ipv4_nexthops, ipv4_routes, kernel, nexthop_request,
                       route_request)
from ..plan import MARK, NetworkPlan

log = logging.getLogger(__name__)

# Our routes and nexthop objects carry it (unassigned in iproute2's rt_protos).
RTPROT_FAN = 250
# Peers per trip to a thread: the event loop answers requests in between.
GROUP = 4096
NO_NEXTHOPS = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT)


def peer_requests(plan: NetworkPlan, index: int, peers: Iterable[Tuple[IPv4Address, IPv4Network]],
                  nexthops: bool) -> List[tuple]:
    """The netlink requests that program `peers`, each peer's in a row, its
    route last (so a route means the peer is complete). Pure."""
    requests = []
    for peer, slice_ in peers:
        hop = plan.encap.next_hop(peer, slice_)
        requests += plan.encap.peer_requests(index, peer, hop)
        if nexthops:
            requests += [nexthop_request(int(hop), hop, index, RTPROT_FAN),
                         route_request(slice_, RTPROT_FAN, nexthop=int(hop))]
        else:
            requests.append(route_request(slice_, RTPROT_FAN, gateway=hop, oif=index))
    return requests


def removal_requests(plan: NetworkPlan, keep: List[NetworkPlan], nexthops: bool) -> List[tuple]:
    """Deleting a network's peer routes, then the nexthop objects that no plan
    in `keep` shares: a nexthop object deleted under routes (as with its
    device) makes the kernel walk the whole table, for each object. Pure."""
    requests = [del_route_request(Route(slice_, MAIN_TABLE, RTPROT_FAN, None, None))
                for _, slice_ in plan.host.fan.peers(plan.underlay_address)]
    if nexthops:
        unshared = wanted_nexthops([plan]) - wanted_nexthops(keep)
        requests += [del_nexthop_request(n) for n in unshared]
    return requests


def wanted_nexthops(plans: Iterable[NetworkPlan]) -> Set[int]:
    return {int(p.encap.next_hop(peer, slice_)) for p in plans
            for peer, slice_ in p.host.fan.peers(p.underlay_address)}


async def in_thread(fn, *args):
    """fn(*args) in a thread. A cancellation waits for it to finish (it is
    changing the kernel through a socket the caller closes), then goes on."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


class RoutesMapping(PeerMapping):
    name = "routes"

    async def attach_endpoint(self, links: Links, plan: NetworkPlan, veth_index: int,
                              endpoint: Endpoint) -> None:
        """Nothing per container: packets take the kernel's path."""

    def detach_endpoint(self, plan: NetworkPlan, endpoint: Endpoint) -> None:
        """Nothing per container."""

    def __init__(self, use_nexthops: Optional[bool] = None):
        """`use_nexthops`: None finds out from the kernel (once)."""
        self._programming: Dict[str, asyncio.Task] = {}
        # Networks on a shared device (IPIP's): restore() ensures every network at
        # start-up, so this is complete without reading tens of thousands of routes.
        self._sharing: Dict[str, NetworkPlan] = {}
        self.use_nexthops = use_nexthops

    def tunnel_device(self, plan: NetworkPlan) -> str:
        return plan.encap.routes_device(plan.vni)

    async def ensure(self, links: Links, plan: NetworkPlan) -> None:
        index = await self._ensure_device(links, plan)
        if plan.encap.routes_device_shared:
            self._sharing[plan.network_id] = plan
        task = self._programming.get(plan.network_id)
        if task is None or task.done():
            self._programming[plan.network_id] = asyncio.create_task(
                self._program_peers(plan, index))

    async def remove(self, links: Links, plan: NetworkPlan) -> None:
        task = self._programming.pop(plan.network_id, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])   # no peer added behind our back
        device = self.tunnel_device(plan)
        index = await links.index(device)
        if index is None:
            return
        self._sharing.pop(plan.network_id, None)
        keep = [p for p in self._sharing.values() if self.tunnel_device(p) == device]
        nexthops = self.use_nexthops is not False
        doing = f"removing network {short_id(plan.network_id)}'s peers from {device}"
        with Rtnl() as rtnl, kernel(doing):
            await in_thread(lambda: rtnl.apply(removal_requests(plan, keep, nexthops), doing,
                                         GONE + NO_NEXTHOPS))
        if not keep:
            await links.delete(device)

    async def remove_orphans(self, links: Links, plans) -> None:
        """On each tunnel device of this mapping, remove the peer routes of
        overlays that no network in `plans` (this mapping's, from the state)
        holds, and our nexthop objects that none of them uses: a device may be
        shared (IPIP's), and a crash may leave stale peers on any. A device of
        no network loses all of them here, in bulk, before it goes as an orphan
        interface: deleting a device deletes its routes one by one (24 s for
        the 65,533 peers of a /16 underlay)."""
        keep: Dict[int, List[NetworkPlan]] = {}
        for plan in plans:
            index = await links.index(self.tunnel_device(plan))
            if index is not None:
                keep.setdefault(index, []).append(plan)
        devices = {self.tunnel_device(p) for p in plans}
        for name in await links.marked():
            if name.startswith(ROUTES_DEVICE_PREFIX) and name not in devices:
                index = await links.index(name)
                if index is not None:
                    keep.setdefault(index, [])
        if keep:
            await self._sweep(keep, "removing orphan peer routes and nexthops")

    async def _sweep(self, keep: Dict[int, List[NetworkPlan]], doing: str) -> None:
        """On each device (index) in `keep`, delete the routes outside the
        overlays of its plans and our nexthop objects that none of them uses."""
        wanted = {index: wanted_nexthops(plans) for index, plans in keep.items()}
        with Rtnl() as rtnl, kernel(doing):
            nexthops = await in_thread(_nexthops_or_none, rtnl) or []
            device = {n.id: n.oif for n in nexthops}   # a route through one may not name it
            routes = []
            for route in await in_thread(ipv4_routes, rtnl):
                index = route.oif or device.get(route.nexthop)
                if route.table == MAIN_TABLE and index in keep and not any(
                        route.dst.subnet_of(p.overlay) for p in keep[index]):
                    routes.append(route)
            unused = [n for n in nexthops if n.protocol == RTPROT_FAN and n.oif in keep
                      and n.id not in wanted[n.oif]]
            if routes or unused:
                log.warning("%s: %d routes, %d nexthop objects", doing, len(routes), len(unused))
            await in_thread(rtnl.apply, [del_route_request(r) for r in routes]
                            + [del_nexthop_request(n.id) for n in unused], doing, GONE)

    async def _ensure_device(self, links: Links, plan: NetworkPlan) -> int:
        underlay = await links.index(plan.underlay_interface)
        mark = MARK if plan.encap.routes_device_shared else plan.mark
        index = await links.claim(
            self.tunnel_device(plan), plan.encap.name, mark, mtu=plan.mtu,
            **plan.encap.routes_spec(plan.vni, plan.underlay_address, underlay, plan.vxlan_port))
        await links.set_up(index, mtu=plan.mtu)
        return index

    async def _program_peers(self, plan: NetworkPlan, index: int) -> None:
        loop = asyncio.get_running_loop()
        started, count = loop.time(), 0
        network = short_id(plan.network_id)
        peers = await in_thread(lambda: list(plan.host.fan.peers(plan.underlay_address)))
        try:
            with Rtnl() as rtnl:
                with kernel(f"listing nexthop objects for network {network}"):
                    nexthops = await self._nexthops_usable(rtnl, plan)
                for start in range(0, len(peers), GROUP):
                    group = peers[start:start + GROUP]
                    doing = (f"programming peers {group[0][0]}-{group[-1][0]} of network "
                             f"{network} on {self.tunnel_device(plan)}")
                    with kernel(doing):   # built in the thread too: 10-20 us a request
                        await in_thread(lambda: rtnl.apply(peer_requests(plan, index, group,
                                                                         nexthops), doing))
                    count += len(group)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("network %s: programming peers failed after %d", network, count)
            raise
        log.info("network %s: %d peers programmed in %.1f s (%s)", network, count,
                 loop.time() - started, "nexthop objects" if nexthops else "gateway routes")

    async def _nexthops_usable(self, rtnl: Rtnl, plan: NetworkPlan) -> bool:
        """Whether this kernel has nexthop objects (found out once); if so,
        refuse to replace one that another program made under an id we need."""
        if self.use_nexthops is False:
            return False
        existing = await in_thread(_nexthops_or_none, rtnl)
        if self.use_nexthops is None:
            self.use_nexthops = existing is not None
            if existing is None:
                log.warning("this kernel has no nexthop objects (Linux 5.3+): one route per "
                            "peer with its own gateway, slow to program for a large underlay")
        if existing is None:
            return False
        foreign = [n for n in existing if n.protocol != RTPROT_FAN]
        if foreign:
            needed = await in_thread(wanted_nexthops, [plan])
            foreign = [n for n in foreign if n.id in needed]
        if foreign:
            raise FanError(
                f"network {short_id(plan.network_id)} needs nexthop id {foreign[0].id} "
                f"({IPv4Address(foreign[0].id)}), which another program made (protocol "
                f"{foreign[0].protocol}); delete it (`ip nexthop del id {foreign[0].id}`) "
                "or use another underlay")
        return True


async def programmed(mapping: RoutesMapping, plan: NetworkPlan) -> None:
    """Until a network's peers are in the kernel; their failure, if any."""
    task = mapping._programming.get(plan.network_id)
    if task is not None:
        await task


def _nexthops_or_none(rtnl: Rtnl):
    """Every IPv4 nexthop object, or None on a kernel without them. Blocking."""
    try:
        return ipv4_nexthops(rtnl)
    except OSError as exc:
        if exc.errno in NO_NEXTHOPS:
            return None
        raise
