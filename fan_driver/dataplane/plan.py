"""What the kernel must hold for one fan network, derived from state. Pure."""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from ..fanmap import HostSlice
from ..model import short_id

# The mark on everything we create: we only ever delete what carries it.
MARK = "fan-driver"


@dataclass(frozen=True)
class Encap:
    name: str
    overhead: int          # bytes of outer headers per packet
    inner_ip_offset: int   # where the inner IPv4 header starts in a packet on the device
    device: str            # the shared external-mode device of this encapsulation

    @property
    def l2(self) -> bool:
        """Whether the device's packets carry an inner Ethernet header (VXLAN)."""
        return self.inner_ip_offset > 0


# IPIP adds an outer IPv4 header; VXLAN adds IPv4 + UDP + VXLAN + inner Ethernet.
IPIP = Encap("ipip", overhead=20, inner_ip_offset=0, device="fan-ipip")
VXLAN = Encap("vxlan", overhead=50, inner_ip_offset=14, device="fan-vxlan")
ENCAPS = {e.name: e for e in (IPIP, VXLAN)}
VXLAN_PORT = 4789
# The kernel's (and flannel's) VXLAN port: 4789 belongs to the eBPF mapping's
# external-mode device, whose socket a plain VXLAN device cannot share.
VXLAN_ROUTES_PORT = 8472
TUNNEL_UDP_PORTS = (VXLAN_PORT, VXLAN_ROUTES_PORT)
OUTER_TTL = 64   # of the outer IPv4 header, whichever device or program adds it


@dataclass(frozen=True)
class NetworkPlan:
    network_id: str
    host: HostSlice
    underlay_interface: str
    mtu: int
    encap: Encap
    mapping: str
    tc_pref: int
    internal: bool = False   # --internal: nothing leaves the overlay, nothing is published
    receive: str = "tunnel"  # tunnel | conntrack | direct (config.RECEIVES)

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
