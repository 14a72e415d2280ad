"""iptables rules with their packet counters: where a packet was dropped, told
by the rule that counted it rather than guessed from its absence."""
from __future__ import annotations

import re

_COUNTERS = re.compile(r" -c (\d+) \d+")


def rule_packets(saved: str) -> list[tuple[str, int]]:
    """(rule without its counters, packets) for each `-A` line of `iptables -S -v`."""
    rules = []
    for line in saved.splitlines():
        found = _COUNTERS.search(line)
        if line.startswith("-A ") and found:
            rules.append((line[:found.start()] + line[found.end():], int(found.group(1))))
    return rules


def packets_of(rules: list[tuple[str, int]], *parts: str) -> int | None:
    """Packets of the first rule whose line has every one of `parts` (regexes)."""
    for line, packets in rules:
        if all(re.search(part, line) for part in parts):
            return packets
    return None
