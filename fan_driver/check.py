"""fan-driver check: what this host supports and what the plugin would do here.

    fan-driver check              the full report; exit status 1 when a fan
                                  network could not work here
    fan-driver check --settings   only the settings (FAN_UNDERLAY, FAN_ENCAP,
                                  FAN_LOG_LEVEL or their flags)

Reading the host (`probe`: kernel features, interfaces and routes, iptables,
ip_forward, the state file) is kept apart from judging what was read (`judge`)
and printing it (`format_report`); those two are pure.

`--settings --serve-refusal` is the managed plugin's guard (plugin/entrypoint.sh):
with valid settings it returns at once; with an invalid one it keeps the plugin
socket up and answers every Docker request with the problem and its fix. A
managed plugin whose process exits is reported by `docker plugin enable` only
as a socket it could not dial, after seconds of retries.
"""
from __future__ import annotations

import asyncio
import errno as errno_mod
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .config import (DEFAULT_OVERLAY, DEFAULT_UNDERLAY, ENCAPS, LOG_LEVELS, MIN_MTU, HostFacts,
                     UnderlaySpec, parse_cidr, resolve_underlay)
from .dataplane import libbpf
from .errors import FanError
from .fanmap import FanMap, HostSlice
from .host import KernelFeatures

log = logging.getLogger(__name__)

OK, INFO, WARN, FAIL = "ok", "info", "warn", "FAIL"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
# Where the plugin image keeps one directory of iptables links per backend
# (see Dockerfile and plugin/entrypoint.sh).
PLUGIN_BACKENDS = Path("/usr/local/lib/fan-driver")
BACKENDS = ("nft", "legacy")
PLUGIN_SET = ("docker plugin disable -f fan:latest && docker plugin set fan:latest {setting} && "
              "docker plugin enable fan:latest")


# --- what is checked -----------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """The plugin's settings, as `serve` would read them (flags or environment)."""
    underlay: str = DEFAULT_UNDERLAY
    encap: str = "auto"
    log_level: str = "info"
    overlay: str = str(DEFAULT_OVERLAY)
    iptables: str = "auto"      # the managed plugin's FAN_IPTABLES


@dataclass(frozen=True)
class Item:
    section: str
    name: str
    status: str              # OK, INFO, WARN or FAIL
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Iptables:
    """What iptables looks like from here."""
    installed: bool = True
    version: str = ""                       # `iptables --version` of the backend in use
    backend: Optional[str] = None           # "nft" or "legacy": the one fan-driver uses
    chosen_by: str = ""                     # why that one
    # backend -> how many rules it holds (None: cannot be read)
    rules: Dict[str, Optional[int]] = field(default_factory=dict)
    forward_policy: Optional[str] = None
    # FAN-FORWARD / FAN-POSTROUTING -> how many rules (None: no such chain)
    fan_chains: Dict[str, Optional[int]] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class StateInfo:
    directory: str
    networks: Tuple[str, ...] = ()          # one line per network
    overlays: Tuple[str, ...] = ()          # overlays held by fan networks
    exists: bool = True
    error: str = ""


@dataclass(frozen=True)
class Probe:
    """Everything read from the host; plain data, so judging it is pure."""
    features: Optional[KernelFeatures]
    facts: Optional[HostFacts]
    iptables: Iptables
    state: StateInfo
    ip_forward: Optional[str]               # "1", "0", or None when unreadable
    ebpf_error: str = ""                    # why the eBPF probe failed
    netlink_error: str = ""                 # reading links or probing devices failed


# --- settings (pure) ---------------------------------------------------------------

def settings_problems(settings: Settings) -> List[str]:
    """Each invalid setting, with what is wrong and how to fix it."""
    problems = []
    try:
        UnderlaySpec.parse(settings.underlay)
    except FanError as exc:
        problems.append(_setting_problem("FAN_UNDERLAY", "--default-underlay", settings.underlay,
                                         str(exc), f"FAN_UNDERLAY={DEFAULT_UNDERLAY}"))
    if settings.encap not in ENCAPS:
        problems.append(_setting_problem("FAN_ENCAP", "--default-encap", settings.encap,
                                         f"must be one of {', '.join(ENCAPS)}", "FAN_ENCAP=auto"))
    if settings.log_level.lower() not in LOG_LEVELS:
        problems.append(_setting_problem("FAN_LOG_LEVEL", "--log-level", settings.log_level,
                                         f"must be one of {', '.join(LOG_LEVELS)}",
                                         "FAN_LOG_LEVEL=info"))
    if settings.iptables not in ("auto",) + BACKENDS:
        problems.append(_setting_problem("FAN_IPTABLES", "", settings.iptables,
                                         "must be one of auto, nft, legacy", "FAN_IPTABLES=auto"))
    try:
        parse_cidr(settings.overlay, "overlay")
    except FanError as exc:
        problems.append(f"--overlay {settings.overlay!r}: {exc}")
    return problems


def _setting_problem(env: str, flag: str, value: str, why: str, example: str) -> str:
    unmanaged = f"; unmanaged: {flag} or {env}" if flag else ""
    return (f"setting {env}={value!r} is invalid: {why}. Fix: "
            f"{PLUGIN_SET.format(setting=example)} (with the plugin's name from "
            f"`docker plugin ls`){unmanaged}")


# --- judging (pure) ----------------------------------------------------------------

def judge(settings: Settings, probe: Probe) -> List[Item]:
    items: List[Item] = []
    add = lambda *a, **k: items.append(Item(*a, **k))  # noqa: E731

    problems = settings_problems(settings)
    for problem in problems:
        add("settings", "setting", FAIL, problem)
    if not problems:
        add("settings", "settings", OK, f"underlay {settings.underlay}, encap {settings.encap}, "
            f"log level {settings.log_level.lower()}, iptables {settings.iptables}, "
            f"overlay {settings.overlay}")

    valid = not problems
    encap = None
    if probe.features is None:
        add("kernel", "netlink", FAIL, f"cannot probe the kernel: {probe.netlink_error}",
            "fan-driver needs CAP_NET_ADMIN in the host's network namespace "
            "(docker run --net host --cap-add NET_ADMIN ...)")
    else:
        encap = _judge_kernel(settings if valid else None, probe.features, probe.ebpf_error, add)
    underlay = _judge_underlay(settings, probe, add) if valid and probe.facts else None
    if underlay is not None and encap is not None:
        _judge_mtu(underlay, encap, add)
    _judge_firewall(probe.iptables, probe.ip_forward, add)
    _judge_state(probe.state, add)
    return items


def _judge_kernel(settings: Optional[Settings], features: KernelFeatures, ebpf_error: str,
                  add):
    """The kernel's features; the encapsulation a network would get (None
    when there is none, or the settings are invalid)."""
    from .dataplane import choose

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
        encap, mapping = choose(settings.encap, "auto", features)
    except FanError as exc:
        add("plan", "tunnel", FAIL, str(exc))
        return None
    add("plan", "tunnel", OK, f"{encap.name} with {mapping} mapping, device {encap.device}")
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


def _judge_underlay(settings: Settings, probe: Probe, add):
    try:
        underlay = resolve_underlay(UnderlaySpec.parse(settings.underlay), probe.facts)
    except FanError as exc:
        add("plan", "underlay", FAIL, str(exc),
            "give each network --ipam-opt underlay=BLOCK (e.g. 172.30.0.0/16) or set "
            "FAN_UNDERLAY / --default-underlay")
        return None
    add("plan", "underlay", OK, f"{underlay.network} on {underlay.interface}: this host is "
        f"{underlay.address} (MTU {underlay.mtu})")
    overlay = IPv4Network(settings.overlay, strict=False)
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


# --- formatting (pure) ---------------------------------------------------------------

SECTIONS = {"settings": "settings", "kernel": "kernel features",
            "plan": "what a fan network would get here", "firewall": "firewall",
            "state": "state"}


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
    failed = [i for i in items if i.status == FAIL]
    warned = [i for i in items if i.status == WARN]
    if failed:
        lines.append(f"NOT READY: {len(failed)} problem(s) keep fan networks from working "
                     f"here: {', '.join(i.name for i in failed)}")
    else:
        note = f" ({len(warned)} warning(s): {', '.join(i.name for i in warned)})" if warned else ""
        lines.append(f"ready: fan networks can be created here{note}")
    return "\n".join(lines)


def exit_status(items: Sequence[Item]) -> int:
    return 1 if any(i.status == FAIL for i in items) else 0


# --- probing the host ------------------------------------------------------------------

async def probe(state_dir: Path, iptables_setting: str = "auto") -> Probe:
    from pyroute2 import AsyncIPRoute

    from . import host
    from .dataplane import ebpf

    features = facts = None
    netlink_error = ebpf_error = ""

    def ebpf_works() -> bool:   # the probe once, keeping why it failed
        nonlocal ebpf_error
        ebpf_error = ebpf.probe_error() or ""
        return not ebpf_error

    try:
        async with AsyncIPRoute() as ipr:
            facts = await host.read_facts(ipr)
            features = await host.probe_kernel(ipr, ebpf_works)
    except Exception as exc:   # a report, not a crash: say what failed
        netlink_error = f"{type(exc).__name__}: {exc}"
    return Probe(features=features, facts=facts, iptables=probe_iptables(iptables_setting),
                 state=probe_state(state_dir), ip_forward=_read(IP_FORWARD),
                 ebpf_error=ebpf_error, netlink_error=netlink_error)


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _run(cmd: Sequence[str]) -> Tuple[Optional[int], str]:
    """(exit status, stdout + stderr); (None, why) when it cannot run."""
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    return result.returncode, (result.stdout + result.stderr)


def _count_rules(binary: str) -> Optional[int]:
    if not shutil.which(binary):
        return None
    code, out = _run([binary])
    if code != 0:
        return None
    return sum(1 for line in out.splitlines() if line.startswith("-A"))


def choose_backend(in_plugin_image: bool, version_text: str, rules: Dict[str, Optional[int]],
                   forced: str) -> Tuple[Optional[str], str]:
    """The iptables backend fan-driver uses and why: in the plugin image the
    entry point's rule (FAN_IPTABLES, else the backend holding more rules);
    elsewhere whatever `iptables` is."""
    if in_plugin_image:
        if forced in BACKENDS:
            return forced, f"FAN_IPTABLES={forced}"
        legacy, nft = rules.get("legacy") or 0, rules.get("nft") or 0
        return ("legacy" if legacy > nft else "nft"), "the backend holding the host's rules"
    if "legacy" in version_text:
        return "legacy", "the host's iptables"
    if "nf_tables" in version_text:
        return "nft", "the host's iptables"
    return None, "the host's iptables"


def probe_iptables(iptables_setting: str = "auto") -> Iptables:
    from .dataplane.firewall import CHAINS

    rules = {b: _count_rules(f"iptables-{b}-save") for b in BACKENDS}
    in_image = (PLUGIN_BACKENDS / "iptables-nft").is_dir()
    code, version = _run(["iptables", "--version"])
    if code is None and not any(shutil.which(f"iptables-{b}") for b in BACKENDS):
        return Iptables(installed=False, rules=rules)
    backend, why = choose_backend(in_image, version, rules, iptables_setting)
    binary = str(PLUGIN_BACKENDS / f"iptables-{backend}" / "iptables") if in_image else "iptables"
    code, version = _run([binary, "--version"])
    code, forward = _run([binary, "-w", "-S", "FORWARD"])
    if code != 0:
        return Iptables(version=version.strip(), backend=backend, chosen_by=why, rules=rules,
                        error=forward.strip() or f"exit status {code}")
    policy = next((line.split()[2] for line in forward.splitlines()
                   if line.startswith("-P FORWARD ")), None)
    chains: Dict[str, Optional[int]] = {}
    for table, _, chain in CHAINS:
        code, out = _run([binary, "-w", "-t", table, "-S", chain])
        chains[chain] = (sum(1 for line in out.splitlines() if line.startswith("-A"))
                         if code == 0 else None)
    return Iptables(version=version.strip(), backend=backend, chosen_by=why, rules=rules,
                    forward_policy=policy, fan_chains=chains)


def probe_state(state_dir: Path) -> StateInfo:
    from .model import short_id
    from .store import STATE_FILE, Store

    directory = str(state_dir)
    if not (Path(state_dir) / STATE_FILE).exists():
        return StateInfo(directory=directory, exists=False)
    try:
        state = Store(Path(state_dir)).load()
    except (FanError, OSError) as exc:
        return StateInfo(directory=directory, error=str(exc))
    lines, overlays = [], []
    for nid, net in sorted(state.networks.items()):
        pool = state.pools.get(net.pool_id)
        if pool is None:
            lines.append(f"{short_id(nid)}: its pool {net.pool_id} is missing")
            continue
        overlays.append(pool.overlay)
        hs = pool.host_slice
        lines.append(f"{short_id(nid)}: bridge {hs.bridge_name}, slice {hs.slice} of "
                     f"{pool.overlay}, {net.encap}/{net.mapping}, MTU {net.mtu}, "
                     f"{len(net.endpoints)} endpoint(s)")
    return StateInfo(directory=directory, networks=tuple(lines), overlays=tuple(overlays))


# --- the managed plugin's guard ----------------------------------------------------------

class _Refusing:
    """Stands in for a driver: every method it does not define refuses."""

    def __init__(self, message: str):
        self.message = message

    def __getattr__(self, name):
        async def refuse(*_args, **_kwargs):
            raise FanError(self.message)
        return refuse


def refusal_app(message: str):
    """An aiohttp app on Docker's plugin protocol answering every driver call
    with `message` (Activate, capabilities and address spaces still answer, so
    Docker registers the drivers and shows the message on use)."""
    from .ipam import IpamDriver
    from .network import NetworkDriver
    from .server import make_app

    class Network(_Refusing):
        capabilities = NetworkDriver.capabilities

    class Ipam(_Refusing):
        capabilities = IpamDriver.capabilities
        default_address_spaces = IpamDriver.default_address_spaces

    return make_app(Network(message), Ipam(message))


async def serve_refusal(socket_path: Path, message: str) -> None:
    from .server import serve_until_stopped

    await serve_until_stopped(refusal_app(message), socket_path)


# --- command line ------------------------------------------------------------------------

def add_arguments(parser) -> None:
    """`fan-driver check` options; the settings default like `serve`'s."""
    from .cli import DEFAULT_SOCKET, DEFAULT_STATE_DIR

    env = os.environ.get
    parser.add_argument("--default-underlay", default=env("FAN_UNDERLAY", DEFAULT_UNDERLAY),
                        help="underlay setting to check (default: $FAN_UNDERLAY or %(default)s)")
    parser.add_argument("--default-encap", default=env("FAN_ENCAP", "auto"),
                        help="encapsulation setting to check (default: $FAN_ENCAP or auto)")
    parser.add_argument("--log-level", default=env("FAN_LOG_LEVEL", "info"))
    parser.add_argument("--overlay", default=str(DEFAULT_OVERLAY),
                        help="overlay to plan a slice of (default: %(default)s)")
    parser.add_argument("--iptables", default=env("FAN_IPTABLES", "auto"),
                        help="the managed plugin's iptables backend setting: auto, nft or "
                             "legacy (default: $FAN_IPTABLES or auto)")
    parser.add_argument("--state-dir", default=env("FAN_STATE_DIR", DEFAULT_STATE_DIR))
    parser.add_argument("--settings", action="store_true",
                        help="check only the settings; exit status 1 when one is invalid")
    parser.add_argument("--serve-refusal", action="store_true",
                        help="with --settings: when a setting is invalid, keep answering "
                             "Docker on --socket with the problem instead of exiting (the "
                             "managed plugin's entry point)")
    parser.add_argument("--socket", default=env("FAN_SOCKET", DEFAULT_SOCKET))


def run(args) -> int:
    settings = Settings(underlay=args.default_underlay, encap=args.default_encap,
                        log_level=args.log_level, overlay=args.overlay, iptables=args.iptables)
    if args.settings:
        problems = settings_problems(settings)
        for problem in problems:
            print(f"fan-driver: {problem}", file=sys.stderr)
        if problems and args.serve_refusal:
            message = "fan-driver cannot start: " + "; ".join(problems)
            print(f"fan-driver: refusing every request on {args.socket} until the settings "
                  "are fixed", file=sys.stderr)
            asyncio.run(serve_refusal(Path(args.socket), message))
        return 1 if problems else 0
    items = judge(settings, asyncio.run(probe(Path(args.state_dir), settings.iptables)))
    print(format_report(items))
    return exit_status(items)
