"""What the network driver asks of the kernel side, and what the dataplane asks
of a peer-mapping mechanism and of a firewall: three declared interfaces.

Implementations subclass these protocols, so a missing or renamed method makes
the class impossible to instantiate (the methods are abstract), and
tests/unit/test_interfaces.py checks that no implementation, fakes included,
has public methods the protocol does not declare.
"""
from __future__ import annotations

from abc import abstractmethod
from ipaddress import IPv4Address
from typing import Dict, Iterable, List, Protocol, Sequence, Set, Tuple

from ..model import Endpoint
from ..ports import Held, PortBinding, PortRequest
from .dnat import ForeignDnat
from .netlink import Links
from .plan import NetworkPlan


class PeerMapping(Protocol):
    """How a network's tunnel finds the host of a remote overlay address: one
    mechanism (kernel fan map, eBPF, per-peer routes). Every step is idempotent."""
    name: str   # the network option's value: mapping=NAME

    @abstractmethod
    async def ensure(self, links: Links, plan: NetworkPlan) -> None:
        """The tunnel device and whatever maps peers onto it."""

    @abstractmethod
    async def remove(self, links: Links, plan: NetworkPlan) -> None:
        """Undo `ensure` for this network, keeping what other networks share."""

    @abstractmethod
    async def attach_endpoint(self, links: Links, plan: NetworkPlan, veth_index: int,
                              endpoint: Endpoint) -> None:
        """Per-container state, once the container's veth is on the bridge."""

    @abstractmethod
    def detach_endpoint(self, plan: NetworkPlan, endpoint: Endpoint) -> None:
        """No more traffic handed to the container: first of its removal."""

    @abstractmethod
    def tunnel_device(self, plan: NetworkPlan) -> str:
        """The name of the network's tunnel device."""

    @abstractmethod
    async def remove_orphans(self, links: Links, plans: List[NetworkPlan]) -> None:
        """What this mechanism made that `plans` (its networks in the state) do
        not account for, on devices that networks share."""


class Firewall(Protocol):
    """A fan network's packet filtering and NAT, stated as intent; one
    implementation per firewall backend. Everything it writes carries the
    network's mark (plan.mark), or for published ports the endpoint's under it,
    and only what carries a mark of ours is ever removed. Every step is idempotent."""

    @abstractmethod
    async def ensure_network(self, plan: NetworkPlan, tunnel_device: str) -> None:
        """The network's isolation from every other network on the host (fan or
        Docker's), its forwarding and egress NAT, and the guard on its tunnel:
        no tunnel traffic from outside the underlay, none sent by containers."""

    @abstractmethod
    async def remove_network(self, plan: NetworkPlan) -> None:
        """Every rule of the network, its endpoints' published ports included."""

    @abstractmethod
    async def ensure_ports(self, plan: NetworkPlan, endpoint_id: str, container: IPv4Address,
                           bindings: Sequence[PortBinding]) -> None:
        """The endpoint's published ports, exactly `bindings`: DNAT from the
        host's addresses, and what lets that traffic in."""

    @abstractmethod
    async def remove_ports(self, plan: NetworkPlan, endpoint_id: str) -> None:
        """The endpoint's published ports."""

    @abstractmethod
    async def foreign_dnat(self) -> List[ForeignDnat]:
        """The host ports other tools' DNAT rules forward: taken, as a listening
        socket makes a port taken."""

    @abstractmethod
    async def sweep(self, known_marks: Set[str]) -> None:
        """Every rule of ours whose mark is not in `known_marks`, and what then
        holds nothing."""


class Dataplane(Protocol):
    """The kernel side of fan networks, as the network driver sees it."""

    @abstractmethod
    async def ensure_network(self, plan: NetworkPlan, undo_on_failure: bool = True) -> None:
        """Bridge, tunnel and rules (again after a crash or a reboot)."""

    @abstractmethod
    async def reattach(self, plan: NetworkPlan, endpoints: Dict[str, Endpoint]) -> None:
        """The endpoints' surviving veths back on a bridge made again."""

    @abstractmethod
    async def ensure_rules(self, plan: NetworkPlan) -> None:
        """The network's firewall rules."""

    @abstractmethod
    async def remove_network(self, plan: NetworkPlan, endpoint_ids: Iterable[str]) -> None:
        """The network and its endpoints' veths."""

    @abstractmethod
    async def attach(self, plan: NetworkPlan, endpoint_id: str, endpoint: Endpoint) -> None:
        """A container's veth pair on the network's bridge."""

    @abstractmethod
    def forget(self, plan: NetworkPlan, endpoint: Endpoint) -> None:
        """No more traffic handed to the endpoint: first of its removal."""

    @abstractmethod
    async def detach(self, endpoint_id: str) -> None:
        """The endpoint's veth pair."""

    @abstractmethod
    async def publish(self, plan: NetworkPlan, endpoint_id: str, container: IPv4Address,
                      requests: Sequence[PortRequest], held: Held) -> Tuple[PortBinding, ...]:
        """Host ports for the requests (none of `held`) and their rules; all or nothing."""

    @abstractmethod
    async def unpublish(self, plan: NetworkPlan, endpoint_id: str,
                        bindings: Sequence[PortBinding]) -> None:
        """The endpoint's published ports and their rules."""

    @abstractmethod
    async def restore_ports(self, plan: NetworkPlan, endpoint_id: str, container: IPv4Address,
                            bindings: Sequence[PortBinding]) -> None:
        """Published ports again, as the state holds them (after a restart or a reboot)."""

    @abstractmethod
    async def remove_orphans(self, plans: Iterable[NetworkPlan], endpoint_ids: Set[str],
                             published: Set[str] = frozenset()) -> None:
        """What we made that no network in the state accounts for (port rules
        too, of endpoints not in `published`)."""
