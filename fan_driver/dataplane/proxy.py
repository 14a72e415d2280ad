"""The userland proxy: a listening socket on every published host port, relaying
to the container, as Docker's docker-proxy does for its bridge.

It serves what the kernel's DNAT cannot: connections to 127.0.0.1 (the
kernel does not route loopback addresses out of the host unless
route_localnet is set, and /proc/sys is read-only in a managed plugin), and
connections the host makes to its own loopback address for any binding. Its
listening socket is also the port's reservation: a port held by another
process (docker-proxy of a bridge container, a host service) cannot be
bound, and a port the fan holds cannot be taken by anyone else. Traffic from
other machines never reaches it: DNAT sends it to the container first, with
the client's own address.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..errors import FanError
from ..ports import PortBinding

log = logging.getLogger(__name__)

# docker-proxy forgets a UDP "connection" after 90 s without traffic.
UDP_IDLE_SECONDS = 90.0
RELAY_CHUNK = 65536
LISTEN_STATES = {"tcp": "0A", "udp": "07"}   # TCP_LISTEN; UDP's unconnected state
# Relayed TCP connections, and UDP client flows, per published port: each takes
# two file descriptors, so one local client cannot exhaust the plugin's.
MAX_RELAYED = 1024
# At most one warning per published port in this time, counting what was turned away.
REFUSAL_WARNING_SECONDS = 60.0

Key = Tuple[str, str, int]   # proto, host address, host port


class PortTaken(FanError):
    pass


class UserlandProxy:
    def __init__(self, proc: Path = Path("/proc"), max_relayed: int = MAX_RELAYED):
        self.proc = proc
        self.max_relayed = max_relayed
        self._listeners: Dict[Key, object] = {}
        _raise_open_file_limit()   # a 1,000-port range is 1,000 listening sockets

    async def open(self, binding: PortBinding, target: IPv4Address) -> None:
        """Listen on the binding's host port; PortTaken names who holds it."""
        key = _key(binding)
        if key in self._listeners:
            return
        loop = asyncio.get_running_loop()
        address = (str(binding.host_ip), binding.host_port)
        bound = _Bound(binding, self.max_relayed)
        try:
            if binding.proto == "tcp":
                listener = await asyncio.start_server(
                    lambda r, w: _relay_tcp(r, w, (str(target), binding.port), bound), *address,
                    reuse_address=True)
            else:
                listener, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpRelay((str(target), binding.port), bound), local_addr=address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise FanError(f"cannot listen on {binding.describe()}: {exc.strerror}") from None
            raise PortTaken(f"host port {binding.host_port}/{binding.proto} is already in use "
                            f"by {self.holder(binding)}") from None
        self._listeners[key] = listener

    def close(self, binding: PortBinding) -> None:
        listener = self._listeners.pop(_key(binding), None)
        if listener is not None:
            listener.close()

    def holder(self, binding: PortBinding) -> str:
        return listener_of(binding, self.proc) or "another process listening on the host"


def listener_of(binding: PortBinding, proc: Path = Path("/proc")) -> Optional[str]:
    """Who listens on the binding's port, as well as /proc tells (a managed
    plugin sees the host's sockets but not the host's processes); None when
    no socket listens on it."""
    inodes = _listening_inodes(proc, binding.proto, binding.host_port)
    if not inodes:
        return None
    for pid in (p for p in os.listdir(proc) if p.isdigit()):
        try:
            fds = os.listdir(proc / pid / "fd")
            if any(os.readlink(proc / pid / "fd" / fd) in inodes for fd in fds):
                name = (proc / pid / "comm").read_text().strip()
                return f"{name} (pid {pid}, listening on the host)"
        except OSError:
            continue
    return "another process listening on the host"


def _key(binding: PortBinding) -> Key:
    return binding.proto, str(binding.host_ip), binding.host_port


def _listening_inodes(proc: Path, proto: str, port: int) -> set:
    found = set()
    for table in (proto, proto + "6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for fields in (line.split() for line in lines):
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == LISTEN_STATES[proto]:
                found.add(f"socket:[{fields[9]}]")
    return found


def _raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Bound:
    """One published port's bound: its TCP connections are counted here (its
    UDP flows are its relay's upstreams), and the warning, at most one per
    REFUSAL_WARNING_SECONDS, counts those turned away."""

    def __init__(self, binding: PortBinding, limit: int):
        self.binding, self.limit = binding, limit
        self.active = 0
        self.refused = 0
        self.warned_at = -REFUSAL_WARNING_SECONDS

    def full(self) -> bool:
        return self.active >= self.limit

    def refuse(self, what: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.warned_at >= REFUSAL_WARNING_SECONDS:
            log.warning("proxy: %s relays %d %s already, its bound: %d new one(s) turned away",
                        self.binding.describe(), self.limit, what, self.refused)
            self.warned_at, self.refused = now, 0


async def _relay_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     target: Tuple[str, int], bound: _Bound) -> None:
    if bound.full():
        writer.close()
        bound.refuse("TCP connections")
        return
    bound.active += 1
    try:
        await _relay(reader, writer, target)
    finally:
        bound.active -= 1


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 target: Tuple[str, int]) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection(*target)
    except OSError as exc:
        log.warning("proxy: cannot reach %s:%d: %s", *target, exc)
        writer.close()
        return
    try:
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    except OSError:   # a reset on one side: the other goes too
        pass
    finally:
        writer.close()
        up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close, so request/response protocols finish."""
    while True:
        data = await reader.read(RELAY_CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


class _UdpRelay(asyncio.DatagramProtocol):
    """One upstream socket per client address, forgotten when idle."""

    def __init__(self, target: Tuple[str, int], bound: _Bound):
        self.target, self.bound = target, bound
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.upstreams: Dict[tuple, "_UdpUpstream"] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, client) -> None:
        upstream = self.upstreams.get(client)
        if upstream is None:
            if len(self.upstreams) >= self.bound.limit:
                self.bound.refuse("UDP flows")
                return
            upstream = self.upstreams[client] = _UdpUpstream(self, client)
            asyncio.get_running_loop().create_task(upstream.connect(self.target))
        upstream.send(data)

    def connection_lost(self, exc) -> None:
        for upstream in list(self.upstreams.values()):
            upstream.close()


class _UdpUpstream(asyncio.DatagramProtocol):
    def __init__(self, relay: _UdpRelay, client):
        self.relay, self.client = relay, client
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.pending = []
        self.idle: Optional[asyncio.TimerHandle] = None

    async def connect(self, target) -> None:
        try:
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: self,
                                                                       remote_addr=target)
        except OSError as exc:
            log.warning("proxy: cannot reach %s:%d/udp: %s", *target, exc)
            self.close()

    def connection_made(self, transport) -> None:
        self.transport = transport
        for data in self.pending:
            transport.sendto(data)
        self.pending.clear()

    def send(self, data: bytes) -> None:
        self._touch()
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr) -> None:
        self._touch()
        if self.relay.transport is not None:
            self.relay.transport.sendto(data, self.client)

    def _touch(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(UDP_IDLE_SECONDS, self.close)

    def close(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.relay.upstreams.pop(self.client, None)
        if self.transport is not None:
            self.transport.close()
