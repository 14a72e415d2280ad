"""Judging what `fan-driver check` read (pure): one Item per thing checked,
each that is not ok with its fix."""
from __future__ import annotations

import errno as errno_mod
from ipaddress import IPv4Network
from typing import List, Mapping, Optional

from ..config import DEFAULT_OVERLAY, MIN_MTU, RECEIVE_PATHS, UnderlaySpec, parse_cidr
from ..dataplane import choose, libbpf
from ..dataplane.base import PeerMapping
from ..errors import FanError
from ..fanmap import FanMap, HostSlice
from ..model import short_id
from ..lookup import plan_for
from ..hostfacts import KernelFeatures, resolve_underlay
from ..settings import Settings
from .drift import differences
from .probe import IP_FORWARD, Iptables, Probe, PublishedPort, StateInfo
from .report import FAIL, INFO, OK, WARN, Item


def overlay_problems(overlay: str) -> List[str]:
    try:
        parse_cidr(overlay, "overlay")
    except FanError as exc:
        return [f"--overlay {overlay!r}: {exc}"]
    return []


def judge(settings: Settings, probe: Probe, overlay: str = str(DEFAULT_OVERLAY),
          mappings: Optional[Mapping[str, PeerMapping]] = None) -> List[Item]:
    """What `probe` means for a fan network on `overlay` with `settings`; with
    the peer mappings (cli.peer_mappings), whether the kernel holds what the
    state says."""
    items: List[Item] = []
    add = lambda *a, **k: items.append(Item(*a, **k))  # noqa: E731

    problems = settings.problems() + overlay_problems(overlay)
    for problem in problems:
        add("settings", "setting", FAIL, problem)
    if not problems:
        add("settings", "settings", OK, f"{settings.describe()}, overlay {overlay}")

    valid = not problems
    encap = None
    if probe.features is None:
        add("kernel", "netlink", FAIL, f"cannot probe the kernel: {probe.netlink_error}",
            "fan-driver needs CAP_NET_ADMIN in the host's network namespace "
            "(docker run --net host --cap-add NET_ADMIN ...)")
    else:
        encap = _judge_kernel(settings if valid else None, probe.features, probe.ebpf_error, add)
    underlay = _judge_underlay(settings, overlay, probe, add) if valid and probe.facts else None
    if underlay is not None and encap is not None:
        _judge_mtu(underlay, encap, add)
    _judge_firewall(probe.iptables, probe.ip_forward, add)
    _judge_state(probe.state, add)
    _judge_ports(probe.ports, add)
    if mappings is not None:
        _judge_drift(probe, mappings, add)
    return items


def _judge_kernel(settings: Optional[Settings], features: KernelFeatures, ebpf_error: str,
                  add):
    """The kernel's features; the encapsulation a network would get (None
    when there is none, or the settings are invalid)."""
    if features.vxlan:
        add("kernel", "vxlan", OK, "VXLAN devices can be created (50 bytes of overhead)")
    else:
        add("kernel", "vxlan", WARN if features.ipip else FAIL, "no VXLAN devices",
            "on the host: modprobe vxlan (CONFIG_VXLAN)")
    if features.ipip:
        add("kernel", "ipip", OK, "IPIP devices can be created (20 bytes of overhead)")
    else:
        add("kernel", "ipip", INFO if features.vxlan else FAIL,
            "no IPIP devices: VXLAN is used instead" if features.vxlan else "no IPIP devices",
            "for IPIP's smaller overhead, on the host: modprobe ipip (CONFIG_NET_IPIP); "
            "and let the underlay carry IP protocol 4 (some cloud firewalls drop it)")
    if features.ebpf:
        add("kernel", "ebpf", OK, "tc eBPF programs can map peers: the same few kernel objects "
            "per host, whatever the number of hosts")
    else:
        add("kernel", "ebpf", WARN, f"eBPF mapping unavailable ({_first_line(ebpf_error)}): "
            "peers get one route each (and for VXLAN a neighbour and FDB entry): "
            "65,534 of them over a /16 underlay", _ebpf_fix(ebpf_error))
    if features.fan_map:
        add("kernel", "fan map", OK, "the kernel's own fan map (Ubuntu's patch) is present")
    else:
        add("kernel", "fan map", INFO, "no kernel fan map (an Ubuntu-only patch): not needed, "
            "eBPF or per-peer routes do its work")
    if settings is None:
        return None
    try:
        encap, mapping, receive = choose(settings.encap, "auto", "auto", features)
    except FanError as exc:
        add("plan", "tunnel", FAIL, str(exc))
        return None
    add("plan", "tunnel", OK, f"{encap.name} with {mapping} mapping, device {encap.device}")
    add("plan", "receive", OK, f"receive={receive}: {RECEIVE_PATHS[receive]}")
    return encap


def _ebpf_fix(error: str) -> str:
    if libbpf.LIBRARY in error:
        return f"install libbpf (Debian and Ubuntu: apt-get install {libbpf.PACKAGE})"
    if f"errno {errno_mod.EPERM})" in error or "Operation not permitted" in error:
        return ("bpf(2) was refused: fan-driver needs CAP_BPF and CAP_NET_ADMIN (kernel 5.8 "
                "or later; older kernels want CAP_SYS_ADMIN); in a container: --cap-add BPF")
    if f"errno {errno_mod.ENOSYS})" in error:
        return "this kernel has no bpf(2) (CONFIG_BPF_SYSCALL)"
    return ("a kernel with tc eBPF, bpf_skb_set_tunnel_key, bpf_redirect_peer and "
            "bpf_redirect_neigh (Linux 5.10 or later, CONFIG_NET_CLS_BPF); the verifier's "
            "log above says what it refused")


def _judge_underlay(settings: Settings, overlay_text: str, probe: Probe, add):
    try:
        underlay = resolve_underlay(UnderlaySpec.parse(settings.underlay), probe.facts)
    except FanError as exc:
        add("plan", "underlay", FAIL, str(exc),
            "give each network --ipam-opt underlay=BLOCK (e.g. 172.30.0.0/16) or set "
            "FAN_UNDERLAY / --default-underlay")
        return None
    add("plan", "underlay", OK, f"{underlay.network} on {underlay.interface}: this host is "
        f"{underlay.address} (MTU {underlay.mtu})")
    overlay = IPv4Network(overlay_text, strict=False)
    try:
        host = HostSlice(FanMap(overlay, underlay.network), underlay.address)
        add("plan", "slice", OK, f"{host.slice} of overlay {overlay}: bridge {host.bridge_name}, "
            f"gateway {host.gateway.ip}, {host.slice.num_addresses - 3} container addresses")
    except FanError as exc:
        add("plan", "slice", FAIL, str(exc))
        return None
    if str(overlay) in probe.state.overlays:
        add("plan", "overlay", INFO, f"{overlay} is already in use by a fan network here")
    else:
        clashes = [r for r in probe.facts.routes if r.overlaps(overlay)]
        if clashes:
            add("plan", "overlay", WARN, f"{overlay} overlaps route {clashes[0]} on this host: "
                "a fan network on it would be refused", "pick another --subnet")
    return underlay


def _judge_mtu(underlay, encap, add):
    mtu = underlay.mtu - encap.overhead
    if mtu < MIN_MTU:
        add("plan", "mtu", FAIL, f"underlay MTU {underlay.mtu} - {encap.name} {encap.overhead} "
            f"= {mtu}, below {MIN_MTU}", "raise the MTU of " + underlay.interface)
    else:
        add("plan", "mtu", OK, f"{mtu} on bridge, tunnel and containers (underlay "
            f"{underlay.mtu} - {encap.name} {encap.overhead})")


def _judge_firewall(ipt: Iptables, ip_forward, add):
    if not ipt.installed:
        add("firewall", "iptables", FAIL, "iptables is not installed: fan networks need it for "
            "forwarding and NAT rules", "apt-get install iptables")
    elif ipt.error:
        add("firewall", "iptables", FAIL, f"iptables does not work here: {_first_line(ipt.error)}",
            "fan-driver needs CAP_NET_ADMIN (and CAP_NET_RAW for legacy iptables)")
    else:
        counts = ", ".join(f"{'nf_tables' if b == 'nft' else b} {'?' if n is None else n}"
                           for b, n in sorted(ipt.rules.items()))
        add("firewall", "iptables", OK, f"{ipt.version} ({ipt.chosen_by}); rules on this host: "
            f"{counts}")
        other = [b for b, n in ipt.rules.items()
                 if b != ipt.backend and n and n > (ipt.rules.get(ipt.backend) or 0)]
        if other:
            add("firewall", "backend", WARN, f"the host's rules (Docker's) are in the "
                f"{other[0]} backend, fan-driver would write to {ipt.backend}: its ACCEPT "
                "rules would not meet Docker's DROP policy",
                f"managed plugin: docker plugin set fan:latest FAN_IPTABLES={other[0]}; "
                f"unmanaged: update-alternatives --set iptables /usr/sbin/iptables-{other[0]}")
        if ipt.forward_policy == "DROP":
            add("firewall", "FORWARD", INFO, "policy DROP (Docker's): fan bridges get ACCEPT "
                "rules in FAN-FORWARD")
        elif ipt.forward_policy:
            add("firewall", "FORWARD", INFO, f"policy {ipt.forward_policy}")
        chains = ", ".join(f"{c}: {'absent' if n is None else f'{n} rules'}"
                           for c, n in ipt.fan_chains.items())
        if chains:
            add("firewall", "fan chains", INFO, chains + " (made with the first fan network)"
                if all(n is None for n in ipt.fan_chains.values()) else chains)
    if ip_forward == "1":
        add("firewall", "ip_forward", OK, "IPv4 forwarding is on")
    elif ip_forward == "0":
        add("firewall", "ip_forward", WARN, "IPv4 forwarding is off: containers cannot reach "
            "other hosts or the outside", "sysctl -w net.ipv4.ip_forward=1 on the host "
            "(dockerd turns it on unless started with --ip-forward=false)")
    else:
        add("firewall", "ip_forward", WARN, f"cannot read {IP_FORWARD}")


def _judge_state(state: StateInfo, add):
    if state.error:
        add("state", "state", FAIL, state.error)
    elif not state.exists:
        add("state", "state", INFO, f"{state.directory}: nothing yet (made by the first "
            "fan network)")
    elif not state.networks:
        add("state", "state", INFO, f"{state.directory}: no fan networks")
    else:
        add("state", "state", OK, f"{state.directory}: {len(state.networks)} fan network(s)")
        for line in state.networks:
            add("state", "network", INFO, line)


def _first_line(text: str) -> str:
    return (text or "unknown reason").strip().splitlines()[0]


def _judge_ports(ports, add):
    """Published ports whose host port is not (only) the fan's: a restore
    leaves a port another process or DNAT rule took to it, without our rule."""
    problems = 0
    for port in ports:
        problem = _port_problem(port)
        if problem is not None:
            problems += 1
            add("ports", f"port {port.binding.split('->')[0]}", WARN, *problem)
    if ports and not problems:
        add("ports", "ports", OK, f"{len(ports)} published port(s), each with its DNAT rule "
            "(loopback ones: the proxy alone)")


def _port_problem(port: PublishedPort):
    """(detail, fix) for a port that does not reach its container, else None."""
    whose = f"endpoint {port.endpoint} of fan network {port.network} publishes {port.binding}"
    restart = "restarting fan-driver (its restore) or the container programs the rule again"
    if port.loopback:
        return None
    if port.dnat and port.foreign:
        return (f"{whose}, and a DNAT rule that is not fan-driver's forwards that host port "
                f"too ({port.foreign}): fan-driver's rule comes first and takes its traffic",
                "publish one of them on another host port")
    if port.dnat:
        return None
    if port.foreign:
        return (f"{whose}, but a DNAT rule that is not fan-driver's forwards that host port "
                f"({port.foreign}): fan-driver left it without its own rule",
                f"remove that rule (or what wrote it), then {restart}; or publish another "
                "host port")
    if port.listener:
        return (f"{whose}, but {port.listener} holds that host port: fan-driver left it "
                "without a DNAT rule rather than take the port's traffic from it",
                f"stop what holds the port, then {restart}; or publish another host port")
    return (f"{whose}, but it has no DNAT rule: it does not reach the container",
            f"start fan-driver if it is not running; {restart}")


def _judge_drift(probe: Probe, mappings: Mapping[str, PeerMapping], add):
    """The state against the kernel: a line per network (with its receive
    path), then every difference with its fix."""
    if probe.kernel is None or probe.stored is None:
        if probe.state.exists and not probe.state.error:
            add("drift", "kernel", INFO, "not compared: the kernel could not be read")
        return
    state = probe.stored
    found = differences(state, probe.kernel, mappings)
    for nid, net in sorted(state.networks.items()):
        if net.pool_id not in state.pools:
            continue
        plan = plan_for(state, nid)
        mine = sum(1 for d in found if d.network == short_id(nid))
        add("drift", short_id(nid), INFO if mine else OK,
            f"bridge {plan.bridge}, {net.encap}/{net.mapping} through "
            f"{mappings[net.mapping].tunnel_device(plan)}, receive={net.receive}: "
            f"{RECEIVE_PATHS[net.receive]}; "
            + (f"{mine} difference(s) below" if mine else "the kernel holds what the state says"))
    if not state.networks and not found:
        add("drift", "kernel", OK, "no fan networks, and no fan objects in the kernel")
    for difference in found:
        add("drift", difference.network or "leftover", FAIL, difference.what, difference.fix)
