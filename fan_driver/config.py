"""Options as Docker passes them, parsed into typed values: pure, no I/O."""
from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Mapping, Optional

from .errors import FanError

DEFAULT_OVERLAY = IPv4Network("250.0.0.0/8")
DEFAULT_UNDERLAY = "default/16"
ENCAPS = ("auto", "ipip", "vxlan")
LOG_LEVELS = ("debug", "info", "warning", "error")
# How a host finds the underlay address of a peer's slice: the kernel's fan map
# (Ubuntu's patch), an eBPF program, or one route (and for VXLAN neighbour and
# FDB entry) per peer; `auto` takes the first this kernel can do.
PEER_MAPPINGS = ("kernel", "ebpf", "routes")
MAPPINGS = ("auto",) + PEER_MAPPINGS
# How VXLAN from other hosts reaches containers: through the kernel's tunnel
# device (after the host's PREROUTING and INPUT), straight from the underlay
# device for flows the host's firewall admitted (conntrack), or straight from
# it for every packet (direct: skips PREROUTING and INPUT, opt-in).
RECEIVES = ("auto", "tunnel", "conntrack", "direct")
RECEIVE_PATHS = {
    "tunnel": "tunnel traffic through the tunnel device, after the host's PREROUTING and INPUT",
    "conntrack": "tunnel traffic straight from the underlay device, for flows whose first "
                 "packet passed the host's PREROUTING and INPUT (conntrack)",
    "direct": "tunnel traffic straight from the underlay device, skipping the host's "
              "PREROUTING and INPUT",
}
# The UDP port of a VXLAN network's tunnel when -o vxlan_port does not say:
# the eBPF mapping's external-mode device and the kernel fan map take the IANA
# port, mapping=routes the kernel's (and flannel's) own, since a plain VXLAN
# device cannot share a port with an external-mode one. Every host of a fan
# must use the same, so these never change: a network keeps its port in the state.
VXLAN_PORT = 4789
ROUTES_VXLAN_PORT = 8472
DEFAULT_VXLAN_PORTS = {"kernel": VXLAN_PORT, "ebpf": VXLAN_PORT, "routes": ROUTES_VXLAN_PORT}
MTU_OPTION = "com.docker.network.driver.mtu"
NETWORK_OPTIONS = ("underlay", "encap", "mapping", "receive", "host_reserve", "vxlan_port",
                   MTU_OPTION)
IPAM_OPTIONS = ("underlay",)
# Linux interface names: at most 15 bytes, no '/', no whitespace.
_IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}")
MIN_MTU = 576


def parse_cidr(text: str, what: str) -> IPv4Network:
    try:
        return IPv4Network(text, strict=False)
    except (ValueError, TypeError):
        raise FanError(f"{what} {text!r} is not an IPv4 CIDR such as 250.0.0.0/8") from None


@dataclass(frozen=True)
class UnderlaySpec:
    """`172.30.0.0/16`, `eth0/16` or `default/16`, as fanctl writes an underlay."""
    text: str
    prefixlen: int
    network: Optional[IPv4Network] = None   # address-block form
    interface: Optional[str] = None         # interface form; "default" = default route's

    @classmethod
    def parse(cls, text: str) -> "UnderlaySpec":
        if not isinstance(text, str) or text.count("/") != 1:
            raise FanError(
                f"underlay {text!r} is malformed: write an address block (172.30.0.0/16), "
                "an interface with a prefix length (eth0/16) or default/16")
        head, length = text.split("/")
        if not _is_number(length) or not 1 <= int(length) <= 30:
            raise FanError(f"underlay {text!r}: prefix length must be a number from 1 to 30")
        try:
            IPv4Address(head)
        except ValueError:
            if not _IFNAME.fullmatch(head):
                raise FanError(
                    f"underlay {text!r}: {head!r} is neither an IPv4 address nor a valid "
                    "interface name") from None
            return cls(text=text, prefixlen=int(length), interface=head)
        return cls(text=text, prefixlen=int(length), network=parse_cidr(text, "underlay"))


@dataclass(frozen=True)
class NetworkOptions:
    """The `-o KEY=VALUE` options of `docker network create -d fan`."""
    underlay: Optional[UnderlaySpec] = None
    encap: str = "auto"
    mapping: str = "auto"
    receive: str = "auto"
    host_reserve: int = 1
    mtu: Optional[int] = None
    vxlan_port: Optional[int] = None   # None: the mapping's default (DEFAULT_VXLAN_PORTS)

    @classmethod
    def parse(cls, generic: Mapping) -> "NetworkOptions":
        generic = generic or {}
        if not isinstance(generic, Mapping):
            raise FanError("network options must be a map of KEY=VALUE")
        _reject_unknown(generic, NETWORK_OPTIONS, "network option", "-o")
        underlay = generic.get("underlay")
        encap = str(generic.get("encap", "auto"))
        if encap not in ENCAPS:
            raise FanError(f"encap {encap!r} is not one of: {', '.join(ENCAPS)}")
        mapping = str(generic.get("mapping", "auto"))
        if mapping not in MAPPINGS:
            raise FanError(f"mapping {mapping!r} is not one of: {', '.join(MAPPINGS)}")
        receive = str(generic.get("receive", "auto"))
        if receive not in RECEIVES:
            raise FanError(f"receive {receive!r} is not one of: {', '.join(RECEIVES)}")
        host_reserve = _int_option(generic, "host_reserve", 1, minimum=1)
        mtu = _int_option(generic, MTU_OPTION, None, minimum=MIN_MTU)
        vxlan_port = _int_option(generic, "vxlan_port", None, minimum=1, maximum=65535)
        if vxlan_port is not None and encap == "ipip":
            raise FanError(f"vxlan_port applies to encap=vxlan, not encap={encap}: "
                           "drop -o vxlan_port or use -o encap=vxlan")
        return cls(
            underlay=UnderlaySpec.parse(str(underlay)) if underlay is not None else None,
            encap=encap, mapping=mapping, receive=receive, host_reserve=host_reserve, mtu=mtu,
            vxlan_port=vxlan_port)

    def vxlan_port_for(self, encap: str, mapping: str) -> Optional[int]:
        """The UDP port of a network given `encap` and `mapping` (as chosen for
        it): the option's, else the mapping's default; None for IPIP."""
        if encap != "vxlan":
            if self.vxlan_port is not None:
                raise FanError(f"vxlan_port applies to encap=vxlan, and this network gets "
                               f"encap={encap}: add -o encap=vxlan or drop -o vxlan_port")
            return None
        return self.vxlan_port if self.vxlan_port is not None else DEFAULT_VXLAN_PORTS[mapping]


def parse_flag(options: Mapping, key: str, default: bool) -> bool:
    """A true/false network option (a JSON boolean, or its text)."""
    value = options.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise FanError(f"network option {key}={value!r} must be true or false")
    return value


def parse_ipam_options(options: Optional[Mapping]) -> Optional[UnderlaySpec]:
    """The `--ipam-opt` options: only the underlay, which decides the slice."""
    options = options or {}
    if not isinstance(options, Mapping):
        raise FanError("IPAM options must be a map of KEY=VALUE")
    _reject_unknown(options, IPAM_OPTIONS, "IPAM option", "--ipam-opt")
    if "underlay" in options:
        return UnderlaySpec.parse(str(options["underlay"]))
    return None


def _reject_unknown(options: Mapping, known, what: str, flag: str) -> None:
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        raise FanError(
            f"unknown {what} {', '.join(repr(k) for k in unknown)}; "
            f"the fan driver accepts {flag} {', '.join(known)}")


def _int_option(options: Mapping, key: str, default, minimum: int,
                maximum: Optional[int] = None):
    if key not in options:
        return default
    value = str(options[key])
    if (not _is_number(value) or int(value) < minimum
            or (maximum is not None and int(value) > maximum)):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
        raise FanError(f"option {key}={value!r} must be a whole number {bound}")
    return int(value)


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() refuses."""
    return re.fullmatch(r"[0-9]{1,9}", text) is not None
