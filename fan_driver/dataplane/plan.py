"""What the kernel must hold for one fan network, derived from state. Pure."""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TYPE_CHECKING, Optional

from ..fanmap import HostSlice
from ..model import short_id

if TYPE_CHECKING:   # the encapsulations' modules import this one
    from .encap.base import Encapsulation

# The mark on everything we create: we only ever delete what carries it.
MARK = "fan-driver"
OUTER_TTL = 64   # of the outer IPv4 header, whichever device or program adds it


@dataclass(frozen=True)
class NetworkPlan:
    network_id: str
    host: HostSlice
    underlay_interface: str
    mtu: int
    encap: Encapsulation
    mapping: str
    tc_pref: int
    internal: bool = False   # --internal: nothing leaves the overlay, nothing is published
    receive: str = "tunnel"  # tunnel | conntrack | direct (config.RECEIVES)
    vxlan_port: Optional[int] = None   # the UDP port of its tunnel (VXLAN only)

    @property
    def overlay(self) -> IPv4Network:
        return self.host.fan.overlay

    @property
    def slice(self) -> IPv4Network:
        return self.host.slice

    @property
    def gateway(self) -> IPv4Interface:
        return self.host.gateway

    @property
    def underlay_address(self) -> IPv4Address:
        return self.host.underlay_addr

    @property
    def bridge(self) -> str:
        return self.host.bridge_name

    @property
    def mark(self) -> str:
        return f"{MARK} {short_id(self.network_id)}"

    def endpoint_mark(self, endpoint_id: str) -> str:
        """The mark of an endpoint's published ports: under the network's."""
        return f"{self.mark} {short_id(endpoint_id)}"

    @property
    def vni(self) -> int:
        """VXLAN network identifier: the overlay's leading 24 bits, the same on every host."""
        return (int(self.overlay.network_address) >> 8) & 0xFFFFFF
