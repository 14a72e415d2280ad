"""VXLAN: outer IPv4, UDP and VXLAN headers around an Ethernet frame (50
bytes); the network's VNI tells its packets apart.

The shared external-mode device (mapping=ebpf) is NOARP and has the same MAC
on every host: with NOARP the kernel uses the device's own MAC as the next
hop's, and since every host's device has that MAC the receiving device takes
the frame as addressed to it. (The program flips a bit of the inner source
MAC, because VXLAN drops frames whose source is its own MAC as loops.)
Learning is off: no FDB entries appear. Networks on another UDP port
(-o vxlan_port) share another such device, named after the port.

With mapping=routes each network has a device of its own, and per remote host
one permanent neighbour entry for its VTEP address and one permanent FDB
entry: every VTEP's MAC is derived from its underlay address, so all of it is
computed locally from the peer's address.
"""
from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network
from typing import Dict, List, Optional

from ...config import ROUTES_VXLAN_PORT, VXLAN_PORT
from ..netlink import attr, fdb_request, neighbour_request
from .base import ROUTES_DEVICE_PREFIX, TO_THIS_HOST, Encapsulation

SHARED_MAC = "0e:fa:00:00:00:01"
ATTRS = {"id": 1, "link": 3, "local": 4, "ttl": 5, "port": 15}   # IFLA_VXLAN_*


def vtep_mac(underlay: IPv4Address) -> str:
    return "0e:fb:" + ":".join(f"{b:02x}" for b in underlay.packed)


def vtep_address(slice_: IPv4Network) -> IPv4Address:
    """The next hop for a slice: its network address, as flannel uses."""
    return slice_.network_address


class Vxlan(Encapsulation):
    name = "vxlan"
    overhead = 50
    inner_ip_offset = 14
    bpf_encap = 1
    udp_ports = (VXLAN_PORT, ROUTES_VXLAN_PORT)
    device = "fan-vxlan"
    device_mac = SHARED_MAC
    receive_shortcut = True
    routes_device_shared = False

    def probe_spec(self) -> Dict[str, object]:
        return {"vxlan_id": 1, "vxlan_port": VXLAN_PORT}

    def external_device(self, port: Optional[int]) -> str:
        # fan-vxlan-65535 is 15 bytes, as long as an interface name may be
        return self.device if port == VXLAN_PORT else f"{self.device}-{port}"

    def is_external_device(self, name: str) -> bool:
        suffix = name[len(self.device) + 1:]
        return name == self.device or (name.startswith(self.device + "-") and suffix.isascii()
                                       and suffix.isdigit())

    def external_spec(self, port: Optional[int]) -> Dict[str, object]:
        return dict(vxlan_collect_metadata=1, vxlan_learning=0, vxlan_port=port,
                    address=SHARED_MAC)

    def routes_device(self, vni: int) -> str:
        return f"{ROUTES_DEVICE_PREFIX}{vni:06x}"

    def routes_spec(self, vni: int, local: IPv4Address, underlay_index: int,
                    port: Optional[int]) -> Dict[str, object]:
        return dict(vxlan_id=vni, vxlan_local=str(local), vxlan_link=underlay_index,
                    vxlan_port=port, vxlan_learning=0, address=vtep_mac(local))

    def next_hop(self, peer: IPv4Address, slice_: IPv4Network) -> IPv4Address:
        return vtep_address(slice_)

    def peer_requests(self, index: int, peer: IPv4Address, hop: IPv4Address) -> List[tuple]:
        mac = bytes.fromhex(vtep_mac(peer).replace(":", ""))
        return [neighbour_request(index, hop, mac), fdb_request(index, mac, peer)]

    def fan_map_data(self, vni: int, local: IPv4Address, underlay_index: int,
                     port: Optional[int]) -> List[bytes]:
        return [attr(ATTRS["id"], struct.pack("=I", vni)),
                attr(ATTRS["link"], struct.pack("=I", underlay_index)),
                attr(ATTRS["local"], local.packed),
                attr(ATTRS["port"], struct.pack("!H", port))]

    def tunnel_match(self, vni: int, overlay: IPv4Network, port: Optional[int]) -> List[str]:
        # the VNI (after the IPv4 header, whatever its length, and the 8 bytes of UDP)
        return ["-p", "udp", "-m", "udp", "--dport", str(port), *TO_THIS_HOST,
                "-m", "u32", "--u32", f"0x0>>0x16&0x3c@0xc>>0x8={vni:#x}"]


VXLAN = Vxlan()
