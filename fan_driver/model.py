"""The plugin's state: pools, networks and endpoints, and their JSON form. Pure."""
from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Dict, Optional, Tuple

from .config import DEFAULT_VXLAN_PORTS
from .fanmap import FanMap, HostSlice
from .ports import PortBinding

# Pools are keyed by their overlay: two fan networks can never share one.
POOL_PREFIX = "fan:"
ENDPOINT_IFNAME_PREFIX = "fve"
# The state file's layout; a file without a version has the first one.
STATE_VERSION = 1


class NewerState(Exception):
    """A state file of a layout this fan-driver does not know: a newer one wrote it."""

    def __init__(self, version: int):
        super().__init__(f"version {version}")
        self.version = version


class Owner:
    """Who holds an address in Pool.addresses, when not an endpoint (whose ID is
    then the owner). Plain strings, as the state file has always stored them."""
    GATEWAY = "gateway"        # the bridge's .1
    PENDING = ""               # handed out; the endpoint that uses it is not known yet
    # PENDING when the plugin (re)started: Docker either claims it within its
    # retries or never will (the reply was lost in a crash): released after a while.
    UNCLAIMED = "unclaimed"


def pool_id(overlay: IPv4Network) -> str:
    return POOL_PREFIX + str(overlay)


def short_id(docker_id: str) -> str:
    """Docker's short form of a network or endpoint ID, of either form: its
    first 12 characters, as `docker network ls` shows them."""
    return docker_id[:12]


@dataclass
class Pool:
    """An overlay given out by the IPAM: this host's slice of it and what is taken."""
    overlay: str
    underlay: str            # the underlay block, e.g. 172.30.0.0/16
    underlay_address: str    # this host's address in it
    interface: str           # the link the underlay is on
    mtu: int                 # that link's MTU
    host_reserve: int = 1
    # address -> owner: an endpoint ID or an Owner value
    addresses: Dict[str, str] = field(default_factory=dict)
    # Handed out before a restart and no network uses it yet: released after a while.
    unclaimed: bool = False
    # endpoint name -> the address it last had, least recently seen first
    # (Docker 29 and later name the container in RequestAddress; see ipam.py)
    remembered: Dict[str, str] = field(default_factory=dict)

    @property
    def host_slice(self) -> HostSlice:
        fan = FanMap(IPv4Network(self.overlay), IPv4Network(self.underlay))
        return HostSlice(fan, IPv4Address(self.underlay_address))


@dataclass
class Endpoint:
    address: str             # a.b.c.d/len
    mac: str
    ports: Tuple[PortBinding, ...] = ()   # published, as programmed

    def to_json(self) -> dict:
        return {"address": self.address, "mac": self.mac,
                "ports": [b.to_json() for b in self.ports]}

    @classmethod
    def from_json(cls, raw: dict) -> "Endpoint":
        """State files written before ports were published have no "ports"."""
        return cls(address=raw["address"], mac=raw["mac"],
                   ports=tuple(PortBinding.from_json(b) for b in raw.get("ports", ())))

    @property
    def ip(self) -> IPv4Address:
        return IPv4Interface(self.address).ip

    @staticmethod
    def host_ifname(endpoint_id: str) -> str:
        return ENDPOINT_IFNAME_PREFIX + endpoint_id[:12]

    @staticmethod
    def container_ifname(endpoint_id: str) -> str:
        return "fvc" + endpoint_id[:12]


@dataclass
class Network:
    pool_id: str
    encap: str               # ipip | vxlan
    mapping: str             # how peers are found: ebpf | routes | kernel
    mtu: int
    tc_pref: int             # the priority of this network's filter on a shared tunnel
    internal: bool = False   # --internal: no NAT, nothing leaves the overlay
    # how tunnel traffic reaches containers (config.RECEIVES); networks made
    # before it existed take the kernel's path, which every kernel has
    receive: str = "tunnel"
    # the UDP port of its VXLAN (None: IPIP); networks made before it could be
    # chosen use their mapping's default, which is what they were made with
    vxlan_port: Optional[int] = None
    endpoints: Dict[str, Endpoint] = field(default_factory=dict)

    def __post_init__(self):
        if self.encap == "vxlan" and self.vxlan_port is None:
            self.vxlan_port = DEFAULT_VXLAN_PORTS[self.mapping]


@dataclass
class State:
    pools: Dict[str, Pool] = field(default_factory=dict)
    networks: Dict[str, Network] = field(default_factory=dict)

    def to_json(self) -> dict:
        """A copy as plain data (by hand: dataclasses.asdict is ten times slower,
        and this runs on every change)."""
        return {"version": STATE_VERSION,
                # remembered as pairs: the file's keys are sorted, and its order matters
                "pools": {k: dict(vars(p), addresses=dict(p.addresses),
                                  remembered=[[n, a] for n, a in p.remembered.items()])
                          for k, p in self.pools.items()},
                "networks": {k: dict(vars(n), endpoints={e: ep.to_json()
                                                         for e, ep in n.endpoints.items()})
                             for k, n in self.networks.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "State":
        """The state in `data`, sharing nothing with it."""
        version = data.get("version", 1)
        if type(version) is not int or version < 1:
            raise ValueError(f"version {version!r}")
        if version > STATE_VERSION:
            raise NewerState(version)
        networks = {}
        for nid, raw in data.get("networks", {}).items():
            raw = dict(raw)
            eps = {eid: Endpoint.from_json(ep) for eid, ep in raw.pop("endpoints", {}).items()}
            networks[nid] = Network(endpoints=eps, **raw)
        pools = {pid: Pool(**dict(raw, addresses=dict(raw.get("addresses", {})),
                                  remembered=dict(raw.get("remembered", []))))
                 for pid, raw in data.get("pools", {}).items()}
        return cls(pools=pools, networks=networks)

    def network_of_pool(self, pid: str) -> Optional[str]:
        for nid, net in self.networks.items():
            if net.pool_id == pid:
                return nid
        return None


def mac_for(address: IPv4Interface) -> str:
    """A MAC derived from the IP, as Docker's bridge does: a reused address keeps
    its MAC, so stale neighbour entries elsewhere stay right."""
    return "0e:fa:" + ":".join(f"{b:02x}" for b in address.ip.packed)
