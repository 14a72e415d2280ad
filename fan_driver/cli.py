"""fan-driver serve | show | check: the one place where the parts are built and wired."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Dict, List

from . import check
from .config import UnderlaySpec
from .dataplane.base import PeerMapping
from .errors import FanError
from .model import State, short_id
from .reconcile import UNCLAIMED_GRACE
from .settings import Settings, add_flags
from .store import Store

log = logging.getLogger("fan_driver")


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fan-driver", description="Fan networking for Docker")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="run the network and IPAM plugin")
    add_flags(serve_parser, ("socket", "log_level", "underlay", "encap", "iptables", "state_dir"))
    serve_parser.add_argument(
        "--refuse-when-invalid", action="store_true",
        help="when a setting is invalid, keep answering Docker on --socket with the problem "
             "and its fix instead of exiting (the managed plugin's entry point)")
    serve_parser.add_argument(
        "--unclaimed-grace", type=seconds, default=UNCLAIMED_GRACE, metavar="SECONDS",
        help="after a start, how long pools and addresses handed out before it and not in "
             f"use are kept for Docker to claim (default: {UNCLAIMED_GRACE:.0f}, the time "
             "Docker retries a call)")
    add_flags(sub.add_parser("show", help="one line per fan network"), ("state_dir",))
    check.add_arguments(sub.add_parser(
        "check", help="what this host supports and what the plugin would do here"))
    return parser.parse_args(argv)


def seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings.from_environment(os.environ, vars(args))
    try:
        if args.command == "serve":
            problems = settings.problems()
            store = Store(Path(settings.state_dir))
            if not problems:
                try:
                    state = store.open()
                except FanError as exc:   # before anything touches the kernel
                    problems = [str(exc)]
            if problems and args.refuse_when_invalid:
                return refuse(Path(settings.socket), problems)
            if problems:
                raise FanError("; ".join(problems))
            # Other libraries (pyroute2 logs every netlink message) stay at warnings.
            logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                                format="%(levelname)s %(name)s: %(message)s")
            log.setLevel(settings.log_level.upper())
            asyncio.run(serve(settings, store, state, args.unclaimed_grace))
        elif args.command == "check":
            return check.run(settings, args, peer_mappings())
        else:
            show(Path(settings.state_dir))
    except FanError as exc:
        print(f"fan-driver: {exc}", file=sys.stderr)
        return 1
    return 0


def refuse(socket: Path, problems: List[str]) -> int:
    """serve's guard against invalid settings or an unreadable state: a managed
    plugin whose process exits is reported by `docker plugin enable` only as a
    socket it could not dial, after seconds of retries; answering every request
    with the problem shows it where it is used."""
    from .refusal import serve_refusal

    for problem in problems:
        print(f"fan-driver: {problem}", file=sys.stderr)
    print(f"fan-driver: refusing every request on {socket} until that is fixed",
          file=sys.stderr)
    asyncio.run(serve_refusal(socket, "fan-driver cannot start: " + "; ".join(problems)))
    return 1


def peer_mappings() -> Dict[str, PeerMapping]:
    """One of each peer-mapping mechanism, by name (config.PEER_MAPPINGS)."""
    from .dataplane.mapping.ebpf import EbpfMapping
    from .dataplane.mapping.kernel_fanmap import KernelMapping
    from .dataplane.mapping.routes import RoutesMapping

    return {m.name: m for m in (KernelMapping(), EbpfMapping(), RoutesMapping())}


async def serve(settings: Settings, store: Store, state: State,
                unclaimed_grace: float = UNCLAIMED_GRACE) -> None:
    """Serve Docker on the settings' socket from the state `store` has opened."""
    from pyroute2 import AsyncIPRoute

    from . import host, iptables, server
    from .dataplane import LinuxDataplane
    from .dataplane.mapping import ebpf
    from .dataplane.firewall import IptablesFirewall
    from .faults import Faults
    from .ipam import IpamDriver
    from .ledger import Ledger
    from .network import NetworkDriver
    from .reconcile import Reconciler

    default_underlay = UnderlaySpec.parse(settings.underlay)
    faults = Faults.from_env()   # FAN_CRASH_AT, for crash tests; a no-op when unset
    firewall = IptablesFirewall(iptables.firewall_binary(settings.iptables))
    async with AsyncIPRoute() as ipr:
        features = await host.probe_kernel(ipr, ebpf.supported, ebpf.conntrack_supported)
        log.info("kernel: %s", features.describe())
        ledger = Ledger(store, state)

        def read_facts():
            return host.read_facts(ipr)

        dataplane = LinuxDataplane(ipr, firewall, peer_mappings())
        network = NetworkDriver(ledger, dataplane, features, read_facts, settings.encap,
                                faults=faults)
        ipam = IpamDriver(ledger, read_facts, default_underlay, network=network, faults=faults)
        # Kept to the end: it holds the delayed release of what no one claimed.
        reconciler = Reconciler(ledger, dataplane, faults=faults, grace=unclaimed_grace)
        await reconciler.restore()
        log.info("serving on %s, state in %s", settings.socket, settings.state_dir)
        await server.serve_until_stopped(server.make_app(network, ipam), Path(settings.socket))
        store.close()


def show(state_dir: Path) -> None:
    state = Store(state_dir).load()
    if not state.networks:
        print("no fan networks")
        return
    print(f"{'NETWORK':12}  {'BRIDGE':15}  {'OVERLAY':18}  {'UNDERLAY':18}  {'SLICE':18}  "
          f"{'ENCAP':12}  {'PORT':>5}  {'RECEIVE':9}  {'MTU':>5}  {'ENDPOINTS':>9}")
    for nid, net in sorted(state.networks.items()):
        pool = state.pools[net.pool_id]
        hs = pool.host_slice
        underlay = f"{IPv4Interface((pool.underlay_address, hs.fan.underlay.prefixlen))}"
        print(f"{short_id(nid):12}  {hs.bridge_name:15}  {pool.overlay:18}  {underlay:18}  "
              f"{str(hs.slice):18}  {net.encap + '/' + net.mapping:12}  "
              f"{net.vxlan_port or '-':>5}  {net.receive:9}  "
              f"{net.mtu:>5}  "
              f"{len(net.endpoints):>9}")
