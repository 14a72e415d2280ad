"""What a fan network's encapsulation is to the rest of the plugin: one
declared interface, one module per encapsulation (registered in __init__.py).

The kernel probe, the peer mappings, the firewall and the eBPF programs ask an
Encapsulation what they need instead of comparing names, so a new one is a
module here, a line in the registry and its value in bpf/fan.h's enum.
Implementations subclass the protocol, so a missing method makes them
impossible to instantiate; they hold no state. Arguments are plain values, not
a NetworkPlan: plan.py refers to this module, not the other way round.
"""
from __future__ import annotations

from abc import abstractmethod
from ipaddress import IPv4Address, IPv4Network
from typing import Dict, List, Optional, Protocol, Tuple

# Every mapping=routes device's name starts so: routes.py finds orphans by it.
ROUTES_DEVICE_PREFIX = "fanr-"
# The iptables match of packets to one of this host's own addresses.
TO_THIS_HOST = ["-m", "addrtype", "--dst-type", "LOCAL"]


class Encapsulation(Protocol):
    """How a fan network's packets travel between hosts (IPIP, VXLAN)."""
    name: str                    # the network option's value encap=NAME, and the link kind
    overhead: int                # bytes of outer headers per packet
    inner_ip_offset: int         # where the inner IPv4 header starts in a packet on the device
    bpf_encap: int               # its value of bpf/fan.h's enum fan_encap
    udp_ports: Tuple[int, ...]   # the UDP ports its devices use by default (none: not over UDP)
    device: str                  # the shared external-mode device (mapping=ebpf) on the default port
    device_mac: Optional[str]    # the MAC that device has on every host (None: no Ethernet)
    receive_shortcut: bool       # fan_decap can take its packets straight off the underlay
    routes_device_shared: bool   # mapping=routes: one device for all networks, not one each

    @property
    def l2(self) -> bool:
        """Whether the device's packets carry an inner Ethernet header."""
        return self.inner_ip_offset > 0

    @abstractmethod
    def probe_spec(self) -> Dict[str, object]:
        """The attributes of a throwaway device (pyroute2's link "add") whose
        creation tells whether this kernel has the encapsulation."""

    @abstractmethod
    def external_device(self, port: Optional[int]) -> str:
        """The name of the shared external-mode device of the networks on UDP
        `port` (None: not over UDP): one device per port in use."""

    @abstractmethod
    def is_external_device(self, name: str) -> bool:
        """Whether `name` is one of its external_device names, whatever the port."""

    @abstractmethod
    def external_spec(self, port: Optional[int]) -> Dict[str, object]:
        """The attributes of the shared external-mode (collect_md) device on
        `port`, whose packets' outer addresses the eBPF mapping sets."""

    @abstractmethod
    def routes_device(self, vni: int) -> str:
        """The name of the mapping=routes device of the network with `vni`."""

    @abstractmethod
    def routes_spec(self, vni: int, local: IPv4Address, underlay_index: int,
                    port: Optional[int]) -> Dict[str, object]:
        """The attributes of the mapping=routes device: this host's underlay
        address as `local`, no remote, UDP `port`."""

    @abstractmethod
    def next_hop(self, peer: IPv4Address, slice_: IPv4Network) -> IPv4Address:
        """Where mapping=routes routes the slice of the host `peer`."""

    @abstractmethod
    def peer_requests(self, index: int, peer: IPv4Address, hop: IPv4Address) -> List[tuple]:
        """The netlink requests (netlink.Rtnl) a peer needs on the mapping=routes
        device `index` before its route through `hop`."""

    @abstractmethod
    def fan_map_data(self, vni: int, local: IPv4Address, underlay_index: int,
                     port: Optional[int]) -> List[bytes]:
        """The device's IFLA_INFO_DATA attributes, before the kernel fan map's
        (Ubuntu's patch), of a device with no remote address on UDP `port`."""

    @abstractmethod
    def tunnel_match(self, vni: int, overlay: IPv4Network, port: Optional[int]) -> List[str]:
        """The iptables match, as `iptables -S` prints it, of the network's
        tunnel packets (on UDP `port`) to this host: what the firewall accepts
        only from the underlay."""
