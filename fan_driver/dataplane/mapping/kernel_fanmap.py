"""Peers found by the kernel itself: Ubuntu's Fan patch.

On a patched kernel (/proc/sys/net/fan/version exists) a tunnel device with no
remote address can carry a "fan map", and the kernel computes every packet's
outer destination from its inner one. pyroute2 does not know the attribute, so
the RTM_NEWLINK message is built here by hand; everything after creation (mark,
MTU, up, route) goes through pyroute2 as usual.
"""
from __future__ import annotations

import struct

from ...errors import KernelError
from ...fanmap import FanMap
from ...model import Endpoint
from ..base import PeerMapping
from ..netlink import (NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, Links, attr,
                       ifinfomsg, rtnl_message, rtnl_request)
from ..plan import MARK, NetworkPlan

RTM_NEWLINK = 16
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 3, 4, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
NLA_F_NESTED = 0x8000
FAN_MAP = 33          # IFLA_IPTUN_FAN_MAP and IFLA_VXLAN_FAN_MAP alike
FAN_MAPPING = 1       # IFLA_FAN_MAPPING


def _nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def fan_mapping(fan: FanMap) -> bytes:
    """struct ifla_fan_map { __be32 underlay; __be32 overlay; __u16 underlay_prefix;
    __u16 overlay_prefix; }"""
    return (fan.underlay.network_address.packed + fan.overlay.network_address.packed
            + struct.pack("=HH", fan.underlay.prefixlen, fan.overlay.prefixlen))


def newlink_message(name: str, plan: NetworkPlan, underlay_index: int) -> bytes:
    """The whole RTM_NEWLINK request for a fan-mapped tunnel device. Pure."""
    fan_map = _nested(FAN_MAP, attr(FAN_MAPPING, fan_mapping(plan.host.fan)))
    data = [*plan.encap.fan_map_data(plan.vni, plan.underlay_address, underlay_index,
                                     plan.vxlan_port), fan_map]
    body = (ifinfomsg()
            + attr(IFLA_IFNAME, name.encode() + b"\0")
            + attr(IFLA_MTU, struct.pack("=I", plan.mtu))
            + _nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, plan.encap.name.encode() + b"\0"),
                      _nested(IFLA_INFO_DATA, *data)))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return rtnl_message(RTM_NEWLINK, flags, body)


def _send(name: str, message: bytes) -> None:
    error = rtnl_request(message)
    if error:
        raise KernelError(f"creating fan-mapped tunnel device {name}", -error)


class KernelMapping(PeerMapping):
    name = "kernel"

    async def attach_endpoint(self, links: Links, plan: NetworkPlan, veth_index: int,
                              endpoint: Endpoint) -> None:
        """Nothing per container: packets take the kernel's path."""

    def detach_endpoint(self, plan: NetworkPlan, endpoint: Endpoint) -> None:
        """Nothing per container."""

    def tunnel_device(self, plan: NetworkPlan) -> str:
        return f"fanm-{plan.vni:06x}"

    async def ensure(self, links: Links, plan: NetworkPlan) -> None:
        device = self.tunnel_device(plan)
        index = await links.index(device)
        if index is None:
            _send(device, newlink_message(device, plan, await links.index(plan.underlay_interface)))
            index = await links.index(device)
        await links.claim(device, plan.encap.name, MARK)
        await links.set_up(index, mtu=plan.mtu)
        await links.ensure_route(plan.overlay, index)

    async def remove(self, links: Links, plan: NetworkPlan) -> None:
        await links.delete(self.tunnel_device(plan))   # its route goes with it

    async def remove_orphans(self, links: Links, plans) -> None:
        """Nothing is shared: an orphan's device goes as an orphan interface."""

