"""The kernel side of a fan network: bridge, veths, tunnel mapping, firewall.

`Dataplane` states intent (ensure a network, attach an endpoint) and every step
is idempotent, so the same calls create a network, repair it after a crash and
restore it after a reboot. How the tunnel finds a peer is one of the
mechanisms (base.PeerMapping, in mapping/) the plugin's wiring
(cli.peer_mappings) hands to LinuxDataplane; how packets travel between hosts
is one of the encapsulations (encap.Encapsulation, in encap/). `choose` picks
one of each.
"""
from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from ipaddress import IPv4Address
from pathlib import Path
from typing import Dict, Iterable, Mapping, Sequence, Set, Tuple

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import FanError
from ..config import PEER_MAPPINGS
from ..hostfacts import KernelFeatures
from ..model import Endpoint
from ..ports import Held, PortBinding, PortRequest
from .base import Dataplane, Firewall, PeerMapping
from .encap import ENCAPS, Encapsulation, encap_named, supported
from .netlink import Links
from .plan import NetworkPlan
from .proxy import UserlandProxy
from .publish import Publisher

log = logging.getLogger(__name__)
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def choose(encap: str, mapping: str, receive: str,
           features: KernelFeatures) -> Tuple[Encapsulation, str, str]:
    """The encapsulation, peer mapping and receive path for a request on this
    kernel: the kernel's own fan map where present, else eBPF, else per-peer
    routes; the first encapsulation of encap.ENCAPS the kernel has (IPIP, 20
    bytes of overhead against VXLAN's 50); VXLAN received straight from the
    underlay for flows conntrack has seen pass the host's firewall, where the
    kernel can look them up."""
    if mapping == "auto":
        mapping = next(m for m in PEER_MAPPINGS if _mapping_supported(m, features))
    elif mapping not in PEER_MAPPINGS:
        raise FanError(f"mapping={mapping} is not available in this version of fan-driver; "
                       f"use one of: {', '.join(sorted(PEER_MAPPINGS))} or auto")
    elif not _mapping_supported(mapping, features):
        raise FanError(f"this kernel cannot do mapping={mapping} ({features.describe()}); "
                       "use mapping=auto, and run `fan-driver check` for details")
    chosen = _choose_encap(encap, features)
    return chosen, mapping, _choose_receive(receive, chosen, mapping, features)


def _choose_encap(name: str, features: KernelFeatures) -> Encapsulation:
    if name == "auto":
        usable = [e for e in ENCAPS.values() if supported(e, features)]
        if not usable:
            raise FanError(f"this kernel can create none of the fan's tunnel devices "
                           f"({', '.join(ENCAPS)}); run `fan-driver check` for details")
        return usable[0]
    chosen = encap_named(name)
    if not supported(chosen, features):
        others = " or ".join(f"encap={other}" for other in ENCAPS if other != name)
        raise FanError(f"this kernel cannot create {name} devices; use encap=auto or {others}")
    return chosen


def _choose_receive(receive: str, encap: Encapsulation, mapping: str,
                    features: KernelFeatures) -> str:
    shortcut = mapping == "ebpf" and encap.receive_shortcut
    if receive == "auto":
        return "conntrack" if shortcut and features.conntrack_lookup else "tunnel"
    if receive != "tunnel" and not shortcut:
        able = " or ".join(f"encap={e.name}" for e in ENCAPS.values() if e.receive_shortcut)
        raise FanError(f"receive={receive} needs mapping=ebpf and {able} (this network "
                       f"has mapping={mapping}, encap={encap.name}); use receive=tunnel or auto")
    if receive == "conntrack" and not features.conntrack_lookup:
        raise FanError("this kernel's eBPF programs cannot look up conntrack entries "
                       "(Linux 6.0 and later can): use receive=tunnel, or receive=direct "
                       "if the host's INPUT chain need not see tunnel traffic")
    return receive


def _mapping_supported(mapping: str, features: KernelFeatures) -> bool:
    return {"kernel": features.fan_map, "ebpf": features.ebpf, "routes": True}[mapping]


class LinuxDataplane(Dataplane):
    def __init__(self, ipr: AsyncIPRoute, firewall: Firewall,
                 mappings: Mapping[str, PeerMapping]):
        self.links = Links(ipr)
        self.firewall = firewall
        self.mappings = mappings   # name -> mechanism, one of each in PEER_MAPPINGS
        self.ports = Publisher(firewall, UserlandProxy())

    async def _ensure_rules(self, plan: NetworkPlan) -> None:
        await self.firewall.ensure_network(plan, self.mappings[plan.mapping].tunnel_device(plan))

    async def ensure_network(self, plan: NetworkPlan, undo_on_failure: bool = True) -> None:
        """Bridge, tunnel and rules; on failure, whatever was done is undone
        (unless the network is in use: restoring must not break what works)."""
        async with AsyncExitStack() as undo:
            if undo_on_failure:
                undo.push_async_callback(self._undo, plan)
            await self.links.ensure_bridge(plan.bridge, plan.gateway, plan.mtu, plan.mark)
            await self.mappings[plan.mapping].ensure(self.links, plan)
            await self._ensure_rules(plan)
            undo.pop_all()
        _enable_forwarding()

    async def reattach(self, plan: NetworkPlan, endpoints: Dict[str, Endpoint]) -> None:
        """Put the endpoints' veths that still exist back on the bridge (after
        the bridge was made again) and into the mapping's per-container state;
        those of vanished containers are gone."""
        bridge = await self.links.index(plan.bridge)
        for endpoint_id, endpoint in endpoints.items():
            index = await self.links.index(Endpoint.host_ifname(endpoint_id))
            if index is None:
                continue
            try:
                await self.links.ipr.link("set", index=index, master=bridge, state="up")
                await self.mappings[plan.mapping].attach_endpoint(self.links, plan, index,
                                                                  endpoint)
            except (NetlinkError, FanError) as exc:
                log.warning("cannot re-attach %s to %s: %s", Endpoint.host_ifname(endpoint_id),
                            plan.bridge, exc)

    async def _undo(self, plan: NetworkPlan) -> None:
        """Undo a failed ensure_network without hiding why it failed."""
        try:
            await self.remove_network(plan, ())
        except FanError as exc:
            log.warning("undoing network %s: %s", plan.network_id[:12], exc)

    async def ensure_rules(self, plan: NetworkPlan) -> None:
        await self._ensure_rules(plan)

    async def remove_network(self, plan: NetworkPlan, endpoint_ids: Iterable[str]) -> None:
        for endpoint_id in endpoint_ids:
            await self.detach(endpoint_id)
        await self.firewall.remove_network(plan)
        await self.mappings[plan.mapping].remove(self.links, plan)
        await self.links.delete(plan.bridge)

    async def attach(self, plan: NetworkPlan, endpoint_id: str, endpoint: Endpoint) -> None:
        bridge = await self.links.index(plan.bridge)
        if bridge is None:
            raise FanError(f"bridge {plan.bridge} of network {plan.network_id[:12]} is missing; "
                           "restart fan-driver to restore it")
        index = await self.links.ensure_veth(Endpoint.host_ifname(endpoint_id),
                                             Endpoint.container_ifname(endpoint_id),
                                             plan.mtu, endpoint.mac, bridge, plan.mark)
        try:
            await self.mappings[plan.mapping].attach_endpoint(self.links, plan, index, endpoint)
        except BaseException:
            await self.detach(endpoint_id)   # Docker sees the failure: leave nothing
            raise

    def forget(self, plan: NetworkPlan, endpoint: Endpoint) -> None:
        """No more traffic handed to the endpoint: first of its removal."""
        self.mappings[plan.mapping].detach_endpoint(plan, endpoint)

    async def detach(self, endpoint_id: str) -> None:
        await self.links.delete(Endpoint.host_ifname(endpoint_id))

    async def publish(self, plan: NetworkPlan, endpoint_id: str, container: IPv4Address,
                      requests: Sequence[PortRequest], held: Held) -> Tuple[PortBinding, ...]:
        return await self.ports.publish(plan, endpoint_id, container, requests, held)

    async def unpublish(self, plan: NetworkPlan, endpoint_id: str,
                        bindings: Sequence[PortBinding]) -> None:
        await self.ports.unpublish(plan, endpoint_id, bindings)

    async def restore_ports(self, plan: NetworkPlan, endpoint_id: str, container: IPv4Address,
                            bindings: Sequence[PortBinding]) -> None:
        await self.ports.restore(plan, endpoint_id, container, bindings)

    async def remove_orphans(self, plans: Iterable[NetworkPlan], endpoint_ids: Set[str],
                             published: Set[str] = frozenset()) -> None:
        """Delete what we made that no network in the state accounts for: marked
        interfaces, marked rules (and our chains once empty; port rules of
        endpoints that publish none), and on the tunnel devices networks share,
        other networks' filters and routes."""
        plans = list(plans)
        wanted = {Endpoint.host_ifname(e) for e in endpoint_ids}
        wanted |= {p.bridge for p in plans}
        wanted |= {self.mappings[p.mapping].tunnel_device(p) for p in plans}
        for mapping in self.mappings.values():   # first: a device's routes go faster in bulk
            await mapping.remove_orphans(self.links, [p for p in plans if p.mapping == mapping.name])
        for name in await self.links.marked():
            if name not in wanted:
                log.warning("removing orphan interface %s", name)
                await self.links.delete(name)
        known = {p.mark for p in plans}
        known |= {p.endpoint_mark(e) for p in plans for e in published}
        await self.firewall.sweep(known)


def _enable_forwarding() -> None:
    """The fan routes between bridge and tunnel. dockerd turns forwarding on too;
    inside a managed plugin /proc/sys is read-only, so only warn."""
    try:
        if IP_FORWARD.read_text().strip() != "1":
            IP_FORWARD.write_text("1")
    except OSError as exc:
        log.warning("cannot turn on IPv4 forwarding (%s): containers cannot leave the host", exc)
