"""The userland proxy's bound on what one published port relays, on real
loopback sockets: a low bound set through the constructor, a client opening
more connections and flows than it."""
import asyncio
import logging
import socket
from ipaddress import IPv4Address

import pytest

from fan_driver.dataplane.proxy import UserlandProxy
from fan_driver.ports import PortBinding

LOOPBACK = "127.0.0.1"
BOUND = 4
BEYOND = 30   # connections or flows past the bound


def free_port(kind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture
async def echo_tcp():
    """A TCP server on loopback answering each line with itself."""
    async def echo(reader, writer):
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, LOOPBACK, 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


class Client(asyncio.DatagramProtocol):
    def __init__(self):
        self.received = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.received.put_nowait(data)


@pytest.fixture
async def proxy():
    proxy = UserlandProxy(max_relayed=BOUND)
    opened = []
    proxy.opened = opened
    yield proxy
    for binding in opened:
        proxy.close(binding)


async def publish(proxy, proto, target_port) -> PortBinding:
    binding = PortBinding(proto, IPv4Address(LOOPBACK),
                          free_port(socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM),
                          target_port)
    await proxy.open(binding, IPv4Address(LOOPBACK))
    proxy.opened.append(binding)
    return binding


async def exchange(reader, writer, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.read(100), 5)


async def test_tcp_connections_beyond_the_bound_are_closed_at_once(proxy, echo_tcp, caplog):
    binding = await publish(proxy, "tcp", echo_tcp)
    clients = [await asyncio.open_connection(LOOPBACK, binding.host_port) for _ in range(BOUND)]
    try:
        for i, (reader, writer) in enumerate(clients):
            assert await exchange(reader, writer, b"%d" % i) == b"%d" % i
        with caplog.at_level(logging.WARNING, logger="fan_driver.dataplane.proxy"):
            extra = [await asyncio.open_connection(LOOPBACK, binding.host_port)
                     for _ in range(BEYOND)]
            for reader, writer in extra:   # accepted by the kernel, closed by the proxy
                assert await asyncio.wait_for(reader.read(100), 5) == b""
                writer.close()
        warnings = [r for r in caplog.records if "turned away" in r.getMessage()]
        assert len(warnings) == 1, "one warning per period, not one per connection"
        assert f"relays {BOUND} TCP connections already" in warnings[0].getMessage()
        # the relayed ones go on; a closed one makes room for a new one
        assert await exchange(*clients[0], b"still") == b"still"
        clients[0][1].close()
        await clients[0][1].wait_closed()
        for _ in range(50):
            reader, writer = await asyncio.open_connection(LOOPBACK, binding.host_port)
            clients[0] = reader, writer
            try:
                if await exchange(reader, writer, b"again") == b"again":
                    break
            except ConnectionResetError:   # turned away: the proxy had not seen the close yet
                pass
            writer.close()
            await asyncio.sleep(0.05)
        else:
            pytest.fail("no room made by a closed connection")
    finally:
        for _, writer in clients:
            writer.close()


async def test_udp_flows_beyond_the_bound_are_dropped(proxy):
    loop = asyncio.get_running_loop()
    server, _ = await loop.create_datagram_endpoint(Echo, local_addr=(LOOPBACK, 0))
    binding = await publish(proxy, "udp", server.get_extra_info("sockname")[1])
    flows = [await loop.create_datagram_endpoint(
        Client, remote_addr=(LOOPBACK, binding.host_port)) for _ in range(BOUND + BEYOND)]
    try:
        for i, (transport, client) in enumerate(flows[:BOUND]):
            transport.sendto(b"%d" % i)
            assert await asyncio.wait_for(client.received.get(), 5) == b"%d" % i
        for transport, _ in flows[BOUND:]:
            transport.sendto(b"over")
        await asyncio.sleep(0.5)
        assert all(client.received.empty() for _, client in flows[BOUND:])
        transport, client = flows[0]     # an existing flow is unaffected
        transport.sendto(b"still")
        assert await asyncio.wait_for(client.received.get(), 5) == b"still"
    finally:
        for transport, _ in flows:
            transport.close()
        server.close()
