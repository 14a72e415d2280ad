"""Comparing the plugin's state with what the kernel holds (pure): every
difference with its fix. What the kernel must hold comes from the plans
(lookup.plan_for), the peer mappings' tunnel devices and the firewall's own
rule builders, so that this check cannot disagree with what the plugin makes."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Set, Tuple

from ..dataplane.base import PeerMapping
from ..dataplane.mapping.ebpf import decap_pref, takes_decap
from ..dataplane.firewall import mark_of, missing_jumps, network_rules, port_rules, saved_lines
from ..dataplane.plan import NetworkPlan
from ..model import ENDPOINT_IFNAME_PREFIX, Endpoint, State, short_id
from ..lookup import plan_for
from .kernel import CONTAINER_IFNAME_PREFIX, KernelView

RESTART = "restart the plugin (it rebuilds what its state holds)"
SWEEP = "restart the plugin, which removes what no network accounts for"
RESTART_CONTAINER = ("restart that container (docker restart): Docker makes its endpoint "
                     "again (the plugin cannot: the other end was in the container)")
# Routes a tunnel device of each mapping must hold: one for the overlay where
# the device maps peers itself; per-peer routes are programmed in the background.
OVERLAY_ROUTED = ("ebpf", "kernel")


@dataclass(frozen=True)
class Difference:
    network: str        # the network's short ID; "" for what belongs to no network
    what: str
    fix: str


def differences(state: State, kernel: KernelView,
                mappings: Mapping[str, PeerMapping]) -> List[Difference]:
    """Everything in which the kernel does not hold what `state` says, or holds
    fan objects no network in it accounts for."""
    found: List[Difference] = []
    plans = {}
    for nid, net in sorted(state.networks.items()):
        if net.pool_id not in state.pools:
            found.append(Difference(short_id(nid), f"network {short_id(nid)}: its pool "
                                    f"{net.pool_id} is missing from the state",
                                    "remove the network (docker network rm) and create it again"))
            continue
        plans[nid] = plan_for(state, nid)
    tunnels = {nid: mappings[plan.mapping].tunnel_device(plan) for nid, plan in plans.items()}
    for nid, plan in plans.items():
        found += _network(state, plan, tunnels[nid], kernel)
    found += _firewall(state, plans, tunnels, kernel)
    found += _leftovers(state, plans, tunnels, kernel)
    return found


def _network(state: State, plan: NetworkPlan, tunnel: str,
             kernel: KernelView) -> List[Difference]:
    nid = short_id(plan.network_id)
    found: List[Difference] = []

    def add(what: str, fix: str = RESTART) -> None:
        found.append(Difference(nid, what, fix))

    if plan.bridge not in kernel.marked:
        add(f"bridge {plan.bridge} of network {nid} missing")
    if tunnel not in kernel.marked:
        add(f"tunnel device {tunnel} of network {nid} missing")
    elif plan.mapping in OVERLAY_ROUTED and str(plan.overlay) not in kernel.routes.get(tunnel, ()):
        add(f"route to overlay {plan.overlay} through {tunnel} (network {nid}) missing")
    if plan.mapping == "ebpf" and tunnel in kernel.marked:
        for side, prefs in (("egress", kernel.filters), ("ingress", kernel.ingress_filters)):
            if plan.tc_pref not in prefs.get(tunnel, ()):
                add(f"eBPF filter of network {nid} at pref {plan.tc_pref} of {tunnel}'s "
                    f"{side} missing")
    if takes_decap(plan) and (plan.underlay_interface, decap_pref(plan)) not in kernel.decaps:
        add(f"receive filter of network {nid} at pref {decap_pref(plan)} of "
            f"{plan.underlay_interface}'s ingress missing: VXLAN for its containers goes "
            f"through {tunnel} instead of straight from {plan.underlay_interface} "
            f"(receive={plan.receive})",
            RESTART + "; should it stay missing, the plugin's log says why (e.g. another "
            "tool's filter at that pref)")
    endpoints = state.networks[plan.network_id].endpoints
    veths = {Endpoint.host_ifname(eid): eid for eid in endpoints}
    ports = set(kernel.ports.get(plan.bridge, ()))
    for veth, eid in sorted(veths.items()):
        if veth not in kernel.marked and veth not in kernel.endpoint_links:
            add(f"interface {veth} of endpoint {short_id(eid)} ({endpoints[eid].address}) "
                f"missing: its container has no interface on network {nid}", RESTART_CONTAINER)
        elif plan.bridge in kernel.marked and veth not in ports:
            add(f"interface {veth} of endpoint {short_id(eid)} is not on bridge {plan.bridge}")
    for port in sorted(ports - set(veths)):
        if not port.startswith(ENDPOINT_IFNAME_PREFIX):   # ours: a leftover, below
            add(f"interface {port} is a port of bridge {plan.bridge} but no endpoint's",
                f"ip link set {port} nomaster")
    return found


def _firewall(state: State, plans: Dict[str, NetworkPlan], tunnels: Dict[str, str],
              kernel: KernelView) -> List[Difference]:
    if kernel.iptables_error:
        return [Difference("", f"iptables rules not compared: iptables-save failed: "
                           f"{kernel.iptables_error}",
                           "run fan-driver check as root, with the iptables the plugin uses "
                           "(--iptables)")]
    marked: Dict[str, List[Tuple[str, str]]] = {}
    for table, line in kernel.rules:
        marked.setdefault(mark_of(line), []).append((table, line))
    found: List[Difference] = []
    used_chains: Set[str] = set()
    for nid, plan in plans.items():
        wanted = network_rules(plan, tunnels[nid])
        found += _rules(plan, f"network {short_id(nid)}", saved_lines(wanted),
                        marked.pop(plan.mark, []), RESTART)
        used_chains |= {chain for _, chain, _ in wanted}
        for eid, endpoint in sorted(state.networks[nid].endpoints.items()):
            wanted = port_rules(plan, eid, endpoint.ip, endpoint.ports)
            found += _rules(plan, f"endpoint {short_id(eid)} of network {short_id(nid)} "
                            "(its published ports)", saved_lines(wanted),
                            marked.pop(plan.endpoint_mark(eid), []),
                            RESTART + "; or restart the container")
            used_chains |= {chain for _, chain, _ in wanted}
    for mark, lines in sorted(marked.items()):
        found.append(Difference("", f"{len(lines)} iptables rule(s) marked {mark!r} belong "
                                "to no network in the state", SWEEP))
    for table, builtin, chain in missing_jumps(kernel.hooks):
        if chain in used_chains:
            found.append(Difference("", f"{table} {builtin} does not jump to {chain} (or "
                                    "jumps before DOCKER-USER): its rules are never reached",
                                    RESTART))
    if not plans and kernel.chains:
        found.append(Difference("", "iptables chains left by no network: " + ", ".join(
            f"{table} {chain}" for table, chain in kernel.chains), SWEEP))
    return found


def _rules(plan: NetworkPlan, whose: str, wanted: Sequence[Tuple[str, str]],
           there: Sequence[Tuple[str, str]], fix: str) -> List[Difference]:
    missing = Counter(wanted) - Counter(there)
    extra = Counter(there) - Counter(wanted)
    nid = short_id(plan.network_id)
    found = []
    if missing:
        first = next(iter(missing))
        found.append(Difference(nid, f"{whose}: {sum(missing.values())} of {len(wanted)} "
                                f"iptables rules missing (first: {first[0]} {first[1]})", fix))
    if extra:
        first = next(iter(extra))
        found.append(Difference(nid, f"{whose}: {sum(extra.values())} iptables rule(s) carry "
                                f"its mark but are not the ones the plugin builds (first: "
                                f"{first[0]} {first[1]})", fix))
    return found


def _leftovers(state: State, plans: Dict[str, NetworkPlan], tunnels: Dict[str, str],
               kernel: KernelView) -> List[Difference]:
    """Fan objects in the kernel that no network in the state accounts for."""
    endpoint_ids = {eid for nid in plans for eid in state.networks[nid].endpoints}
    wanted = {p.bridge for p in plans.values()} | set(tunnels.values())
    wanted |= {Endpoint.host_ifname(eid) for eid in endpoint_ids}
    found: List[Difference] = []
    for name in sorted((set(kernel.marked) | set(kernel.endpoint_links)) - wanted):
        if name.startswith(ENDPOINT_IFNAME_PREFIX):
            found.append(Difference("", f"interface {name} left by no endpoint", SWEEP))
        elif name in kernel.endpoint_links:   # a container's end, still in the host
            veth = Endpoint.host_ifname(name[len(CONTAINER_IFNAME_PREFIX):])
            found.append(Difference("", f"interface {name}, a container's end of a veth pair, "
                                    "is in the host's namespace",
                                    RESTART_CONTAINER if veth in wanted else
                                    f"{SWEEP} (with {veth}, or else: ip link del {name})"))
        else:
            found.append(Difference("", f"interface {name} (marked {kernel.marked[name]!r}) "
                                    "belongs to no network in the state", SWEEP))
    for device in sorted(set(tunnels.values()) & set(kernel.marked)):
        on_it = [p for nid, p in plans.items() if tunnels[nid] == device]
        if not all(p.mapping in OVERLAY_ROUTED for p in on_it):
            continue   # a device of its own, with per-peer routes
        overlays = {str(p.overlay) for p in on_it}
        for dst in kernel.routes.get(device, ()):
            if dst not in overlays:
                found.append(Difference("", f"route {dst} through {device} belongs to no "
                                        "network in the state", SWEEP))
        prefs = {p.tc_pref for p in on_it if p.mapping == "ebpf"}
        for side, listed in (("egress", kernel.filters), ("ingress", kernel.ingress_filters)):
            for pref in listed.get(device, ()):
                if pref not in prefs:
                    found.append(Difference("", f"eBPF filter at pref {pref} of {device}'s "
                                            f"{side} belongs to no network in the state", SWEEP))
    decaps = {(p.underlay_interface, decap_pref(p)) for p in plans.values() if takes_decap(p)}
    for device, pref in kernel.decaps:
        if (device, pref) not in decaps:
            found.append(Difference("", f"receive filter at pref {pref} of {device}'s ingress "
                                    "belongs to no network in the state", SWEEP))
    return found
