"""fan-driver check: what this host supports and what the plugin would do here.

    fan-driver check              the full report; exit status 1 when a fan
                                  network could not work here, or the kernel
                                  does not hold what the state (--state-dir) says
    fan-driver check --settings   only the settings (FAN_UNDERLAY, FAN_ENCAP,
                                  FAN_LOG_LEVEL, FAN_IPTABLES or their flags)
    fan-driver check --kernel-json
                                  the fan's objects in the kernel, as JSON

Reading the host (probe.py and kernel.py, into plain data) is kept apart from
judging what was read (judge.py, and drift.py: the state against the kernel)
and printing it (report.py); those are pure functions, tested without root
(tests/unit/test_check.py, test_drift.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Mapping

from pyroute2 import AsyncIPRoute

from ..config import DEFAULT_OVERLAY
from ..dataplane.base import PeerMapping
from ..iptables import firewall_binary
from ..settings import Settings, add_flags
from .judge import judge, overlay_problems
from .kernel import KernelView, read_kernel
from .probe import probe
from .report import exit_status, format_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`fan-driver check` options; the settings are read like `serve`'s."""
    add_flags(parser, ("underlay", "encap", "log_level", "iptables", "state_dir", "socket"),
              validate=False)   # check reports an invalid value instead of refusing it
    parser.add_argument("--overlay", default=str(DEFAULT_OVERLAY),
                        help="overlay to plan a slice of (default: %(default)s)")
    parser.add_argument("--settings", action="store_true",
                        help="check only the settings; exit status 1 when one is invalid")
    parser.add_argument("--kernel-json", action="store_true",
                        help="print the fan's objects in the kernel as JSON, what the report "
                             "compares with the state, and exit")


def run(settings: Settings, args: argparse.Namespace,
        mappings: Mapping[str, PeerMapping]) -> int:
    """`fan-driver check`; `mappings`: the peer mappings (cli.peer_mappings),
    whose tunnel devices the state's networks use."""
    if args.settings:
        return check_settings(settings, args.overlay)
    if args.kernel_json:
        print(json.dumps(asyncio.run(kernel_view(settings.iptables)).to_json()))
        return 0
    items = judge(settings, asyncio.run(probe(Path(settings.state_dir), settings.iptables)),
                  args.overlay, mappings)
    print(format_report(items))
    return exit_status(items)


async def kernel_view(iptables_setting: str) -> KernelView:
    async with AsyncIPRoute() as ipr:
        return await read_kernel(ipr, firewall_binary(iptables_setting))


def check_settings(settings: Settings, overlay: str) -> int:
    problems = settings.problems() + overlay_problems(overlay)
    for problem in problems:
        print(f"fan-driver: {problem}", file=sys.stderr)
    return 1 if problems else 0
