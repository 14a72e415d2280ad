"""Idempotent pyroute2 helpers: each one tolerates "already there" and "already
gone", and refuses to touch an interface that does not carry our mark."""
from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import struct
from ipaddress import IPv4Interface, IPv4Network
from typing import Dict, List, Optional

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import FanError
from ..model import ENDPOINT_IFNAME_PREFIX
from .plan import MARK

GONE = (errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)
MAIN_TABLE = 254


# An endpoint's host-side veth (model.Endpoint.host_ifname). The kernel takes no
# alias when it creates a link, so a crash between creating the pair and marking
# it leaves one unmarked: by this name it is still recognisably ours.
ENDPOINT_VETH = re.compile(ENDPOINT_IFNAME_PREFIX + r"[0-9a-f]{12}")


def is_ours(alias: Optional[str], name: str = "") -> bool:
    """Whether an interface alias is our mark ("fan-driver" or "fan-driver <network>"),
    or the interface is an endpoint veth not yet marked."""
    if alias is None:
        return bool(ENDPOINT_VETH.fullmatch(name))
    return alias == MARK or alias.startswith(MARK + " ")


RTM_DELLINK = 17
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2


def rtnl_request(message: bytes) -> int:
    """Send one rtnetlink request on a socket of its own and return its
    status (0 or -errno). Blocking: the kernel does the work inside send()."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(message)
        reply = sock.recv(65536)
    kind = struct.unpack_from("=H", reply, 4)[0]
    return struct.unpack_from("=i", reply, 16)[0] if kind == NLMSG_ERROR else 0


def ifinfomsg(index: int = 0) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0)


def rtnl_message(kind: int, flags: int, body: bytes) -> bytes:
    """A request (sequence number 1, on a socket of its own): struct nlmsghdr, then `body`."""
    return struct.pack("=IHHII", 16 + len(body), kind, flags, 1, 0) + body


def dellink_message(index: int) -> bytes:
    return rtnl_message(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, ifinfomsg(index))


class Links:
    def __init__(self, ipr: AsyncIPRoute):
        self.ipr = ipr

    async def index(self, name: str) -> Optional[int]:
        found = await self.ipr.link_lookup(ifname=name)
        return found[0] if found else None

    async def marked(self) -> Dict[str, str]:
        """name -> mark of every interface we created."""
        result = {}
        async for link in await self.ipr.get_links():
            alias, name = link.get("ifalias"), link.get("ifname")
            if is_ours(alias, name):
                result[name] = alias or MARK
        return result

    async def claim(self, name: str, kind: str, mark: str, **spec) -> int:
        """Create the link, or adopt it if it exists with our mark; refuse a stranger's."""
        index = await self.index(name)
        if index is None:
            try:
                await self.ipr.link("add", ifname=name, kind=kind, **spec)
            except NetlinkError as exc:
                raise FanError(f"cannot create {kind} device {name}: {exc.args[-1]}") from exc
            index = await self.index(name)
        else:
            if not is_ours(await self._alias(index)):
                raise FanError(
                    f"interface {name} already exists and was not made by fan-driver; "
                    "remove it or choose another overlay")
        await self.ipr.link("set", index=index, ifalias=mark)
        return index

    async def _alias(self, index: int) -> Optional[str]:
        async for link in await self.ipr.get_links(index):
            return link.get("ifalias")
        return None

    async def mtu(self, index: int) -> int:
        async for link in await self.ipr.get_links(index):
            return link.get("mtu")
        return 0

    async def set_up(self, index: int, **spec) -> None:
        try:
            await self.ipr.link("set", index=index, state="up", **spec)
        except NetlinkError as exc:
            raise FanError(f"cannot bring up interface {index}: {exc.args[-1]}") from exc

    async def ensure_bridge(self, name: str, gateway: IPv4Interface, mtu: int, mark: str) -> int:
        index = await self.claim(name, "bridge", mark, mtu=mtu)
        await self.set_up(index, mtu=mtu)
        await self.ensure_address(index, gateway)
        return index

    async def ensure_address(self, index: int, address: IPv4Interface) -> None:
        try:
            await self.ipr.addr("add", index=index, address=str(address.ip),
                                prefixlen=address.network.prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    async def ensure_veth(self, host_name: str, peer_name: str, mtu: int, mac: str,
                          bridge_index: int, mark: str) -> int:
        index = await self.index(host_name)
        if index is not None and not is_ours(await self._alias(index), host_name):
            raise FanError(f"interface {host_name} already exists and was not made by "
                           "fan-driver; remove it")
        if index is None:
            await self.ipr.link("add", ifname=host_name, kind="veth", mtu=mtu,
                                peer={"ifname": peer_name, "address": mac, "mtu": mtu})
            index = await self.index(host_name)
        await self.ipr.link("set", index=index, ifalias=mark, master=bridge_index, state="up")
        return index

    async def delete(self, name: str) -> None:
        """Delete an interface we made; a missing one is already deleted."""
        index = await self.index(name)
        if index is None:
            return
        try:
            alias = await self._alias(index)
        except NetlinkError as exc:
            if exc.code in GONE:
                return
            raise FanError(f"cannot read {name}: {exc}") from exc
        if not is_ours(alias, name):
            raise FanError(f"refusing to delete {name}: it was not made by fan-driver")
        # Deleting a link waits for an RCU grace period (15-20 ms for a veth) inside
        # the kernel: in a thread, so that the plugin answers other requests meanwhile.
        try:
            error = await asyncio.to_thread(rtnl_request, dellink_message(index))
        except OSError as exc:
            raise FanError(f"cannot delete {name}: {exc}") from exc
        if error and -error not in GONE:
            raise FanError(f"cannot delete {name}: {os.strerror(-error)}")

    async def ensure_route(self, dst: IPv4Network, oif: int, **extra) -> None:
        try:
            await self.ipr.route("replace", dst=str(dst), oif=oif, **extra)
        except NetlinkError as exc:
            raise FanError(f"cannot add route {dst}: {exc}") from exc

    async def routes_on(self, index: int) -> List[IPv4Network]:
        """Destinations of the main table's IPv4 routes through a device."""
        return [IPv4Network((route.get("dst") or "0.0.0.0", route["dst_len"]))
                async for route in await self.ipr.get_routes(family=2, oif=index,
                                                             table=MAIN_TABLE)]

    async def remove_route(self, dst: IPv4Network, oif: int) -> None:
        try:
            await self.ipr.route("del", dst=str(dst), oif=oif)
        except NetlinkError as exc:
            if exc.code not in GONE:
                raise
