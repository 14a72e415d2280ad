"""The encapsulations a fan network can use: one module each, behind
base.Encapsulation, and one line each in ENCAPS."""
from __future__ import annotations

from typing import Dict

from ...errors import FanError
from ...hostfacts import KernelFeatures
from .base import Encapsulation
from .ipip import IPIP
from .vxlan import VXLAN

# By name, in the order encap=auto prefers them (the least overhead first).
ENCAPS: Dict[str, Encapsulation] = {e.name: e for e in (
    IPIP,
    VXLAN,
)}
TUNNEL_UDP_PORTS = tuple(port for e in ENCAPS.values() for port in e.udp_ports)


def encap_named(name: str) -> Encapsulation:
    try:
        return ENCAPS[name]
    except KeyError:
        raise FanError(f"encap={name} is not available in this version of fan-driver; "
                       f"use one of: {', '.join(ENCAPS)} or auto") from None


def supported(encap: Encapsulation, features: KernelFeatures) -> bool:
    """Whether this kernel creates the encapsulation's devices: KernelFeatures
    has a field of its name, which host.probe_kernel fills with its probe."""
    return getattr(features, encap.name)
