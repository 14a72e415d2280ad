"""Reading the kernel's fan objects for `fan-driver check` as plain data
(`KernelView`), so that comparing them with the state (drift.py) is pure.
`fan-driver check --kernel-json` prints it (the tests read a lab host's so).
"""
from __future__ import annotations

import asyncio
import socket
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

from pyroute2 import AsyncIPRoute

from .. import iptables
from ..dataplane import bpf
from ..dataplane.mapping.ebpf import DECAP_PREF, PROGRAM_PREFIX
from ..dataplane.firewall import CHAINS, mark_of, saved_line
from ..dataplane.netlink import LOCAL_TABLE, Rtnl, dumped, ipv4_routes, is_ours
from ..dataplane.encap import ENCAPS
from ..model import ENDPOINT_IFNAME_PREFIX, Endpoint

CONTAINER_IFNAME_PREFIX = Endpoint.container_ifname("")
ENDPOINT_PREFIXES = (ENDPOINT_IFNAME_PREFIX, CONTAINER_IFNAME_PREFIX)
HOOKED = {builtin for _, builtin, _ in CHAINS}
USER_CHAIN = "DOCKER-USER"


@dataclass(frozen=True)
class KernelView:
    """What the kernel holds of fan networks, by name."""
    marked: Dict[str, str] = field(default_factory=dict)       # interface -> its mark
    # interfaces named like an endpoint's veth ends (fve..., fvc...), marked or not
    endpoint_links: List[str] = field(default_factory=list)
    ports: Dict[str, List[str]] = field(default_factory=dict)  # bridge -> its ports
    # marked interface -> IPv4 routes through it, the local table's aside
    routes: Dict[str, List[str]] = field(default_factory=dict)
    # shared tunnel device -> prefs of the eBPF filters at its egress / ingress
    filters: Dict[str, List[int]] = field(default_factory=dict)
    ingress_filters: Dict[str, List[int]] = field(default_factory=dict)
    # [interface, pref] of our receive filters at an addressed interface's ingress
    decaps: List[Tuple[str, int]] = field(default_factory=list)
    rules: List[Tuple[str, str]] = field(default_factory=list)  # [table, line] with a fan mark
    chains: List[Tuple[str, str]] = field(default_factory=list)  # [table, chain] of ours
    # table -> the rules of the built-in chains we hook that jump to ours or DOCKER-USER
    hooks: Dict[str, List[str]] = field(default_factory=dict)
    iptables_error: str = ""                                   # why rules could not be read

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "KernelView":
        return cls(**{**raw, "decaps": [tuple(d) for d in raw["decaps"]],
                      "rules": [tuple(r) for r in raw["rules"]],
                      "chains": [tuple(c) for c in raw["chains"]]})


async def read_kernel(ipr: AsyncIPRoute, iptables_binary: str) -> KernelView:
    """The view of this network namespace; iptables rules read with
    `iptables_binary`-save (the backend the plugin writes with)."""
    links = await dumped("listing interfaces", ipr.get_links)
    names = {link["index"]: link.get("ifname") for link in links}
    marked = {link.get("ifname"): link.get("ifalias") for link in links
              if link.get("ifalias") is not None and is_ours(link.get("ifalias"))}
    ports: Dict[str, List[str]] = {}
    for link in links:
        master = names.get(link.get("master"))
        if master in marked:
            ports.setdefault(master, []).append(link.get("ifname"))
    routes: Dict[str, List[str]] = {}
    for route in await asyncio.to_thread(_routes):
        device = names.get(route.oif)
        if device in marked and route.table != LOCAL_TABLE:
            routes.setdefault(device, []).append(str(route.dst))
    filters, ingress = {}, {}
    for index, name in names.items():
        # the shared devices: one per encapsulation, and for VXLAN per UDP port in use
        if name in marked and any(e.is_external_device(name) for e in ENCAPS.values()):
            filters[name] = sorted(await bpf.filters(ipr, index, bpf.EGRESS))
            ingress[name] = sorted(await bpf.filters(ipr, index, bpf.INGRESS))
    addressed = {a["index"] for a in await dumped(
        "listing IPv4 addresses", lambda: ipr.get_addr(family=socket.AF_INET))}
    decaps = []
    for index in sorted(addressed):
        decaps += [(names[index], pref)
                   for pref, program in (await bpf.filters(ipr, index, bpf.INGRESS)).items()
                   if pref >= DECAP_PREF and program.startswith(PROGRAM_PREFIX)]
    rules, chains, hooks, error = read_iptables(iptables_binary)
    return KernelView(
        marked=dict(sorted(marked.items())),
        endpoint_links=sorted(n for n in names.values() if n.startswith(ENDPOINT_PREFIXES)),
        ports={bridge: sorted(p) for bridge, p in sorted(ports.items())},
        routes={device: sorted(r) for device, r in sorted(routes.items())},
        filters=filters, ingress_filters=ingress, decaps=sorted(decaps),
        rules=rules, chains=chains, hooks=hooks, iptables_error=error)


def _routes():
    with Rtnl() as rtnl:
        return ipv4_routes(rtnl)


def read_iptables(binary: str):
    """(rules with a fan mark, our chains, the hooks' jumps, error) from `binary`-save."""
    code, out = iptables.run([binary + "-save"])
    if code != 0:
        return [], [], {}, (out.strip() or f"exit status {code}")
    rules, chains, hooks, table = [], [], {}, ""
    ours = {chain for _, _, chain in CHAINS}
    for line in map(saved_line, out.splitlines()):
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":") and line[1:].split()[0] in ours:
            chains.append((table, line[1:].split()[0]))
        elif line.startswith("-A ") and mark_of(line):
            rules.append((table, line))
        elif (line.startswith("-A ") and line.split()[1] in HOOKED
              and line.split()[-1] in ours | {USER_CHAIN}):
            hooks.setdefault(table, []).append(line)
    return rules, chains, hooks, ""
