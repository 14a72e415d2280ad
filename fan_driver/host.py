"""Reading the host: its interfaces, routes and what its kernel can do."""
from __future__ import annotations

import errno
import logging
import os
from ipaddress import IPv4Interface, IPv4Network

from pyroute2 import AsyncIPRoute

from .dataplane.netlink import GONE, MAIN_TABLE, RTN_UNICAST, dumped, kernel
from .dataplane.encap import ENCAPS
from .errors import KernelError
from .hostfacts import HostFacts, Interface, KernelFeatures

log = logging.getLogger(__name__)

KERNEL_FAN_VERSION = "/proc/sys/net/fan/version"
# A device kind the kernel refuses to create for lack of permission is not
# known to be absent: the plugin cannot work anyway, and says why.
NOT_ALLOWED = (errno.EPERM, errno.EACCES)


async def read_facts(ipr: AsyncIPRoute) -> HostFacts:
    """The interfaces, addresses and main-table routes; a kernel refusal (or a
    dump interrupted again and again) is a KernelError."""
    names, mtus = {}, {}
    for link in await dumped("reading the host's interfaces", ipr.get_links):
        names[link["index"]] = link.get("ifname")
        mtus[link["index"]] = link.get("mtu")
    addresses = {index: [] for index in names}
    for msg in await dumped("reading the host's addresses", lambda: ipr.get_addr(family=2)):
        addresses.setdefault(msg["index"], []).append(
            IPv4Interface((msg.get("address"), msg["prefixlen"])))
    interfaces = tuple(
        Interface(name=names[i], mtu=mtus[i], addresses=tuple(addresses[i]))
        for i in sorted(names) if names[i] != "lo")
    default_interface, routes = None, []
    for route in await dumped("reading the host's routes",
                              lambda: ipr.get_routes(family=2, table=MAIN_TABLE)):
        if route["type"] != RTN_UNICAST:
            continue
        if route["dst_len"] == 0:
            default_interface = default_interface or names.get(route.get("oif"))
        else:
            routes.append(IPv4Network((route.get("dst"), route["dst_len"])))
    return HostFacts(interfaces=interfaces, default_interface=default_interface,
                     routes=tuple(routes))


async def probe_kernel(ipr: AsyncIPRoute, ebpf_check, conntrack_check) -> KernelFeatures:
    """Try each feature for real: a kernel config can't be read from a container."""
    ebpf = ebpf_check()
    return KernelFeatures(
        fan_map=os.path.exists(KERNEL_FAN_VERSION),
        **{e.name: await _can_create(ipr, e.name, e.probe_spec()) for e in ENCAPS.values()},
        ebpf=ebpf,
        conntrack_lookup=ebpf and conntrack_check(),
    )


async def _can_create(ipr: AsyncIPRoute, kind: str, extra: dict) -> bool:
    """Whether the kernel makes devices of `kind`. Its refusal means it does not,
    but EEXIST (an equivalent device exists: the kind is there) and a lack of
    permission (a KernelError saying so); so does failing to delete the probe."""
    name = f"fanprobe{os.getpid() % 10000}"
    try:
        with kernel(f"creating probe device {name} ({kind})"):
            await ipr.link("add", ifname=name, kind=kind, **extra)
    except KernelError as exc:
        if exc.code == errno.EEXIST:
            return True
        if exc.code in NOT_ALLOWED:
            raise
        log.debug("kernel cannot create %s devices: %s", kind, exc)
        return False
    with kernel(f"deleting probe device {name} ({kind})", tolerate=GONE):
        await ipr.link("del", ifname=name)
    return True
