"""DNAT rules of others in the nat table, read from `iptables -t nat -S`. Pure.

A host port can be taken without a socket: Docker's bridge with
"userland-proxy": false, and other tools, only write DNAT rules. Ours jump
first from PREROUTING and OUTPUT, so publishing such a port would silently
take its traffic away from them. A rule counts when it is reachable from
PREROUTING or OUTPUT and names the destination port itself (--dport,
--dports); a rule matching every port of an address is left out, since
chains like Kubernetes' match the port on the jump before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ..ports import ANY_ADDRESS, PortBinding
from .plan import MARK

ROOTS = ("PREROUTING", "OUTPUT")


@dataclass(frozen=True)
class ForeignDnat:
    """One DNAT rule not fan-driver's: what destinations it takes."""
    chain: str
    text: str                                   # the line as `iptables -S` prints it
    proto: str                                  # tcp | udp | ... ("" for any)
    ports: Tuple[Tuple[int, int], ...]          # inclusive ranges
    ports_negated: bool = False
    destination: Optional[IPv4Network] = None   # None: any address
    destination_negated: bool = False

    def takes(self, binding: PortBinding) -> bool:
        """Whether traffic to the binding's host address and port would meet this rule."""
        if self.proto not in ("", binding.proto):
            return False
        inside = any(low <= binding.host_port <= high for low, high in self.ports)
        if inside == self.ports_negated:
            return False
        if self.destination is None or binding.host_ip == ANY_ADDRESS:
            return True
        return (binding.host_ip in self.destination) != self.destination_negated

    def describe(self) -> str:
        return f"nat chain {self.chain}: {self.text}"


def foreign_dnat(lines: Iterable[str]) -> List[ForeignDnat]:
    """The DNAT rules of `iptables -t nat -S` that are not ours and can be met."""
    rules = [line for line in lines if line.startswith("-A ")]
    reachable = _reachable(rules)
    found = []
    for line in rules:
        if _is_ours(line):
            continue
        words = _split(line)
        if words[1] not in reachable or _target(words) != "DNAT":
            continue
        rule = _parse(words, line)
        if rule is not None:
            found.append(rule)
    return found


def first_taker(binding: PortBinding, rules: Sequence[ForeignDnat]) -> Optional[ForeignDnat]:
    return next((rule for rule in rules if rule.takes(binding)), None)


def _is_ours(line: str) -> bool:
    return f'--comment "{MARK} ' in line


def _split(line: str) -> List[str]:
    """Words of a listed rule; iptables quotes a comment with spaces in it."""
    words, quoted = [], None
    for word in line.split(" "):
        if quoted is not None:
            quoted.append(word)
            if word.endswith('"'):
                words.append(" ".join(quoted)[1:-1])
                quoted = None
        elif word.startswith('"') and not (len(word) > 1 and word.endswith('"')):
            quoted = [word]
        else:
            words.append(word.strip('"') if word.startswith('"') else word)
    return words


def _target(words: Sequence[str]) -> Optional[str]:
    for flag in ("-j", "-g"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return None


def _reachable(rules: Sequence[str]) -> Set[str]:
    """Chains that PREROUTING or OUTPUT jump or go to, directly or not."""
    edges: Dict[str, Set[str]] = {}
    for line in rules:
        words = _split(line)
        target = _target(words)
        if target is not None:
            edges.setdefault(words[1], set()).add(target)
    seen, todo = set(ROOTS), list(ROOTS)
    while todo:
        for chain in edges.get(todo.pop(), ()):
            if chain not in seen:
                seen.add(chain)
                todo.append(chain)
    return seen


def _parse(words: List[str], line: str) -> Optional[ForeignDnat]:
    proto, ports, ports_negated, destination, destination_negated = "", None, False, None, False
    for i, word in enumerate(words):
        negated = i > 0 and words[i - 1] == "!"
        if word == "-p" and i + 1 < len(words):
            # `! -p udp` reads as any protocol, to be safe
            proto = "" if negated or words[i + 1] == "all" else words[i + 1]
        elif word in ("--dport", "--destination-port", "--dports", "--destination-ports") \
                and i + 1 < len(words):
            ports, ports_negated = _port_ranges(words[i + 1]), negated
        elif word in ("-d", "--destination") and i + 1 < len(words):
            try:
                destination = IPv4Network(words[i + 1], strict=False)
            except ValueError:   # a name or IPv6: read as any address, to be safe
                destination = None
            destination_negated = negated
    if not ports:
        return None
    return ForeignDnat(chain=words[1], text=line, proto=proto, ports=ports,
                       ports_negated=ports_negated, destination=destination,
                       destination_negated=destination_negated)


def _port_ranges(text: str) -> Tuple[Tuple[int, int], ...]:
    """`80`, `8000:8010` or multiport's `80,443,8000:8010`; `:N` and `N:` are open ends."""
    ranges = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        try:
            ranges.append((int(low or 0), int(high or 65535) if _ else int(low)))
        except ValueError:
            return ()
    return tuple(ranges)
