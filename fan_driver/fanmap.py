"""The Fan's address arithmetic: pure, no I/O.

An overlay block of prefix length O is shared out among the hosts of an
underlay block of prefix length U. Each host owns the slice of the overlay
whose extra H = 32 - U bits are the host bits of its underlay address, so the
slice length is O + H, and a packet's outer destination is computed back from
its inner destination alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from .errors import FanError

# LXD and fanctl insist on at least 8 bits of room for containers per host.
MIN_CONTAINER_BITS = 8
IFNAME_MAX = 15
# "This network", loopback, link-local, multicast and the limited broadcast.
UNUSABLE = tuple(IPv4Network(n) for n in
                 ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32"))


@dataclass(frozen=True)
class FanMap:
    overlay: IPv4Network
    underlay: IPv4Network

    def __post_init__(self) -> None:
        for unusable in UNUSABLE:
            if self.overlay.overlaps(unusable):
                raise FanError(f"overlay {self.overlay} overlaps {unusable}, whose addresses "
                               "cannot be given to containers; use e.g. 250.0.0.0/8")
        if self.overlay.overlaps(self.underlay):
            raise FanError(
                f"overlay {self.overlay} overlaps underlay {self.underlay}: "
                "pick an overlay outside the underlay, e.g. 250.0.0.0/8")
        if self.slice_prefixlen > 32 - MIN_CONTAINER_BITS:
            raise FanError(
                f"overlay {self.overlay} is too small for underlay {self.underlay}: "
                f"each of its {2 ** self.host_bits} hosts would get a "
                f"/{self.slice_prefixlen}, leaving fewer than {MIN_CONTAINER_BITS} bits "
                f"for containers; use an overlay of at most "
                f"/{32 - MIN_CONTAINER_BITS - self.host_bits} (e.g. 250.0.0.0/8)")

    @property
    def host_bits(self) -> int:
        return 32 - self.underlay.prefixlen

    @property
    def slice_prefixlen(self) -> int:
        return self.overlay.prefixlen + self.host_bits

    @property
    def shift(self) -> int:
        """How far a host number is shifted left to land in the overlay."""
        return 32 - self.slice_prefixlen

    def host_number(self, underlay_addr: IPv4Address) -> int:
        if underlay_addr not in self.underlay:
            raise FanError(f"{underlay_addr} is not in underlay {self.underlay}")
        return int(underlay_addr) & int(self.underlay.hostmask)

    def slice_for(self, underlay_addr: IPv4Address) -> IPv4Network:
        """The overlay slice owned by the host at underlay_addr."""
        base = int(self.overlay.network_address) | (self.host_number(underlay_addr) << self.shift)
        return IPv4Network((base, self.slice_prefixlen))

    def peers(self, underlay_addr: IPv4Address):
        """Every other usable host of the underlay, with its slice."""
        for peer in self.underlay.hosts():
            if peer != underlay_addr:
                yield peer, self.slice_for(peer)


@dataclass(frozen=True)
class HostSlice:
    """This host's place in a fan: what the IPAM and the dataplane agree on."""
    fan: FanMap
    underlay_addr: IPv4Address

    @property
    def slice(self) -> IPv4Network:
        return self.fan.slice_for(self.underlay_addr)

    @property
    def gateway(self) -> IPv4Interface:
        return IPv4Interface((int(self.slice.network_address) + 1, self.slice.prefixlen))

    @property
    def bridge_name(self) -> str:
        return bridge_name(self.slice)


def bridge_name(slice_: IPv4Network) -> str:
    """fanctl's convention: the bridge is named after the slice's leading octets.

    Octets that are zero in the slice's host part are dropped from the tail, as
    fanctl does (250.0.28.0/24 -> fan-250-0-28); the name always fits the
    kernel's 15 characters.
    """
    octets = str(slice_.network_address).split(".")
    keep = max(1, (slice_.prefixlen + 7) // 8)
    name = "fan-" + "-".join(octets[:keep])
    if len(name) > IFNAME_MAX:
        name = "fan-" + format(int(slice_.network_address), "08x")[: IFNAME_MAX - 4]
    return name
