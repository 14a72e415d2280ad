"""Which iptables the firewall runs.

The plugin must write its rules with the same backend as the host's Docker
(legacy x_tables or nf_tables), or its ACCEPT rules never meet Docker's DROP
policy. The managed plugin's image has one directory of iptables links per
backend (see the Dockerfile); there, like Kubernetes' iptables-wrapper, the
backend is the one already holding more rules, unless FAN_IPTABLES names one.
Elsewhere fan-driver runs the host's `iptables`, whichever backend that is.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

PLUGIN_BACKENDS = Path("/usr/local/lib/fan-driver")
BACKENDS = ("nft", "legacy")
HOST_IPTABLES = "iptables"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    name: Optional[str]             # "nft" or "legacy"; None when unknown
    binary: str
    chosen_by: str                  # why that one
    # backend -> how many rules it holds (None: cannot be read)
    rules: Dict[str, Optional[int]] = field(default_factory=dict)


def choose(in_plugin_image: bool, version_text: str, rules: Dict[str, Optional[int]],
           setting: str) -> Tuple[Optional[str], str]:
    """The backend and why: in the plugin image the setting (FAN_IPTABLES), else
    the backend holding more rules; elsewhere whatever `iptables` is."""
    if in_plugin_image:
        if setting in BACKENDS:
            return setting, f"FAN_IPTABLES={setting}"
        legacy, nft = rules.get("legacy") or 0, rules.get("nft") or 0
        return ("legacy" if legacy > nft else "nft"), "the backend holding the host's rules"
    if "legacy" in version_text:
        return "legacy", "the host's iptables"
    if "nf_tables" in version_text:
        return "nft", "the host's iptables"
    return None, "the host's iptables"


def in_plugin_image() -> bool:
    return (PLUGIN_BACKENDS / "iptables-nft").is_dir()


def run(cmd: Sequence[str]) -> Tuple[Optional[int], str]:
    """(exit status, stdout + stderr); (None, why) when it cannot run."""
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    return result.returncode, (result.stdout + result.stderr)


def count_rules(binary: str, *args: str) -> Optional[int]:
    """How many rules `binary args` lists (None: it cannot be read)."""
    if not shutil.which(binary):
        return None
    code, out = run([binary, *args])
    if code != 0:
        return None
    return sum(1 for line in out.splitlines() if line.startswith("-A"))


def select(setting: str) -> Backend:
    """The backend fan-driver writes with here, why, and the rules of each."""
    rules = {b: count_rules(f"iptables-{b}-save") for b in BACKENDS}
    image = in_plugin_image()
    version = "" if image else run([HOST_IPTABLES, "--version"])[1]
    name, why = choose(image, version, rules, setting)
    binary = str(PLUGIN_BACKENDS / f"iptables-{name}" / "iptables") if image else HOST_IPTABLES
    return Backend(name=name, binary=binary, chosen_by=why, rules=rules)


def firewall_binary(setting: str) -> str:
    """What `serve` runs: in the plugin image the selected backend (logged with
    why); elsewhere the host's iptables, without probing."""
    if not in_plugin_image():
        return HOST_IPTABLES
    backend = select(setting)
    log.info("iptables backend %s (%s; host rules: legacy %s, nf_tables %s)", backend.name,
             backend.chosen_by, backend.rules.get("legacy"), backend.rules.get("nft"))
    return backend.binary
