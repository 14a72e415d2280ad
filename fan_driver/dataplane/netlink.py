"""Idempotent pyroute2 helpers: each one tolerates "already there" and "already
gone", and refuses to touch an interface that does not carry our mark."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
import struct
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import (Awaitable, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence,
                    Tuple)

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from ..errors import FanError, KernelError
from ..model import ENDPOINT_IFNAME_PREFIX
from .plan import MARK

GONE = (errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)
MAIN_TABLE = 254
LOCAL_TABLE = 255   # the kernel's own routes for each address


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
NLM_F_DUMP_INTR = 0x10     # the dump changed while it was read: read it again
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
NLMSGERR_ATTR_MSG = 1
HEADER = struct.Struct("=IHHII")   # struct nlmsghdr
DUMP_ATTEMPTS = 10
# Requests in one sendmsg(): their replies (failures only, and one ack for the
# last) must fit the receive buffer, which is raised to RCVBUF.
CHUNK = 512
RCVBUF = 4 << 20


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
    return HEADER.pack(HEADER.size + len(body), kind, flags, 1, 0) + body


def dellink_message(index: int) -> bytes:
    return rtnl_message(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, ifinfomsg(index))


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute (struct nlattr and its payload, padded to 4 bytes)."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def attrs(data: bytes, offset: int) -> Dict[int, bytes]:
    """A message's attributes from `offset` on, by type (nesting flags dropped)."""
    found = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return found


def replies(data: bytes):
    """(type, flags, seq, payload) of each message in one recv()'s data."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, flags, seq, _ = HEADER.unpack_from(data, offset)
        if length < HEADER.size:
            break
        yield kind, flags, seq, data[offset + HEADER.size:offset + length]
        offset += (length + 3) & ~3


def refusal(payload: bytes, ext_ack_at: int) -> Tuple[int, str]:
    """(errno, the kernel's explanation or '') of an NLMSG_ERROR payload; 0 is an ack."""
    error = -struct.unpack_from("=i", payload)[0]
    text = attrs(payload, ext_ack_at).get(NLMSGERR_ATTR_MSG, b"")
    return error, text.rstrip(b"\0").decode(errors="replace")


class Refused(NamedTuple):
    index: int      # of the request in the list given
    code: int       # errno
    detail: str     # the kernel's explanation, if it gave one


class Rtnl:
    """One rtnetlink socket for many requests: they go CHUNK at a time in one
    sendmsg(), only the chunk's last asks for an ack, and the kernel answers
    the others only if it refuses them. Blocking (the kernel does the work
    inside send()): call it in a thread."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        # Acks without the request quoted back, and the kernel's own error text.
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)   # SO_RCVBUFFORCE
        except OSError:   # without CAP_NET_ADMIN: as large as rmem_max allows
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send_all(self, requests: Sequence[Tuple[int, int, bytes]]) -> List[Refused]:
        """Send (type, flags, body) requests in order; return those refused."""
        refused = []
        for start in range(0, len(requests), CHUNK):
            chunk = requests[start:start + CHUNK]
            first = self.seq + 1
            buffer = bytearray()
            for i, (kind, flags, body) in enumerate(chunk):
                last = NLM_F_ACK if i == len(chunk) - 1 else 0
                buffer += HEADER.pack(HEADER.size + len(body), kind, flags | NLM_F_REQUEST | last,
                                      first + i, 0) + body
            self.seq += len(chunk)
            self.sock.send(buffer)
            refused += [Refused(start + seq - first, code, detail)
                        for seq, code, detail in self._acks(self.seq) if code]
        return refused

    def apply(self, requests: Sequence[Tuple[int, int, bytes]], doing: str,
              tolerate: Iterable[int] = ()) -> None:
        """send_all, and the first refusal (but those tolerated) as a KernelError."""
        refused = [r for r in self.send_all(requests) if r.code not in tolerate]
        if refused:
            more = f" (and {len(refused) - 1} more refused)" if len(refused) > 1 else ""
            raise KernelError(f"{doing}{more}", refused[0].code, refused[0].detail)

    def _acks(self, last: int):
        """(seq, errno, detail) of every error message until the ack of `last`."""
        while True:
            for kind, _, seq, payload in replies(self.sock.recv(RCVBUF)):
                if kind != NLMSG_ERROR:
                    continue
                # with NETLINK_CAP_ACK only the request's header is quoted
                code, detail = refusal(payload, 4 + HEADER.size)
                yield seq, code, detail
                if seq == last:
                    return

    def dump(self, kind: int, body: bytes) -> List[bytes]:
        """Every message of a dump, as payloads; read again while the kernel
        marks it interrupted (the table changed meanwhile)."""
        for _ in range(DUMP_ATTEMPTS):
            messages, interrupted = self._dump_once(kind, body)
            if not interrupted:
                return messages
        raise OSError(errno.EINTR, f"dump interrupted {DUMP_ATTEMPTS} times in a row")

    def _dump_once(self, kind: int, body: bytes) -> Tuple[List[bytes], bool]:
        self.seq += 1
        self.sock.send(HEADER.pack(HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP,
                                   self.seq, 0) + body)
        messages, interrupted = [], False
        while True:
            for reply, flags, seq, payload in replies(self.sock.recv(RCVBUF)):
                if seq != self.seq:
                    continue
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if reply == NLMSG_DONE:
                    return messages, interrupted
                if reply == NLMSG_ERROR:
                    code, detail = refusal(payload, 4 + HEADER.size)
                    if code == errno.EINTR:
                        return [], True
                    raise OSError(code, detail or os.strerror(code))
                messages.append(payload)


# Kernel objects that exist by the tens of thousands (one per peer), built by hand
# so that they go in bulk through Rtnl.send_all (pyroute2 sends one at a time).
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH = 28
RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP = 104, 105, 106
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE, RTA_NH_ID = 1, 4, 5, 15, 30
NHA_ID, NHA_OIF, NHA_GATEWAY = 1, 5, 6
NDA_DST, NDA_LLADDR = 1, 2
RTNH_F_ONLINK = 4          # the gateway is on the link, whatever its address
RTN_UNICAST, RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 1, 0, 255
NUD_PERMANENT = 0x80
NTF_SELF = 0x02            # an FDB entry of the VXLAN device itself, not of a bridge
UPSERT = NLM_F_CREATE | NLM_F_REPLACE
RTMSG = struct.Struct("=BBBBBBBBI")
NHMSG = struct.Struct("=BBBBI")
NDMSG = struct.Struct("=BxxxiHBB")


class Route(NamedTuple):
    dst: IPv4Network
    table: int
    protocol: int
    oif: Optional[int]      # absent on a nexthop route if nexthop_compat_mode is off
    nexthop: Optional[int]


class Nexthop(NamedTuple):
    id: int
    protocol: int
    oif: Optional[int]


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def nexthop_request(nexthop: int, gateway: IPv4Address, oif: int, protocol: int):
    """`ip nexthop replace id N via GATEWAY dev OIF onlink proto P`."""
    body = (NHMSG.pack(socket.AF_INET, RT_SCOPE_UNIVERSE, protocol, 0, RTNH_F_ONLINK)
            + attr(NHA_ID, _u32(nexthop)) + attr(NHA_OIF, _u32(oif))
            + attr(NHA_GATEWAY, gateway.packed))
    return RTM_NEWNEXTHOP, UPSERT, body


def del_nexthop_request(nexthop: int):
    return RTM_DELNEXTHOP, 0, NHMSG.pack(socket.AF_INET, 0, 0, 0, 0) + attr(NHA_ID, _u32(nexthop))


def route_request(dst: IPv4Network, protocol: int, nexthop: Optional[int] = None,
                  gateway: Optional[IPv4Address] = None, oif: int = 0):
    """`ip route replace DST nhid N proto P`, or without a nexthop object
    `ip route replace DST via GATEWAY dev OIF onlink proto P` (main table)."""
    flags = 0 if nexthop else RTNH_F_ONLINK
    body = (RTMSG.pack(socket.AF_INET, dst.prefixlen, 0, 0, MAIN_TABLE, protocol,
                       RT_SCOPE_UNIVERSE, RTN_UNICAST, flags)
            + attr(RTA_DST, dst.network_address.packed))
    if nexthop:
        body += attr(RTA_NH_ID, _u32(nexthop))
    else:
        body += attr(RTA_GATEWAY, gateway.packed) + attr(RTA_OIF, _u32(oif))
    return RTM_NEWROUTE, UPSERT, body


def del_route_request(route: Route):
    """Delete exactly this route: by its nexthop object, or by its device."""
    body = (RTMSG.pack(socket.AF_INET, route.dst.prefixlen, 0, 0, route.table & 0xFF, 0,
                       RT_SCOPE_NOWHERE, 0, 0)
            + attr(RTA_DST, route.dst.network_address.packed) + attr(RTA_TABLE, _u32(route.table)))
    if route.nexthop:
        body += attr(RTA_NH_ID, _u32(route.nexthop))
    elif route.oif:
        body += attr(RTA_OIF, _u32(route.oif))
    return RTM_DELROUTE, 0, body


def neighbour_request(oif: int, address: IPv4Address, mac: bytes):
    """`ip neigh replace ADDRESS lladdr MAC dev OIF nud permanent`."""
    return RTM_NEWNEIGH, UPSERT, (NDMSG.pack(socket.AF_INET, oif, NUD_PERMANENT, 0, 0)
                                  + attr(NDA_DST, address.packed) + attr(NDA_LLADDR, mac))


def fdb_request(oif: int, mac: bytes, remote: IPv4Address):
    """`bridge fdb replace MAC dev OIF dst REMOTE self permanent`."""
    return RTM_NEWNEIGH, UPSERT, (NDMSG.pack(socket.AF_BRIDGE, oif, NUD_PERMANENT, NTF_SELF, 0)
                                  + attr(NDA_LLADDR, mac) + attr(NDA_DST, remote.packed))


def _u32_attr(found: Dict[int, bytes], kind: int) -> Optional[int]:
    return struct.unpack("=I", found[kind])[0] if kind in found else None


def parse_route(payload: bytes) -> Route:
    family, dst_len, _, _, table, protocol, _, _, _ = RTMSG.unpack_from(payload)
    found = attrs(payload, RTMSG.size)
    dst = IPv4Address(found.get(RTA_DST, b"\0\0\0\0"))
    return Route(IPv4Network((dst, dst_len)), _u32_attr(found, RTA_TABLE) or table, protocol,
                 _u32_attr(found, RTA_OIF), _u32_attr(found, RTA_NH_ID))


def parse_nexthop(payload: bytes) -> Nexthop:
    _, _, protocol, _, _ = NHMSG.unpack_from(payload)
    found = attrs(payload, NHMSG.size)
    return Nexthop(_u32_attr(found, NHA_ID), protocol, _u32_attr(found, NHA_OIF))


def ipv4_routes(rtnl: Rtnl) -> List[Route]:
    """Every IPv4 route of every table. Blocking."""
    return [parse_route(p) for p in rtnl.dump(RTM_GETROUTE, RTMSG.pack(socket.AF_INET, *[0] * 8))]


def ipv4_nexthops(rtnl: Rtnl) -> List[Nexthop]:
    """Every IPv4 nexthop object. Blocking; OSError EOPNOTSUPP before Linux 5.3."""
    return [parse_nexthop(p)
            for p in rtnl.dump(RTM_GETNEXTHOP, NHMSG.pack(socket.AF_INET, 0, 0, 0, 0))]


def refused(doing: str, exc: BaseException) -> KernelError:
    """A NetlinkError or OSError from the kernel as the plugin's error."""
    if isinstance(exc, NetlinkDumpInterrupted):
        return KernelError(doing, errno.EINTR, "dump interrupted")
    code = getattr(exc, "code", None) or getattr(exc, "errno", None) or errno.EIO
    detail = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else ""
    return KernelError(doing, code, detail)


@contextlib.contextmanager
def kernel(doing: str, tolerate: Iterable[int] = ()):
    """Turn the kernel's refusal of what is being done into a KernelError naming
    it (`doing`: "creating bridge fan-250-0-28"); errnos in `tolerate` are fine."""
    try:
        yield
    except (NetlinkError, OSError) as exc:
        if getattr(exc, "code", None) in tolerate or getattr(exc, "errno", None) in tolerate:
            return
        raise refused(doing, exc) from exc


async def dumped(doing: str, dump: Callable[[], Awaitable]) -> list:
    """All messages of a pyroute2 dump, read again while it was interrupted."""
    for _ in range(DUMP_ATTEMPTS):
        try:
            with kernel(doing):
                messages = [m async for m in await dump()]
        except KernelError as exc:
            if exc.code != errno.EINTR:
                raise
            continue
        if not any(m["header"]["flags"] & NLM_F_DUMP_INTR for m in messages):
            return messages
    raise KernelError(doing, errno.EINTR, f"dump interrupted {DUMP_ATTEMPTS} times in a row")


class Links:
    """The plugin's netlink operations; every kernel refusal comes out as a
    KernelError naming the object."""

    def __init__(self, ipr: AsyncIPRoute):
        self.ipr = ipr

    async def index(self, name: str) -> Optional[int]:
        with kernel(f"looking up interface {name}"):
            found = await self.ipr.link_lookup(ifname=name)
        return found[0] if found else None

    async def _links(self, index: Optional[int] = None) -> list:
        what = "listing interfaces" if index is None else f"reading interface {index}"
        if index is None:
            return await dumped(what, self.ipr.get_links)
        with kernel(what):
            return [link async for link in await self.ipr.get_links(index)]

    async def marked(self) -> Dict[str, str]:
        """name -> mark of every interface we created."""
        result = {}
        for link in await self._links():
            alias, name = link.get("ifalias"), link.get("ifname")
            if is_ours(alias, name):
                result[name] = alias or MARK
        return result

    async def claim(self, name: str, kind: str, mark: str, **spec) -> int:
        """Create the link, or adopt it if it exists with our mark; refuse a stranger's."""
        index = await self.index(name)
        if index is None:
            with kernel(f"creating {kind} device {name}"):
                await self.ipr.link("add", ifname=name, kind=kind, **spec)
            index = await self.index(name)
        elif not is_ours(await self._alias(index)):
            raise FanError(
                f"interface {name} already exists and was not made by fan-driver; "
                "remove it or choose another overlay")
        with kernel(f"marking {kind} device {name} as fan-driver's"):
            await self.ipr.link("set", index=index, ifalias=mark)
        return index

    async def _alias(self, index: int) -> Optional[str]:
        for link in await self._links(index):
            return link.get("ifalias")
        return None

    async def mtu(self, index: int) -> int:
        for link in await self._links(index):
            return link.get("mtu")
        return 0

    async def set_up(self, index: int, **spec) -> None:
        with kernel(f"bringing up interface {index}"):
            await self.ipr.link("set", index=index, state="up", **spec)

    async def ensure_bridge(self, name: str, gateway: IPv4Interface, mtu: int, mark: str) -> int:
        index = await self.claim(name, "bridge", mark, mtu=mtu)
        await self.set_up(index, mtu=mtu)
        await self.ensure_address(index, gateway)
        return index

    async def ensure_address(self, index: int, address: IPv4Interface) -> None:
        with kernel(f"adding address {address} to interface {index}", tolerate=(errno.EEXIST,)):
            await self.ipr.addr("add", index=index, address=str(address.ip),
                                prefixlen=address.network.prefixlen)

    async def ensure_veth(self, host_name: str, peer_name: str, mtu: int, mac: str,
                          bridge_index: int, mark: str) -> int:
        index = await self.index(host_name)
        if index is not None and not is_ours(await self._alias(index), host_name):
            raise FanError(f"interface {host_name} already exists and was not made by "
                           "fan-driver; remove it")
        if index is None:
            with kernel(f"creating veth pair {host_name} / {peer_name}"):
                await self.ipr.link("add", ifname=host_name, kind="veth", mtu=mtu,
                                    peer={"ifname": peer_name, "address": mac, "mtu": mtu})
            index = await self.index(host_name)
        with kernel(f"plugging veth {host_name} into bridge {bridge_index}"):
            await self.ipr.link("set", index=index, ifalias=mark, master=bridge_index,
                                state="up")
        return index

    async def delete(self, name: str) -> None:
        """Delete an interface we made; a missing one is already deleted."""
        index = await self.index(name)
        if index is None:
            return
        try:
            alias = await self._alias(index)
        except KernelError as exc:
            if exc.code in GONE:
                return
            raise
        if not is_ours(alias, name):
            raise FanError(f"refusing to delete {name}: it was not made by fan-driver")
        # Deleting a link waits for an RCU grace period (15-20 ms for a veth) inside
        # the kernel: in a thread, so that the plugin answers other requests meanwhile.
        with kernel(f"deleting interface {name}"):
            error = await asyncio.to_thread(rtnl_request, dellink_message(index))
        if error and -error not in GONE:
            raise KernelError(f"deleting interface {name}", -error)

    async def ensure_route(self, dst: IPv4Network, oif: int, **extra) -> None:
        with kernel(f"adding route {dst} via interface {oif}"):
            await self.ipr.route("replace", dst=str(dst), oif=oif, **extra)

    async def routes_on(self, index: int) -> List[IPv4Network]:
        """Destinations of the main table's IPv4 routes through a device."""
        routes = await dumped(f"listing routes on interface {index}", lambda: self.ipr.get_routes(
            family=socket.AF_INET, oif=index, table=MAIN_TABLE))
        return [IPv4Network((route.get("dst") or "0.0.0.0", route["dst_len"])) for route in routes]

    async def remove_route(self, dst: IPv4Network, oif: int) -> None:
        with kernel(f"removing route {dst} via interface {oif}", tolerate=GONE):
            await self.ipr.route("del", dst=str(dst), oif=oif)
