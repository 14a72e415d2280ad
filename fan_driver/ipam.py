"""The IpamDriver: each host hands out addresses from its own slice of the overlay.

Docker asks for the pool before the network exists and shows the IPAM only the
`--ipam-opt` options, so the slice is decided here, from the underlay given
there or the plugin's default.
"""
from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Interface
from typing import Awaitable, Callable, Optional

from .config import DEFAULT_OVERLAY, UnderlaySpec, parse_cidr
from .drivers import IpamDriverApi, NetworkRemoval
from .errors import FanError, NotFound
from .fanmap import FanMap
from .faults import NO_FAULTS, Faults
from .hostfacts import HostFacts, resolve_underlay
from .ledger import Ledger
from .model import Owner, Pool, pool_id, short_id
from .protocol import (AddressGranted, AddressRelease, AddressRequest, AddressSpaces,
                       IpamCapabilities, PoolGranted, PoolRef, PoolRequest)

log = logging.getLogger(__name__)

ADDRESS_SPACE = "fan"
# Docker does not limit container names; longer ones are not remembered, so a
# request cannot grow the state file much. With one entry per address too,
# a pool remembers at most its capacity, and at most MAX_REMEMBERED names.
MAX_NAME = 255
MAX_REMEMBERED = 1024


def reserved(pool: Pool) -> set:
    """The slice's network and broadcast addresses and the host's first N (gateway .1 among them)."""
    net = pool.host_slice.slice
    first = int(net.network_address)
    return {IPv4Address(first + i) for i in range(pool.host_reserve + 1)} | {net.broadcast_address}


def capacity(pool: Pool) -> int:
    return pool.host_slice.slice.num_addresses - len(reserved(pool))


def allocate(pool: Pool, requested: Optional[IPv4Address],
             name: Optional[str] = None) -> IPv4Address:
    """The address for a container, in this order:
    1. exactly the one asked for (`--ip`), or an error saying why it cannot be
       had; one held only as unclaimed (handed out before the plugin restarted,
       in use by no endpoint since) is had: it is its container coming back,
       e.g. after a dockerd restart that stopped the plugin before Docker
       released it;
    2. the address `name` last had, when it is free (Docker 29 and later name
       the container): a container keeps its address across restarts;
    3. the lowest free address that no name remembers;
    4. the free address whose name was seen least recently: another container's
       address is taken only when no other is free, and then the one least
       likely to be wanted back.
    Before Docker 29 no name is remembered, so this is the lowest free address.
    Addresses are reused freely: an endpoint's MAC follows its IP, so peers'
    caches stay right."""
    net = pool.host_slice.slice
    excluded = reserved(pool)
    if requested is not None:
        if requested not in net:
            raise FanError(f"address {requested} is outside this host's fan slice {net}; "
                           f"choose one in {net}")
        if requested in excluded:
            raise FanError(f"address {requested} is reserved for the host in slice {net} "
                           f"(host_reserve={pool.host_reserve}); choose another")
        if pool.addresses.get(str(requested), Owner.UNCLAIMED) != Owner.UNCLAIMED:
            raise FanError(f"address {requested} is already in use in slice {net}")
        return requested
    # Remembered addresses were all handed out here: in the slice, not reserved.
    previous = pool.remembered.get(name) if name else None
    if previous is not None and previous not in pool.addresses:
        return IPv4Address(previous)
    unwanted = set(pool.addresses).union(pool.remembered.values())
    for host in net.hosts():
        if host not in excluded and str(host) not in unwanted:
            return host
    for address in pool.remembered.values():   # least recently seen first
        if address not in pool.addresses:
            return IPv4Address(address)
    raise FanError(f"fan slice {net} is full: all {capacity(pool)} container addresses are "
                   "in use; remove containers or give the fan a larger slice per host")


def remember(pool: Pool, address: str, name: Optional[str]) -> None:
    """`address` is now `name`'s (or, without a name, no one's) and `name` was
    just seen: one entry per name and one per address, the most recent last, at
    most MAX_REMEMBERED."""
    for other in [n for n, a in pool.remembered.items() if a == address]:
        del pool.remembered[other]
    if name is None:
        return
    pool.remembered.pop(name, None)
    pool.remembered[name] = address
    while len(pool.remembered) > MAX_REMEMBERED:
        del pool.remembered[next(iter(pool.remembered))]


def seen_leaving(pool: Pool, address: str) -> None:
    """The container that had `address` lets go of it (it stops or goes): its
    name is now the most recently seen, its address the last a newcomer gets."""
    name = next((n for n, a in pool.remembered.items() if a == address), None)
    if name is not None:
        remember(pool, address, name)


def kept_name(name: Optional[str]) -> Optional[str]:
    """The container's name as remembered: none for a name too long to keep."""
    if name is not None and len(name) > MAX_NAME:
        log.warning("endpoint name of %d characters: its address is not remembered", len(name))
        return None
    return name


class IpamDriver(IpamDriverApi):
    def __init__(self, ledger: Ledger, read_facts: Callable[[], Awaitable[HostFacts]],
                 default_underlay: UnderlaySpec, network: Optional[NetworkRemoval] = None,
                 faults: Faults = NO_FAULTS):
        self.ledger = ledger
        self.read_facts = read_facts
        self.default_underlay = default_underlay
        # The network driver, only as far as NetworkRemoval declares: it removes
        # the network or endpoint of a pool or address that Docker releases
        # while they still hold it (see release_*).
        self.network = network
        self.faults = faults

    async def capabilities(self) -> IpamCapabilities:
        return IpamCapabilities(requires_mac_address=False, requires_request_replay=False)

    async def default_address_spaces(self) -> AddressSpaces:
        return AddressSpaces(local=ADDRESS_SPACE, global_=ADDRESS_SPACE)

    async def request_pool(self, request: PoolRequest) -> PoolGranted:
        overlay = request.overlay if request.overlay is not None else DEFAULT_OVERLAY
        spec = request.underlay or self.default_underlay
        pid = pool_id(overlay)
        async with self.ledger.change() as state:
            for other_id, other in list(state.pools.items()):
                if other.unclaimed and state.network_of_pool(other_id) is None:
                    del state.pools[other_id]   # its request's reply was lost in a crash
                    continue
                if overlay.overlaps(parse_cidr(other.overlay, "overlay")):
                    nid = state.network_of_pool(other_id)
                    owner = f"fan network {short_id(nid)}" if nid else "another fan network"
                    raise FanError(f"overlay {overlay} overlaps {other.overlay} of {owner}; "
                                   "each fan network needs its own overlay")
            facts = await self.read_facts()
            underlay = resolve_underlay(spec, facts)
            fan = FanMap(overlay, underlay.network)
            for route in facts.routes:
                if route.overlaps(overlay):
                    raise FanError(f"overlay {overlay} overlaps route {route} already on this "
                                   "host; pick an overlay that no local network uses")
            for iface in facts.interfaces:
                for addr in iface.addresses:
                    if addr.ip in overlay:
                        raise FanError(f"overlay {overlay} holds address {addr.ip} of "
                                       f"{iface.name} on this host; pick an overlay that no "
                                       "local network uses")
            state.pools[pid] = Pool(
                overlay=str(overlay), underlay=str(underlay.network),
                underlay_address=str(underlay.address), interface=underlay.interface,
                mtu=underlay.mtu, addresses={})
            log.info("pool %s: host %s owns slice %s", overlay, underlay.address,
                     fan.slice_for(underlay.address))
        self.faults.check("request_pool:after_state")
        return PoolGranted(pool_id=pid, pool=overlay)

    async def release_pool(self, request: PoolRef) -> None:
        pid = request.pool_id
        async with self.ledger.change() as state:
            nid = state.network_of_pool(pid)
            if nid is None:
                state.pools.pop(pid, None)
            elif self.network is not None:
                # Docker releases a network's pool once it is done with the network:
                # just before DeleteNetwork when removing it (and it ignores
                # DeleteNetwork's errors), or when it gave up creating it (because
                # CreateNetwork failed, if only as far as Docker could tell).
                await self.network.remove_network(state, nid)
        self.faults.check("release_pool:after_state")

    async def request_address(self, request: AddressRequest) -> AddressGranted:
        async with self.ledger.change() as state:
            pool = self._pool(state, request.pool_id)
            slice_ = pool.host_slice
            if request.gateway:
                if request.address is not None and request.address != slice_.gateway.ip:
                    raise FanError(f"the fan's gateway is always {slice_.gateway.ip}; "
                                   "drop --gateway")
                chosen = slice_.gateway
                pool.addresses[str(chosen.ip)] = Owner.GATEWAY
            else:
                name = kept_name(request.name)
                chosen = IPv4Interface((allocate(pool, request.address, name),
                                        slice_.slice.prefixlen))
                remember(pool, str(chosen.ip), name)
                pool.addresses[str(chosen.ip)] = Owner.PENDING
        self.faults.check("request_address:after_state")
        return AddressGranted(chosen)

    async def release_address(self, request: AddressRelease) -> None:
        pid, ip = request.pool_id, str(request.address)
        self.faults.check("release_address:before_state")
        async with self.ledger.change() as state:
            pool = state.pools.get(pid)
            if pool is None:
                return
            owner = pool.addresses.get(ip)
            nid = state.network_of_pool(pid)
            if (self.network is not None and nid is not None and owner
                    and owner in state.networks[nid].endpoints):
                # DeleteEndpoint normally lets go of the address first. An endpoint
                # that still holds it is one Docker gave up on: its CreateEndpoint
                # failed as far as Docker could tell (the plugin crashed before
                # answering), or its DeleteEndpoint did (Docker ignores that).
                log.warning("address %s released while endpoint %s holds it: removing "
                            "the endpoint", ip, short_id(owner))
                await self.network.remove_endpoint(state, nid, owner)
            if pool.addresses.pop(ip, None) is not None:
                seen_leaving(pool, ip)
        self.faults.check("release_address:after_state")

    @staticmethod
    def _pool(state, pid: str) -> Pool:
        try:
            return state.pools[pid]
        except KeyError:
            raise NotFound(f"no fan pool {pid!r}; was the network created with "
                           "--ipam-driver fan?") from None

