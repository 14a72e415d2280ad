"""Docker's plugin protocol as typed values: each request decoded once into a
frozen dataclass, each reply encoded from one. Pure.

Docker's JSON keys live here alone: the drivers take and return these values.
What the fan cannot serve and a request's own shape already shows (IPv6, a
sub-pool, auxiliary addresses, an IPv6-only network) is refused while decoding,
in the order Docker's fields were always checked; what depends on the state
is the drivers' to refuse.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, Optional, Tuple

from .config import NetworkOptions, UnderlaySpec, parse_cidr, parse_flag, parse_ipam_options
from .errors import FanError
from .ports import PORTMAP, PortBinding, Publication, bindings_to_docker

GENERIC_OPTIONS = "com.docker.network.generic"
# CreateNetwork Options next to the generic ones (docker network create --internal,
# and Docker 28's --ipv4=false)
INTERNAL_OPTION = "com.docker.network.internal"
ENABLE_IPV4_OPTION = "com.docker.network.enable_ipv4"
GATEWAY_REQUEST = "com.docker.network.gateway"
# Docker 29 and later name the container in RequestAddress (moby PR 50586).
ENDPOINT_NAME = "com.docker.network.endpoint.name"
# The IDs Docker names networks and endpoints by (see network_id, endpoint_id):
# they end up in interface names, marks and firewall comments, so nothing else
# is let in.
DOCKER_ID = re.compile(r"[0-9a-f]{64}")
SWARM_ID = re.compile(r"[0-9a-z]{25}")
MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
ROUTE_VIA_NEXT_HOP = 0   # libnetwork types.NEXTHOP: a StaticRoute through NextHop


class BadRequest(FanError):
    """A request whose body is not what Docker sends."""


# --- fields ------------------------------------------------------------------------------

def field(body: dict, key: str, kind: type, default: Any = None) -> Any:
    """body[key], which must be a `kind`; absent or null means `default`, or
    that the request lacks it when there is none."""
    value = body.get(key, default)
    if value is None:
        value = default
    if value is None:
        raise BadRequest(f"request is missing {key}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"request field {key} must be a {_kind_name(kind)}")
    return value


def _kind_name(kind) -> str:
    names = {str: "string", dict: "JSON object", list: "JSON list", bool: "boolean"}
    return names.get(kind, kind.__name__)


def network_id(body: dict) -> str:
    """NetworkID: a Docker ID, 64 lower-case hexadecimal digits (libnetwork's
    stringid.GenerateRandomID), or for a swarm-scoped network the ID swarmkit
    gave it, which the daemon creates it under: a swarm ID, 25 lower-case
    base-36 digits (swarmkit's identity.NewID)."""
    value = field(body, "NetworkID", str)
    if not (DOCKER_ID.fullmatch(value) or SWARM_ID.fullmatch(value)):
        raise BadRequest("request field NetworkID must be a Docker ID (64 hexadecimal digits) "
                         "or a swarm ID (25 lower-case letters and digits), "
                         f"not {value[:80]!r}")
    return value


def endpoint_id(body: dict) -> str:
    """EndpointID: a Docker ID only. libnetwork makes every endpoint itself,
    with stringid.GenerateRandomID, in swarm-scoped networks too."""
    value = field(body, "EndpointID", str)
    if not DOCKER_ID.fullmatch(value):
        raise BadRequest("request field EndpointID must be a Docker ID (64 hexadecimal digits), "
                         f"not {value[:80]!r}")
    return value


def _require_ipv4(options: dict) -> None:
    """Docker 28 and later say whether the network has IPv4; the fan is IPv4 only."""
    if parse_flag(options, ENABLE_IPV4_OPTION, True) is False:
        raise FanError("a fan network is IPv4: an IPv6-only network (--ipv4=false) cannot be "
                       "a fan; create it without --ipv4=false")


def _address(text: str) -> IPv4Address:
    """`a.b.c.d`, as Docker sends it, or `a.b.c.d/len` (a valid length)."""
    try:
        return IPv4Interface(str(text)).ip
    except ValueError:
        raise FanError(f"{str(text)[:80]!r} is not an IPv4 address") from None


# --- network driver requests ---------------------------------------------------------------

@dataclass(frozen=True)
class NetworkRef:
    """DeleteNetwork."""
    network_id: str

    @classmethod
    def decode(cls, body: dict) -> "NetworkRef":
        return cls(network_id(body))


@dataclass(frozen=True)
class EndpointRef:
    """DeleteEndpoint, EndpointOperInfo, Join, Leave, RevokeExternalConnectivity."""
    network_id: str
    endpoint_id: str

    @classmethod
    def decode(cls, body: dict) -> "EndpointRef":
        return cls(network_id(body), endpoint_id(body))


@dataclass(frozen=True)
class CreateNetwork:
    network_id: str
    options: NetworkOptions          # the -o KEY=VALUE options
    internal: bool                   # --internal
    address_space: Optional[str]     # what the IPAM said in GetDefaultAddressSpaces
    pool: Optional[IPv4Network]      # the overlay; None: Docker named none
    pool_as_sent: str = ""           # as Docker wrote it: messages quote it

    @classmethod
    def decode(cls, body: dict) -> "CreateNetwork":
        nid = network_id(body)
        options = field(body, "Options", dict, {})
        ipv4_data = field(body, "IPv4Data", list, [])
        ipv6_data = field(body, "IPv6Data", list, [])
        generic = NetworkOptions.parse(options.get(GENERIC_OPTIONS))
        _require_ipv4(options)
        if ipv6_data:
            raise FanError("the fan is IPv4 only; create the network without --ipv6")
        data = ipv4_data[0] if ipv4_data else {}
        if not isinstance(data, dict) or not isinstance(data.get("Pool", ""), str):
            raise FanError("IPv4Data must be a list of objects with a Pool string")
        if data.get("AuxAddresses"):
            raise FanError("--aux-address is not supported on a fan network: each host hands "
                           "out its own slice; keep addresses for the host with "
                           "-o host_reserve=N instead")
        text = data.get("Pool", "")
        space = data.get("AddressSpace")
        return cls(network_id=nid, options=generic,
                   internal=parse_flag(options, INTERNAL_OPTION, False),
                   address_space=space if isinstance(space, str) else None,
                   pool=parse_cidr(text, "subnet") if text else None, pool_as_sent=text)


@dataclass(frozen=True)
class CreateEndpoint:
    network_id: str
    endpoint_id: str
    address: Optional[IPv4Interface]   # None: Docker gave none
    mac: Optional[str]                 # lower case; None: Docker leaves it to the driver
    address_as_sent: str = ""          # as Docker wrote it: messages quote it

    @classmethod
    def decode(cls, body: dict) -> "CreateEndpoint":
        ids = EndpointRef.decode(body)
        interface = field(body, "Interface", dict, {})
        if interface.get("AddressIPv6"):
            raise FanError("the fan is IPv4 only; drop --ip6")
        text = interface.get("Address")
        return cls(network_id=ids.network_id, endpoint_id=ids.endpoint_id,
                   address=_endpoint_address(text), mac=_mac(interface.get("MacAddress")),
                   address_as_sent=str(text) if text else "")


def _endpoint_address(text) -> Optional[IPv4Interface]:
    if not text:
        return None
    if not isinstance(text, str):
        raise FanError(f"endpoint address {text!r} is not an IPv4 address")
    try:
        return IPv4Interface(text)
    except ValueError:
        raise FanError(f"endpoint address {text!r} is not an IPv4 address") from None


def _mac(text) -> Optional[str]:
    if not text:
        return None
    if not isinstance(text, str) or not MAC.fullmatch(text) or int(text[:2], 16) & 1:
        raise FanError(f"endpoint MAC address {str(text)[:40]!r} is not a unicast MAC "
                       "address such as 0e:fa:fa:00:1c:02")
    return text.lower()


@dataclass(frozen=True)
class ExternalConnectivity:
    """ProgramExternalConnectivity: the ports to publish."""
    network_id: str
    endpoint_id: str
    publication: Publication

    @classmethod
    def decode(cls, body: dict) -> "ExternalConnectivity":
        ids = EndpointRef.decode(body)
        return cls(ids.network_id, ids.endpoint_id,
                   Publication.from_options(field(body, "Options", dict, {})))


@dataclass(frozen=True)
class GatewayCheck:
    """GwAllocCheck: only whether the network has IPv4 matters, and it must."""

    @classmethod
    def decode(cls, body: dict) -> "GatewayCheck":
        _require_ipv4(field(body, "Options", dict, {}))
        return cls()


# --- IPAM driver requests ------------------------------------------------------------------

@dataclass(frozen=True)
class PoolRequest:
    overlay: Optional[IPv4Network]     # None: Docker named none (--subnet left out)
    underlay: Optional[UnderlaySpec]   # --ipam-opt underlay=...; None: the plugin's default

    @classmethod
    def decode(cls, body: dict) -> "PoolRequest":
        pool = field(body, "Pool", str, "")
        sub_pool = field(body, "SubPool", str, "")
        options = field(body, "Options", dict, {})
        if field(body, "V6", bool, False):
            raise FanError("the fan is IPv4 only; create the network without --ipv6 "
                           "and without an IPv6 --subnet")
        if sub_pool:
            raise FanError(f"--ip-range {sub_pool} is not supported: on the fan each host's "
                           "range is decided by its underlay address")
        return cls(overlay=parse_cidr(pool, "subnet") if pool else None,
                   underlay=parse_ipam_options(options))


@dataclass(frozen=True)
class PoolRef:
    """ReleasePool."""
    pool_id: str

    @classmethod
    def decode(cls, body: dict) -> "PoolRef":
        return cls(field(body, "PoolID", str))


@dataclass(frozen=True)
class AddressRequest:
    pool_id: str
    address: Optional[IPv4Address]   # --ip (or --gateway); None: any
    gateway: bool                    # the bridge's own address, not a container's
    name: Optional[str]              # the container's (Docker 29 and later)

    @classmethod
    def decode(cls, body: dict) -> "AddressRequest":
        pool_id = field(body, "PoolID", str)
        text = field(body, "Address", str, "")
        options = field(body, "Options", dict, {})
        gateway = options.get("RequestAddressType") == GATEWAY_REQUEST
        address = _address(text) if text else None
        return cls(pool_id=pool_id, address=address, gateway=gateway,
                   name=None if gateway else _endpoint_name(options))


def _endpoint_name(options: dict) -> Optional[str]:
    name = options.get(ENDPOINT_NAME)
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise FanError(f"RequestAddress option {ENDPOINT_NAME} must be a string: the "
                       "container's name, as Docker sends it")
    return name


@dataclass(frozen=True)
class AddressRelease:
    pool_id: str
    address: IPv4Address

    @classmethod
    def decode(cls, body: dict) -> "AddressRelease":
        pool_id = field(body, "PoolID", str)
        return cls(pool_id, _address(field(body, "Address", str)))


# --- replies -------------------------------------------------------------------------------

def encode(reply) -> dict:
    """A reply as Docker reads it; None, for a call that succeeded and has
    nothing to say, is {}."""
    return {} if reply is None else reply.encode()


@dataclass(frozen=True)
class Activation:
    """Plugin.Activate: the plugin APIs this plugin serves."""
    implements: Tuple[str, ...] = ("NetworkDriver", "IpamDriver")

    def encode(self) -> dict:
        return {"Implements": list(self.implements)}


@dataclass(frozen=True)
class NetworkCapabilities:
    scope: str
    connectivity_scope: str
    gateway_alloc_checker: bool   # Docker 28: GwAllocCheck is asked first

    def encode(self) -> dict:
        return {"Scope": self.scope, "ConnectivityScope": self.connectivity_scope,
                "GwAllocChecker": self.gateway_alloc_checker}


@dataclass(frozen=True)
class GatewayAllocation:
    skip_ipv4: bool
    skip_ipv6: bool

    def encode(self) -> dict:
        return {"SkipIPv4": self.skip_ipv4, "SkipIPv6": self.skip_ipv6}


@dataclass(frozen=True)
class EndpointCreated:
    mac: Optional[str]   # the MAC the driver chose; None when Docker gave one

    def encode(self) -> dict:
        # only the fields Docker left empty: changing a value it gave makes it roll back
        return {"Interface": {} if self.mac is None else {"MacAddress": self.mac}}


@dataclass(frozen=True)
class EndpointInfo:
    address: IPv4Interface
    mac: str
    host_interface: str
    ports: Tuple[PortBinding, ...]

    def encode(self) -> dict:
        return {"Value": {"Address": str(self.address), "MacAddress": self.mac,
                          "HostInterface": self.host_interface,
                          PORTMAP: bindings_to_docker(self.ports, self.address.ip)}}


@dataclass(frozen=True)
class StaticRoute:
    destination: IPv4Network
    next_hop: IPv4Address


@dataclass(frozen=True)
class JoinInfo:
    src_name: str                      # the veth end Docker moves into the container
    gateway: IPv4Address
    static_routes: Tuple[StaticRoute, ...] = ()
    dst_prefix: str = "eth"            # Docker names it eth0, eth1, ... inside
    disable_gateway_service: bool = False

    def encode(self) -> dict:
        return {"InterfaceName": {"SrcName": self.src_name, "DstPrefix": self.dst_prefix},
                "Gateway": str(self.gateway),
                "StaticRoutes": [{"Destination": str(r.destination),
                                  "RouteType": ROUTE_VIA_NEXT_HOP, "NextHop": str(r.next_hop)}
                                 for r in self.static_routes],
                "DisableGatewayService": self.disable_gateway_service}


@dataclass(frozen=True)
class IpamCapabilities:
    requires_mac_address: bool
    requires_request_replay: bool

    def encode(self) -> dict:
        return {"RequiresMACAddress": self.requires_mac_address,
                "RequiresRequestReplay": self.requires_request_replay}


@dataclass(frozen=True)
class AddressSpaces:
    local: str
    global_: str

    def encode(self) -> dict:
        return {"LocalDefaultAddressSpace": self.local, "GlobalDefaultAddressSpace": self.global_}


@dataclass(frozen=True)
class PoolGranted:
    pool_id: str
    pool: IPv4Network

    def encode(self) -> dict:
        return {"PoolID": self.pool_id, "Pool": str(self.pool), "Data": {}}


@dataclass(frozen=True)
class AddressGranted:
    address: IPv4Interface

    def encode(self) -> dict:
        return {"Address": str(self.address), "Data": {}}
