"""The fan's iptables rules, in chains of our own and marked with the network.

dockerd sets the FORWARD policy to DROP and sends bridged traffic through
iptables, so a fan bridge needs explicit ACCEPT rules; egress to the world is
source-NATed, overlay-to-overlay traffic is not. Rules are added by argument
list, never through a shell, and only rules carrying our comment are removed.
"""
from __future__ import annotations

import asyncio
import logging
import shlex
from typing import List, Sequence, Tuple

from ..errors import FanError
from .plan import NetworkPlan

log = logging.getLogger(__name__)

FORWARD_CHAIN = "FAN-FORWARD"
NAT_CHAIN = "FAN-POSTROUTING"
# (table, builtin chain, our chain)
CHAINS = (("filter", "FORWARD", FORWARD_CHAIN), ("nat", "POSTROUTING", NAT_CHAIN))

Rule = Tuple[str, str, List[str]]  # table, chain, match and target


def network_rules(plan: NetworkPlan, tunnel_device: str) -> List[Rule]:
    comment = ["-m", "comment", "--comment", plan.mark]
    bridge, slice_, overlay = plan.bridge, str(plan.slice), str(plan.overlay)
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


class Firewall:
    def __init__(self, binary: str = "iptables"):
        self.binary = binary
        # Checking a rule and adding it are two commands: one change at a time.
        self._lock = asyncio.Lock()

    async def _run(self, table: str, *args: str) -> Tuple[int, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.binary, "-w", "-t", table, *args,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            raise FanError(f"{self.binary} is not installed; the fan needs it for "
                           "forwarding and NAT rules (apt-get install iptables)") from None
        out, err = await proc.communicate()
        return proc.returncode, (out + err).decode(errors="replace").strip()

    async def _must(self, table: str, *args: str) -> str:
        code, out = await self._run(table, *args)
        if code != 0:
            raise FanError(f"{self.binary} -t {table} {' '.join(args)} failed: {out}")
        return out

    async def _ensure_chains(self) -> None:
        for table, builtin, chain in CHAINS:
            if (await self._run(table, "-n", "-L", chain))[0] != 0:
                await self._must(table, "-N", chain)
            if (await self._run(table, "-C", builtin, "-j", chain))[0] != 0:
                await self._must(table, "-I", builtin, "1", "-j", chain)

    async def ensure(self, rules: Sequence[Rule]) -> None:
        if await self._complete(rules):
            return
        async with self._lock:
            await self._ensure_chains()
            for table, chain, spec in rules:
                if (await self._run(table, "-C", chain, *spec))[0] != 0:
                    await self._must(table, "-A", chain, *spec)

    async def _complete(self, rules: Sequence[Rule]) -> bool:
        """Whether our jumps and as many marked rules as `rules` are in place:
        one listing per table, in parallel, instead of a check per rule (this
        runs on every container start). It counts, it does not compare: a
        marked rule edited by hand in place is not noticed."""
        tables = sorted({table for table, _, _ in CHAINS})
        listings = dict(zip(tables, await asyncio.gather(
            *(self._run(table, "-S") for table in tables))))
        lines = {table: out.splitlines() for table, (code, out) in listings.items() if code == 0}
        if set(lines) != set(tables):
            return False
        for table, builtin, chain in CHAINS:
            if f"-A {builtin} -j {chain}" not in lines[table]:
                return False
        for table, chain, spec in rules:
            mark = spec[spec.index("--comment") + 1]
            wanted = sum(1 for t, c, sp in rules if (t, c) == (table, chain))
            found = sum(1 for line in lines[table]
                        if line.startswith(f"-A {chain} ") and f'--comment "{mark}"' in line)
            if found != wanted:
                return False
        return True

    async def remove(self, rules: Sequence[Rule]) -> None:
        async with self._lock:
            for table, chain, spec in rules:
                while (await self._run(table, "-D", chain, *spec))[0] == 0:
                    pass
            await self._drop_empty_chains()

    async def drop_empty_chains(self) -> None:
        async with self._lock:
            await self._drop_empty_chains()

    async def _drop_empty_chains(self) -> None:
        for table, builtin, chain in CHAINS:
            code, out = await self._run(table, "-S", chain)
            if code != 0 or any(line.startswith("-A") for line in out.splitlines()):
                continue
            while (await self._run(table, "-D", builtin, "-j", chain))[0] == 0:
                pass
            await self._run(table, "-X", chain)

    async def marked_networks(self) -> set:
        """Short network IDs that have rules in our chains (to find orphans)."""
        found = set()
        for table, _, chain in CHAINS:
            code, out = await self._run(table, "-S", chain)
            for line in out.splitlines() if code == 0 else ():
                if '--comment "fan-driver ' in line:
                    found.add(line.split('--comment "fan-driver ', 1)[1].split('"', 1)[0])
        return found

    async def remove_marked(self, short_network_id: str) -> None:
        """Remove every rule in our chains that carries this network's mark."""
        async with self._lock:
            for table, _, chain in CHAINS:
                code, out = await self._run(table, "-S", chain)
                for line in out.splitlines() if code == 0 else ():
                    if (f'--comment "fan-driver {short_network_id}"' in line
                            and line.startswith("-A")):
                        await self._run(table, "-D", *shlex.split(line[3:]))
            await self._drop_empty_chains()

