"""The fan's firewall in iptables: the dataplane's Firewall, one implementation.

Rules live in chains of our own, each rule marked with its network (and, for
published ports, its endpoint), added by argument list through iptables-restore,
never through a shell; only rules carrying our mark are ever removed.

Isolation is a stage of its own, as Docker's bridge driver has it, but in the
mangle table's FORWARD chain, which the kernel runs before the filter table's:
nothing dockerd inserts into filter FORWARD, in whatever order, can let a
packet through that the fan's isolation drops. What the isolation lets pass
still needs an ACCEPT in filter FORWARD (dockerd's policy there is DROP), and
the fan's ACCEPTs come after DOCKER-USER, so a user's rules there apply to fan
containers as to bridge containers. Tunnel traffic is guarded in the raw table,
before conntrack: from outside the underlay it reaches no tunnel of ours, and
what containers send never reaches another host's tunnel.
"""
from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ..errors import FanError
from ..ports import ANY_ADDRESS, PortBinding
from .base import Firewall
from .dnat import ForeignDnat, foreign_dnat
from .encap import TUNNEL_UDP_PORTS
from .encap.ipip import PROTOCOL as IPIP_PROTOCOL
from .plan import MARK, NetworkPlan

log = logging.getLogger(__name__)

FORWARD_CHAIN = "FAN-FORWARD"
INPUT_CHAIN = "FAN-INPUT"
ISOLATION_CHAIN = "FAN-ISOLATION"
TUNNEL_CHAIN = "FAN-TUNNEL"
NAT_CHAIN = "FAN-POSTROUTING"
# Published ports: DNAT for traffic to the host's own addresses, arriving
# (PREROUTING) or made on the host (OUTPUT, except to 127.0.0.0/8: the kernel
# cannot send a loopback source out of the host; the userland proxy serves it).
PORTS_CHAIN = "FAN-PORTS"
# (table, builtin chain, our chain)
CHAINS = (("raw", "PREROUTING", TUNNEL_CHAIN), ("mangle", "FORWARD", ISOLATION_CHAIN),
          ("filter", "FORWARD", FORWARD_CHAIN), ("filter", "INPUT", INPUT_CHAIN),
          ("nat", "POSTROUTING", NAT_CHAIN),
          ("nat", "PREROUTING", PORTS_CHAIN), ("nat", "OUTPUT", PORTS_CHAIN))
JUMP_MATCH = {PORTS_CHAIN: {"PREROUTING": ["-m", "addrtype", "--dst-type", "LOCAL"],
                            "OUTPUT": ["!", "-d", "127.0.0.0/8", "-m", "addrtype",
                                       "--dst-type", "LOCAL"]}}
# Our jump in filter FORWARD goes right after this one: dockerd puts it first.
USER_JUMP = "-A FORWARD -j DOCKER-USER"
# The bridges of Docker's own networks (docker0, br-<network id>): what a fan
# container may not open connections into, as Docker's isolation keeps its
# bridge networks apart. A bridge given another name with
# com.docker.network.bridge.name is not matched.
DOCKER_BRIDGES = ("docker+", "br-+")
# How `iptables -S` prints protocol 4 where /etc/protocols names it.
PROTOCOL_NAMES = {"-p ipencap ": "-p 4 "}

# table, chain, match and target. Each rule is written in the order `iptables -S`
# prints it (addresses, then interfaces, then protocol, then matches, numbers of
# u32 in lower-case hexadecimal), so that checking rules in place is comparing lines.
Rule = Tuple[str, str, List[str]]


def tunnel_rules(plan: NetworkPlan) -> List[Rule]:
    """raw PREROUTING, before conntrack: the network's tunnel traffic to this
    host from outside the underlay (no fan host sends it: nothing of it may
    reach a container, nor create a conntrack entry that would admit its flow
    to the receive shortcut), and tunnel traffic routed through this host to
    an underlay address, which only containers send (the host's own
    encapsulation leaves through OUTPUT, or from the send program after
    netfilter): their tunnel datagrams would reach the fan's tunnels elsewhere
    with this host's address once masqueraded. That rule covers the default
    ports and the network's own: together the networks' rules cover every
    port in use."""
    comment = ["-m", "comment", "--comment", plan.mark]
    underlay = str(plan.host.fan.underlay)
    in_use = sorted({*TUNNEL_UDP_PORTS, *([plan.vxlan_port] if plan.vxlan_port else [])})
    ports = ["-m", "multiport", "--dports", ",".join(map(str, in_use))]
    routed = ["-m", "addrtype", "!", "--dst-type", "LOCAL"]
    foreign = plan.encap.tunnel_match(plan.vni, plan.overlay, plan.vxlan_port)
    return [
        ("raw", TUNNEL_CHAIN, ["!", "-s", underlay, *foreign, *comment, "-j", "DROP"]),
        ("raw", TUNNEL_CHAIN, ["-d", underlay, "-p", "udp", *ports, *routed, *comment,
                               "-j", "DROP"]),
        ("raw", TUNNEL_CHAIN, ["-d", underlay, "-p", IPIP_PROTOCOL, *routed, *comment,
                               "-j", "DROP"]),
    ]


def isolation_rules(plan: NetworkPlan, tunnel_device: str) -> List[Rule]:
    """mangle FORWARD: what may enter and leave the network's bridge. RETURN
    lets a packet go on to filter FORWARD; a rule here only ever matches
    packets of its own bridge, so the networks' rules cannot override each
    other whatever their order."""
    comment = ["-m", "comment", "--comment", plan.mark]
    bridge, overlay = plan.bridge, str(plan.overlay)

    def rule(*spec: str) -> Rule:
        return ("mangle", ISOLATION_CHAIN, [*spec[:-2], *comment, *spec[-2:]])

    same_network = [rule("-i", bridge, "-o", bridge, "-j", "RETURN"),
                    rule("-s", overlay, "-i", tunnel_device, "-o", bridge, "-j", "RETURN")]
    if plan.internal:
        # The network's containers, on this host and across hosts: nothing else.
        return [*same_network,
                rule("-d", overlay, "-i", bridge, "-o", tunnel_device, "-j", "RETURN"),
                rule("-o", bridge, "-j", "DROP"),
                rule("-i", bridge, "-j", "DROP")]
    return [
        *same_network,
        # In: replies, and what reached a published port through the host's addresses.
        rule("-o", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED,DNAT",
             "-j", "RETURN"),
        rule("-o", bridge, "-j", "DROP"),
        # Out: anywhere but into Docker's bridge networks (into another fan
        # network, that network's rules drop it), unless replying or DNATed.
        rule("-i", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED,DNAT",
             "-j", "RETURN"),
        *(rule("-i", bridge, "-o", docker, "-j", "DROP") for docker in DOCKER_BRIDGES),
    ]


def forwarding_rules(plan: NetworkPlan, tunnel_device: str) -> List[Rule]:
    """filter FORWARD and INPUT: what the isolation lets pass is accepted here;
    egress leaving the overlay is source-NATed to the host's address."""
    comment = ["-m", "comment", "--comment", plan.mark]
    bridge, slice_, overlay = plan.bridge, str(plan.slice), str(plan.overlay)
    from_tunnel = ("filter", FORWARD_CHAIN, ["-s", overlay, "-i", tunnel_device, "-o", bridge,
                                             *comment, "-j", "ACCEPT"])
    if plan.internal:
        return [
            ("filter", FORWARD_CHAIN, ["-i", bridge, "-o", bridge, *comment, "-j", "ACCEPT"]),
            ("filter", FORWARD_CHAIN, ["-d", overlay, "-i", bridge, "-o", tunnel_device,
                                       *comment, "-j", "ACCEPT"]),
            from_tunnel,
            # The host answers on the gateway only (DNS, ARP), not on its underlay
            # address or other networks' gateways.
            ("filter", INPUT_CHAIN, ["!", "-d", f"{plan.gateway.ip}/32", "-i", bridge, *comment,
                                     "-j", "DROP"]),
        ]
    return [
        # Anything a container sends that the isolation let through.
        ("filter", FORWARD_CHAIN, ["-i", bridge, *comment, "-j", "ACCEPT"]),
        from_tunnel,
        ("filter", FORWARD_CHAIN, ["-o", bridge, "-m", "conntrack", "--ctstate",
                                   "RELATED,ESTABLISHED", *comment, "-j", "ACCEPT"]),
        ("nat", NAT_CHAIN, ["-s", slice_, "!", "-d", overlay, *comment, "-j", "MASQUERADE"]),
    ]


def network_rules(plan: NetworkPlan, tunnel_device: str) -> List[Rule]:
    return [*tunnel_rules(plan), *isolation_rules(plan, tunnel_device),
            *forwarding_rules(plan, tunnel_device)]


def port_rules(plan: NetworkPlan, endpoint_id: str, container: IPv4Address,
               bindings: Iterable[PortBinding]) -> List[Rule]:
    """DNAT per published port; for the endpoint, one ACCEPT of what was DNATed to
    it and one MASQUERADE of what its neighbours send it through a published
    port (hairpin: else the reply would go straight back over the bridge, from
    an address the client never asked). Loopback bindings are the proxy's alone."""
    comment = ["-m", "comment", "--comment", plan.endpoint_mark(endpoint_id)]
    target = f"{container}/32"
    dnat = [("nat", PORTS_CHAIN,
             [*([] if b.host_ip == ANY_ADDRESS else ["-d", f"{b.host_ip}/32"]),
              "-p", b.proto, "-m", b.proto, "--dport", str(b.host_port), *comment,
              "-j", "DNAT", "--to-destination", f"{container}:{b.port}"])
            for b in bindings if not b.loopback]
    if not dnat:
        return []
    dnatted = ["-m", "conntrack", "--ctstate", "DNAT", *comment]
    return [("filter", FORWARD_CHAIN, ["-d", target, "-o", plan.bridge, *dnatted, "-j", "ACCEPT"]),
            ("nat", NAT_CHAIN, ["-s", str(plan.slice), "-d", target, *dnatted, "-j", "MASQUERADE"]),
            *dnat]


def _jump(builtin: str, chain: str) -> List[str]:
    return [*JUMP_MATCH.get(chain, {}).get(builtin, []), "-j", chain]


def _jump_line(builtin: str, chain: str) -> str:
    return " ".join(["-A", builtin, *_jump(builtin, chain)])


def _jump_in_place(builtin: str, chain: str, table_lines: Sequence[str]) -> bool:
    """Our jump is there, and in filter FORWARD after DOCKER-USER's."""
    rules = [line for line in table_lines if line.startswith(f"-A {builtin} ")]
    jump = _jump_line(builtin, chain)
    if jump not in rules:
        return False
    return USER_JUMP not in rules or rules.index(USER_JUMP) < rules.index(jump)


def _restore_line(args: Sequence[str]) -> str:
    """A rule as iptables-restore reads it (it knows double quotes only) and as
    `iptables -S` prints it (which quotes a u32 expression too)."""
    return " ".join(f'"{a}"' if " " in a or before == "--u32" else a
                    for before, a in zip(["", *args], args))


def saved_line(line: str) -> str:
    """An iptables-save (or `iptables -S`) line as saved_lines writes it."""
    for printed, written in PROTOCOL_NAMES.items():
        line = line.replace(printed, written)
    return line


def mark_of(line: str) -> Optional[str]:
    """The fan mark in an `iptables -S` line, or None."""
    if '--comment "' + MARK + " " not in line:
        return None
    return line.split('--comment "', 1)[1].split('"', 1)[0]


def saved_lines(rules: Iterable[Rule]) -> List[Tuple[str, str]]:
    """(table, line) of each rule as iptables-save prints it: what `fan-driver
    check` looks for."""
    return [(table, _restore_line(["-A", chain, *spec])) for table, chain, spec in rules]


def missing_jumps(listings: Dict[str, Sequence[str]]) -> List[Tuple[str, str, str]]:
    """The CHAINS entries whose jump is not in place in `listings` (table ->
    its lines): absent, or in filter FORWARD before DOCKER-USER's."""
    return [(table, builtin, chain) for table, builtin, chain in CHAINS
            if not _jump_in_place(builtin, chain, listings.get(table, ()))]


class IptablesFirewall(Firewall):
    def __init__(self, binary: str = "iptables"):
        self.binary = binary
        # Checking a rule and adding it are two commands: one change at a time.
        self._lock = asyncio.Lock()

    async def ensure_network(self, plan: NetworkPlan, tunnel_device: str) -> None:
        await self._replace_marked(plan.mark, network_rules(plan, tunnel_device))

    async def remove_network(self, plan: NetworkPlan) -> None:
        await self._remove_marked(plan.mark)

    async def ensure_ports(self, plan: NetworkPlan, endpoint_id: str, container: IPv4Address,
                           bindings: Sequence[PortBinding]) -> None:
        await self._replace_marked(plan.endpoint_mark(endpoint_id),
                                   port_rules(plan, endpoint_id, container, bindings))

    async def remove_ports(self, plan: NetworkPlan, endpoint_id: str) -> None:
        # The chains stay: the next container start would make them again.
        async with self._lock:
            mark = plan.endpoint_mark(endpoint_id)
            await self._restore(await self._deletions(lambda m: m == mark))

    async def sweep(self, known_marks: Set[str]) -> None:
        for mark in sorted(await self._marks() - known_marks):
            log.warning("removing orphan firewall rules marked %s", mark)
            await self._remove_marked(mark)
        async with self._lock:
            await self._drop_empty_chains()

    async def _exec(self, argv: Sequence[str], stdin: Optional[bytes] = None) -> Tuple[int, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else None,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            raise FanError(f"{argv[0]} is not installed; the fan needs it for "
                           "forwarding and NAT rules (apt-get install iptables)") from None
        out, err = await proc.communicate(stdin)
        return proc.returncode, (out + err).decode(errors="replace").strip()

    async def _run(self, table: str, *args: str) -> Tuple[int, str]:
        return await self._exec([self.binary, "-w", "-t", table, *args])

    async def _must(self, table: str, *args: str) -> str:
        code, out = await self._run(table, *args)
        if code != 0:
            raise FanError(f"{self.binary} -t {table} {' '.join(args)} failed: {out}")
        return out

    async def _restore(self, changes: Dict[str, List[str]]) -> None:
        """Many rule changes in one process per call: `iptables-restore --noflush`
        applies each table's lines atomically (a 1,000-port range is one call)."""
        text = "".join(f"*{table}\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"
                       for table, lines in changes.items() if lines)
        if not text:
            return
        code, out = await self._exec([self.binary + "-restore", "--noflush", "-w"],
                                     text.encode())
        if code != 0:
            raise FanError(f"{self.binary}-restore failed: {out}")

    async def _ensure_chains(self) -> None:
        for table, builtin, chain in CHAINS:
            if (await self._run(table, "-n", "-L", chain))[0] != 0:
                await self._must(table, "-N", chain)
            rules = (await self._must(table, "-S", builtin)).splitlines()
            if _jump_in_place(builtin, chain, rules):
                continue
            while (await self._run(table, "-D", builtin, *_jump(builtin, chain)))[0] == 0:
                pass
            rules = [line for line in (await self._must(table, "-S", builtin)).splitlines()
                     if line.startswith("-A ")]
            position = rules.index(USER_JUMP) + 2 if USER_JUMP in rules else 1
            await self._must(table, "-I", builtin, str(position), *_jump(builtin, chain))

    async def _listings(self) -> Optional[Dict[str, List[str]]]:
        """`iptables -S` of each table we use, in parallel; None if one fails."""
        tables = sorted({table for table, _, _ in CHAINS})
        listings = await asyncio.gather(*(self._run(table, "-S") for table in tables))
        if any(code != 0 for code, _ in listings):
            return None
        return {table: [saved_line(line) for line in out.splitlines()]
                for table, (_, out) in zip(tables, listings)}

    async def _complete(self, mark: str, rules: Sequence[Rule]) -> bool:
        """Whether our jumps are in place and the rules carrying `mark` are
        `rules`, line for line and in order: one listing per table, in
        parallel, instead of a check per rule (this runs on every container
        start); a marked rule edited or added by hand makes it False."""
        lines = await self._listings()
        if lines is None:
            return False
        for table, builtin, chain in CHAINS:
            if not _jump_in_place(builtin, chain, lines[table]):
                return False
        wanted: Dict[Tuple[str, str], List[str]] = {}
        for table, chain, spec in rules:
            wanted.setdefault((table, chain), []).append(_restore_line(["-A", chain, *spec]))
        found: Dict[Tuple[str, str], List[str]] = {}
        for table, table_lines in lines.items():
            for line in table_lines:
                if line.startswith("-A ") and mark_of(line) == mark:
                    found.setdefault((table, line.split()[1]), []).append(line)
        return found == wanted

    async def _replace_marked(self, mark: str, rules: Sequence[Rule]) -> None:
        """Make the rules carrying `mark` exactly `rules`, in one batch per table."""
        if rules and await self._complete(mark, rules):
            return
        async with self._lock:
            await self._ensure_chains()
            changes = await self._deletions(lambda m: m == mark)
            for table, chain, spec in rules:
                changes.setdefault(table, []).append(_restore_line(["-A", chain, *spec]))
            await self._restore(changes)

    async def _remove_marked(self, mark: str) -> None:
        """Remove every rule in our chains marked `mark` or a mark under it (a
        network's mark takes its endpoints' port rules too), then our chains
        once empty."""
        async with self._lock:
            await self._restore(await self._deletions(
                lambda m: m == mark or m.startswith(mark + " ")))
            await self._drop_empty_chains()

    async def _deletions(self, selected) -> Dict[str, List[str]]:
        lines = await self._listings() or {}
        ours = {chain for _, _, chain in CHAINS}
        return {table: ["-D" + line[2:] for line in table_lines
                        if line.startswith("-A ") and line.split()[1] in ours
                        and selected(mark_of(line) or "")]
                for table, table_lines in lines.items()}

    async def _drop_empty_chains(self) -> None:
        empty = set()
        for table, builtin, chain in CHAINS:
            code, out = await self._run(table, "-S", chain)
            if code != 0 or any(line.startswith("-A") for line in out.splitlines()):
                continue
            while (await self._run(table, "-D", builtin, *_jump(builtin, chain)))[0] == 0:
                pass
            empty.add((table, chain))
        for table, chain in sorted(empty):   # after every jump to it is gone
            await self._run(table, "-X", chain)

    async def _marks(self) -> Set[str]:
        """Every fan mark on a rule in our chains: `fan-driver <network>` on a
        network's rules, `fan-driver <network> <endpoint>` on published ports."""
        ours = {chain for _, _, chain in CHAINS}
        return {mark_of(line) for table_lines in (await self._listings() or {}).values()
                for line in table_lines
                if line.startswith("-A ") and line.split()[1] in ours and mark_of(line)}

    async def foreign_dnat(self) -> List[ForeignDnat]:
        """The nat table's DNAT rules that are not ours (dnat.py): host ports
        taken without a socket. An unreadable table reads as none: the rules
        we write next would fail the same way, and say why."""
        code, out = await self._run("nat", "-S")
        return foreign_dnat(out.splitlines()) if code == 0 else []
