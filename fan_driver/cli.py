"""fan-driver serve | show: the one place where the parts are built and wired."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from ipaddress import IPv4Interface
from pathlib import Path

from .config import DEFAULT_UNDERLAY, ENCAPS, LOG_LEVELS, UnderlaySpec
from .errors import FanError
from .model import short_id
from .store import Store

DEFAULT_SOCKET = "/run/docker/plugins/fan.sock"
DEFAULT_STATE_DIR = "/var/lib/fan-driver"
log = logging.getLogger("fan_driver")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fan-driver", description="Fan networking for Docker")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the network and IPAM plugin")
    serve.add_argument("--socket", default=os.environ.get("FAN_SOCKET", DEFAULT_SOCKET))
    serve.add_argument("--log-level", default=os.environ.get("FAN_LOG_LEVEL", "info"),
                       choices=LOG_LEVELS, type=str.lower)
    serve.add_argument("--default-underlay",
                       default=os.environ.get("FAN_UNDERLAY", DEFAULT_UNDERLAY),
                       help="underlay for networks created without one (default: %(default)s)")
    serve.add_argument("--default-encap", default=os.environ.get("FAN_ENCAP", "auto"),
                       choices=ENCAPS)
    show = sub.add_parser("show", help="one line per fan network")
    for cmd in (serve, show):
        cmd.add_argument("--state-dir",
                         default=os.environ.get("FAN_STATE_DIR", DEFAULT_STATE_DIR))
    from . import check
    check.add_arguments(sub.add_parser(
        "check", help="what this host supports and what the plugin would do here"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "serve":
            # Other libraries (pyroute2 logs every netlink message) stay at warnings.
            logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                                format="%(levelname)s %(name)s: %(message)s")
            log.setLevel(args.log_level.upper())
            asyncio.run(serve(args))
        elif args.command == "check":
            from . import check
            return check.run(args)
        else:
            show(Path(args.state_dir))
    except FanError as exc:
        print(f"fan-driver: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve(args) -> None:
    from pyroute2 import AsyncIPRoute

    from . import host, server
    from .dataplane import Dataplane, ebpf
    from .dataplane.firewall import Firewall
    from .faults import Faults
    from .ipam import IpamDriver
    from .ledger import Ledger
    from .network import NetworkDriver

    default_underlay = UnderlaySpec.parse(args.default_underlay)
    faults = Faults.from_env()   # FAN_CRASH_AT, for crash tests; a no-op when unset
    store = Store(Path(args.state_dir))
    state = store.open()
    async with AsyncIPRoute() as ipr:
        features = await host.probe_kernel(ipr, ebpf.supported)
        log.info("kernel: %s", features.describe())
        ledger = Ledger(store, state)

        def read_facts():
            return host.read_facts(ipr)

        network = NetworkDriver(ledger, Dataplane(ipr, Firewall()), features, read_facts,
                                args.default_encap, faults=faults)
        ipam = IpamDriver(ledger, read_facts, default_underlay, network=network, faults=faults)
        await network.restore()
        log.info("serving on %s, state in %s", args.socket, args.state_dir)
        await server.serve_until_stopped(server.make_app(network, ipam), Path(args.socket))
        store.close()


def show(state_dir: Path) -> None:
    state = Store(state_dir).load()
    if not state.networks:
        print("no fan networks")
        return
    print(f"{'NETWORK':12}  {'BRIDGE':15}  {'OVERLAY':18}  {'UNDERLAY':18}  {'SLICE':18}  "
          f"{'ENCAP':12}  {'MTU':>5}  {'ENDPOINTS':>9}")
    for nid, net in sorted(state.networks.items()):
        pool = state.pools[net.pool_id]
        hs = pool.host_slice
        underlay = f"{IPv4Interface((pool.underlay_address, hs.fan.underlay.prefixlen))}"
        print(f"{short_id(nid):12}  {hs.bridge_name:15}  {pool.overlay:18}  {underlay:18}  "
              f"{str(hs.slice):18}  {net.encap + '/' + net.mapping:12}  {net.mtu:>5}  "
              f"{len(net.endpoints):>9}")
