"""What `fan-driver check` found, and the report printed from it (pure)."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import List, Sequence

OK, INFO, WARN, FAIL = "ok", "info", "warn", "FAIL"
SECTIONS = {"settings": "settings", "kernel": "kernel features",
            "plan": "what a fan network would get here", "firewall": "firewall",
            "state": "state", "ports": "published ports", "drift": "state vs kernel"}


@dataclass(frozen=True)
class Item:
    section: str
    name: str
    status: str              # OK, INFO, WARN or FAIL
    detail: str
    fix: str = ""


def format_report(items: Sequence[Item], columns: int = 100) -> str:
    """One line (wrapped at `columns`) per item under its section's heading, a
    `fix:` line under each that is not ok, and a verdict at the end."""
    lines = ["fan-driver check"]
    width = max((len(i.name) for i in items), default=8)
    indent = " " * (2 + 4 + 2 + width + 2)
    section = None

    def wrapped(head: str, text: str) -> List[str]:
        return textwrap.wrap(text, width=max(columns, len(indent) + 20), initial_indent=head,
                             subsequent_indent=indent + "  ", break_on_hyphens=False,
                             break_long_words=False) or [head]

    for item in items:
        if item.section != section:
            section = item.section
            lines.append(f"{SECTIONS.get(section, section)}:")
        lines += wrapped(f"  {item.status:4}  {item.name:{width}}  ", item.detail)
        if item.fix and item.status != OK:
            lines += wrapped(f"{indent}fix: ", item.fix)
    lines.append(verdict(items))
    return "\n".join(lines)


def verdict(items: Sequence[Item]) -> str:
    failed = [i for i in items if i.status == FAIL and i.section != "drift"]
    warned = [i for i in items if i.status == WARN]
    drift = sum(1 for i in items if i.status == FAIL and i.section == "drift")
    differ = (f"state and kernel differ: {drift} difference(s), each with its fix above"
              if drift else "")
    if failed:
        return (f"NOT READY: {len(failed)} problem(s) keep fan networks from working "
                f"here: {', '.join(i.name for i in failed)}" + (f"; {differ}" if differ else ""))
    note = f" ({len(warned)} warning(s): {', '.join(i.name for i in warned)})" if warned else ""
    return f"ready: fan networks can be created here{note}" + (f"; but {differ}" if differ else "")


def exit_status(items: Sequence[Item]) -> int:
    return 1 if any(i.status == FAIL for i in items) else 0
