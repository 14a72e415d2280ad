"""Published ports: Docker's port map decoded into typed bindings, the host
ports each one may take, and the bindings described back in Docker's shape. Pure.

ProgramExternalConnectivity carries `com.docker.network.portmap`, a list of
{Proto, IP, Port, HostIP, HostPort, HostPortEnd} (libnetwork types.PortBinding):
Proto 6 is TCP and 17 UDP, HostIP "" means every host address, HostPort 0
(from -P) means "any free port", and HostPort < HostPortEnd means "any free
port of that range" (-p 8090-8091:80 publishes one port, not two). The
exposed ports Docker sends beside it (com.docker.network.endpoint.exposedports)
are not read: what -P publishes is in the port map already, with HostPort 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from .errors import FanError

PORTMAP = "com.docker.network.portmap"
PROTOCOLS = {6: "tcp", 17: "udp"}
PROTOCOL_NUMBERS = {name: number for number, name in PROTOCOLS.items()}
ANY_ADDRESS = IPv4Address("0.0.0.0")
# Docker's portallocator falls back to this range when it cannot read
# net.ipv4.ip_local_port_range.
EPHEMERAL_FALLBACK = (49153, 65535)
MAX_BINDINGS = 65536
EXAMPLE_ENTRY = ('{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, '
                 '"HostPortEnd": 8080}')


@dataclass(frozen=True)
class PortRequest:
    """One entry of Docker's port map: a container port and the host ports it may take."""
    proto: str                # tcp | udp
    port: int                 # in the container
    host_ip: IPv4Address      # 0.0.0.0: every address of the host
    host_port: int            # 0: any free port
    host_port_end: int        # > host_port: any free port from host_port to here

    @classmethod
    def from_json(cls, raw) -> "PortRequest":
        if not isinstance(raw, Mapping):
            raise FanError(f"port map entry {str(raw)[:80]!r} is not a JSON object; each "
                           f"entry of {PORTMAP} is one, as {EXAMPLE_ENTRY}")
        number = raw.get("Proto", 6)
        if not _is_int(number):
            raise FanError(f"port map entry {_shown(raw)}: Proto {repr(number)[:40]} is not an "
                           "integer; give the IP protocol number, 6 (TCP) or 17 (UDP)")
        if number not in PROTOCOLS:
            raise FanError(f"port map entry {_shown(raw)}: protocol {number!r} is neither "
                           "TCP (6) nor UDP (17); the fan publishes TCP and UDP ports")
        port = _port(raw.get("Port"), "Port", raw, minimum=1)
        start = _port(_or_zero(raw.get("HostPort")), "HostPort", raw)
        end = _port(_or_zero(raw.get("HostPortEnd")), "HostPortEnd", raw)
        if start and end and end < start:
            raise FanError(f"port map entry {_shown(raw)}: host port range {start}-{end} "
                           "ends before it starts")
        return cls(proto=PROTOCOLS[number], port=port, host_ip=_host_ip(raw.get("HostIP"), raw),
                   host_port=start, host_port_end=max(start, end))

    def candidates(self, ephemeral: Tuple[int, int]) -> range:
        """The host ports this entry may take, in the order they are tried."""
        if self.host_port == 0:
            return range(ephemeral[0], ephemeral[1] + 1)
        return range(self.host_port, self.host_port_end + 1)

    def describe(self) -> str:
        ports = (str(self.host_port) if self.host_port == self.host_port_end
                 else f"{self.host_port}-{self.host_port_end}" if self.host_port else "any")
        return f"{self.host_ip}:{ports}->{self.port}/{self.proto}"


@dataclass(frozen=True)
class PortBinding:
    """A published port as programmed: host address and port to the container's port."""
    proto: str
    host_ip: IPv4Address
    host_port: int
    port: int

    @property
    def loopback(self) -> bool:
        """Bound to 127.0.0.0/8: served by the userland proxy only (the kernel
        never routes 127.x to another interface without route_localnet)."""
        return self.host_ip.is_loopback

    def overlaps(self, other: "PortBinding") -> bool:
        """Whether both cannot be bound at once (0.0.0.0 takes every address)."""
        return ((self.proto, self.host_port) == (other.proto, other.host_port)
                and ANY_ADDRESS in (self.host_ip, other.host_ip)
                or (self.proto, self.host_ip, self.host_port)
                == (other.proto, other.host_ip, other.host_port))

    def describe(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.port}/{self.proto}"

    def to_docker(self, container_ip: IPv4Address) -> dict:
        """The shape of libnetwork's types.PortBinding (EndpointOperInfo)."""
        return {"Proto": PROTOCOL_NUMBERS[self.proto], "IP": str(container_ip), "Port": self.port,
                "HostIP": "" if self.host_ip == ANY_ADDRESS else str(self.host_ip),
                "HostPort": self.host_port, "HostPortEnd": self.host_port}

    def to_json(self) -> dict:
        return {"proto": self.proto, "host_ip": str(self.host_ip),
                "host_port": self.host_port, "port": self.port}

    @classmethod
    def from_json(cls, raw: Mapping) -> "PortBinding":
        return cls(proto=raw["proto"], host_ip=IPv4Address(raw["host_ip"]),
                   host_port=int(raw["host_port"]), port=int(raw["port"]))


@dataclass(frozen=True)
class Publication:
    """What ProgramExternalConnectivity asks for: the port map, in Docker's order."""
    requests: Tuple[PortRequest, ...] = ()

    @classmethod
    def from_options(cls, options: Optional[Mapping]) -> "Publication":
        options = options or {}
        if not isinstance(options, Mapping):
            raise FanError("ProgramExternalConnectivity Options must be a JSON object")
        raw = options.get(PORTMAP)
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise FanError(f"{PORTMAP} {str(raw)[:80]!r} is not a list; it must be a JSON list "
                           f"of port bindings, as [{EXAMPLE_ENTRY}] (null or [] for none)")
        if len(raw) > MAX_BINDINGS:
            raise FanError(f"{len(raw)} port bindings: at most {MAX_BINDINGS} can be published")
        return cls(tuple(PortRequest.from_json(entry) for entry in raw))


# (proto, host port) -> [(who holds it, binding)]: the fan's own bindings.
Held = Dict[Tuple[str, int], List[Tuple[str, "PortBinding"]]]


def held_index(pairs: Iterable[Tuple[str, PortBinding]]) -> Held:
    index: Held = {}
    for holder, binding in pairs:
        index.setdefault((binding.proto, binding.host_port), []).append((holder, binding))
    return index


def bindings_to_docker(bindings: Iterable[PortBinding], container_ip: IPv4Address) -> list:
    return [b.to_docker(container_ip) for b in bindings]


def first_conflict(binding: PortBinding, held: Iterable[Tuple[str, PortBinding]]
                   ) -> Optional[str]:
    """Who, of (holder, binding) pairs, already holds what `binding` needs."""
    return next((holder for holder, other in held if binding.overlaps(other)), None)


def parse_port_range(text: str) -> Tuple[int, int]:
    """net.ipv4.ip_local_port_range ("32768\t60999"); Docker's fallback if unreadable."""
    try:
        low, high = (int(part) for part in text.split())
    except ValueError:
        return EPHEMERAL_FALLBACK
    return (low, high) if 0 < low <= high <= 65535 else EPHEMERAL_FALLBACK


def runs(bindings: Iterable[PortBinding]) -> Iterator[Tuple[PortBinding, int]]:
    """Bindings grouped into runs of consecutive host and container ports of one
    protocol and address: (first binding, length), to log a range as one line."""
    first, length = None, 0
    for b in bindings:
        if first is not None and (b.proto, b.host_ip) == (first.proto, first.host_ip) \
                and b.host_port == first.host_port + length and b.port == first.port + length:
            length += 1
            continue
        if first is not None:
            yield first, length
        first, length = b, 1
    if first is not None:
        yield first, length


def _is_int(value) -> bool:
    """A JSON integer: not a boolean, not a float such as 6.0 (6.0 == 6 in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _or_zero(value):
    """HostPort and HostPortEnd: absent or null is 0, as Go's zero value."""
    return 0 if value is None else value


def _shown(raw: Mapping) -> str:
    return repr(dict(raw))[:200]


def _port(value, name: str, raw, minimum: int = 0) -> int:
    if not _is_int(value):
        raise FanError(f"port map entry {_shown(raw)}: {name} {str(value)[:40]!r} is not an "
                       f"integer; give a port number from {minimum} to 65535 as a JSON number")
    if not minimum <= value <= 65535:
        raise FanError(f"port map entry {_shown(raw)}: {name} {value!r} is not a port "
                       f"number from {minimum} to 65535")
    return value


def _host_ip(value, raw) -> IPv4Address:
    if value in (None, ""):
        return ANY_ADDRESS
    if not isinstance(value, str):
        raise FanError(f"port map entry {_shown(raw)}: HostIP {str(value)[:40]!r} is not a "
                       'string; give an IPv4 address as a string, such as "127.0.0.1", or "" '
                       "for every address of the host")
    try:
        address = ip_address(value)
    except ValueError:
        raise FanError(f"port map entry {_shown(raw)}: HostIP {value[:40]!r} is not an IP "
                       'address; give an IPv4 address such as "127.0.0.1", or "" for every '
                       "address of the host") from None
    if address.version != 4:
        raise FanError(f"port map entry {_shown(raw)}: HostIP {value} is IPv6; the fan is "
                       "IPv4: publish on an IPv4 host address (-p 0.0.0.0:PORT:PORT)")
    return address

