"""Reading the host: its interfaces, routes and what its kernel can do."""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .config import HostFacts, Interface

log = logging.getLogger(__name__)

MAIN_TABLE = 254
RTN_UNICAST = 1
KERNEL_FAN_VERSION = "/proc/sys/net/fan/version"


async def read_facts(ipr: AsyncIPRoute) -> HostFacts:
    names, mtus = {}, {}
    async for link in await ipr.get_links():
        names[link["index"]] = link.get("ifname")
        mtus[link["index"]] = link.get("mtu")
    addresses = {index: [] for index in names}
    async for msg in await ipr.get_addr(family=2):
        addresses.setdefault(msg["index"], []).append(
            IPv4Interface((msg.get("address"), msg["prefixlen"])))
    interfaces = tuple(
        Interface(name=names[i], mtu=mtus[i], addresses=tuple(addresses[i]))
        for i in sorted(names) if names[i] != "lo")
    default_interface, routes = None, []
    async for route in await ipr.get_routes(family=2, table=MAIN_TABLE):
        if route["type"] != RTN_UNICAST:
            continue
        if route["dst_len"] == 0:
            default_interface = default_interface or names.get(route.get("oif"))
        else:
            routes.append(IPv4Network((route.get("dst"), route["dst_len"])))
    return HostFacts(interfaces=interfaces, default_interface=default_interface,
                     routes=tuple(routes))


@dataclass(frozen=True)
class KernelFeatures:
    fan_map: bool   # Ubuntu's fan patch: the tunnel computes the outer address itself
    ipip: bool
    vxlan: bool
    ebpf: bool      # tc programs that set tunnel keys on external-mode devices

    def describe(self) -> str:
        return ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in vars(self).items())


async def probe_kernel(ipr: AsyncIPRoute, ebpf_check) -> KernelFeatures:
    """Try each feature for real: a kernel config can't be read from a container."""
    return KernelFeatures(
        fan_map=os.path.exists(KERNEL_FAN_VERSION),
        ipip=await _can_create(ipr, "ipip", {}),
        vxlan=await _can_create(ipr, "vxlan", {"vxlan_id": 1, "vxlan_port": 4789}),
        ebpf=ebpf_check(),
    )


async def _can_create(ipr: AsyncIPRoute, kind: str, extra: dict) -> bool:
    name = f"fanprobe{os.getpid() % 10000}"
    try:
        await ipr.link("add", ifname=name, kind=kind, **extra)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:   # an equivalent device exists: the kind is there
            return True
        log.debug("kernel cannot create %s devices: %s", kind, exc)
        return False
    await ipr.link("del", ifname=name)
    return True
