"""Reading the host for `fan-driver check`: kernel features, interfaces and
routes, iptables, ip_forward, the state file, what the kernel shows of each
published port and the fan's objects in the kernel (kernel.py), as plain data
(`Probe`) so that judging it is pure."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from pyroute2 import AsyncIPRoute

from .. import host, iptables
from ..config import RECEIVE_PATHS
from ..dataplane import IP_FORWARD
from ..dataplane.mapping import ebpf
from ..dataplane.dnat import first_taker, foreign_dnat
from ..dataplane.firewall import CHAINS
from ..dataplane.plan import MARK
from ..dataplane.proxy import listener_of
from ..errors import FanError
from ..hostfacts import HostFacts, KernelFeatures
from ..model import State, short_id
from ..store import STATE_FILE, Store
from .kernel import KernelView, read_kernel


@dataclass(frozen=True)
class Iptables:
    """What iptables looks like from here."""
    installed: bool = True
    version: str = ""                       # `iptables --version` of the backend in use
    backend: Optional[str] = None           # "nft" or "legacy": the one fan-driver uses
    binary: str = ""                        # the iptables fan-driver runs
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
class PublishedPort:
    """A binding of the state, and what the kernel shows of its host port: the
    plugin is a separate process, so this is how check learns that a restore
    left a port to the process or rule that took it meanwhile."""
    network: str                            # short IDs
    endpoint: str
    binding: str                            # PortBinding.describe()
    loopback: bool                          # served by the proxy alone: no DNAT rule
    dnat: bool                              # our DNAT rule is in the nat table
    listener: Optional[str] = None          # who listens on the host port, if anyone
    foreign: Optional[str] = None           # a DNAT rule not ours forwarding it


@dataclass(frozen=True)
class Probe:
    """Everything read from the host."""
    features: Optional[KernelFeatures]
    facts: Optional[HostFacts]
    iptables: Iptables
    state: StateInfo
    ip_forward: Optional[str]               # "1", "0", or None when unreadable
    ebpf_error: str = ""                    # why the eBPF probe failed
    netlink_error: str = ""                 # reading links or probing devices failed
    ports: Tuple[PublishedPort, ...] = ()
    stored: Optional[State] = None          # the state, when it could be read
    kernel: Optional[KernelView] = None     # the fan's objects in the kernel


async def probe(state_dir: Path, iptables_setting: str = "auto") -> Probe:
    features = facts = None
    netlink_error = ebpf_error = ""

    def ebpf_works() -> bool:   # the probe once, keeping why it failed
        nonlocal ebpf_error
        ebpf_error = ebpf.probe_error() or ""
        return not ebpf_error

    ipt = probe_iptables(iptables_setting)
    kernel = None
    try:
        async with AsyncIPRoute() as ipr:
            facts = await host.read_facts(ipr)
            features = await host.probe_kernel(ipr, ebpf_works, ebpf.conntrack_supported)
            kernel = await read_kernel(ipr, ipt.binary or iptables.HOST_IPTABLES)
    except Exception as exc:   # a report, not a crash: say what failed
        netlink_error = f"{type(exc).__name__}: {exc}"
    stored, state_info = read_state(state_dir)
    return Probe(features=features, facts=facts, iptables=ipt,
                 state=state_info, ip_forward=_read(IP_FORWARD),
                 ebpf_error=ebpf_error, netlink_error=netlink_error,
                 ports=probe_ports(stored, ipt.binary)
                 if stored is not None and ipt.binary and not ipt.error else (),
                 stored=stored, kernel=kernel)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def probe_iptables(iptables_setting: str = "auto") -> Iptables:
    backend = iptables.select(iptables_setting)
    installed = iptables.run([iptables.HOST_IPTABLES, "--version"])[0] is not None or any(
        shutil.which(f"iptables-{b}") for b in iptables.BACKENDS)
    if not installed:
        return Iptables(installed=False, rules=backend.rules)
    found = dict(backend=backend.name, binary=backend.binary, chosen_by=backend.chosen_by,
                 rules=backend.rules)
    code, version = iptables.run([backend.binary, "--version"])
    code, forward = iptables.run([backend.binary, "-w", "-S", "FORWARD"])
    if code != 0:
        return Iptables(version=version.strip(), error=forward.strip() or f"exit status {code}",
                        **found)
    policy = next((line.split()[2] for line in forward.splitlines()
                   if line.startswith("-P FORWARD ")), None)
    chains = {chain: iptables.count_rules(backend.binary, "-w", "-t", table, "-S", chain)
              for table, _, chain in CHAINS}
    return Iptables(version=version.strip(), forward_policy=policy, fan_chains=chains, **found)


def read_state(state_dir: Path) -> Tuple[Optional[State], StateInfo]:
    """The state, read once (None when there is none or it cannot be read),
    and what the report says of it."""
    directory = str(state_dir)
    try:
        state = Store(Path(state_dir)).load()
    except (FanError, OSError) as exc:
        return None, StateInfo(directory=directory, error=str(exc))
    if not (Path(state_dir) / STATE_FILE).exists():
        return None, StateInfo(directory=directory, exists=False)
    lines, overlays = [], []
    for nid, net in sorted(state.networks.items()):
        pool = state.pools.get(net.pool_id)
        if pool is None:
            lines.append(f"{short_id(nid)}: its pool {net.pool_id} is missing")
            continue
        overlays.append(pool.overlay)
        hs = pool.host_slice
        lines.append(f"{short_id(nid)}: bridge {hs.bridge_name}, slice {hs.slice} of "
                     f"{pool.overlay}, {net.encap}/{net.mapping}"
                     f"{f', UDP port {net.vxlan_port}' if net.vxlan_port else ''}, MTU {net.mtu}, "
                     f"{len(net.endpoints)} endpoint(s), receive={net.receive}: "
                     f"{RECEIVE_PATHS[net.receive]}")
    return state, StateInfo(directory=directory, networks=tuple(lines),
                            overlays=tuple(overlays))


def probe_ports(state: State, binary: str) -> Tuple[PublishedPort, ...]:
    """Each published port of the state with its DNAT rule (or none), its
    listener and a DNAT rule of others forwarding it; () when the nat table
    cannot be read (the iptables item says why)."""
    code, out = iptables.run([binary, "-w", "-t", "nat", "-S"])
    if code != 0:
        return ()
    lines = out.splitlines()
    foreign = foreign_dnat(lines)
    found = []
    for nid, net in sorted(state.networks.items()):
        for eid, endpoint in sorted(net.endpoints.items()):
            ours = [line for line in lines if line.startswith("-A ") and " -j DNAT " in line
                    and f'--comment "{MARK} {short_id(nid)} {short_id(eid)}"' in line]
            for b in endpoint.ports:
                rule = first_taker(b, foreign)
                found.append(PublishedPort(
                    network=short_id(nid), endpoint=short_id(eid), binding=b.describe(),
                    loopback=b.loopback, dnat=any(_dnats(line, b) for line in ours),
                    listener=listener_of(b), foreign=rule.describe() if rule else None))
    return tuple(found)


def _dnats(line: str, binding) -> bool:
    """Whether our DNAT rule `line` is the binding's (port_rules writes it)."""
    words = line.split()
    address = [] if binding.host_ip.is_unspecified else ["-d", f"{binding.host_ip}/32"]
    return (words[2:2 + len(address)] == address
            and f"-p {binding.proto} " in line and f" --dport {binding.host_port} " in line)
