"""What this host is, as the drivers see it: its interfaces, addresses and
routes (HostFacts), what its kernel can do (KernelFeatures), and the underlay an
UnderlaySpec names on it (resolve_underlay). Plain values, no I/O: host.py reads
them from the kernel."""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Optional

from .config import UnderlaySpec
from .errors import FanError


@dataclass(frozen=True)
class Interface:
    name: str
    mtu: int
    addresses: tuple  # of IPv4Interface


@dataclass(frozen=True)
class HostFacts:
    """What the host's network looks like: read by `host.read_facts`."""
    interfaces: tuple  # of Interface
    default_interface: Optional[str]
    routes: tuple  # of IPv4Network, the main table's destinations other than default

    def interface(self, name: str) -> Interface:
        for iface in self.interfaces:
            if iface.name == name:
                return iface
        known = ", ".join(sorted(i.name for i in self.interfaces))
        raise FanError(f"unknown interface {name!r} in underlay; this host has: {known}")


@dataclass(frozen=True)
class KernelFeatures:
    """What the host's kernel can do: probed by `host.probe_kernel`."""
    fan_map: bool   # Ubuntu's fan patch: the tunnel computes the outer address itself
    ipip: bool
    vxlan: bool
    ebpf: bool      # tc programs that set tunnel keys on external-mode devices
    conntrack_lookup: bool = False   # tc programs that find conntrack entries (receive=conntrack)

    def describe(self) -> str:
        return ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in vars(self).items())


@dataclass(frozen=True)
class Underlay:
    """The underlay as resolved on this host: our address in it and the link it is on."""
    network: IPv4Network
    address: IPv4Address
    interface: str
    mtu: int


def resolve_underlay(spec: UnderlaySpec, facts: HostFacts) -> Underlay:
    if spec.network is not None:
        for iface in facts.interfaces:
            for addr in iface.addresses:
                if addr.ip in spec.network:
                    return Underlay(spec.network, addr.ip, iface.name, iface.mtu)
        raise FanError(
            f"underlay {spec.text} matches no address on this host: give the block that "
            "holds one of this host's addresses, or an interface (eth0/16)")
    name = spec.interface
    if name == "default":
        if facts.default_interface is None:
            raise FanError(
                f"underlay {spec.text}: this host has no default route; name the "
                "underlay explicitly (--ipam-opt underlay=172.30.0.0/16 or eth0/16)")
        name = facts.default_interface
    iface = facts.interface(name)
    if not iface.addresses:
        raise FanError(f"underlay {spec.text}: interface {name} has no IPv4 address")
    addr: IPv4Interface = iface.addresses[0]
    network = IPv4Network((addr.ip, spec.prefixlen), strict=False)
    return Underlay(network, addr.ip, iface.name, iface.mtu)
