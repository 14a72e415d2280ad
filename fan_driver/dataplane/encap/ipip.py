"""IPIP: an outer IPv4 header around the inner packet (20 bytes), no Ethernet,
no VNI: networks tell their packets apart by the inner destination."""
from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network
from typing import Dict, List, Optional

from ..netlink import attr
from ..plan import OUTER_TTL
from .base import ROUTES_DEVICE_PREFIX, TO_THIS_HOST, Encapsulation

PROTOCOL = "4"   # IP protocol number, as iptables takes it
ATTRS = {"link": 1, "local": 2, "ttl": 4}   # IFLA_IPTUN_*


class Ipip(Encapsulation):
    name = "ipip"
    overhead = 20
    inner_ip_offset = 0
    bpf_encap = 0
    udp_ports = ()
    device = "fan-ipip"
    device_mac = None
    receive_shortcut = False
    routes_device_shared = True

    def probe_spec(self) -> Dict[str, object]:
        return {}

    def external_device(self, port: Optional[int]) -> str:
        return self.device

    def is_external_device(self, name: str) -> bool:
        return name == self.device

    def external_spec(self, port: Optional[int]) -> Dict[str, object]:
        return dict(ipip_collect_metadata=True)

    def routes_device(self, vni: int) -> str:
        return ROUTES_DEVICE_PREFIX + self.name   # never `tunl0`, which other tools share

    def routes_spec(self, vni: int, local: IPv4Address, underlay_index: int,
                    port: Optional[int]) -> Dict[str, object]:
        return dict(ipip_local=str(local), ipip_link=underlay_index, ipip_ttl=OUTER_TTL)

    def next_hop(self, peer: IPv4Address, slice_: IPv4Network) -> IPv4Address:
        return peer

    def peer_requests(self, index: int, peer: IPv4Address, hop: IPv4Address) -> List[tuple]:
        return []

    def fan_map_data(self, vni: int, local: IPv4Address, underlay_index: int,
                     port: Optional[int]) -> List[bytes]:
        return [attr(ATTRS["link"], struct.pack("=I", underlay_index)),
                attr(ATTRS["local"], local.packed),
                attr(ATTRS["ttl"], struct.pack("=B", OUTER_TTL))]

    def tunnel_match(self, vni: int, overlay: IPv4Network, port: Optional[int]) -> List[str]:
        # the inner header's destination (after the outer header, whatever its length)
        inner_destination = (f"0x0>>0x16&0x3c@0x10&{int(overlay.netmask):#x}="
                             f"{int(overlay.network_address):#x}")
        return ["-p", PROTOCOL, *TO_THIS_HOST, "-m", "u32", "--u32", inner_destination]


IPIP = Ipip()
