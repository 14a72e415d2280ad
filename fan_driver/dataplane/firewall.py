"""The fan's iptables rules, in chains of our own and marked with the network.

dockerd sets the FORWARD policy to DROP and sends bridged traffic through
iptables, so a fan bridge needs explicit ACCEPT rules; egress to the world is
source-NATed, overlay-to-overlay traffic is not. Rules are added by argument
list, never through a shell, and only rules carrying our comment are removed.
"""
from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import FanError
from ..model import short_id
from ..ports import ANY_ADDRESS, PortBinding
from .dnat import ForeignDnat, foreign_dnat
from .plan import MARK, NetworkPlan

log = logging.getLogger(__name__)

FORWARD_CHAIN = "FAN-FORWARD"
INPUT_CHAIN = "FAN-INPUT"
NAT_CHAIN = "FAN-POSTROUTING"
# Published ports: DNAT for traffic to the host's own addresses, arriving
# (PREROUTING) or made on the host (OUTPUT, except to 127.0.0.0/8: the kernel
# cannot send a loopback source out of the host; the userland proxy serves it).
PORTS_CHAIN = "FAN-PORTS"
# (table, builtin chain, our chain)
CHAINS = (("filter", "FORWARD", FORWARD_CHAIN), ("filter", "INPUT", INPUT_CHAIN),
          ("nat", "POSTROUTING", NAT_CHAIN),
          ("nat", "PREROUTING", PORTS_CHAIN), ("nat", "OUTPUT", PORTS_CHAIN))
JUMP_MATCH = {"PREROUTING": ["-m", "addrtype", "--dst-type", "LOCAL"],
              "OUTPUT": ["!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL"]}

# table, chain, match and target. Each rule is written in the order `iptables -S`
# prints it (addresses, then interfaces, then protocol, then matches), so that
# checking rules in place is comparing lines.
Rule = Tuple[str, str, List[str]]


def network_rules(plan: NetworkPlan, tunnel_device: str) -> List[Rule]:
    comment = ["-m", "comment", "--comment", plan.mark]
    bridge, slice_, overlay = plan.bridge, str(plan.slice), str(plan.overlay)
    if plan.internal:
        return [
            # Containers of the network, on this host and across hosts: nothing else.
            ("filter", FORWARD_CHAIN, ["-i", bridge, "-o", bridge, *comment, "-j", "ACCEPT"]),
            ("filter", FORWARD_CHAIN, ["-d", overlay, "-i", bridge, "-o", tunnel_device,
                                       *comment, "-j", "ACCEPT"]),
            ("filter", FORWARD_CHAIN, ["-s", overlay, "-i", tunnel_device, "-o", bridge,
                                       *comment, "-j", "ACCEPT"]),
            ("filter", FORWARD_CHAIN, ["-i", bridge, *comment, "-j", "DROP"]),
            ("filter", FORWARD_CHAIN, ["-o", bridge, *comment, "-j", "DROP"]),
            # The host answers on the gateway only (DNS, ARP), not on its underlay
            # address or other networks' gateways.
            ("filter", INPUT_CHAIN, ["!", "-d", f"{plan.gateway.ip}/32", "-i", bridge, *comment,
                                     "-j", "DROP"]),
        ]
    return [
        # Anything a container sends: to its neighbours, to other hosts, out.
        ("filter", FORWARD_CHAIN, ["-i", bridge, *comment, "-j", "ACCEPT"]),
        # Overlay traffic from other hosts.
        ("filter", FORWARD_CHAIN, ["-i", tunnel_device, "-o", bridge, *comment, "-j", "ACCEPT"]),
        # Replies to what containers started; nothing unsolicited from outside.
        ("filter", FORWARD_CHAIN, ["-o", bridge, "-m", "conntrack", "--ctstate",
                                   "RELATED,ESTABLISHED", *comment, "-j", "ACCEPT"]),
        ("nat", NAT_CHAIN, ["-s", slice_, "!", "-d", overlay, *comment, "-j", "MASQUERADE"]),
    ]


def endpoint_mark(plan: NetworkPlan, endpoint_id: str) -> str:
    return f"{plan.mark} {short_id(endpoint_id)}"


def port_rules(plan: NetworkPlan, endpoint_id: str, container: IPv4Address,
               bindings: Iterable[PortBinding]) -> List[Rule]:
    """DNAT per published port; for the endpoint, one ACCEPT of what was DNATed to
    it and one MASQUERADE of what its neighbours send it through a published
    port (hairpin: else the reply would go straight back over the bridge, from
    an address the client never asked). Loopback bindings are the proxy's alone."""
    comment = ["-m", "comment", "--comment", endpoint_mark(plan, endpoint_id)]
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
    return [*JUMP_MATCH.get(builtin, []), "-j", chain]


def _restore_line(args: Sequence[str]) -> str:
    """A rule as iptables-restore reads it: it knows double quotes only."""
    return " ".join(f'"{a}"' if " " in a else a for a in args)


def _mark_of(line: str) -> Optional[str]:
    """The fan mark in an `iptables -S` line, or None."""
    if '--comment "' + MARK + " " not in line:
        return None
    return line.split('--comment "', 1)[1].split('"', 1)[0]


class Firewall:
    def __init__(self, binary: str = "iptables"):
        self.binary = binary
        # Checking a rule and adding it are two commands: one change at a time.
        self._lock = asyncio.Lock()

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
            if (await self._run(table, "-C", builtin, *_jump(builtin, chain)))[0] != 0:
                await self._must(table, "-I", builtin, "1", *_jump(builtin, chain))

    async def _listings(self) -> Optional[Dict[str, List[str]]]:
        """`iptables -S` of each table we use, in parallel; None if one fails."""
        tables = sorted({table for table, _, _ in CHAINS})
        listings = await asyncio.gather(*(self._run(table, "-S") for table in tables))
        if any(code != 0 for code, _ in listings):
            return None
        return {table: out.splitlines() for table, (_, out) in zip(tables, listings)}

    async def _complete(self, mark: str, rules: Sequence[Rule]) -> bool:
        """Whether our jumps are in place and the rules carrying `mark` are
        `rules`, line for line and in order: one listing per table, in
        parallel, instead of a check per rule (this runs on every container
        start); a marked rule edited or added by hand makes it False."""
        lines = await self._listings()
        if lines is None:
            return False
        for table, builtin, chain in CHAINS:
            if " ".join(["-A", builtin, *_jump(builtin, chain)]) not in lines[table]:
                return False
        wanted: Dict[Tuple[str, str], List[str]] = {}
        for table, chain, spec in rules:
            wanted.setdefault((table, chain), []).append(_restore_line(["-A", chain, *spec]))
        found: Dict[Tuple[str, str], List[str]] = {}
        for table, table_lines in lines.items():
            for line in table_lines:
                if line.startswith("-A ") and _mark_of(line) == mark:
                    found.setdefault((table, line.split()[1]), []).append(line)
        return found == wanted

    async def replace_marked(self, mark: str, rules: Sequence[Rule]) -> None:
        """Make the rules carrying `mark` exactly `rules`, in one batch per table."""
        if rules and await self._complete(mark, rules):
            return
        async with self._lock:
            await self._ensure_chains()
            changes = await self._deletions(lambda m: m == mark)
            for table, chain, spec in rules:
                changes.setdefault(table, []).append(_restore_line(["-A", chain, *spec]))
            await self._restore(changes)

    async def remove_marked(self, mark: str, drop_empty_chains: bool = True) -> None:
        """Remove every rule in our chains marked `mark` or a mark under it (a
        network's mark takes its endpoints' port rules too). An endpoint's
        ports keep the chains: the next container start would make them again."""
        async with self._lock:
            await self._restore(await self._deletions(
                lambda m: m == mark or m.startswith(mark + " ")))
            if drop_empty_chains:
                await self._drop_empty_chains()

    async def _deletions(self, selected) -> Dict[str, List[str]]:
        lines = await self._listings() or {}
        ours = {chain for _, _, chain in CHAINS}
        return {table: ["-D" + line[2:] for line in table_lines
                        if line.startswith("-A ") and line.split()[1] in ours
                        and selected(_mark_of(line) or "")]
                for table, table_lines in lines.items()}

    async def drop_empty_chains(self) -> None:
        async with self._lock:
            await self._drop_empty_chains()

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

    async def marks(self) -> set:
        """Every fan mark on a rule in our chains: `fan-driver <network>` on a
        network's rules, `fan-driver <network> <endpoint>` on published ports."""
        ours = {chain for _, _, chain in CHAINS}
        return {_mark_of(line) for table_lines in (await self._listings() or {}).values()
                for line in table_lines
                if line.startswith("-A ") and line.split()[1] in ours and _mark_of(line)}

    async def foreign_dnat(self) -> List[ForeignDnat]:
        """The nat table's DNAT rules that are not ours (dnat.py): host ports
        taken without a socket. An unreadable table reads as none: the rules
        we write next would fail the same way, and say why."""
        code, out = await self._run("nat", "-S")
        return foreign_dnat(out.splitlines()) if code == 0 else []
