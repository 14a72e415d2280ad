"""The NetworkDriver: turns Docker's network and endpoint calls into a fan on this host."""
from __future__ import annotations

import logging
from ipaddress import IPv4Interface
from typing import Awaitable, Callable, Optional

from .config import HostFacts, NetworkOptions, parse_cidr, resolve_underlay
from .dataplane import Dataplane, choose
from .dataplane.plan import ENCAPS, NetworkPlan
from .errors import FanError, NotFound
from .host import KernelFeatures
from .ipam import ADDRESS_SPACE
from .ledger import Ledger
from .model import Endpoint, Network, State, mac_for, pool_id, short_id

log = logging.getLogger(__name__)

GENERIC_OPTIONS = "com.docker.network.generic"
CREATE_HINT = ("docker network create -d fan --ipam-driver fan --subnet 250.0.0.0/8 "
               "[--ipam-opt underlay=172.30.0.0/16] NAME")


def plan_for(state: State, network_id: str) -> NetworkPlan:
    net = state.networks[network_id]
    pool = state.pools[net.pool_id]
    return NetworkPlan(network_id=network_id, host=pool.host_slice,
                       underlay_interface=pool.interface, mtu=net.mtu,
                       encap=ENCAPS[net.encap], mapping=net.mapping, tc_pref=net.tc_pref)


class NetworkDriver:
    def __init__(self, ledger: Ledger, dataplane: Dataplane, features: KernelFeatures,
                 read_facts: Callable[[], Awaitable[HostFacts]], default_encap: str = "auto"):
        self.ledger = ledger
        self.dataplane = dataplane
        self.features = features
        self.read_facts = read_facts
        self.default_encap = default_encap

    async def capabilities(self) -> dict:
        return {"Scope": "local", "ConnectivityScope": "global"}

    async def create_network(self, network_id: str, options: dict, ipv4_data: list,
                             ipv6_data: list) -> dict:
        opts = NetworkOptions.parse((options or {}).get(GENERIC_OPTIONS))
        if ipv6_data:
            raise FanError("the fan is IPv4 only; create the network without --ipv6")
        async with self.ledger.change() as state:
            if network_id in state.networks:
                raise FanError(f"network {short_id(network_id)} already exists")
            pid = self._claim_pool(state, ipv4_data)
            pool = state.pools[pid]
            if opts.underlay is not None:
                await self._check_underlay(opts, pool)
            if opts.host_reserve + 2 >= pool.host_slice.slice.num_addresses:
                raise FanError(f"host_reserve={opts.host_reserve} leaves no container address "
                               f"in slice {pool.host_slice.slice}")
            pool.host_reserve = opts.host_reserve
            encap, mapping = choose(
                opts.encap if opts.encap != "auto" else self.default_encap, opts.mapping,
                self.features)
            state.networks[network_id] = Network(
                pool_id=pid, encap=encap.name, mapping=mapping,
                mtu=self._mtu(opts, pool.mtu, encap.overhead, pool.interface),
                tc_pref=min(set(range(1, len(state.networks) + 2))
                            - {n.tc_pref for n in state.networks.values()}))
            plan = plan_for(state, network_id)
            await self.dataplane.ensure_network(plan)
        log.info("network %s: bridge %s slice %s over %s via %s/%s, mtu %d",
                 short_id(network_id), plan.bridge, plan.slice, pool.underlay,
                 encap.name, mapping, plan.mtu)
        return {}

    @staticmethod
    def _claim_pool(state: State, ipv4_data: list) -> str:
        data = ipv4_data[0] if ipv4_data else {}
        if not isinstance(data, dict):
            raise FanError("IPv4Data must be a list of objects")
        pid = pool_id(parse_cidr(data.get("Pool", ""), "subnet")) if data.get("Pool") else ""
        if data.get("AddressSpace") != ADDRESS_SPACE or pid not in state.pools:
            raise FanError(
                "a fan network needs the fan IPAM driver, which gives each host its own "
                "slice of the overlay (Docker's default IPAM would give every host the same "
                f"addresses); create it with: {CREATE_HINT}")
        other = state.network_of_pool(pid)
        if other is not None:
            raise FanError(f"overlay {data['Pool']} is already used by fan network "
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

    async def delete_network(self, network_id: str) -> dict:
        async with self.ledger.change() as state:
            if network_id not in state.networks:
                return {}
            plan = plan_for(state, network_id)
            net = state.networks.pop(network_id)
            await self.dataplane.remove_network(plan, list(net.endpoints))
            state.pools.pop(net.pool_id, None)
        log.info("network %s removed", short_id(network_id))
        return {}

    async def create_endpoint(self, network_id: str, endpoint_id: str,
                              interface: Optional[dict]) -> dict:
        interface = interface or {}
        if interface.get("AddressIPv6"):
            raise FanError("the fan is IPv4 only; drop --ip6")
        async with self.ledger.change() as state:
            net = self._network(state, network_id)
            plan = plan_for(state, network_id)
            address = _endpoint_address(interface.get("Address"), plan)
            mac = interface.get("MacAddress") or mac_for(address)
            await self.dataplane.attach(plan, endpoint_id, mac)
            net.endpoints[endpoint_id] = Endpoint(address=str(address), mac=mac)
            pool = state.pools[net.pool_id]
            pool.addresses[str(address.ip)] = endpoint_id
        log.info("endpoint %s on %s: %s", short_id(endpoint_id), short_id(network_id), address)
        return {"Interface": {} if interface.get("MacAddress") else {"MacAddress": mac}}

    async def delete_endpoint(self, network_id: str, endpoint_id: str) -> dict:
        async with self.ledger.change() as state:
            net = state.networks.get(network_id)
            if net is None or endpoint_id not in net.endpoints:
                return {}
            await self.dataplane.detach(endpoint_id)
            endpoint = net.endpoints.pop(endpoint_id)
            addresses = state.pools[net.pool_id].addresses
            ip = str(IPv4Interface(endpoint.address).ip)
            if addresses.get(ip) == endpoint_id:
                addresses[ip] = ""   # Docker releases the address itself next
        log.info("endpoint %s removed", short_id(endpoint_id))
        return {}

    async def endpoint_info(self, network_id: str, endpoint_id: str) -> dict:
        async with self.ledger.read() as state:
            endpoint = self._endpoint(state, network_id, endpoint_id)
            return {"Value": {"Address": endpoint.address, "MacAddress": endpoint.mac,
                              "HostInterface": Endpoint.host_ifname(endpoint_id)}}

    async def join(self, network_id: str, endpoint_id: str) -> dict:
        async with self.ledger.read() as state:
            self._endpoint(state, network_id, endpoint_id)
            plan = plan_for(state, network_id)
            # Rules are cheap to check, and something may have flushed them.
            await self.dataplane.ensure_rules(plan)
        return {"InterfaceName": {"SrcName": Endpoint.container_ifname(endpoint_id),
                                  "DstPrefix": "eth"},
                "Gateway": str(plan.gateway.ip), "StaticRoutes": [],
                "DisableGatewayService": False}

    async def leave(self, network_id: str, endpoint_id: str) -> dict:
        return {}

    async def restore(self) -> None:
        """After a restart or a reboot: make the kernel match the state, both ways."""
        async with self.ledger.read() as state:
            plans = [plan_for(state, nid) for nid in state.networks]
            endpoints = {eid for net in state.networks.values() for eid in net.endpoints}
            await self.dataplane.remove_orphans(plans, endpoints)
            for plan in plans:
                await self.dataplane.ensure_network(plan)
                log.info("network %s restored: bridge %s", short_id(plan.network_id), plan.bridge)

    @staticmethod
    def _network(state: State, network_id: str) -> Network:
        try:
            return state.networks[network_id]
        except KeyError:
            raise NotFound(f"no fan network {short_id(str(network_id))}") from None

    def _endpoint(self, state: State, network_id: str, endpoint_id: str) -> Endpoint:
        try:
            return self._network(state, network_id).endpoints[endpoint_id]
        except KeyError:
            raise NotFound(f"no endpoint {short_id(str(endpoint_id))} on fan network "
                           f"{short_id(network_id)}") from None


def _endpoint_address(text: Optional[str], plan: NetworkPlan) -> IPv4Interface:
    if not text:
        raise FanError("the endpoint has no address: fan networks take addresses from "
                       f"the fan IPAM; create the network with: {CREATE_HINT}")
    try:
        address = IPv4Interface(text)
    except ValueError:
        raise FanError(f"endpoint address {text!r} is not an IPv4 address") from None
    if address.ip not in plan.slice:
        raise FanError(f"endpoint address {address} is outside this host's slice {plan.slice}")
    return address
