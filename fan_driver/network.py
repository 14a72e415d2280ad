"""The NetworkDriver: turns Docker's network and endpoint calls into a fan on this host.

Published ports are the PortPublisher's (publishing.py), and making the kernel
match the state after a restart the Reconciler's (reconcile.py); the IPAM
reaches this driver only as drivers.NetworkRemoval.
"""
from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Interface
from typing import Awaitable, Callable, Set, Tuple

from .config import NetworkOptions
from .dataplane import Dataplane, choose
from .dataplane.plan import NetworkPlan
from .drivers import NetworkDriverApi, NetworkRemoval
from .errors import FanError
from .faults import NO_FAULTS, Faults
from .hostfacts import HostFacts, KernelFeatures, resolve_underlay
from .ipam import ADDRESS_SPACE
from .ledger import Ledger
from .lookup import find_endpoint, find_network, plan_for
from .model import Endpoint, Network, Owner, State, mac_for, pool_id, short_id
from .protocol import (CreateEndpoint, CreateNetwork, EndpointCreated, EndpointInfo, EndpointRef,
                       ExternalConnectivity, GatewayAllocation, GatewayCheck, JoinInfo,
                       NetworkCapabilities, NetworkRef, StaticRoute)
from .publishing import PortPublisher

log = logging.getLogger(__name__)

CREATE_HINT = ("docker network create -d fan --ipam-driver fan --subnet 250.0.0.0/8 "
               "[--ipam-opt underlay=172.30.0.0/16] NAME (with the managed plugin on "
               "Docker 20.10: -d fan:latest --ipam-driver fan:latest)")


class NetworkDriver(NetworkDriverApi, NetworkRemoval):
    def __init__(self, ledger: Ledger, dataplane: Dataplane, features: KernelFeatures,
                 read_facts: Callable[[], Awaitable[HostFacts]], default_encap: str = "auto",
                 faults: Faults = NO_FAULTS):
        self.ledger = ledger
        self.dataplane = dataplane
        self.features = features
        self.read_facts = read_facts
        self.default_encap = default_encap
        self.faults = faults
        self.ports = PortPublisher(ledger, dataplane, faults)
        self._deleting: Set[asyncio.Task] = set()   # veths going away after the answer

    async def capabilities(self) -> NetworkCapabilities:
        # GwAllocChecker: Docker 28 asks GwAllocCheck before it requests any
        # address, which is the earliest point to refuse an IPv6-only network
        # (decoding the request refuses it).
        return NetworkCapabilities(scope="local", connectivity_scope="global",
                                   gateway_alloc_checker=True)

    async def gateway_allocation(self, request: GatewayCheck) -> GatewayAllocation:
        """A fan bridge always holds its slice's .1, so Docker reserves the gateway."""
        return GatewayAllocation(skip_ipv4=False, skip_ipv6=False)

    async def create_network(self, request: CreateNetwork) -> None:
        network_id, opts = request.network_id, request.options
        async with self.ledger.change() as state:
            if network_id in state.networks:
                raise FanError(f"network {short_id(network_id)} already exists")
            pid = self._claim_pool(state, request)
            pool = state.pools[pid]
            if opts.underlay is not None:
                await self._check_underlay(opts, pool)
            if opts.host_reserve + 2 >= pool.host_slice.slice.num_addresses:
                raise FanError(f"host_reserve={opts.host_reserve} leaves no container address "
                               f"in slice {pool.host_slice.slice}")
            pool.host_reserve = opts.host_reserve
            pool.unclaimed = False
            encap, mapping, receive = choose(
                opts.encap if opts.encap != "auto" else self.default_encap, opts.mapping,
                opts.receive, self.features)
            state.networks[network_id] = Network(
                pool_id=pid, encap=encap.name, mapping=mapping, receive=receive,
                vxlan_port=opts.vxlan_port_for(encap.name, mapping),
                mtu=self._mtu(opts, pool.mtu, encap.overhead, pool.interface),
                internal=request.internal,
                tc_pref=min(set(range(1, len(state.networks) + 2))
                            - {n.tc_pref for n in state.networks.values()}))
            plan = plan_for(state, network_id)
            await self.dataplane.ensure_network(plan)
            self.faults.check("create_network:after_kernel")
        self.faults.check("create_network:after_state")
        log.info("network %s: bridge %s slice %s over %s via %s/%s, receive %s, mtu %d%s",
                 short_id(network_id), plan.bridge, plan.slice, pool.underlay,
                 encap.name, mapping, receive, plan.mtu, ", internal" if plan.internal else "")

    @staticmethod
    def _claim_pool(state: State, request: CreateNetwork) -> str:
        pid = pool_id(request.pool) if request.pool is not None else ""
        if request.address_space != ADDRESS_SPACE or pid not in state.pools:
            raise FanError(
                "a fan network needs the fan IPAM driver, which gives each host its own "
                "slice of the overlay (Docker's default IPAM would give every host the same "
                f"addresses); create it with: {CREATE_HINT}")
        other = state.network_of_pool(pid)
        if other is not None:
            raise FanError(f"overlay {request.pool_as_sent} is already used by fan network "
                           f"{short_id(other)}")
        return pid

    async def _check_underlay(self, opts: NetworkOptions, pool) -> None:
        underlay = resolve_underlay(opts.underlay, await self.read_facts())
        if (str(underlay.network), str(underlay.address)) != (pool.underlay, pool.underlay_address):
            raise FanError(
                f"-o underlay={opts.underlay.text} gives underlay {underlay.network} "
                f"(host {underlay.address}) but the fan IPAM chose {pool.underlay} "
                f"(host {pool.underlay_address}): the IPAM only sees --ipam-opt, so give "
                f"the same value there: --ipam-opt underlay={opts.underlay.text}")

    @staticmethod
    def _mtu(opts: NetworkOptions, underlay_mtu: int, overhead: int, interface: str) -> int:
        largest = underlay_mtu - overhead
        if opts.mtu is None:
            return largest
        if opts.mtu > largest:
            raise FanError(f"mtu {opts.mtu} is too large: {interface} carries {underlay_mtu} "
                           f"bytes and the tunnel takes {overhead}, so at most {largest}")
        return opts.mtu

    async def delete_network(self, request: NetworkRef) -> None:
        async with self.ledger.change() as state:
            if request.network_id in state.networks:
                await self.remove_network(state, request.network_id)

    async def remove_network(self, state: State, network_id: str) -> None:
        """Forget a network and its pool, then remove its kernel objects; the
        caller holds the ledger (change()). The IPAM calls this too when Docker
        releases the pool: Docker does that just before DeleteNetwork (whose
        errors it ignores) or when it gave up creating the network."""
        plan = plan_for(state, network_id)
        net = state.networks.pop(network_id)
        state.pools.pop(net.pool_id, None)
        self.ledger.commit()
        for endpoint_id, endpoint in net.endpoints.items():
            await self.dataplane.unpublish(plan, endpoint_id, endpoint.ports)
        self.faults.check("delete_network:after_state")
        await self.dataplane.remove_network(plan, list(net.endpoints))
        self.faults.check("delete_network:after_kernel")
        log.info("network %s removed", short_id(network_id))

    async def create_endpoint(self, request: CreateEndpoint) -> EndpointCreated:
        network_id, endpoint_id = request.network_id, request.endpoint_id
        async with self.ledger.change() as state:
            net = find_network(state, network_id)
            plan = plan_for(state, network_id)
            address = _endpoint_address(request, plan)
            pool = state.pools[net.pool_id]
            owner = pool.addresses.get(str(address.ip))
            if owner not in (None, Owner.PENDING, Owner.UNCLAIMED, endpoint_id):
                raise FanError(f"address {address.ip} is already used by "
                               f"{owner if owner == Owner.GATEWAY else 'endpoint ' + short_id(owner)}")
            mac = request.mac or mac_for(address)
            endpoint = Endpoint(address=str(address), mac=mac)
            await self.dataplane.attach(plan, endpoint_id, endpoint)
            self.faults.check("create_endpoint:after_kernel")
            net.endpoints[endpoint_id] = endpoint
            pool.addresses[str(address.ip)] = endpoint_id
        self.faults.check("create_endpoint:after_state")
        log.info("endpoint %s on %s: %s", short_id(endpoint_id), short_id(network_id), address)
        return EndpointCreated(mac=None if request.mac else mac)

    async def delete_endpoint(self, request: EndpointRef) -> None:
        async with self.ledger.change() as state:
            net = state.networks.get(request.network_id)
            if net is not None and request.endpoint_id in net.endpoints:
                await self.remove_endpoint(state, request.network_id, request.endpoint_id)

    async def remove_endpoint(self, state: State, network_id: str, endpoint_id: str) -> None:
        """Forget an endpoint, then delete its veth; the caller holds the ledger.
        Its address stays taken until Docker releases it (the IPAM calls this
        too, when Docker releases an address an endpoint still holds).

        The veth is deleted after the answer: deleting one waits for the
        kernel's RCU grace period (15-20 ms), and `docker run --rm` waits for
        this answer. The state no longer has the endpoint, so a crash before
        the deletion leaves an orphan that the next start removes."""
        net = state.networks[network_id]
        endpoint = net.endpoints.pop(endpoint_id)
        addresses = state.pools[net.pool_id].addresses
        ip = str(endpoint.ip)
        if addresses.get(ip) == endpoint_id:
            addresses[ip] = Owner.PENDING   # Docker releases the address itself next
        self.ledger.commit()
        self.faults.check("delete_endpoint:after_state")
        plan = plan_for(state, network_id)
        if endpoint.ports:   # Docker revokes first; after a crash it may not have
            await self.dataplane.unpublish(plan, endpoint_id, endpoint.ports)
        self.dataplane.forget(plan, endpoint)
        task = asyncio.get_running_loop().create_task(self._delete_veth(endpoint_id))
        self._deleting.add(task)
        task.add_done_callback(self._deleting.discard)

    async def _delete_veth(self, endpoint_id: str) -> None:
        try:
            await self.dataplane.detach(endpoint_id)
        except FanError as exc:   # the next start's orphan sweep tries again
            log.error("endpoint %s: deleting its veth: %s", short_id(endpoint_id), exc)
            return
        self.faults.check("delete_endpoint:after_kernel")
        log.info("endpoint %s removed", short_id(endpoint_id))

    async def endpoint_info(self, request: EndpointRef) -> EndpointInfo:
        async with self.ledger.read() as state:
            endpoint = find_endpoint(state, request.network_id, request.endpoint_id)
            return EndpointInfo(address=IPv4Interface(endpoint.address), mac=endpoint.mac,
                                host_interface=Endpoint.host_ifname(request.endpoint_id),
                                ports=endpoint.ports)

    async def join(self, request: EndpointRef) -> JoinInfo:
        async with self.ledger.read() as state:
            find_endpoint(state, request.network_id, request.endpoint_id)
            plan = plan_for(state, request.network_id)
        # Rules are cheap to check, and something may have flushed them. Outside
        # the ledger: other requests need not wait for iptables (the firewall
        # serialises its own changes; Docker never removes a network while an
        # endpoint on it joins).
        await self.dataplane.ensure_rules(plan)
        self.faults.check("join:after_kernel")
        return JoinInfo(src_name=Endpoint.container_ifname(request.endpoint_id),
                        gateway=plan.gateway.ip, static_routes=_static_routes(plan))

    async def program_external_connectivity(self, request: ExternalConnectivity) -> None:
        await self.ports.publish(request)

    async def revoke_external_connectivity(self, request: EndpointRef) -> None:
        await self.ports.revoke(request)

    async def leave(self, request: EndpointRef) -> None:
        self.faults.check("leave:before_reply")


def _static_routes(plan: NetworkPlan) -> Tuple[StaticRoute, ...]:
    """On an --internal network the overlay is routed through the gateway: other
    hosts' slices stay reachable should Docker not route the default through it
    (its own bridge gives internal networks no gateway at all)."""
    if not plan.internal:
        return ()
    return (StaticRoute(destination=plan.overlay, next_hop=plan.gateway.ip),)


def _endpoint_address(request: CreateEndpoint, plan: NetworkPlan) -> IPv4Interface:
    address, text = request.address, request.address_as_sent
    if address is None:
        raise FanError("the endpoint has no address: fan networks take addresses from "
                       f"the fan IPAM; create the network with: {CREATE_HINT}")
    if address.ip not in plan.slice:
        raise FanError(f"endpoint address {address} is outside this host's slice {plan.slice}")
    if address.network.prefixlen != plan.slice.prefixlen:
        raise FanError(f"endpoint address {text} must carry the slice's prefix length "
                       f"/{plan.slice.prefixlen}, as the fan IPAM gives it")
    if address.ip in (plan.slice.network_address, plan.slice.broadcast_address):
        raise FanError(f"endpoint address {address.ip} is the network or broadcast address "
                       f"of slice {plan.slice}")
    return address
